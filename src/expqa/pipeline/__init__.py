"""The pipeline stages as library functions: `dvc repro` runs them through stages/<name>.py, `expqa <name>` directly.

Each stage module has a docstring (its --help: what each path option is), `PATHS` (the names of its path options,
all required: dvc.yaml gives them) and/or `arguments(parser)` for other options, `run(args, params) -> int | None`
and `main = stage_main(...)`, run by `python -m expqa.pipeline.<name>` too. stage_main adds `--params` (the stage's
resolved params, metrics/params/<stage>.json, or a whole params.yaml to run by hand), loads it, checks the output
paths before the stage writes any, and turns the expected failures into one `error: ...` line and exit status 2.
The glue between dvc.yaml and the library: a stage module may import any package of expqa (the stage's own modules);
no library package imports the pipeline.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from expqa.config import ConfigError, Params, load_stage_params
from expqa.files import output_path_problems


def stage_main(
    name: str,
    doc: str,
    run: Callable[[argparse.Namespace, Params | None], int | None],
    *,
    paths: str = "",
    output_files: str = "",
    output_folders: str = "",
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    errors: tuple[type[BaseException], ...] = (),
    uses_params: bool = True,
) -> Callable[..., int]:
    """The `main(argv=None) -> int` of stage ``name``: ``paths`` names its path options (all required), ``arguments``
    adds any other options; ``errors`` are the exceptions that mean bad input. ``output_files`` and
    ``output_folders`` name the options that are outputs (of either kind of option; unset ones are skipped): they
    are checked before the stage runs, so that a bad one fails before any output is replaced."""

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(
            prog=f"expqa {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        for option in paths.split():  # what each one is: the module docstring, printed above
            parser.add_argument(option, type=Path, required=True)
        if arguments is not None:
            arguments(parser)
        if uses_params:
            parser.add_argument(
                "--params",
                type=Path,
                required=True,
                help=f"this stage's params: metrics/params/{name}.json (written by the params stage) "
                "or a whole params.yaml (its profile resolved on this machine)",
            )
            parser.add_argument(
                "--config",
                type=Path,
                help="with a whole params.yaml: a partial override file (YAML or JSON), e.g. lora: {r: 32}",
            )
        args = parser.parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else list(argv)  # train re-runs itself with them under torchrun
        try:
            outputs = [
                {option: getattr(args, option.lstrip("-").replace("-", "_")) for option in options.split()}
                for options in (output_files, output_folders)
            ]
            if problems := output_path_problems(*outputs):
                raise ConfigError([f"{problem} (nothing was written)" for problem in problems])
            # --sources (combine's data.sources folder): its files are checked with the params, at their lines
            sources = getattr(args, "sources", None)
            params = load_stage_params(args.params, name, args.config, sources) if uses_params else None
            return run(args, params) or 0
        except (ConfigError, *errors) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return main


def check_profile(params: Params, stage: str) -> None:
    """The profile the params stage resolved must suit this machine: the gpu profile's kernels need CUDA, and the
    cpu profile runs on the CPU even where a GPU is (its settings, 2 gloo processes among them, are the CPU's; and
    a committed CPU-made lock is reproduced on the CPU). Call before torch touches CUDA."""
    if params.profile == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # this process and the workers it starts
        return
    if params.profile == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{stage}: the params run with the gpu profile (metrics/params/{stage}.json), but there is no CUDA "
                "GPU here. `dvc repro` re-resolves profile auto on every run; with profile: gpu in params.yaml set "
                "it to auto or cpu"
            )


# the file that makes a folder what the stage builds: a model (config.json) or a LoRA adapter
BUILT_MARKER = {
    "base": "config.json",
    "merge": "config.json",
    "train": "adapter_config.json",
    "align": "adapter_config.json",
}


def require(path: Path, stage: str) -> None:
    """An input another stage builds; a clear message instead of a traceback when it is not there, or when the
    folder is another one (an empty folder, the wrong one passed by hand) that would fail deep in transformers."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; build it with `dvc repro {stage}`")
    marker = BUILT_MARKER.get(stage)
    if marker is not None and not (path / marker).is_file():
        raise FileNotFoundError(
            f"{path} has no {marker}, so it is not what `dvc repro {stage}` builds; build it, or pass such a folder"
        )
