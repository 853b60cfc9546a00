"""What the benchmark scripts share, so that none of them imports another: the exact Llama architectures and
random checkpoints of them, the realistic conversation lengths and data, the settings and measuring helpers of the GPU
benchmark's processes (gpu_train.py runs each variant in a child; unsloth_recipe.py's rows use the same counting).
Standard library only at import time (the GPU benchmark's driver runs on it alone): torch and transformers are
imported inside the functions that need them.

WORK and DRY are read from the environment (BENCH_DIR, BENCH_DRY_RUN), so a child process sees its driver's; the
driver (gpu_train.py --suite) sets them here, as common.WORK / common.DRY, before it starts any child.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/expqa_bench"))
DRY = os.environ.get("BENCH_DRY_RUN") == "1"  # set by --dry-run for the child processes
PEAK_FLOPS = 790e12  # bf16 dense matmul measured on the H100 and the H200 (788 TFLOP/s, random data)
# (warm-up, timed) optimizer steps; 8B steps take 2.5x longer
STEPS = {"llama-3.2-3b": (3, 6), "llama-3.1-8b": (2, 4)}
DRY_STEPS = (1, 2)
WORDS = (
    "test effect sample power data rate user metric value group control mean the of and to in is for "
    "variance lift error level design analysis"
).split()


# ---------------------------------------------------------------------------------------------------------------
# the exact architectures (one definition: the benchmarks' random checkpoints and the tests' configs)

LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
ARCHITECTURES = {  # from the models' config.json on the Hugging Face Hub
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
    ),
}


def llama_config(arch: str, **values):
    """A transformers LlamaConfig of ``arch`` as on the Hugging Face Hub (vocabulary, context, rope, norms and
    ARCHITECTURES' shape); ``values`` override or add fields (special-token ids, dtype, fewer layers)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **{
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            **ARCHITECTURES[arch],
            **values,
        }
    )


def make_random_llama(arch: str, tokenizer_dir: Path, out: Path, seed: int = 0, **shrink) -> Path:
    """shrink: architecture values to override (e.g. num_hidden_layers=2 for a CPU dry run of a benchmark)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_config(
        arch,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
        **shrink,
    )
    started = time.time()
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "base_info.json").write_text(
        json.dumps({"name": f"{arch}-random", "source": "benchmarks/random_llama.py", "seed": seed}, indent=2) + "\n"
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"random {arch}: {params / 1e9:.2f}B parameters -> {out} in {time.time() - started:.0f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# conversations of realistic lengths


def real_lengths(n, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.6 + math.log(450))
    return x.clamp(64, 2048).long().tolist()


def make_data(n: int, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(out / "train.jsonl", "w") as handle:
        for i, length in enumerate(real_lengths(n)):
            if DRY:
                length = max(8, length // 8)
            text = " ".join(rng.choice(WORDS) for _ in range(max(1, length - 30)))  # ~30 template tokens
            handle.write(
                json.dumps(
                    {
                        "id": f"b{i}",
                        "source": "bench",
                        "messages": [
                            {"role": "user", "content": f"Question {i}?"},
                            {"role": "assistant", "content": text},
                        ],
                    }
                )
                + "\n"
            )
    (out / "val.jsonl").write_text("")
    return out


# ---------------------------------------------------------------------------------------------------------------
# shared by the child processes (imports inside: the driver runs on the standard library alone)


def steps(arch: str) -> tuple[int, int]:
    return DRY_STEPS if DRY else STEPS[arch]


def param_count(config) -> float:
    """Parameters of a Llama config incl. embeddings (and the output head when untied): N in 6N FLOPs per token."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return float(layers * per_layer + embeddings + h)


def memory_peaks() -> dict:
    import torch

    if torch.cuda.is_available():
        return {
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        }
    import resource  # CPU dry run: the process's peak RSS stands in

    return {
        "peak_alloc_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_reserved_gib": None,
    }


def reset_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timer(warm: int, timed: int, tokens_so_far):
    """A TrainerCallback timing optimizer steps warm+1 .. warm+timed; tokens_so_far() = real tokens counted so far."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        elapsed = tokens = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warm:
                sync()
                self.t0, self.tokens0 = time.time(), tokens_so_far()
            elif state.global_step == warm + timed:
                sync()
                self.elapsed, self.tokens = time.time() - self.t0, tokens_so_far() - self.tokens0

    return StepTimer()


def count_real_tokens(inputs) -> int:
    """Non-padding tokens of one micro-batch: the attention mask when there is one, else every token (packed rows)."""
    if inputs.get("attention_mask") is not None:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())


def last_loss(trainer):
    return next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"


def emit(result: dict) -> None:
    print("RESULT", json.dumps(result), flush=True)


def shipped_params():
    """params.yaml's GPU profile; in a dry run shrunk to what a CPU runs (no Liger, no fused AdamW, short rows)."""
    from expqa.config import load_params

    params = load_params(REPO / "params.yaml").resolve(cuda=True)  # the gpu profile: the sections as written
    if DRY:
        params.train = dataclasses.replace(
            params.train,
            use_liger_kernel=False,
            optim="adamw_torch",
            micro_batch="512 tokens",
            max_seq_length=256,
            num_threads=2,
        )
    return params
