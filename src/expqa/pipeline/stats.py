"""Stage `stats`: dataset statistics (metrics/data_stats.json) and the token-length histogram.

Lengths use the base model's tokenizer and chat template; truncation is counted at train.max_seq_length of the
profile that runs.
"""

from pathlib import Path

from expqa.pipeline import require, stage_main
from expqa.stats import summary_line, write_dataset_stats


def arguments(parser):
    parser.add_argument("--data", type=Path, required=True, help="the combine stage's folder (data/processed)")
    parser.add_argument("--base", type=Path, required=True, help="base model folder: tokenizer and chat template")
    parser.add_argument("--out", type=Path, required=True, help="statistics (JSON)")
    parser.add_argument("--histogram", type=Path, required=True, help="token-length histogram (CSV)")


def run(args, params):
    require(args.base, "base")
    stats = write_dataset_stats(args.data, args.base, [params.train.max_seq_length], args.out, args.histogram)
    print(summary_line(stats) + f" -> {args.out}")


main = stage_main("stats", __doc__, arguments, run, errors=(OSError, ValueError))
