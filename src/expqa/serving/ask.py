"""`expqa ask "What is CUPED?" ["Another question" ...] [--file questions.txt]`: answer with the merged model (or
base + --adapter, or --base), streaming. The model is loaded once for all the questions; each is asked on its own
(no history: that is `expqa chat`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expqa.data.dataset import end_of_turn_ids, render

BUILT_BY = {"models/merged": "dvc repro merge", "models/adapter": "dvc repro train", "models/base": "dvc repro base"}


class QuestionFileError(ValueError):
    """A --file that cannot be read as questions; the message names the file (and line) and the fix."""


def missing_model_message(path: Path) -> str:
    stage = BUILT_BY.get(path.as_posix(), "dvc repro")
    return f"{path} does not exist yet: build it with `{stage}` (or `make repro`), or pull it with `dvc pull`"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model / --adapter / --base, shared by `ask` and `chat`."""
    parser.add_argument("--model", type=Path, default=Path("models/merged"), help="merged model directory")
    parser.add_argument("--adapter", type=Path, help="use models/base + this adapter instead of the merged model")
    parser.add_argument("--base", action="store_true", help="answer with the base model (no fine-tuning)")


def chosen_model(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(model directory, adapter or None) as the options chose them; FileNotFoundError says how to build one."""
    model_dir = Path("models/base") if (args.base or args.adapter) else args.model
    for path in [model_dir] + ([args.adapter] if args.adapter else []):
        if not path.exists():
            raise FileNotFoundError(missing_model_message(path))
    return model_dir, args.adapter


def read_questions(path: Path) -> list[str]:
    """One question per line; blank lines and `#` comment lines are skipped."""
    if not path.is_file():
        raise QuestionFileError(
            f"{path}: {'is a directory' if path.is_dir() else 'file not found'}; give a text "
            "file with one question per line"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise QuestionFileError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); save the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    questions = [line.strip() for line in text.splitlines()]
    questions = [q for q in questions if q and not q.startswith("#")]
    if not questions:
        raise QuestionFileError(f"{path}: no questions (every line is blank or a # comment)")
    return questions


def answer(model, tokenizer, question: str, *, max_new_tokens: int, temperature: float, stream=None) -> str:
    import torch

    prompt = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    eos_ids = end_of_turn_ids(tokenizer)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
            streamer=stream,
            **sampling,
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa ask", description=__doc__)
    parser.add_argument("questions", nargs="*", metavar="question")
    parser.add_argument("--file", type=Path, help="more questions, one per line (blank and # lines skipped)")
    add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    args = parser.parse_args(argv)
    try:
        questions = args.questions + (read_questions(args.file) if args.file else [])
        if not questions:
            parser.error("give a question (or several, or --file questions.txt)")
        model_dir, adapter = chosen_model(args)
    except (QuestionFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers import TextStreamer

    from expqa.model.loading import load_for_inference

    model, tokenizer = load_for_inference(model_dir, adapter)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for number, question in enumerate(questions, 1):
        if len(questions) > 1:  # one question prints its answer only, as before: scripts read it whole
            blank_line = "\n" if number > 1 else ""
            print(f"{blank_line}Q{number}: {question}\nA{number}: ", end="", flush=True)
        answer(
            model,
            tokenizer,
            question,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            stream=streamer,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
