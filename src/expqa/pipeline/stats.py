"""Stage `stats`: dataset statistics (metrics/data_stats.json) and the token-length histogram.

Lengths use the base model's tokenizer and chat template; truncation is counted at train.max_seq_length of the
profile that runs.

Reads --data (the combine stage's folder) and --base (tokenizer, chat template); writes --out
(statistics, JSON) and --histogram (token lengths, CSV).
"""

import sys

from expqa.data.stats import summary_line, write_dataset_stats
from expqa.pipeline import require, stage_main

PATHS = "--data --base --out --histogram"  # required path options: dvc.yaml gives them


def run(args, params):
    require(args.base, "base")
    stats = write_dataset_stats(args.data, args.base, [params.train.max_seq_length], args.out, args.histogram)
    print(summary_line(stats) + f" -> {args.out}")


main = stage_main("stats", __doc__, run, paths=PATHS, output_files="--out --histogram", errors=(OSError, ValueError))

if __name__ == "__main__":  # `python -m expqa.pipeline.stats ...` runs the stage, as `expqa stats` does
    sys.exit(main())
