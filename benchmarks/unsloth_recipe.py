"""The Unsloth rows of benchmarks/gpu_train.py: Unsloth's own QLoRA recipe on the same checkpoint and conversations.

Run by gpu_train.py (`--one unsloth ARCH BASE DATA`) in a process of its own whose PYTHONPATH holds Unsloth's site
folder (unsloth 2026.10.9 pins trl <= 1.15 and datasets < 5; ours are newer), never the project's.

The recipe is Unsloth's documented one for QLoRA (its Llama 3.x notebooks and "LoRA hyperparameters" guide):
`FastLanguageModel.from_pretrained(load_in_4bit=True)`, `FastLanguageModel.get_peft_model(r=16, lora_alpha=16,
lora_dropout=0, bias="none", all 7 projections, use_gradient_checkpointing="unsloth")`, TRL's `SFTTrainer` as
Unsloth patches it, adamw_8bit, linear schedule, bf16 chosen by Unsloth. Batches:
- `unsloth`: its packing (`packing=True`, TRL's best-fit packing with Unsloth's padding-free attention) into rows of
  the project's token budget (16,384 tokens, one row per micro-batch): the same micro-batch shapes as `params`;
- `unsloth_notebook`: the notebooks' 2 conversations x 4 accumulation steps, padding-free (Unsloth's default).
The conversations are the project's own tokens (expqa.data.dataset.build_sft_dataset: input_ids + labels), so both sides
train on exactly the same tokens, counted the same way (non-padding tokens of each micro-batch, over the same timed
steps after warm-up). If a batching setup fails, the next one is tried and every failure is reported in the row.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipes(name: str, tokens: int, mean_length: float) -> list[tuple[str, dict]]:
    """(label, SFTConfig batching) in the order to try."""
    packed = dict(packing=True, max_length=tokens, per_device_train_batch_size=1, gradient_accumulation_steps=1)
    padding_free = dict(
        packing=False,
        padding_free=True,
        max_length=None,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=max(1, int(tokens / mean_length)),
    )
    notebook = dict(packing=False, max_length=2048, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    if name == "unsloth_notebook":
        return [("notebook: 2 conv x 4, padding-free", notebook)]
    return [
        (f"packed {tokens:,} tokens x 1", packed),
        (f"padding-free {padding_free['per_device_train_batch_size']} conv x 1", padding_free),
    ]


def run_unsloth(name: str, arch: str, base: Path, data: Path) -> dict:
    from common import PEAK_FLOPS, WORK, memory_peaks, param_count, reset_memory, shipped_params, steps

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    reset_memory()
    started = time.time()
    import torch
    import trl
    import unsloth  # first: it patches transformers, peft and trl on import
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from expqa.data.dataset import build_sft_dataset

    import_seconds = time.time() - started
    ours = shipped_params().train
    warm, timed = steps(arch)
    budget = ours.tokens_per_micro_batch
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(base),
        max_seq_length=max(budget, ours.max_seq_length),
        dtype=None,
        load_in_4bit=True,
        use_exact_model_name=True,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=PROJECTIONS,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    # the project's tokens: the plain tokenizer of the checkpoint (Unsloth's may be patched for its templates)
    dataset = build_sft_dataset(data / "train.jsonl", AutoTokenizer.from_pretrained(base), ours.max_seq_length)
    mean_length = sum(len(ids) for ids in dataset["input_ids"]) / len(dataset)
    failures, result = [], None
    for label, batching in recipes(name, budget, mean_length):
        try:
            result = train_once(model, tokenizer, dataset, batching, warm, timed, SFTConfig, SFTTrainer)
            ran = result["ran_with"]
            result["recipe"] = (
                f"Unsloth {unsloth.__version__}: {label} (ran: packing {ran['packing']}, padding-free "
                f"{ran['padding_free']}, {ran['optim']}), r 16 / alpha 16, dropout 0, GC unsloth"
            )
            break
        except Exception as exc:  # the next batching setup; every failure goes into the row
            failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            traceback.print_exc()
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
    if result is None:
        raise RuntimeError("every Unsloth batching setup failed: " + " | ".join(failures))
    tok_s = result.pop("tokens") / result.pop("elapsed")
    flops = 6 * param_count(model.config)  # Unsloth's checkpointing recomputes every layer's forward
    return {
        "variant": name,
        "arch": arch,
        **result,
        "attempt_failures": failures,
        "warm_steps": warm,
        "timed_steps": timed,
        "tok_per_s": round(tok_s),
        "mfu_vs_790T": round(tok_s * flops / PEAK_FLOPS, 3),
        **memory_peaks(),
        "unsloth": unsloth.__version__,
        "trl": trl.__version__,
        "import_seconds": round(import_seconds, 1),
        "work": str(WORK),
    }


def train_once(model, tokenizer, dataset, batching: dict, warm: int, timed: int, SFTConfig, SFTTrainer) -> dict:
    import torch

    from common import count_real_tokens, last_loss, step_timer

    args = SFTConfig(
        output_dir="/tmp/unsloth_bench_out",
        max_steps=warm + timed,
        learning_rate=2e-4,
        warmup_steps=1,
        logging_steps=warm + timed,
        optim="adamw_8bit",
        weight_decay=0.001,
        lr_scheduler_type="linear",
        seed=3407,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        dataset_num_proc=1,
        **batching,
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=args)
    ran = {
        k: getattr(getattr(trainer.args, k, None), "value", getattr(trainer.args, k, None))
        for k in ("packing", "padding_free", "per_device_train_batch_size", "gradient_accumulation_steps", "optim")
    }
    if batching.get("packing") and not ran["packing"]:  # Unsloth turned it off (its reason is in the log)
        raise RuntimeError(f"Unsloth turned packing off: ran with {ran}")
    counted = {"tokens": 0, "first_batch": None}
    original = trainer.training_step

    def training_step(model, inputs, *rest, **kwargs):
        counted["tokens"] += count_real_tokens(inputs)
        if counted["first_batch"] is None:  # what Unsloth's batches look like, for the log
            counted["first_batch"] = {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            print(f"unsloth first micro-batch: {counted['first_batch']}", flush=True)
        return original(model, inputs, *rest, **kwargs)

    trainer.training_step = training_step
    timer = step_timer(warm, timed, lambda: counted["tokens"])
    trainer.add_callback(timer)
    trainer.train()
    if timer.elapsed is None or not timer.tokens:
        raise RuntimeError(
            f"no timed window: stopped at step {trainer.state.global_step} of {warm + timed}, "
            f"{counted['tokens']} tokens counted"
        )
    return {
        "tokens": timer.tokens,
        "elapsed": timer.elapsed,
        "timed_tokens": timer.tokens,
        "first_batch": counted["first_batch"],
        "ran_with": ran,
        "last_loss": last_loss(trainer),
    }
