"""`expqa ask "What is CUPED?"`: answer with the merged model (or base + --adapter, or --base), streaming."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expqa.dataset import end_of_turn_ids, render

BUILT_BY = {"models/merged": "dvc repro merge", "models/adapter": "dvc repro train", "models/base": "dvc repro base"}


def missing_model_message(path: Path) -> str:
    stage = BUILT_BY.get(path.as_posix(), "dvc repro")
    return f"{path} does not exist yet: build it with `{stage}` (or `make repro`), or pull it with `dvc pull`"


def answer(model, tokenizer, question: str, *, max_new_tokens: int, temperature: float, stream=None) -> str:
    import torch

    prompt = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    eos_ids = end_of_turn_ids(tokenizer)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                eos_token_id=eos_ids, pad_token_id=eos_ids[0], streamer=stream, **sampling)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa ask", description=__doc__)
    parser.add_argument("question")
    parser.add_argument("--model", type=Path, default=Path("models/merged"), help="merged model directory")
    parser.add_argument("--adapter", type=Path, help="use models/base + this adapter instead of the merged model")
    parser.add_argument("--base", action="store_true", help="answer with the base model (no fine-tuning)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    args = parser.parse_args(argv)
    model_dir = Path("models/base") if (args.base or args.adapter) else args.model
    for path in [model_dir] + ([args.adapter] if args.adapter else []):
        if not path.exists():
            print(f"error: {missing_model_message(path)}", file=sys.stderr)
            return 2
    from transformers import TextStreamer

    from expqa.model import load_for_inference

    model, tokenizer = load_for_inference(model_dir, args.adapter)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer(model, tokenizer, args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
           stream=streamer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
