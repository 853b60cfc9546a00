"""Stage `train` (seed: QLoRATrainer): fine-tune models/base on data/processed into models/adapter.

Params: base.seed, quantization, lora, train, and the `cpu` overrides when there is no GPU.
Checkpoints land in --checkpoints (git-ignored, left alone by DVC): a killed run resumes from the last complete one.
"""

import argparse
import json
import sys
from pathlib import Path

from expqa.config import ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa train", description=__doc__)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--out", type=Path, default=Path("models/adapter"))
    parser.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/train"), help="dvclive folder")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--config", help="partial override file (YAML or JSON), e.g. lora: {r: 32}")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.config)
    except ConfigError as exc:  # checked before torch is imported: fast, and no library noise around it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from expqa.distributed import (die_with_parent, inside_launch, is_main_process, needs_launch, relaunch,
                                   relaunched, wanted_processes)

    run = params.for_device(torch.cuda.is_available()).train
    processes = wanted_processes(run.num_processes)
    if needs_launch(processes, run.distributed):  # never inside a launch (torchrun, accelerate, cluster launchers)
        return relaunch(__file__, sys.argv[1:] if argv is None else argv, processes, output=args.out)
    if inside_launch():
        die_with_parent()  # a worker whose launcher was killed stops too
    from expqa.trainer import QLoRATrainer, TrainingError, TrainingInterrupted

    try:
        trainer = QLoRATrainer.from_params(params, base_model=args.base, data_dir=args.data,
                                           checkpoint_dir=args.checkpoints, metrics_dir=args.metrics)
        metrics = trainer.train()
        trainer.save_model(args.out)
    except TrainingInterrupted as exc:
        if is_main_process():
            print(f"train: {exc}", file=sys.stderr)
        return 0 if relaunched() else 130  # relaunch() returns the 130 (a worker's own would add torchrun's report)
    except (TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: metrics.get(k) for k in ("global_step", "train_loss", "eval_loss", "real_tokens_per_second")}
    if is_main_process():
        print("train: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
