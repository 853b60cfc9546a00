"""`expqa ask "What is CUPED?" ["Another question" ...] [--file questions.txt]`: answer with the merged model (or
base + --adapter, or --base), streaming. The model is loaded once for all the questions; each is asked on its own
(no history: that is `expqa chat`). The generation options default to params.yaml's generation section (--help
shows them); an answer that reaches --max-new-tokens before its end gets a note on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expqa.serving.inference import (
    add_generation_options,
    add_model_options,
    answer,
    chosen_generation,
    chosen_model,
    cut_note,
)


class QuestionFileError(ValueError):
    """A --file that cannot be read as questions; the message names the file (and line) and the fix."""


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa ask", description=__doc__)
    parser.add_argument("questions", nargs="*", metavar="question")
    parser.add_argument("--file", type=Path, help="more questions, one per line (blank and # lines skipped)")
    add_model_options(parser)
    add_generation_options(parser)
    args = parser.parse_args(argv)
    settings = chosen_generation(parser, args)
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
        result = answer(model, tokenizer, question, settings, stream=streamer)
        if not result["stopped"]:  # stderr: stdout keeps the answers alone for scripts
            print(cut_note(settings.max_new_tokens), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
