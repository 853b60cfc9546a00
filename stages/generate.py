"""Stage `generate`: synthetic, grounded Q&A from arXiv papers' metadata -> ChatML JSONL (params: generate).

Off by default (generate.enabled: false writes an empty output); `make generate-qa` runs it with the teacher.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from expqa.chatml import DataError
from expqa.config import ConfigError, load_params
from expqa.generate import generate_qa


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--papers", type=Path, required=True, help="arXiv metadata, JSON lines (the snapshot's format)")
    parser.add_argument("--base", type=Path, required=True, help="the base stage's model (the teacher when "
                        "generate.model is 'base')")
    parser.add_argument("--out", type=Path, required=True, help="output ChatML JSONL")
    parser.add_argument("--report", type=Path, help="where to write the counts (JSON)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", help="partial override file (YAML or JSON)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        g = load_params(args.params, args.config).generate
        counts = generate_qa(args.papers, args.out, base_dir=args.base, enabled=g.enabled, model=g.model,
                             categories=g.categories, keywords=g.keywords, max_papers=g.max_papers,
                             pairs_per_paper=g.pairs_per_paper, max_new_tokens=g.max_new_tokens,
                             batch_size=g.batch_size, min_answer_words=g.min_answer_words,
                             min_distinct_share=g.min_distinct_share, max_copied_words=g.max_copied_words,
                             min_grounding=g.min_grounding)
    except (ConfigError, DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    if not counts["enabled"]:
        print(f"generate: off (generate.enabled: false); {counts['papers_selected']} of {counts['papers_read']} "
              f"papers selected; wrote an empty {args.out}. `make generate-qa` runs the teacher.")
        return 0
    print(f"generate: {counts.get('pairs_kept', 0)} of {counts.get('pairs_requested', 0)} pairs kept from "
          f"{counts['papers_selected']} papers in {time.perf_counter() - started:.0f} s -> {args.out}")
    print("generate: dropped " + ", ".join(f"{reason} {n}" for reason, n in counts.get("dropped", {}).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
