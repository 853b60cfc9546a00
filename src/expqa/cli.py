"""`expqa` command line: the pipeline stages plus `ask`, `chat`, `serve`, `llama-serve`, `params`, `plots`, `verify`
and `pull`.

Stage subcommands call the same functions `dvc repro` runs (expqa.pipeline.<stage>, through stages/<stage>.py), so
there is one implementation of each stage, and they work from any folder once expqa is installed.
`expqa <stage> --help` shows its options.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

STAGES = {
    "base": "materialise models/base from params model.*",
    "collect": "import a Stack Exchange Posts.xml dump into ChatML JSONL",
    "generate": "synthetic Q&A from arXiv papers' metadata with a teacher model (generate.enabled)",
    "combine": "validate, deduplicate, weight and split the raw data into data/processed",
    "stats": "dataset statistics and token-length histogram (metrics/data_stats.json)",
    "train": "QLoRA fine-tuning into models/adapter",
    "align": "preference tuning (DPO) of the adapter into models/aligned (align.enabled)",
    "merge": "merge the aligned adapter into the base weights (models/merged), verified",
    "evaluate": "base vs SFT vs SFT + preference report (metrics/eval.json)",
    "export": "GGUF files for llama.cpp / Ollama (models/gguf), verified (metrics/export.json)",
}


def run_stage(name: str, argv: list[str]) -> int:
    return importlib.import_module(f"expqa.pipeline.{name}").main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expqa",
        description="Reproducible QLoRA fine-tuning for "
        "experimentation and statistics Q&A. Stages are normally run by `dvc repro`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in STAGES.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser(
        "ask", help="answer questions (or a file of them) with the fine-tuned model, loaded once", add_help=False
    )
    sub.add_parser("chat", help="interactive chat with the fine-tuned model (history, /reset, /system)", add_help=False)
    sub.add_parser("serve", help="OpenAI-compatible chat-completions endpoint on 127.0.0.1", add_help=False)
    sub.add_parser(
        "llama-serve",
        help="llama.cpp's OpenAI-compatible server on a GGUF file (xllamacpp), e.g. generate's teacher",
        add_help=False,
    )
    sub.add_parser(
        "params", help="every params.yaml key: the value that runs here (profile) and its meaning", add_help=False
    )
    sub.add_parser(
        "plots", help="dvc plots (show, or diff of revisions) + base vs tuned, drawn offline", add_help=False
    )
    sub.add_parser(
        "verify", help="key metrics of this run vs the committed ones, within stated tolerances", add_help=False
    )
    sub.add_parser("pull", help="dvc pull that says which outputs no remote has and what to run", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse's usage errors (2), --help (0)
            raise
        # a known error raised deep in a command (`error: not inside an expqa checkout ...`): its one line, with
        # the status every other known error has (Python's would be 1)
        print(exc.code, file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`expqa params | head`): stop quietly as cat does, instead of Python's traceback (and
        # a second one when it flushes stdout at exit); Python's documented recipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def dispatch(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command in STAGES:
        return run_stage(command, rest)
    if command == "ask":
        from expqa.serving.ask import main as ask_main

        return ask_main(rest)
    if command == "chat":
        from expqa.serving.chat import main as chat_main

        return chat_main(rest)
    if command == "serve":
        from expqa.serving.serve import main as serve_main

        return serve_main(rest)
    if command == "llama-serve":
        from expqa.serving.llama_server import main as llama_serve_main

        return llama_serve_main(rest)
    if command == "plots":
        from expqa.evaluation.plots import main as plots_main

        return plots_main(rest)
    if command == "params":
        from expqa.config.show import main as params_main

        return params_main(rest)
    if command == "verify":
        from expqa.workspace.verify import main as verify_main

        return verify_main(rest)
    if command == "pull":
        from expqa.workspace.pull import main as pull_main

        return pull_main(rest)
    parser.parse_args(argv)  # prints the usage error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
