"""A local checkpoint with the exact architecture of Llama-3.2-3B (or 3.1-8B) and random bf16 weights.

    python benchmarks/random_llama.py --arch llama-3.2-3b --tokenizer models/base --out /tmp/llama-3.2-3b-random

For GPU runs where the real weights cannot be downloaded: speed and memory do not depend on the values. The
tokenizer and chat template come from --tokenizer (e.g. the embedded SmolLM2's ChatML one: its 49,152 ids fit the
128,256-row embedding); the special-token ids in config.json are set to that tokenizer's. The folder is in Hugging
Face layout with a base_info.json, so `model.name` can point at it. Quality numbers of such a model mean nothing.
The architectures and the builder are common.py's (gpu_train.py and fsdp_check.py build the same checkpoints).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ARCHITECTURES, make_random_llama


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
