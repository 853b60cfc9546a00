"""CPU benchmark: the project's CPU training path vs plain TRL defaults, same data, same embedded model.

    python benchmarks/cpu_train.py          (after `dvc repro stats`: needs models/base and data/processed)

Both runs train LoRA r16 on the same train split with 4 conversations per step, timed over 4 optimizer steps
after 2 warm-up steps, and count real (non-padding) tokens. "expqa" is `QLoRATrainer` with params.yaml's CPU
profile; "plain TRL" is `SFTTrainer` on the `messages` column with SFTConfig's defaults (its own tokenisation,
loss on all tokens, fp32, gradient checkpointing) with the seed's LoRA (r 16, alpha 32, dropout 0.05) and the same
max_length. A third run is the CPU profile with PEFT's LoRA forward instead of the fused one.
Results -> benchmarks/results/.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from expqa.config import LoRAConfig, load_params
from expqa.trainer import QLoRATrainer, make_sft_trainer_class

ROOT = Path(__file__).resolve().parents[1]
WARM, TIMED = 2, 4


class StepTimer(TrainerCallback):
    def __init__(self):
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == WARM:
            self.t0, self.tokens0 = time.time(), self.trainer.real_tokens

    def on_train_end(self, args, state, control, **kwargs):
        self.elapsed, self.tokens = time.time() - self.t0, self.trainer.real_tokens - self.tokens0


def run_expqa(params, out: Path, label: str = "expqa (CPU profile)", **overrides) -> dict:
    cpu = params.for_device(False)
    train = dataclasses.replace(cpu.train, max_steps=WARM + TIMED, eval_steps=1000, save_steps=1000, **overrides)
    runner = QLoRATrainer(train, lora=cpu.lora, quantization=cpu.quantization, seed=cpu.base.seed,
                          base_model=ROOT / "models" / "base", data_dir=ROOT / "data" / "processed",
                          checkpoint_dir=out / "ckpt_expqa", metrics_dir=None, log_dir=None)
    trainer = runner.setup()
    trainer.eval_dataset = None
    trainer.args.eval_strategy = "no"
    trainer.args.eval_on_start = False
    timer = StepTimer()
    timer.trainer = trainer
    trainer.add_callback(timer)
    trainer.train()
    return {"run": label, "tok_per_s": round(timer.tokens / timer.elapsed, 1),
            "s_per_step": round(timer.elapsed / TIMED, 2)}


def run_plain_trl(params, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from expqa.chatml import load_chatml_dataset

    cpu = params.for_device(False)
    torch.set_num_threads(cpu.train.num_threads or torch.get_num_threads())
    rows = load_chatml_dataset(ROOT / "data" / "processed" / "train.jsonl")
    data = Dataset.from_dict({"messages": [r["messages"] for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(ROOT / "models" / "base", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "base")
    lora = LoRAConfig(target_modules=cpu.lora.target_modules)  # the seed's LoRA: r 16, alpha 32, dropout 0.05
    config = SFTConfig(output_dir=str(out / "ckpt_plain"), max_steps=WARM + TIMED, use_cpu=True, report_to=[],
                       per_device_train_batch_size=cpu.train.per_device_train_batch_size,
                       gradient_accumulation_steps=cpu.train.gradient_accumulation_steps,
                       max_length=cpu.train.max_seq_length, save_strategy="no", seed=cpu.base.seed)
    trainer = make_sft_trainer_class()(
        model=model, args=config, train_dataset=data, processing_class=tokenizer,
        peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    timer = StepTimer()
    timer.trainer = trainer
    trainer.add_callback(timer)
    trainer.train()
    return {"run": "plain TRL defaults", "tok_per_s": round(timer.tokens / timer.elapsed, 1),
            "s_per_step": round(timer.elapsed / TIMED, 2), "gradient_checkpointing": config.gradient_checkpointing,
            "bf16": config.bf16}


def main() -> None:
    params = load_params(ROOT / "params.yaml")
    out = Path("/tmp/expqa_cpu_bench")
    results = [run_expqa(params, out), run_plain_trl(params, out),
               run_expqa(params, out, "expqa (CPU profile, PEFT's LoRA forward)", fused_lora=False)]
    ratio = results[0]["tok_per_s"] / results[1]["tok_per_s"]
    stamp = time.strftime("%Y-%m-%d")
    record = {"date": stamp, "cpu": Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0]
              .strip(" :\t"), "threads": torch.get_num_threads(), "results": results, "ratio": round(ratio, 2)}
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"cpu_train_{stamp}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
