"""Align-stage speed: the project's align path vs TRL's DPOTrainer with its defaults, same model, same pairs.

    python benchmarks/gpu_align.py --results DIR [--epochs 1] [expqa trl_defaults]   (after `dvc repro` made the
                                                                                     base and SFT adapter)

Both continue the SFT adapter (models/adapter) on the base (models/base) over the train split of
data/raw/preferences.jsonl (as the align stage splits it), for --epochs passes, each in its own process so that its
peak memory is its own:
- expqa: the align stage's trainer (expqa.training.align.AlignTrainer) with params.yaml as resolved on this machine
  (GPU: 4-bit base, fused LoRA, FP8 base matmuls where auto picks them, reference log-probs computed once);
- trl_defaults: `DPOTrainer(model=<base in its stored dtype + the SFT adapter, trainable>, args=DPOConfig(output_dir,
  num_train_epochs, report_to none))`, nothing else set: TRL's defaults (batch 8 per device, bf16 where supported,
  the reference by switching to a copy of the adapter on every step).
Counted the same way: preference pairs of the train split x epochs / wall seconds of trainer.train() (the
reference pass included), after the model and data are loaded. Writes DIR/align_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def load_pairs(params):
    from expqa.training.align import preference_data

    return preference_data(
        REPO / "data/raw/preferences.jsonl",
        REPO / "data/eval/critical_questions.jsonl",
        REPO / "data/processed",
        params,
    )


def variant_expqa(epochs: float, work: Path) -> dict:
    import dataclasses

    from expqa.config import load_params
    from expqa.training.align import AlignTrainer

    params = load_params(REPO / "params.yaml").resolve()
    params = dataclasses.replace(params, align=dataclasses.replace(params.align, num_train_epochs=epochs))
    data = load_pairs(params)
    data["held_out"] = []  # speed of training only
    trainer = AlignTrainer(
        params,
        base_model=REPO / "models/base",
        adapter=REPO / "models/adapter",
        preferences=REPO / "data/raw/preferences.jsonl",
        questions=REPO / "data/eval/critical_questions.jsonl",
        data_dir=REPO / "data/processed",
        checkpoint_dir=work / "ckpt",
        metrics_dir=work / "metrics",
        log_dir=work / "logs",
    )
    started = time.perf_counter()
    metrics = trainer.train(data)  # includes model loading: subtracted below
    seconds = time.perf_counter() - started
    return {"pairs": len(data["train"]), "seconds_with_loading": seconds, "train_runtime": metrics["train_runtime"],
            "train_loss": metrics["train_loss"], "plan": trainer.plan.describe()}  # fmt: skip


def variant_trl_defaults(epochs: float, work: Path) -> dict:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from expqa.config import load_params
    from expqa.data.dataset import TEMPLATE_KWARGS
    from expqa.data.preferences import as_conversations

    params = load_params(REPO / "params.yaml").resolve()
    data = load_pairs(params)
    model = AutoModelForCausalLM.from_pretrained(REPO / "models/base", device_map={"": 0})
    model = PeftModel.from_pretrained(model, REPO / "models/adapter", is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/adapter")
    args = DPOConfig(output_dir=str(work / "trl"), num_train_epochs=epochs, report_to="none", save_strategy="no")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(as_conversations(data["train"], TEMPLATE_KWARGS)),
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"pairs": len(data["train"]), "train_runtime": seconds, "trainer_runtime": result.metrics["train_runtime"],
            "train_loss": sum(losses) / len(losses) if losses else None, "bf16": args.bf16,
            "batch": args.per_device_train_batch_size}  # fmt: skip


def child(name: str, epochs: float, out: Path) -> None:
    import torch

    work = Path(f"/tmp/align_bench_{name}")
    torch.cuda.reset_peak_memory_stats()
    result = {"variant_expqa": variant_expqa, "variant_trl_defaults": variant_trl_defaults}[f"variant_{name}"](
        epochs, work
    )
    result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["pairs_per_second"] = result["pairs"] * epochs / result["train_runtime"]
    result["device"] = torch.cuda.get_device_name(0)
    out.write_text(json.dumps(result, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["expqa", "trl_defaults"])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.epochs, args.results / f"align_{args.child}.json")
        return 0
    results = {}
    for name in args.variants:
        log = args.results / f"align_{name}.log"
        with open(log, "w") as handle:
            code = subprocess.call(
                [sys.executable, __file__, "--child", name, "--results", str(args.results)]
                + ["--epochs", str(args.epochs)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
        path = args.results / f"align_{name}.json"
        results[name] = (
            json.loads(path.read_text()) if code == 0 and path.exists() else {"error": f"exit {code}, {log}"}
        )
        print(name, json.dumps(results[name]), flush=True)
    (args.results / "align_speed.json").write_text(json.dumps(results, indent=2))
    rows = ["| variant | pairs/s | peak GiB | train loss |", "|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | {r['error']} | | |")
        else:
            rows.append(
                f"| {name} | {r['pairs_per_second']:.1f} | {r['peak_allocated_gib']:.2f} | {r['train_loss']:.4f} |"
            )
    if all("pairs_per_second" in r for r in results.values()) and len(results) == 2:
        ratio = results["expqa"]["pairs_per_second"] / results["trl_defaults"]["pairs_per_second"]
        rows.append(f"\nexpqa / trl_defaults: {ratio:.2f}x")
    (args.results / "align_speed.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
