"""Stage `combine` (seed: combine_datasets): validate, deduplicate, weight and split into data/processed.

Params: data (weights, fractions, on_invalid, sources) and base.seed. data.sources files are read from --sources.
"""

import argparse
import sys
from pathlib import Path

from expqa.chatml import DataError
from expqa.combine import EmptySplitError, combine_datasets
from expqa.config import ConfigError, load_params
from expqa.sources import UserSource


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa combine", description=__doc__)
    parser.add_argument("inputs", nargs="+", type=Path, help="ChatML JSONL files")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--sources", type=Path, help="folder of the data.sources files (data/raw/sources)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", help="partial override file (YAML or JSON)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.config, sources_dir=args.sources)
        d = params.data
        if d.sources and args.sources is None:
            raise ConfigError(f"data.sources lists {len(d.sources)} file(s) but no --sources folder was given")
        sources = [UserSource(args.sources / s.file, s.format, s.name, s.weight) for s in d.sources]
        manifest = combine_datasets(args.inputs, args.out, weights=d.weights, test_fraction=d.test_fraction,
                                    val_fraction=d.val_fraction, on_invalid=d.on_invalid, seed=params.base.seed,
                                    sources=sources)
    except (ConfigError, DataError, EmptySplitError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    totals = manifest["totals"]
    print("combine: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()) if isinstance(v, int)))
    for s in sources:  # what became of each of your rows: nothing is dropped without a count
        c = manifest["sources"][s.name]
        print(f"  {s.name} ({s.format}, {s.path}): read {c['read']}, kept {c['kept']}, invalid {c['invalid']}, "
              f"duplicates {c['duplicates_exact'] + c['duplicates_normalised']}, train rows {c['train_rows']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
