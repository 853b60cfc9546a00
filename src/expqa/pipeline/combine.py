"""Stage `combine`: validate, deduplicate, weight and split the ChatML inputs into train/val/test.

Params: data (weights, fractions, on_invalid, sources) and base.seed; data.sources files are read from --sources.
Writes --out: train/val/test JSONL, quarantine.jsonl, manifest.json.
"""

import logging
import sys
from pathlib import Path

from expqa.data.chatml import DataError
from expqa.data.combine import EmptySplitError, combine_datasets, logger
from expqa.pipeline import stage_main


def arguments(parser):
    parser.add_argument("inputs", nargs="+", type=Path, help="ChatML JSONL files")
    parser.add_argument(
        "--may-be-empty",
        type=Path,
        action="append",
        default=[],
        metavar="INPUT",
        help="an input that is empty on purpose (generate's output while generate.enabled is false): no warning "
        "when it is (repeatable)",
    )


def run(args, params):
    # combine's warnings (an input that adds no row) as `warning: ...` lines, like collect's
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    expected_empty = tuple(f"{path}: empty (" for path in args.may_be_empty)
    handler.addFilter(lambda record: not record.getMessage().startswith(expected_empty))
    logger.addHandler(handler)
    try:
        manifest = combine_datasets(args.inputs, args.out, params.data, seed=params.base.seed, sources_dir=args.sources)
    finally:
        logger.removeHandler(handler)
    totals = manifest["totals"]
    print("combine: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()) if isinstance(v, int)))
    for source in params.data.sources:  # what became of each of your rows: nothing is dropped without a count
        c = manifest["sources"][source.name]
        print(
            f"  {source.name} ({source.format}, {args.sources / source.file}): read {c['read']}, kept {c['kept']}, "
            f"invalid {c['invalid']}, duplicates {c['duplicates_exact'] + c['duplicates_normalised']}, "
            f"train rows {c['train_rows']}"
        )


main = stage_main(
    "combine",
    __doc__,
    run,
    paths="--out --sources",
    output_folders="--out",
    arguments=arguments,
    errors=(DataError, EmptySplitError, OSError),
)

if __name__ == "__main__":  # `python -m expqa.pipeline.combine ...` runs the stage, as `expqa combine` does
    sys.exit(main())
