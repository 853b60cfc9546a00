"""CPU benchmark: params.yaml's CPU profile vs the CPU profile before issue 13, same data, same model, same call.

    python benchmarks/cpu_train.py                  (after `dvc repro stats`: needs models/base and data/processed)
    python benchmarks/cpu_train.py --rounds 3 --variants old profile profile_1proc

Each variant trains the embedded model on the train split through `QLoRATrainer` (the train stage's code) for
--warm + --steps optimizer steps and is timed over the last --steps, counting real (non-padding) tokens of every
process. Every run is its own process (or its own `torch.distributed.run` group, for several processes), and the
variants alternate round by round (old, profile, old, profile, ...) so that a machine shared with other jobs slows
them alike; the ratios are per round. Variants (`VARIANTS`): the profile as shipped, the profile before issue 13
(`old`: 1 process x 2 threads, padded batches of 4 conversations, SDPA with a padding mask, TRL's LM head), and
the profile with one option changed. `plain_trl` is SFTTrainer with SFTConfig's defaults and the seed's LoRA.
Results -> benchmarks/results/cpu_train_<date>_<time>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD = dict(
    num_processes=1,
    num_threads=2,
    micro_batch="4 conversations",
    padding_free=False,  # padded rows: SDPA with a padding mask (the run plan derives the attention from this)
    lm_head_loss="trl",
    max_seq_length=512,
)
VARIANTS = {
    "profile": {},
    "old": OLD,
    "profile_1proc": dict(num_processes=1),  # one process with the profile's threads
    "profile_2threads": dict(num_processes=1, num_threads=2),
    "profile_padded": dict(padding_free=False),
    "profile_trl_head": dict(lm_head_loss="trl"),
    "plain_trl": None,
}


def train_config(name: str, steps: int, warm: int):
    from expqa.config import load_params

    params = load_params(ROOT / "params.yaml").resolve(cuda=False)
    overrides = dict(VARIANTS[name])
    if (
        params.train.tokens_per_micro_batch == 0
        and overrides.get("num_processes", params.train.num_processes) != params.train.num_processes
    ):
        # keep the conversations per optimizer step when the process count changes
        conversations = (
            params.train.per_device_train_batch_size * params.train.num_processes // overrides["num_processes"]
        )
        overrides.setdefault("micro_batch", f"{conversations} conversations")
    train = dataclasses.replace(
        params.train, max_steps=warm + steps, eval_steps=10**6, save_steps=10**6, logging_steps=10**6, **overrides
    )
    return params, train


def run_one(name: str, steps: int, warm: int, out: Path) -> None:
    """One variant in this process (rank 0 of a torch.distributed.run group writes `out`)."""
    import torch
    from transformers import TrainerCallback

    from expqa.training.distributed import is_main_process, world_size
    from expqa.training.trainer import QLoRATrainer

    params, train = train_config(name, steps, warm)
    runner = QLoRATrainer(
        train,
        lora=params.lora,
        quantization=params.quantization,
        seed=params.base.seed,
        base_model=ROOT / "models" / "base",
        data_dir=ROOT / "data" / "processed",
        checkpoint_dir=Path("/tmp/expqa_cpu_bench") / name,
        metrics_dir=None,
        log_dir=None,
    )
    trainer = runner.setup()
    trainer.eval_dataset = None
    trainer.args.eval_strategy = "no"
    trainer.args.eval_on_start = False

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warm:
                self.t0, self.tokens0 = time.perf_counter(), trainer.real_tokens

        def on_train_end(self, args, state, control, **kwargs):
            self.elapsed = time.perf_counter() - self.t0
            tokens = torch.tensor(float(trainer.real_tokens - self.tokens0))
            if world_size() > 1:
                torch.distributed.all_reduce(tokens)
            self.tokens = float(tokens)

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    if is_main_process():
        out.write_text(
            json.dumps(
                {
                    "variant": name,
                    "tok_per_s": round(timer.tokens / timer.elapsed, 1),
                    "s_per_step": round(timer.elapsed / steps, 2),
                    "tokens_per_step": round(timer.tokens / steps),
                    "processes": world_size(),
                    "threads": torch.get_num_threads(),
                    "settings": {k: getattr(train, k) for k in OLD},
                }
            )
        )


def run_plain_trl(steps: int, warm: int, out: Path) -> None:
    """SFTTrainer on the `messages` column with SFTConfig's defaults and the seed's LoRA (r 16, alpha 32, 0.05)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    from expqa.config import LoRAConfig, load_params
    from expqa.data.chatml import load_chatml_dataset
    from expqa.training.trainer import make_sft_trainer_class

    cpu = load_params(ROOT / "params.yaml").resolve(cuda=False)
    torch.set_num_threads(OLD["num_threads"])
    rows = load_chatml_dataset(ROOT / "data" / "processed" / "train.jsonl")
    data = Dataset.from_dict({"messages": [r["messages"] for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(ROOT / "models" / "base", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "base")
    lora = LoRAConfig(target_modules=cpu.lora.target_modules)
    config = SFTConfig(
        output_dir="/tmp/expqa_cpu_bench/plain",
        max_steps=warm + steps,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_length=OLD["max_seq_length"],
        save_strategy="no",
        seed=cpu.base.seed,
    )
    trainer = make_sft_trainer_class()(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warm:
                self.t0, self.tokens0 = time.perf_counter(), trainer.real_tokens

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    elapsed, tokens = time.perf_counter() - timer.t0, trainer.real_tokens - timer.tokens0
    out.write_text(
        json.dumps(
            {
                "variant": "plain_trl",
                "tok_per_s": round(tokens / elapsed, 1),
                "s_per_step": round(elapsed / steps, 2),
                "tokens_per_step": round(tokens / steps),
                "processes": 1,
                "threads": torch.get_num_threads(),
                "gradient_checkpointing": config.gradient_checkpointing,
            }
        )
    )


def launch(name: str, steps: int, warm: int) -> dict:
    """Run one variant in fresh process(es); return its result."""
    out = Path("/tmp/expqa_cpu_bench") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    script = [
        str(Path(__file__).resolve()),
        "--one",
        name,
        "--steps",
        str(steps),
        "--warm",
        str(warm),
        "--out",
        str(out),
    ]
    processes = 1 if name == "plain_trl" else train_config(name, steps, warm)[1].num_processes
    cmd = [
        sys.executable,
        *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []),
        *script,
    ]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)
    return result


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["old", "profile"], choices=sorted(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warm", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        (run_plain_trl if args.one == "plain_trl" else lambda *a: run_one(args.one, *a))(
            args.steps, args.warm, args.out
        )
        return
    rounds = []
    for index in range(args.rounds):
        before = load_average()
        results = {name: launch(name, args.steps, args.warm) for name in args.variants}
        rounds.append(
            {
                "round": index + 1,
                "load_average_before": before,
                "load_average_after": load_average(),
                "results": results,
            }
        )
    reference = args.variants[0]
    ratios = {
        name: [round(r["results"][name]["tok_per_s"] / r["results"][reference]["tok_per_s"], 2) for r in rounds]
        for name in args.variants[1:]
    }
    cpu = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(" :\t")
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "steps": args.steps,
        "warm": args.warm,
        "rounds": rounds,
        f"ratio_to_{reference}": ratios,
    }
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(exist_ok=True)
    path = results_dir / f"cpu_train_{time.strftime('%Y-%m-%d_%H%M')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({f"ratio_to_{reference}": ratios}, indent=2), f"-> {path}")


if __name__ == "__main__":
    main()
