"""Stage `collect`: import a Stack Exchange Posts.xml dump into ChatML JSONL (params: collect).

`expqa collect --list-tags DUMP` instead prints the dump's tags by question count and what collect.tags would keep,
so tags can be chosen from the data; DUMP is a Posts.xml or a site's .7z / .zip archive.
"""

import sys
from pathlib import Path

from expqa.data.stackexchange import DumpError, collect_stackexchange, format_tag_listing, list_tags
from expqa.files import write_json
from expqa.pipeline import stage_main


def arguments(parser):
    parser.add_argument("--posts", type=Path, help="Posts.xml (or .7z / .zip archive) of a Stack Exchange data dump")
    parser.add_argument("--out", type=Path, help="output JSONL")
    parser.add_argument("--report", type=Path, help="the import counts (JSON)")
    parser.add_argument("--list-tags", type=Path, metavar="DUMP", help="print DUMP's tag counts; writes nothing")
    parser.add_argument("--contains", default="", help="with --list-tags: only tags containing this text")
    parser.add_argument("--top", type=int, default=0, help="with --list-tags: at most this many tags (0: all)")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path("."),
        help="with --list-tags: folder for the temporary index (default: the current folder)",
    )


def run(args, params):
    config = params.collect
    if args.list_tags is not None:
        if args.posts or args.out or args.report:
            raise DumpError("--list-tags only reads the dump; leave out --posts, --out and --report")
        report = list_tags(args.list_tags, config, scratch_dir=args.scratch)
        print(format_tag_listing(report, args.list_tags, config, contains=args.contains, top=args.top))
        return 0
    if args.posts is None or args.out is None or args.report is None:
        raise DumpError("give --posts, --out and --report to import a dump, or --list-tags DUMP to see its tags")
    counts = collect_stackexchange(args.posts, args.out, config)
    write_json(args.report, counts)
    print(f"collect: {counts['pairs_written']} question/answer pairs from {args.posts} -> {args.out}")
    per_tag = counts["questions_per_tag"]
    print("collect: questions per tag: " + ", ".join(f"{tag} {count:,}" for tag, count in per_tag.items()))
    for warning in counts["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if not counts["warnings"] and 0 in per_tag.values():
        print(
            f"collect: tags without questions are not warned about in a dump of {counts['questions_seen']:,} "
            "questions (too small to tell)"
        )
    return 0


main = stage_main(
    "collect", __doc__, run, output_files="--out --report", arguments=arguments, errors=(DumpError, OSError)
)

if __name__ == "__main__":  # `python -m expqa.pipeline.collect ...` runs the stage, as `expqa collect` does
    sys.exit(main())
