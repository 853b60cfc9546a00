"""Stage `merge`: fold the adapter into the base weights (float32, never 4-bit), verified.

Writes --report: max |logit difference| against base + adapter and whether greedy outputs agree.
"""

from expqa.files import write_json
from expqa.merge import merge_adapter, merge_summary
from expqa.pipeline import require, stage_main

PATHS = {
    "--base": "base model folder (models/base)",
    "--adapter": "the train stage's adapter (models/adapter)",
    "--out": "merged model folder (models/merged)",
    "--report": "verification report (JSON)",
}


def run(args, params):
    require(args.base, "base")
    require(args.adapter, "train")
    report = merge_adapter(args.base, args.adapter, args.out)
    write_json(args.report, report)
    print(merge_summary(report, args.out))


main = stage_main("merge", __doc__, run, paths=PATHS, errors=(RuntimeError, OSError), uses_params=False)
