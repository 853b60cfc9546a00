"""Stage `generate`: synthetic, grounded Q&A from arXiv papers' metadata -> ChatML JSONL (params: generate).

Off by default (generate.enabled: false writes an empty output); `make generate-qa` runs it with the teacher.
"""

import time
from pathlib import Path

from expqa.chatml import DataError
from expqa.files import write_json
from expqa.generate import generate_qa
from expqa.pipeline import stage_main


def arguments(parser):
    parser.add_argument("--papers", type=Path, required=True, help="arXiv metadata, JSON lines (the snapshot's format)")
    parser.add_argument(
        "--base", type=Path, required=True, help="the base stage's model (the teacher when generate.model is 'base')"
    )
    parser.add_argument("--out", type=Path, required=True, help="output ChatML JSONL")
    parser.add_argument("--report", type=Path, required=True, help="the counts (JSON)")


def run(args, params):
    started = time.perf_counter()
    counts = generate_qa(args.papers, args.out, params.generate, base_dir=args.base)
    write_json(args.report, counts)
    if not counts["enabled"]:
        print(
            f"generate: off (generate.enabled: false); {counts['papers_selected']} of {counts['papers_read']} "
            f"papers selected; wrote an empty {args.out}. `make generate-qa` runs the teacher."
        )
        return
    print(
        f"generate: {counts.get('pairs_kept', 0)} of {counts.get('pairs_requested', 0)} pairs kept from "
        f"{counts['papers_selected']} papers in {time.perf_counter() - started:.0f} s -> {args.out}"
    )
    print("generate: dropped " + ", ".join(f"{reason} {n}" for reason, n in counts.get("dropped", {}).items()))


main = stage_main("generate", __doc__, run, arguments=arguments, errors=(DataError, OSError))
