"""Stage `merge`: fold the adapter into the base weights (float32, never 4-bit), verified.

Writes --report: max |logit difference| against base + adapter and whether greedy outputs agree.
"""

from pathlib import Path

from expqa.files import write_json
from expqa.merge import merge_adapter, merge_summary
from expqa.pipeline import require, stage_main


def arguments(parser):
    parser.add_argument("--base", type=Path, required=True, help="base model folder (models/base)")
    parser.add_argument("--adapter", type=Path, required=True, help="the train stage's adapter (models/adapter)")
    parser.add_argument("--out", type=Path, required=True, help="merged model folder (models/merged)")
    parser.add_argument("--report", type=Path, required=True, help="verification report (JSON)")


def run(args, params):
    require(args.base, "base")
    require(args.adapter, "train")
    report = merge_adapter(args.base, args.adapter, args.out)
    write_json(args.report, report)
    print(merge_summary(report, args.out))


main = stage_main("merge", __doc__, arguments, run, errors=(RuntimeError, OSError), uses_params=False)
