"""Stage `collect`: import a Stack Exchange Posts.xml dump into ChatML JSONL (params: collect).

`--list-tags DUMP` instead prints the dump's tags by question count and what collect.tags would keep, so tags
can be chosen from the data; DUMP is a Posts.xml or a site's .7z / .zip archive.
"""

import argparse
import json
import sys
from pathlib import Path

from expqa.collect import DumpError, collect_stackexchange, format_tag_listing, list_tags
from expqa.config import ConfigError, load_params


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="expqa collect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=Path, help="Posts.xml (or .7z / .zip archive) of a Stack Exchange data dump")
    parser.add_argument("--out", type=Path, help="output JSONL")
    parser.add_argument("--report", type=Path, help="where to write the import counts (JSON)")
    parser.add_argument("--list-tags", type=Path, metavar="DUMP", help="print DUMP's tag counts; writes nothing")
    parser.add_argument("--contains", default="", help="with --list-tags: only tags containing this text")
    parser.add_argument("--top", type=int, default=0, help="with --list-tags: at most this many tags (0: all)")
    parser.add_argument("--scratch", type=Path, default=Path("."),
                        help="with --list-tags: folder for the temporary index (default: the current folder)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", help="partial override file (YAML or JSON)")
    args = parser.parse_args(argv)
    if args.list_tags is None and (args.posts is None or args.out is None):
        parser.error("give --posts and --out to import a dump, or --list-tags DUMP to see its tags")
    if args.list_tags is not None and (args.posts or args.out or args.report):
        parser.error("--list-tags only reads the dump; leave out --posts, --out and --report")
    if args.top < 0:
        parser.error(f"--top must be 0 (all) or more, got {args.top}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        c = load_params(args.params, args.config).collect
        params = dict(tags=c.tags, min_question_score=c.min_question_score, min_answer_score=c.min_answer_score,
                      min_answer_chars=c.min_answer_chars, max_answer_chars=c.max_answer_chars, site_url=c.site_url)
        if args.list_tags is not None:
            report = list_tags(args.list_tags, scratch_dir=args.scratch, **params)
            print(format_tag_listing(report, args.list_tags, contains=args.contains, top=args.top,
                                     min_question_score=c.min_question_score, min_answer_score=c.min_answer_score))
            return 0
        counts = collect_stackexchange(args.posts, args.out, **params)
    except (ConfigError, DumpError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    print(f"collect: {counts['pairs_written']} question/answer pairs from {args.posts} -> {args.out}")
    per_tag = counts["questions_per_tag"]
    print("collect: questions per tag: " + ", ".join(f"{tag} {count:,}" for tag, count in per_tag.items()))
    for warning in counts["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if not counts["warnings"] and 0 in per_tag.values():
        print(f"collect: tags without questions are not warned about in a dump of {counts['questions_seen']:,} "
              "questions (too small to tell)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
