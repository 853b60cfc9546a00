"""Stage `align`: preference tuning (DPO) of the SFT adapter on preference pairs, or the SFT adapter passed through.

Params: align (enabled, method, beta, learning rate, epochs, pairs per step, lengths, held-out share), and what the
run shares with train: base.seed, quantization, lora, train (device, processes, threads, optimizer, fast path),
data.on_invalid (error, or skip: bad preference lines quarantined). With several processes (the cpu profile's 2) the
stage re-runs itself as torchrun workers, as train does. Resumable from --checkpoints, as train is.

Reads --base (model folder), --adapter (the SFT adapter), --preferences (JSONL: prompt, chosen, rejected, topic,
source_id), --questions (the critical questions) and --data (the combine stage's splits: the leakage guard's val
and test conversations, the train split's ids); writes --out (the adapter merge takes), --report (JSON: counts and
final metrics), --quarantine (bad lines under data.on_invalid: skip), --metrics (dvclive curves), --log-folder
(TensorBoard) and --checkpoints.
"""

import json
import sys

from expqa.config import ConfigError
from expqa.files import write_json
from expqa.pipeline import check_profile, require, stage_main
from expqa.wording import plural

PATHS = (
    "--base --adapter --preferences --questions --data --out --report --quarantine --checkpoints --metrics --log-folder"
)


def run(args, params):
    require(args.base, "base")
    require(args.adapter, "train")
    check_profile(params, "align")
    from expqa.training.align import (
        AlignTrainer,
        pass_through,
        preference_data,
        write_align_report,
        write_disabled_outputs,
    )
    from expqa.training.distributed import (
        die_with_parent,
        inside_launch,
        is_main_process,
        needs_launch,
        relaunch,
        relaunched,
        wanted_processes,
    )

    if not params.align.enabled:
        pass_through(args.adapter, args.out)
        write_align_report(args.report, None, None, enabled=False)
        write_json(args.quarantine, [])
        write_disabled_outputs(args.metrics, args.log_folder)
        print(f"align: align.enabled is false; {args.out} is the SFT adapter unchanged")
        return 0
    data = preference_data(args.preferences, args.questions, args.data, params)  # errors before any process starts
    if not data["train"]:
        raise ConfigError(f"{args.preferences}: no preference pair is left to train on ({data['counts']})")
    processes = wanted_processes(params.train.num_processes)
    if needs_launch(processes, params.train.distributed):
        if params.train.distributed == "fsdp":
            raise ConfigError("align runs with DDP or in one process; train.distributed fsdp is not supported here")
        return relaunch(
            "expqa.pipeline.align", args.argv, processes, num_threads=params.train.num_threads, output=args.out
        )
    if inside_launch():
        die_with_parent()
    from expqa.training.trainer import TrainingInterrupted

    counts = data["counts"]
    if is_main_process():
        print(
            f"align: {plural(counts['train_pairs'], 'pair')} to train on, {counts['held_out_pairs']} held out"
            + (f", {counts['quarantined']} quarantined" if counts["quarantined"] else "")
            + (
                f", {counts['source_not_in_train_split']} left out (source conversation not in the train split)"
                if counts["source_not_in_train_split"]
                else ""
            ),
            flush=True,
        )
    trainer = AlignTrainer(
        params,
        base_model=args.base,
        adapter=args.adapter,
        preferences=args.preferences,
        questions=args.questions,
        data_dir=args.data,
        checkpoint_dir=args.checkpoints,
        metrics_dir=args.metrics,
        log_dir=args.log_folder,
    )
    try:
        metrics = trainer.train(data)
        trainer.save_model(args.out, data)
    except TrainingInterrupted as exc:
        if is_main_process():
            print(f"align: {exc}", file=sys.stderr)
        return 0 if relaunched() else 130
    if is_main_process():
        write_align_report(args.report, metrics, counts, enabled=True)
        write_json(args.quarantine, data["quarantined"])
        keys = ("global_step", "train_loss", "rewards/accuracies", "rewards/margins", "pairs_per_second")
        print("align: " + json.dumps({k: metrics.get(k) for k in keys}))


main = stage_main(
    "align",
    __doc__,
    run,
    paths=PATHS,
    output_files="--report --quarantine",
    output_folders="--out --checkpoints --metrics --log-folder",
    errors=(ValueError, OSError, RuntimeError),
)

if __name__ == "__main__":  # torchrun runs the workers as `python -m expqa.pipeline.align ...`
    sys.exit(main())
