"""Stage `base`: materialise the base model named by params `model` into a folder (HF layout + base_info.json).

Writes --out: the model folder.
"""

import sys

from expqa.model.base import BaseModelError, materialize_base
from expqa.pipeline import stage_main

PATHS = "--out"  # required path options: dvc.yaml gives them


def run(args, params):
    info = materialize_base(params.model.name, params.model.revision, args.out)
    print(f"base: {info['name']} ({info['source']}) -> {args.out}")


main = stage_main("base", __doc__, run, paths=PATHS, output_folders="--out", errors=(BaseModelError,))

if __name__ == "__main__":  # `python -m expqa.pipeline.base ...` runs the stage, as `expqa base` does
    sys.exit(main())
