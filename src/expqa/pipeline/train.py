"""Stage `train`: QLoRA fine-tuning of the base model on the combine stage's splits into a LoRA adapter.

Params: base.seed, quantization, lora, train (as the profile resolved them). Checkpoints land in --checkpoints
(git-ignored, left alone by DVC): a killed run resumes from the last complete one. Several processes (train.
num_processes, the cpu profile's 2, or FSDP): the stage re-runs itself as torchrun workers.

Reads --base (model folder) and --data (the combine stage's splits); writes --out (the adapter), --metrics
(dvclive), --log-folder (training.log, TensorBoard, wall-clock figures) and --checkpoints.
"""

import json
import sys

from expqa.config import ConfigError
from expqa.pipeline import check_profile, require, stage_main
from expqa.wording import plural

PATHS = "--base --data --out --checkpoints --metrics --log-folder"  # required path options: dvc.yaml gives them


def run(args, params):
    require(args.base, "base")
    check_profile(params, "train")
    from expqa.training.distributed import (
        die_with_parent,
        inside_launch,
        is_main_process,
        local_devices,
        needs_launch,
        relaunch,
        relaunched,
        wanted_processes,
    )

    processes = wanted_processes(params.train.num_processes)
    devices, kind = local_devices()
    if processes > devices and not inside_launch():  # the params stage says where in params.yaml; a run by hand
        raise ConfigError(  # with a stage file gets it here, before torchrun starts processes that would crash
            f"train.num_processes is {processes}, but this machine has {plural(devices, kind)} for the "
            f"{params.profile or 'resolved'} profile; `dvc repro` checks it in the params stage"
        )
    if needs_launch(processes, params.train.distributed):  # never inside a launch (torchrun, accelerate, clusters)
        return relaunch(
            "expqa.pipeline.train", args.argv, processes, num_threads=params.train.num_threads, output=args.out
        )
    if inside_launch():
        die_with_parent()  # a worker whose launcher was killed stops too
    from expqa.training.trainer import QLoRATrainer, TrainingError, TrainingInterrupted

    try:
        trainer = QLoRATrainer.from_params(
            params,
            base_model=args.base,
            data_dir=args.data,
            checkpoint_dir=args.checkpoints,
            metrics_dir=args.metrics,
            log_dir=args.log_folder,
        )
        metrics = trainer.train()
        trainer.save_model(args.out)
    except TrainingInterrupted as exc:
        if is_main_process():
            print(f"train: {exc}", file=sys.stderr)
        return 0 if relaunched() else 130  # relaunch() returns the 130 (a worker's own would add torchrun's report)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_main_process():
        summary = {k: metrics.get(k) for k in ("global_step", "train_loss", "eval_loss", "real_tokens_per_second")}
        print("train: " + json.dumps(summary))


main = stage_main(
    "train",
    __doc__,
    run,
    paths=PATHS,
    output_folders="--out --checkpoints --metrics --log-folder",
    errors=(ValueError, OSError),
)

if __name__ == "__main__":  # torchrun runs the workers as `python -m expqa.pipeline.train ...`
    sys.exit(main())
