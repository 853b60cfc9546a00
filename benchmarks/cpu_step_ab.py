"""One training step (forward + backward) of the embedded model on the same conversations, variants alternating in
one process: padded vs packed rows, TRL's vs expqa's LM head, 1 or 2 threads.

    python benchmarks/cpu_step_ab.py '["padded/trl/1","padded/expqa/1","packed/expqa/1","packed/trl/1"]' 2 4 512
    (variants as batch/head/threads, repeats, conversations, max_seq_length)

Prints seconds, real tokens/s and the loss (the same in every variant) per variant and repeat.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from expqa.config import load_params
from expqa.model.lm_head import add_label_lm_head
from expqa.training.trainer import QLoRATrainer

ROOT = Path(__file__).resolve().parents[1]
variants, reps, n_conv, max_len = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
params = load_params(ROOT / "params.yaml").resolve(cuda=False)
train = dataclasses.replace(
    params.train,
    max_steps=1,
    padding_free=False,
    micro_batch=params.train.micro_batch,
    lm_head_loss="trl",
    max_seq_length=max_len,
)
runner = QLoRATrainer(
    train,
    lora=params.lora,
    quantization=params.quantization,
    seed=params.base.seed,
    base_model=ROOT / "models" / "base",
    data_dir=ROOT / "data" / "processed",
    checkpoint_dir="/tmp/expqa_step_ab",
    metrics_dir=None,
    log_dir=None,
)
trainer = runner.setup()
model = trainer.model
base = model.get_base_model()
trl_forward = base.forward
add_label_lm_head(base)
expqa_forward = base.forward
examples = [
    {"input_ids": trainer.train_dataset[i]["input_ids"], "labels": trainer.train_dataset[i]["labels"]}
    for i in range(n_conv)
]
pad = trainer.processing_class.pad_token_id
batches = {
    "padded": DataCollatorForLanguageModeling(pad_token_id=pad)(examples),
    "packed": DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(examples),
}
real = sum(len(e["input_ids"]) for e in examples)
print("real tokens", real, "padded", batches["padded"]["input_ids"].numel(), flush=True)
model.train()
trainer.current_gradient_accumulation_steps = 1
trainer.state.max_steps = 10**9
results = {}
for rep in range(reps):
    for name in variants:
        batch, head, threads = name.split("/")
        base.forward = trl_forward if head == "trl" else expqa_forward
        torch.set_num_threads(int(threads))
        inputs = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batches[batch].items()}
        start = time.perf_counter()
        loss = trainer.training_step(model, inputs)
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        results.setdefault(name, []).append(round(real / elapsed, 1))
        print(f"rep {rep} {name}: {elapsed:.1f} s, {real / elapsed:.1f} real tok/s, loss {float(loss):.5f}", flush=True)
for name, values in results.items():
    print(name, values)
