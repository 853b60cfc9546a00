"""Stage `params`: check params.yaml and resolve its profile once, before any stage that has outputs runs.

Writes <out>/<stage>.json for each stage: the sections that stage reads, as they will run (profile auto decided
here, for this machine, on every `dvc repro`: dvc.yaml marks the stage always_changed; the cpu overrides merged in
under the cpu profile). Every other stage depends on its file, so a bad value
(`dvc exp run -S ...`) stops the pipeline here, before DVC deletes any stage's outputs, and dvc.lock records which
profile built each output. Also checked here: the files params name (collect.posts, eval.critical_questions,
data.sources in --sources), that model.name can be obtained (when the base stage's file changes) and that
train.num_processes fits this machine.

Reads --params (params.yaml) and --sources (the data.sources folder); writes --out/<stage>.json.
"""

import json
import sys
from pathlib import Path

from expqa.config import STAGE_SECTIONS, ConfigError, load_params, read_config_file
from expqa.files import write_json
from expqa.model.base import BaseModelError, check_model_source
from expqa.pipeline import stage_main
from expqa.training.distributed import cpu_cores
from expqa.wording import plural

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
    resolved = params.resolve()
    files = {stage: resolved.stage_sections(stage) for stage in STAGE_SECTIONS}
    # this stage runs on every `dvc repro` (always_changed): ask the hub about model.name only when the base stage
    # will run again with it, not on every run of an offline machine
    if files["base"] != previous(args.out / "base.json"):
        check_model_source(params.model.name, params.model.revision)
    check_processes(resolved, args.params)
    for stage, sections in files.items():
        write_json(args.out / f"{stage}.json", sections)
    how = f"profile {params.profile}" + (f" -> {resolved.profile}" if params.profile == "auto" else "")
    if resolved.profile == "cpu" and cuda_devices():
        how += " (the stages run on the CPU: the CUDA GPUs here stay unused; profile: auto or gpu uses them)"
    print(f"params: {args.params} checked, {how}; {plural(len(STAGE_SECTIONS), 'stage file')} in {args.out}")


def previous(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_processes(resolved, params_path: Path) -> None:
    """train.num_processes must fit this machine's devices for the profile's backend: CUDA GPUs (NCCL) under the
    gpu profile, CPU cores (gloo, one thread each) under the cpu profile. Only this machine's share of a job of
    several machines (torchrun's PET_* variables) is counted: processes per node."""
    train = resolved.train
    processes = train.num_processes or max(cuda_devices(), 1)  # 0: one per visible GPU
    if train.gradient_checkpointing == "offload" and (processes > 1 or train.distributed == "fsdp"):
        _, lines = read_config_file(params_path)
        key = "train.gradient_checkpointing"
        if resolved.profile == "cpu" and f"cpu.{key}" in lines:
            key = f"cpu.{key}"
        raise ConfigError(
            f"{lines.get(key, params_path)}: {key} is offload, which runs in one process, but this run has {processes}"
            f"{' (FSDP)' if train.distributed == 'fsdp' else ''}: a reentrant checkpoint does not mix with DDP/FSDP's "
            "gradient hooks; use full, or train.num_processes: 1"
        )
    wanted = train.num_processes
    if wanted == 0:  # one per visible GPU
        return
    if resolved.profile == "gpu":
        have, what, fix = cuda_devices(), "CUDA GPU", "0 (one process per GPU) or a count up to that"
    else:
        have, what, fix = cpu_cores(), "CPU core", "a count up to that (one thread each)"
    if wanted <= have:
        return
    _, lines = read_config_file(params_path)
    key = "cpu.train.num_processes" if resolved.profile == "cpu" and "cpu.train.num_processes" in lines else None
    key = key or "train.num_processes"
    raise ConfigError(
        f"{lines.get(key, params_path)}: {key} is {wanted}, but this machine has {plural(have, what)} for the "
        f"{resolved.profile} profile; set {fix}"
    )


main = stage_main(
    "params", __doc__, run, paths=PATHS, output_folders="--out", errors=(BaseModelError,), uses_params=False
)

if __name__ == "__main__":  # `python -m expqa.pipeline.params ...` runs the stage, as `expqa params` does
    sys.exit(main())
