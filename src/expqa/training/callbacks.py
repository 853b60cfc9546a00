"""The TrainerCallbacks the train stage installs: dvclive metrics per optimizer step, the progress bar with one
numeric line per log, Ctrl-C / SIGTERM as "save a checkpoint and stop", the last step always logged, and checkpoints
marked complete with the run's fingerprint."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback
from transformers.integrations import DVCLiveCallback

from expqa.training.distributed import is_main_process, relaunched
from expqa.training.resume import FINGERPRINT_FILE


class DVCLiveMetrics(DVCLiveCallback):
    """transformers' dvclive integration without dumping every TrainingArguments field into a params file
    (DVC already tracks params.yaml) and with the eval loss before training kept as a summary metric."""

    def setup(self, args, state, model):
        self._initialized = True

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        # plot against the optimizer step, not against the number of log events
        if state.is_world_process_zero:
            self.live.step = state.global_step
        super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and state.global_step == 0 and metrics and "eval_loss" in metrics:
            self.live.summary["eval_loss_before_training"] = metrics["eval_loss"]


def number(value) -> str:
    """A logged value as a number a person reads: whole numbers without a fraction (num_tokens comes as a float),
    others to 4 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_line(step: int, max_steps: int, logs: dict) -> str:
    """One log of the Trainer as `train: step 5/98: loss 3.4, grad_norm 0.3808, ...`."""
    values = ", ".join(f"{key} {number(value)}" for key, value in logs.items() if key != "total_flos")
    return f"train: step {step}/{max_steps}: {values}"


class MetricsLine(ProgressCallback):
    """transformers' progress bar, with each log written as metrics_line instead of the dict of strings transformers 5
    writes (`{'loss': '3.389', 'grad_norm': '0.4394', ...}`: every float formatted into a quoted string)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(metrics_line(state.global_step, state.max_steps, logs))


class StopOnSignal(TrainerCallback):
    """Turn SIGINT/SIGTERM into 'save a checkpoint and stop' at the next logged optimizer step.

    Why not the current step: the Trainer logs the mean loss since the last logged step, and a resumed run starts
    its first interval at the checkpoint. A checkpoint at a logged step is resumed into the same curve, bit for bit,
    as a run that never stopped (periodic checkpoints are logged steps too: save_steps is a multiple of logging_steps).
    """

    def __init__(self):
        self.received: int | None = None

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C stops at once
            abort_now(signum)
        self.received = signum
        if is_main_process():
            print(
                f"\nreceived signal {signum}: saving a checkpoint at the next logged step (train.logging_steps; "
                "Ctrl-C again to abort at once)",
                flush=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None and (
            state.global_step % args.logging_steps == 0 or state.global_step >= state.max_steps
        ):
            control.should_save = True
            control.should_training_stop = True


class LogLastStep(TrainerCallback):
    """Log the last step too, so the curves and the run's mean train loss cover every step (the Trainer otherwise
    folds the unlogged tail into its own train_loss only, which a resumed run cannot reproduce)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


def abort_now(signum: int) -> None:
    """Exit at once with one line. Raising KeyboardInterrupt instead unwinds through the Trainer (a traceback of
    ~130 lines), and interpreter shutdown then runs dvclive's git (dulwich) finalizers, which print more. Nothing is
    lost: a checkpoint is complete only once its fingerprint file is written, so a half-written one is skipped."""
    sys.stdout.flush()
    if is_main_process():
        print(
            f"\ntrain: aborted by a second signal ({signal.Signals(signum).name}); the next run resumes from the "
            "last complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
    # 130, the shell's code for Ctrl-C, whichever signal came second (a worker of relaunch(): 0, and the launching
    # stage returns 130)
    os._exit(0 if relaunched() else 128 + signal.SIGINT)


class WriteFingerprint(TrainerCallback):
    """Mark a checkpoint complete, last, with the fingerprint of the run that wrote it."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / FINGERPRINT_FILE).write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True))
