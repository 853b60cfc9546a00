"""Stage `merge`: fold models/adapter into models/base (float32, never 4-bit) -> models/merged, verified.

Writes metrics/merge.json: max |logit difference| against base + adapter and whether greedy outputs agree.
"""

import argparse
import json
import sys
from pathlib import Path

from expqa.merge import merge_adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa merge", description=__doc__)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--adapter", type=Path, default=Path("models/adapter"))
    parser.add_argument("--out", type=Path, default=Path("models/merged"))
    parser.add_argument("--report", type=Path, default=Path("metrics/merge.json"))
    args = parser.parse_args(argv)
    for needed, stage in ((args.base, "base"), (args.adapter, "train")):
        if not needed.exists():
            print(f"error: {needed} does not exist; build it with `dvc repro {stage}`", file=sys.stderr)
            return 2
    try:
        report = merge_adapter(args.base, args.adapter, args.out)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"merge: {args.out} (max |logit diff| {report['max_abs_logit_diff']:.2e}, "
          f"greedy equal: {report['greedy_equal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
