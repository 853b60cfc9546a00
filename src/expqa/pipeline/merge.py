"""Stage `merge`: fold the adapter into the base weights (float32, never 4-bit), verified.

Writes --report: max |logit difference| against base + adapter and whether greedy outputs agree.

Reads --base and --adapter; writes --out (the merged model) and --report (JSON).
"""

import sys

from expqa.files import write_json
from expqa.model.merge import merge_adapter, merge_summary
from expqa.pipeline import require, stage_main

PATHS = "--base --adapter --out --report"  # required path options: dvc.yaml gives them


def run(args, params):
    require(args.base, "base")
    require(args.adapter, "align")
    report = merge_adapter(args.base, args.adapter, args.out)
    write_json(args.report, report)
    print(merge_summary(report, args.out))


main = stage_main(
    "merge",
    __doc__,
    run,
    paths=PATHS,
    output_files="--report",
    output_folders="--out",
    errors=(RuntimeError, OSError),
    uses_params=False,
)

if __name__ == "__main__":  # `python -m expqa.pipeline.merge ...` runs the stage, as `expqa merge` does
    sys.exit(main())
