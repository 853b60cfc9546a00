"""GPU benchmark: the project's `train` code path vs the plain HF recipe, Llama-3.2-3B architecture, same lengths.

    python benchmarks/gpu_train.py [VARIANT ...]     (on a CUDA machine; tables -> benchmarks/results/)
    BENCH_PROFILE=params python benchmarks/gpu_train.py plain params    (+ a kernel table of `params`)

Builds the exact Llama-3.2-3B config with random bf16 weights (throughput and memory do not depend on values),
writes ChatML conversations whose token lengths follow the plain recipe's realistic distribution (lognormal,
median 450, clipped 64..2048, same seed), and trains through `QLoRATrainer` with params.yaml's GPU profile
("params") or that profile with the overrides of a VARIANTS entry. "plain" is `plain_recipe_baseline.py real_pad`
(the seed's recipe). Each variant runs in its own process (so peak memory is its own) on the same card, and the
tables are rewritten after every variant, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import plain_recipe_baseline as plain  # noqa: E402

from expqa.config import load_params  # noqa: E402
from expqa.trainer import QLoRATrainer  # noqa: E402

WORK = Path(os.environ.get("BENCH_DIR", "/tmp/expqa_bench"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))  # tables are rewritten after every variant
WARM, TIMED = 2, 6
N_PARAMS = 3.21e9  # Llama 3.2 3B incl. embeddings (FLOPs per token ~ 6N with gradient checkpointing)
WORDS = ("test effect sample power data rate user metric value group control mean the of and to in is for "
         "variance lift error level design analysis").split()
# variant -> overrides of params.yaml's train section (lora_dropout: of the lora section); "params" = as shipped,
# "params_X" = the shipped profile with one thing changed, "seedbatch16" = the previous default. Rows in results/
# record every option they ran with, so older tables stay readable after the variant names change.
VARIANTS = {"params": {},
            "seedbatch16": dict(tokens_per_micro_batch=0, per_device_train_batch_size=16, fused_lora=False,
                                lora_dropout=0.05, optim="paged_adamw_8bit"),
            "params_dropout005": dict(lora_dropout=0.05), "params_peft": dict(fused_lora=False),
            "params_paged": dict(optim="paged_adamw_8bit"), "params_adamw8bit": dict(optim="adamw_8bit"),
            "params_nogc": dict(gradient_checkpointing=False),
            **{f"params_tok{k}k": dict(tokens_per_micro_batch=k * 1024) for k in (8, 12, 24, 32)}}


def make_base(tokenizer_dir: Path) -> Path:
    """Random Llama-3.2-3B weights + the embedded tokenizer/chat template (ids < 49152 fit the 128k vocab)."""
    from transformers import AutoTokenizer

    plain.make_ckpt()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(plain.CKPT)
    Path(plain.CKPT, "base_info.json").write_text(json.dumps({"name": "llama-3.2-3b-random", "source": "bench",
                                                              "weights_sha256": {}}))
    return Path(plain.CKPT)


def make_data(n: int) -> Path:
    out = WORK / "data"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lengths = plain.real_lengths(n)
    for split, rows in (("train", lengths), ("val", [])):
        with open(out / f"{split}.jsonl", "w") as handle:
            for i, length in enumerate(rows):
                text = " ".join(rng.choice(WORDS) for _ in range(max(1, length - 30)))  # ~30 template tokens
                handle.write(json.dumps({"id": f"b{i}", "source": "bench", "messages": [
                    {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": text}]}) + "\n")
    return out


class StepTimer(TrainerCallback):
    def __init__(self, runner):
        self.runner, self.t0, self.tokens0 = runner, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARM:
            torch.cuda.synchronize()
            self.t0, self.tokens0 = time.time(), self.runner.trainer.real_tokens

        elif state.global_step == WARM + TIMED:
            torch.cuda.synchronize()
            self.elapsed, self.tokens = time.time() - self.t0, self.runner.trainer.real_tokens - self.tokens0


class Profile(TrainerCallback):
    """torch.profiler over two optimizer steps after the timed ones; writes the kernel table (BENCH_PROFILE=variant,..)."""

    def __init__(self, path: Path):
        self.path, self.prof = path, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARM + TIMED:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        elif state.global_step == WARM + TIMED + 2 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
            self.path.write_text(table)
            print(table, flush=True)
            self.prof = None


def run_project(name: str, base: Path, data: Path) -> dict:
    params = load_params(HERE.parent / "params.yaml")
    overrides = dict(VARIANTS[name])
    lora = dataclasses.replace(params.lora, dropout=overrides.pop("lora_dropout", params.lora.dropout))
    profile = name in os.environ.get("BENCH_PROFILE", "").split(",")
    train = dataclasses.replace(params.train, max_steps=WARM + TIMED + (2 if profile else 0), save_steps=10_000,
                                logging_steps=WARM + TIMED, **overrides)  # logs (and syncs) like a real run
    runner = QLoRATrainer(train, lora=lora, quantization=params.quantization, seed=params.base.seed,
                          base_model=base, data_dir=data, checkpoint_dir=WORK / f"ckpt_{name}", metrics_dir=None,
                          log_dir=None)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    runner.setup()
    timer = StepTimer(runner)
    runner.trainer.add_callback(timer)
    if profile:
        runner.trainer.add_callback(Profile(RESULTS / f"gpu_profile_{name}_{time.strftime('%Y-%m-%d')}.txt"))
    runner.trainer.train()
    tok_s = timer.tokens / timer.elapsed
    c = runner.config
    result = {"variant": f"expqa:{name}", "micro_batch": c.per_device_train_batch_size,
              "tokens_per_micro_batch": c.tokens_per_micro_batch, "fused_lora": c.fused_lora, "optim": c.optim,
              "grad_accum": c.gradient_accumulation_steps, "padding_free": c.padding_free,
              "gradient_checkpointing": c.gradient_checkpointing, "lora_dropout": lora.dropout,
              "attn": c.attn_implementation, "liger": c.use_liger_kernel, "tok_per_s": round(tok_s),
              "mfu_vs_790T": round(tok_s * (6 if c.gradient_checkpointing else 4) * N_PARAMS / 790e12, 3),
              "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
              "last_loss": next((e["loss"] for e in reversed(runner.trainer.state.log_history) if "loss" in e), None)}
    return result


def write_tables(out_dir: Path, stamp: str, device: str, results: list[dict]) -> None:
    record = {"date": stamp, "device": device, "torch": torch.__version__, "results": results}
    (out_dir / f"gpu_train_{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# GPU train benchmark, {stamp}, {device}", "",
             "| variant | micro-batch x GA, options | real tok/s | MFU | peak alloc GiB | peak reserved GiB | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:80]} | | | | | |")
            continue
        if r["variant"].startswith("plain"):
            shape = "2 conv x 4 padded, PEFT LoRA, dropout 0.05, paged_adamw_8bit, SDPA"
        else:
            batch = f"{r['tokens_per_micro_batch']:,} tokens" if r.get("tokens_per_micro_batch") else \
                f"{r['micro_batch']} conv"
            shape = f"{batch} x {r['grad_accum']}, {'fused' if r['fused_lora'] else 'PEFT'} LoRA, dropout " \
                f"{r['lora_dropout']}, {r['optim']}" + ("" if r["gradient_checkpointing"] else ", no GC")
        lines.append(f"| {r['variant']} | {shape} | {r['tok_per_s']:,} | {r['mfu_vs_790T']:.0%} | "
                     f"{r['peak_alloc_gib']} | {r['peak_reserved_gib']} | {r['last_loss']} |")
    lines += ["", f"real tok/s: non-padding tokens per second over {TIMED} optimizer steps after {WARM} warm-up steps. "
              "MFU: 6 x 3.21e9 FLOPs per token (with checkpointing; 4x without) / 790 TFLOP/s bf16 dense. Peak memory: "
              "torch.cuda.max_memory_allocated / max_memory_reserved, one process per row. loss: last logged training "
              "loss of random weights on each recipe's own batches, not comparable across rows (packed = unpacked "
              "loss is tested on CPU: tests/test_attention.py)."]
    (out_dir / f"gpu_train_{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = make_base(Path(os.environ.get("TOKENIZER_DIR", HERE.parent / "models" / "base")))
    data = make_data(n=(WARM + TIMED + 2) * 128)  # enough 32k-token packs for every step
    device = torch.cuda.get_device_name(0)
    stamp = time.strftime("%Y-%m-%d_%H%M")
    results = []
    for name in names:  # one process per variant: peak memory is that variant's alone
        proc = subprocess.run([sys.executable, __file__, "--one", name, str(base), str(data)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        else:
            print(proc.stdout[-4000:], flush=True)
            last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
            results.append({"variant": name, "error": f"exit {proc.returncode}: {last}"[:300]})
        print("RESULT", json.dumps(results[-1]), flush=True)
        write_tables(RESULTS, stamp, device, results)


def run_one(name: str, base: Path, data: Path) -> None:
    if name == "plain":
        plain.OUT = str(WORK)  # the plain recipe appends its results there
        plain.run("real_pad")
        row = json.loads((WORK / "results.jsonl").read_text().splitlines()[-1])
        result = {"variant": "plain:real_pad", **{k: row[k] for k in (
            "tok_per_s", "mfu_vs_790T", "peak_alloc_gib", "peak_reserved_gib", "last_loss")}}
    else:
        result = run_project(name, base, data)
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        run_one(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main(sys.argv[1:] or ["plain", "seedbatch16", "params"])
