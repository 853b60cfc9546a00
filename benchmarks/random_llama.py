"""A local checkpoint with the exact architecture of Llama-3.2-3B (or 3.1-8B) and random bf16 weights.

    python benchmarks/random_llama.py --arch llama-3.2-3b --tokenizer models/base --out /tmp/llama-3.2-3b-random

For GPU runs where the real weights cannot be downloaded: speed and memory do not depend on the values. The
tokenizer and chat template come from --tokenizer (e.g. the embedded SmolLM2's ChatML one: its 49,152 ids fit the
128,256-row embedding); the special-token ids in config.json are set to that tokenizer's. The folder is in Hugging
Face layout with a base_info.json, so `model.name` can point at it. Quality numbers of such a model mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

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


def make_random_llama(arch: str, tokenizer_dir: Path, out: Path, seed: int = 0, **shrink) -> Path:
    """shrink: architecture values to override (e.g. num_hidden_layers=2 for a CPU dry run of a benchmark)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    values = {"vocab_size": 128256, **ARCHITECTURES[arch], **shrink}
    config = LlamaConfig(
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
        **values,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama-3.2-3b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer files + chat template")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_random_llama(args.arch, args.tokenizer, args.out, args.seed)


if __name__ == "__main__":
    main()
