"""Stage `stats`: dataset statistics (metrics/data_stats.json) and the token-length histogram.

Lengths use the base model's tokenizer and chat template; truncation is counted at train.max_seq_length of the
profile that runs.
"""

from expqa.pipeline import require, stage_main
from expqa.stats import summary_line, write_dataset_stats

PATHS = {
    "--data": "the combine stage's folder (data/processed)",
    "--base": "base model folder: tokenizer and chat template",
    "--out": "statistics (JSON)",
    "--histogram": "token-length histogram (CSV)",
}


def run(args, params):
    require(args.base, "base")
    stats = write_dataset_stats(args.data, args.base, [params.train.max_seq_length], args.out, args.histogram)
    print(summary_line(stats) + f" -> {args.out}")


main = stage_main("stats", __doc__, run, paths=PATHS, errors=(OSError, ValueError))
