"""Stage `stats` (seed: get_dataset_stats): metrics/data_stats.json and the token-length histogram plot.

Lengths use the base model's tokenizer and chat template; truncation is reported at train.max_seq_length for
the GPU profile and for the `cpu` overrides.
"""

import argparse
import json
import sys
from pathlib import Path

from expqa.config import ConfigError, load_params
from expqa.stats import get_dataset_stats, summary_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa stats", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="tokenizer and chat template")
    parser.add_argument("--out", type=Path, default=Path("metrics/data_stats.json"))
    parser.add_argument("--histogram", type=Path, default=Path("metrics/plots/token_lengths.csv"))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    lengths = [params.train.max_seq_length, params.for_device(False).train.max_seq_length]
    stats = get_dataset_stats(args.data, tokenizer, lengths)
    histogram = stats.pop("histogram")
    for path in (args.out, args.histogram):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    args.histogram.write_text("tokens,conversations\n" + "".join(
        f"{row['tokens']},{row['conversations']}\n" for row in histogram))
    print(summary_line(stats) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
