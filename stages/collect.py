"""Stage `collect`: import a Stack Exchange Posts.xml dump into ChatML JSONL (params: collect)."""

import argparse
import json
import sys
from pathlib import Path

from expqa.collect import DumpError, collect_stackexchange
from expqa.config import ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa collect", description=__doc__)
    parser.add_argument("--posts", type=Path, required=True, help="Posts.xml of a Stack Exchange data dump")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL")
    parser.add_argument("--report", type=Path, help="where to write the import counts (JSON)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", help="partial override file (YAML or JSON)")
    args = parser.parse_args(argv)
    try:
        c = load_params(args.params, args.config).collect
        counts = collect_stackexchange(args.posts, args.out, tags=c.tags, min_question_score=c.min_question_score,
                                       min_answer_score=c.min_answer_score, min_answer_chars=c.min_answer_chars,
                                       max_answer_chars=c.max_answer_chars, site_url=c.site_url)
    except (ConfigError, DumpError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    print(f"collect: {counts['pairs_written']} question/answer pairs from {args.posts} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
