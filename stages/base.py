"""Stage `base`: materialise the base model named by params `model` into models/base (HF layout + base_info.json)."""

import argparse
import sys
from pathlib import Path

from expqa.base_model import BaseModelError, materialize_base
from expqa.config import ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa base", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models/base"), help="output directory")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--config", help="partial override file (YAML or JSON), e.g. model: {name: ...}")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.config)
        info = materialize_base(params.model.name, params.model.revision, args.out)
    except (ConfigError, BaseModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"base: {info['name']} ({info['source']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
