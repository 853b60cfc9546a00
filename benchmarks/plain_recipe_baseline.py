# Copied from the team's shared GPU notes (shared/gpu/plain_recipe_baseline.py): the reference "plain recipe"; its
# Llama-3.2-3B config and conversation lengths are common.py's, shared with the other benchmarks.
"""Baseline: plain HF transformers + peft + bitsandbytes QLoRA on the Llama-3.2-3B shape.

Random-initialised weights (no hub access); throughput and memory do not depend on values.
Usage: python plain_recipe_baseline.py VARIANT [VARIANT...]   (results appended to $OUT/results.jsonl)
"""

import json
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from common import llama_config, real_lengths

CKPT = "/tmp/llama32_3b_random"
FLAT = False
OUT = os.environ.get("OUT", "/tmp/out")
WARM, TIMED = 2, 6  # optimizer steps (gpu_train.py sets these, CKPT and N_PARAMS per architecture)
N_PARAMS = 3.21e9  # Llama 3.2 3B incl. embeddings
CUDA = torch.cuda.is_available()  # False only in gpu_train.py's CPU dry run


def cuda_sync():
    if CUDA:
        torch.cuda.synchronize()


def make_ckpt():
    if os.path.exists(os.path.join(CKPT, "config.json")):
        return
    cfg = llama_config("llama-3.2-3b", bos_token_id=128000, eos_token_id=128009, torch_dtype="bfloat16")
    t = time.time()
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    m.save_pretrained(CKPT, safe_serialization=True)
    print(
        f"made random ckpt {sum(p.numel() for p in m.parameters()) / 1e9:.3f}B params in {time.time() - t:.1f}s",
        flush=True,
    )
    del m
    torch.cuda.empty_cache()


class DS(torch.utils.data.Dataset):
    def __init__(self, n, seqlen, lengths=None):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            L = seqlen if lengths is None else int(lengths[i % len(lengths)])
            ids = torch.randint(0, 128000, (L,), generator=g)
            self.items.append(ids)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids = self.items[i]
        return (
            {"input_ids": ids.tolist(), "labels": ids.tolist()} if FLAT else {"input_ids": ids, "labels": ids.clone()}
        )


def collate(batch):
    L = max(b["input_ids"].numel() for b in batch)
    ids = torch.full((len(batch), L), 0, dtype=torch.long)
    lab = torch.full((len(batch), L), -100, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    for i, b in enumerate(batch):
        n = b["input_ids"].numel()
        ids[i, :n] = b["input_ids"]
        lab[i, :n] = b["labels"]
        att[i, :n] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


class Timer(TrainerCallback):
    def __init__(self, warm):
        self.warm, self.t0, self.steps = warm, None, 0

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.warm:
            cuda_sync()
            self.t0 = time.time()
            self.steps = 0
        elif state.global_step > self.warm:
            self.steps += 1

    def on_train_end(self, args, state, control, **kw):
        cuda_sync()
        self.t1 = time.time()


VARIANTS = {
    "real_pad": dict(bs=2, ga=4, seq=2048, gc=True, liger=False, attn="sdpa", real=True),
    "real_flat_sdpa_liger": dict(bs=32, ga=1, seq=2048, gc=True, liger=True, attn="sdpa", real=True, flat=True),
    "real_flat_flex_liger": dict(
        bs=32, ga=1, seq=2048, gc=True, liger=True, attn="flex_attention", real=True, flat=True
    ),
    # the seed's defaults: bs 2, GA 4, seq 2048, grad ckpt, paged_adamw_8bit, nf4 double quant
    "seed": dict(bs=2, ga=4, seq=2048, gc=True, liger=False, attn="sdpa"),
    "seed_liger": dict(bs=2, ga=4, seq=2048, gc=True, liger=True, attn="sdpa"),
    "bs8_liger": dict(bs=8, ga=1, seq=2048, gc=True, liger=True, attn="sdpa"),
    "bs8_noGC_liger": dict(bs=8, ga=1, seq=2048, gc=False, liger=True, attn="sdpa"),
    "seed_eager": dict(bs=2, ga=4, seq=2048, gc=True, liger=False, attn="eager"),
}


def run(name):
    global FLAT
    v = VARIANTS[name]
    FLAT = bool(v.get("flat"))
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        CKPT,
        quantization_config=bnb,
        dtype=torch.bfloat16,
        device_map={"": 0} if CUDA else None,
        attn_implementation=v["attn"],
    )
    load_s = time.time() - t
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=v["gc"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    warm, timed = WARM, TIMED
    steps = warm + timed
    n = steps * v["bs"] * v["ga"]
    lengths = real_lengths(n) if v.get("real") else None
    ds = DS(n, v["seq"], lengths)
    real_tokens = sum(x.numel() for x in ds.items) * timed / steps  # sampler shuffles: expected share
    args = TrainingArguments(
        output_dir=f"/tmp/run_{name}",
        per_device_train_batch_size=v["bs"],
        gradient_accumulation_steps=v["ga"],
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        max_steps=steps,
        bf16=CUDA,
        use_cpu=not CUDA,
        gradient_checkpointing=v["gc"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if v["gc"] else None,
        optim="paged_adamw_8bit",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_liger_kernel=v["liger"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    timer = Timer(warm)
    coll = collate
    if v.get("flat"):
        from transformers import DataCollatorWithFlattening

        coll = DataCollatorWithFlattening()
    tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=coll, callbacks=[timer])
    tr.train()
    el = timer.t1 - timer.t0
    tokens = real_tokens * timer.steps / timed if v.get("real") else timer.steps * v["bs"] * v["ga"] * v["seq"]
    res = dict(
        variant=name,
        **v,
        load_s=round(load_s, 1),
        trainable=trainable,
        timed_steps=timer.steps,
        tok_per_s=round(tokens / el),
        s_per_step=round(el / timer.steps, 3),
        peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if CUDA else None,
        last_loss=tr.state.log_history[-2].get("loss") if len(tr.state.log_history) > 1 else None,
    )
    # FLOP model: forward 2N, act-grad backward 2N, recompute 2N (if GC); N ~ 3.21e9 incl. embeddings/lm_head matmul
    f_per_tok = (6 if v["gc"] else 4) * N_PARAMS
    res["mfu_vs_790T"] = round(res["tok_per_s"] * f_per_tok / 790e12, 3)
    print("RESULT", json.dumps(res), flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")
    del tr, model
    if CUDA:
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import bitsandbytes
    import peft
    import transformers

    print(
        "versions",
        torch.__version__,
        transformers.__version__,
        peft.__version__,
        bitsandbytes.__version__,
        torch.cuda.get_device_name(0),
        flush=True,
    )
    make_ckpt()
    for name in sys.argv[1:]:
        try:
            run(name)
        except Exception as e:
            import traceback

            traceback.print_exc()
            print("FAILED", name, repr(e)[:500], flush=True)
