"""Stage `params`: check params.yaml and resolve its profile once, before any stage that has outputs runs.

Writes <out>/<stage>.json for each stage: the sections that stage reads, as they will run (profile auto decided
here, the cpu overrides merged in under the cpu profile). Every other stage depends on its file, so a bad value
(`dvc exp run -S ...`) stops the pipeline here, before DVC deletes any stage's outputs, and dvc.lock records which
profile built each output. Also checked here: the files params name (collect.posts, eval.critical_questions,
data.sources in --sources) and that model.name can be obtained.

Reads --params (params.yaml) and --sources (the data.sources folder); writes --out/<stage>.json.
"""

import sys
from pathlib import Path

from expqa.base_model import BaseModelError, check_model_source
from expqa.config import STAGE_SECTIONS, ConfigError, load_params
from expqa.files import write_json
from expqa.pipeline import stage_main

PATHS = "--params --sources --out"  # required path options: dvc.yaml gives them


def run(args, _):
    params = load_params(args.params, sources_dir=args.sources)
    missing = [
        f"{args.params}: {key} {path} does not exist"
        for key, path in (
            ("collect.posts", params.collect.posts),
            ("eval.critical_questions", params.eval.critical_questions),
        )
        if not Path(path).is_file()
    ]
    if missing:
        raise ConfigError(missing)
    check_model_source(params.model.name, params.model.revision)
    resolved = params.resolve()
    for stage in STAGE_SECTIONS:
        write_json(args.out / f"{stage}.json", resolved.stage_sections(stage))
    how = f"profile {params.profile}" + (f" -> {resolved.profile}" if params.profile == "auto" else "")
    print(f"params: {args.params} checked, {how}; {len(STAGE_SECTIONS)} stage files in {args.out}")


main = stage_main(
    "params", __doc__, run, paths=PATHS, output_folders="--out", errors=(BaseModelError,), uses_params=False
)

if __name__ == "__main__":  # `python -m expqa.pipeline.params ...` runs the stage, as `expqa params` does
    sys.exit(main())
