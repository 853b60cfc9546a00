"""FSDP-QLoRA at world size 1 next to the single-process path, on one GPU (issue 17), in about 3 minutes.

    .venv/bin/python benchmarks/fsdp_check.py RESULTS_DIR [--base /tmp/llama-3.2-3b-random] [--steps 20]

The Llama-3.2-3B architecture with random weights (benchmarks/common.py's make_random_llama, from --tokenizer when
--base is missing) and conversations of realistic lengths (benchmarks/common.make_data) go through `QLoRATrainer`
with params.yaml's GPU profile (4-bit nf4 stored in bf16, token-budget packing, varlen attention, fused LoRA, Liger,
fused AdamW, checkpointing), --steps optimizer steps, each run in its own processes:
1. fsdp:   `torchrun --standalone --nproc_per_node=1` + train.distributed: fsdp (FSDP2 through the Trainer), then a
           fully_shard check of one bf16-stored Linear4bit (output before == after sharding, bitsandbytes #1945);
2. single: the same params with train.distributed: ddp and one process (no launcher), the figure FSDP is compared to;
3. merge:  expqa.model.merge.merge_adapter on the FSDP adapter (merge and evaluate are unchanged by FSDP).
Each run records per-step losses, the val loss before and after training (before: the same base weights, so the two
modes must agree), real tokens/s over the steps after the first quarter, and peak GPU memory. RESULTS_DIR gets
fsdp_check.json, fsdp_check.md and a log per phase (written after every phase); adapters and the merged model stay
in --work. Without a GPU (the CPU profile, a tiny model) the same phases run, for testing this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUTS = {"fsdp": 240, "single": 180, "merge": 150}  # seconds; a phase that runs over is recorded as failed


# ---------------------------------------------------------------------------------------------------------------
# one training run (a child process)


def training_run(mode: str, base: Path, data: Path, work: Path, steps: int, result_file: Path) -> None:
    import torch
    from transformers import TrainerCallback

    from expqa.config import load_params
    from expqa.training.distributed import sharded_weights, world_size
    from expqa.training.trainer import QLoRATrainer

    cuda = torch.cuda.is_available()
    params = load_params(REPO / "params.yaml").resolve(cuda=cuda)
    liger = params.train.use_liger_kernel and importlib.util.find_spec("liger_kernel") is not None
    train = dataclasses.replace(
        params.train,
        max_steps=steps,
        eval_steps=steps,
        save_steps=steps,
        logging_steps=1,
        num_processes=1,
        distributed="fsdp" if mode == "fsdp" else "ddp",
        use_liger_kernel=liger,
    )
    warm = max(1, steps // 4)

    class Timer(TrainerCallback):
        t0 = tokens0 = elapsed = tokens = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warm, steps):
                if cuda:
                    torch.cuda.synchronize()
                if state.global_step == warm:
                    self.t0, self.tokens0 = time.time(), runner.trainer.real_tokens
                else:
                    self.elapsed, self.tokens = time.time() - self.t0, runner.trainer.real_tokens - self.tokens0

    started = time.time()
    runner = QLoRATrainer(
        train,
        lora=params.lora,
        quantization=params.quantization,
        seed=params.base.seed,
        base_model=base,
        data_dir=data,
        checkpoint_dir=work / f"ckpt_{mode}",
        metrics_dir=None,
        log_dir=None,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = Timer()
    runner.setup = _with_callback(runner.setup, timer)
    metrics = runner.train()
    runner.save_model(work / f"adapter_{mode}")
    trainer = runner.trainer
    held, total = sharded_weights(trainer.model)
    result = {
        "mode": mode,
        "world_size": world_size(),
        "steps": trainer.state.global_step,
        "fsdp": bool(trainer.is_fsdp_enabled),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "tok_per_s": round(timer.tokens * world_size() / timer.elapsed) if timer.elapsed else None,
        "timed_steps": f"{warm + 1}-{steps}",
        "real_tokens_per_second_whole_run": round(metrics["real_tokens_per_second"]),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "weights_held_mib": round(held / 2**20, 1),
        "weights_total_mib": round(total / 2**20, 1),
        "eval_loss_before": metrics.get("eval_loss_before_training"),
        "eval_loss_after": metrics.get("eval_loss"),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "liger": liger,
        "options": {
            k: getattr(train, k)
            for k in (
                "micro_batch",
                "gradient_accumulation_steps",
                "gradient_checkpointing",
                "fused_lora",
                "padding_free",
                "optim",
                "bf16",
            )
        },
        "adapter": str(work / f"adapter_{mode}"),
        "wall_s": round(time.time() - started, 1),
    }
    if mode == "fsdp":
        result["linear4bit_fully_shard"] = linear4bit_fully_shard_check("cuda" if cuda else "cpu")
    if int(os.environ.get("RANK", "0")) == 0:
        result_file.write_text(json.dumps(result, indent=2) + "\n")


def _with_callback(setup, callback):
    def wrapped():
        trainer = setup()
        trainer.add_callback(callback)
        return trainer

    return wrapped


def linear4bit_fully_shard_check(device: str) -> dict:
    """One Linear4bit of the 3B MLP shape, packed nf4 stored in bf16: its output before and after FSDP2's
    fully_shard (bf16 params, fp32 reduce, as training uses). bitsandbytes #1945 reports that FSDP2 rewrites the
    ~0.1 % of packed bytes that read as bf16 NaNs; here the outputs must be identical."""
    import bitsandbytes as bnb
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        3072, 8192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=torch.bfloat16
    )
    layer.weight = bnb.nn.Params4bit(
        torch.randn(8192, 3072, dtype=torch.bfloat16) * 0.02,
        requires_grad=False,
        quant_type="nf4",
        quant_storage=torch.bfloat16,
        module=layer,
    )
    layer = layer.to(device)  # quantizes
    layer.support_avx512bf16_for_cpu = False
    nan_patterns = int(torch.isnan(layer.weight.data).sum())
    x = torch.randn(64, 3072, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        before = layer(x)
    wrapper = torch.nn.Sequential(layer)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(layer, mp_policy=policy)
    fully_shard(wrapper, mp_policy=policy)
    with torch.no_grad():
        after = wrapper(x)
    diff = (after.float() - before.float()).abs().max().item()
    return {"packed_values_that_are_bf16_nan": nan_patterns, "max_abs_diff": diff, "identical": diff == 0.0}


def merge_run(base: Path, adapter: Path, work: Path, result_file: Path) -> None:
    from expqa.model.merge import merge_adapter

    started = time.time()
    report = merge_adapter(base, adapter, work / "merged")
    report["wall_s"] = round(time.time() - started, 1)
    result_file.write_text(json.dumps(report, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# the driver


def make_inputs(base: Path, tokenizer: Path | None, work: Path, steps: int, cuda: bool) -> Path:
    sys.path.insert(0, str(HERE))
    import common

    if not (base / "config.json").exists():
        if tokenizer is None:
            raise SystemExit(f"{base} does not exist; give --tokenizer DIR to build it")
        if cuda:
            common.make_random_llama("llama-3.2-3b", tokenizer, base)
        else:  # CPU: a tiny Llama (tests/helpers.py), for checking this script
            sys.path.insert(0, str(REPO / "tests"))
            from transformers import AutoTokenizer

            from helpers import make_tiny_llama

            base.mkdir(parents=True)
            make_tiny_llama(base, AutoTokenizer.from_pretrained(tokenizer))
    common.WORK = work
    data = common.make_data(48 * steps + 32, work / "data")  # realistic lengths, 16k-token packs for every step
    rows = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(rows[:-32]) + "\n")
    (data / "val.jsonl").write_text("\n".join(rows[-32:]) + "\n")
    return data


def run_phase(name: str, cmd: list[str], results: Path, env: dict, timeout: float) -> tuple[dict | None, str]:
    result_file = results / f"{name}.json"
    result_file.unlink(missing_ok=True)
    started = time.time()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with open(results / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.time() - started
    if result_file.exists():
        print(f"== {name}: done in {seconds:.0f} s", flush=True)
        return json.loads(result_file.read_text()), ""
    tail = (results / f"{name}.log").read_text(errors="replace").splitlines()[-40:]
    print(f"== {name}: FAILED ({code}) after {seconds:.0f} s; last lines of {name}.log:", *tail, sep="\n", flush=True)
    return None, f"exit {code}: " + next((line for line in reversed(tail) if line.strip()), "")[:300]


def table(record: dict) -> str:
    lines = [
        f"# FSDP-QLoRA at world size 1 vs one process, {record['date']}, {record['device']}",
        "",
        "| run | launch | FSDP | real tok/s (timed steps) | peak alloc GiB | peak reserved GiB | weights held MiB "
        "| val loss before -> after | last train loss | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, launch in (("single", "python, 1 process (ddp path)"), ("fsdp", "torchrun --nproc_per_node=1")):
        r = record["runs"].get(name)
        if r is None:
            error = record["errors"].get(name)
            lines.append(f"| {name} | {launch} | {'error: ' + error if error else 'not run'} | | | | | | | |")
            continue
        speed = f"{r['tok_per_s']:,}" if r["tok_per_s"] else "?"
        lines.append(
            f"| {name} | {launch} | {'yes' if r['fsdp'] else 'no'} | {speed} ({r['timed_steps']}) "
            f"| {r['peak_alloc_gib']} | {r['peak_reserved_gib']} | {r['weights_held_mib']} of "
            f"{r['weights_total_mib']} | {_f(r['eval_loss_before'])} -> {_f(r['eval_loss_after'])} | "
            f"{_f(r['losses'][-1] if r['losses'] else None)} | {r['wall_s']} |"
        )
    lines.append("")
    for line in record["notes"]:
        lines.append(f"- {line}")
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "?" if value is None else f"{value:.4f}"


def notes(record: dict) -> list[str]:
    runs, out = record["runs"], []
    if "fsdp" in runs and "single" in runs:
        f, s = runs["fsdp"], runs["single"]
        if f["eval_loss_before"] is not None and s["eval_loss_before"] is not None:
            out.append(
                f"val loss of the untrained base: fsdp {f['eval_loss_before']:.5f}, single "
                f"{s['eval_loss_before']:.5f} (|diff| {abs(f['eval_loss_before'] - s['eval_loss_before']):.2e}; "
                "the same 4-bit weights)"
            )
        steps = min(len(f["losses"]), len(s["losses"]))
        if steps:
            worst = max(abs(a - b) for a, b in zip(f["losses"][:steps], s["losses"][:steps], strict=True))
            out.append(f"train loss per step, max |fsdp - single| over {steps} logged steps: {worst:.4f}")
        if f["tok_per_s"] and s["tok_per_s"]:
            out.append(
                f"fsdp / single speed: {f['tok_per_s'] / s['tok_per_s']:.2f}x; peak alloc "
                f"{f['peak_alloc_gib']} vs {s['peak_alloc_gib']} GiB"
            )
    check = runs.get("fsdp", {}).get("linear4bit_fully_shard")
    if check:
        out.append(
            f"Linear4bit 3072->8192 (nf4 in bf16, {check['packed_values_that_are_bf16_nan']} packed values read "
            f"as bf16 NaN) before/after fully_shard: max |diff| {check['max_abs_diff']} "
            f"({'identical' if check['identical'] else 'DIFFERENT'})"
        )
    merge = record.get("merge")
    if merge:
        out.append(
            f"merge of the FSDP adapter: passed={merge.get('passed')} on {merge.get('device')}, saved "
            f"{merge.get('saved_dtype')}, max |logit diff| {merge.get('max_abs_logit_diff')} (tolerance "
            f"{merge.get('tolerance')}), {merge['wall_s']} s"
        )
    for name, error in record["errors"].items():
        out.append(f"{name} failed: {error}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--base", type=Path, default=Path("/tmp/llama-3.2-3b-random"))
    parser.add_argument("--tokenizer", type=Path, help="to build --base when it is missing (e.g. models/base)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/expqa_fsdp_check"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--phases", default="fsdp,single,merge")
    parser.add_argument("--timeout-factor", type=float, default=1.0, help="scales every phase's time limit")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in ("ckpt_fsdp", "ckpt_single", "adapter_fsdp", "adapter_single", "merged"):  # a rerun would resume
        shutil.rmtree(args.work / name, ignore_errors=True)
    data = make_inputs(args.base, args.tokenizer, args.work, args.steps, cuda)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    common = [
        "--base",
        str(args.base),
        "--data",
        str(data),
        "--work",
        str(args.work),
        "--steps",
        str(args.steps),
        "--out",
        "",
    ]
    commands = {
        "fsdp": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            __file__,
            "--worker",
            "fsdp",
            *common,
        ],
        "single": [sys.executable, __file__, "--worker", "single", *common],
        "merge": [sys.executable, __file__, "--worker", "merge", *common],
    }
    # the device's name comes from the runs: a CUDA context here would hold GPU memory during all of them
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": "cuda" if cuda else "cpu",
        "versions": _versions(),
        "steps": args.steps,
        "base": str(args.base),
        "runs": {},
        "errors": {},
        "merge": None,
    }
    for name in args.phases.split(","):
        cmd = list(commands[name])
        cmd[-1] = str(args.results / f"{name}.json")
        if name == "merge" and "fsdp" not in record["runs"]:
            record["errors"]["merge"] = "skipped: no FSDP adapter"
            continue
        result, error = run_phase(name, cmd, args.results, env, TIMEOUTS[name] * args.timeout_factor)
        if result is None:
            record["errors"][name] = error
        elif name == "merge":
            record["merge"] = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        else:
            record["runs"][name] = result
            record["device"] = result["device"]
        record["notes"] = notes(record)
        (args.results / "fsdp_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        (args.results / "fsdp_check.md").write_text(table(record))
    print(table(record), flush=True)
    return 0 if not record["errors"] else 1


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "liger-kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["fsdp", "single", "merge"])
    for name in ("--base", "--data", "--work", "--out"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)
    if args.worker == "merge":
        merge_run(args.base, args.work / "adapter_fsdp", args.work, args.out)
    else:
        training_run(args.worker, args.base, args.data, args.work, args.steps, args.out)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[1:])
    else:
        sys.exit(main())
