"""The train stage: QLoRA (or plain LoRA) fine-tuning with TRL's SFTTrainer, resumable and tracked with dvclive.

    params = load_params("params.yaml").resolve()           # profile auto decided for this machine
    trainer = QLoRATrainer.from_params(params, base_model="models/base", data_dir="data/processed",
                                       checkpoint_dir="models/checkpoints", metrics_dir=None, log_dir=None)
    metrics = trainer.train()                               # plans the run (training/plan.py), loads, trains
    trainer.save_model("models/adapter")
    trainer.evaluate()                                      # {"eval_loss": ...} on the val split

Same code path on CUDA and CPU. Checkpoints go to `checkpoint_dir` (a folder DVC leaves alone): a killed
`dvc repro` resumes from the last complete checkpoint whose fingerprint (resolved params + data + base weights)
matches this run; anything else there is cleared, so an experiment with other params never resumes a stranger
(training/resume.py). The callbacks the Trainer runs are training/callbacks.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from expqa.config import LoRAConfig, Params, QuantizationConfig, TrainingConfig
from expqa.data.dataset import build_sft_dataset
from expqa.files import atomic_dir, is_wall_clock, sha256_file
from expqa.model import checkpointing
from expqa.model.loading import load_for_training
from expqa.training.callbacks import DVCLiveMetrics, LogLastStep, MetricsLine, StopOnSignal, WriteFingerprint
from expqa.training.distributed import (
    agree_across_processes,
    enable_fsdp_on_cpu,
    fsdp_summary,
    fsdp_trainer_args,
    full_adapter_state_dict,
    is_main_process,
    set_fsdp_mixed_precision,
    unwrap_adapter_file,
    world_size,
)
from expqa.training.plan import RunPlan, machine_facts, plan_run
from expqa.training.resume import (
    code_fingerprint,
    find_resumable_checkpoint,
    library_versions,
    tokens_logged_at_checkpoint,
)

log = logging.getLogger("expqa.train")
OOM_ADVICE = (
    "CUDA ran out of memory. Try, in this order: a smaller train.micro_batch (raise "
    "train.gradient_accumulation_steps to keep the effective batch), a shorter train.max_seq_length, "
    "train.gradient_checkpointing: offload (the least GPU memory), fewer lora.target_modules (e.g. "
    "[q_proj, v_proj])."
)


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on; the message says what to do."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C / SIGTERM: a checkpoint was written; running the stage again resumes from it."""


# ---------------------------------------------------------------------------------------------------------------
# TRL's SFTTrainer, guarded


def make_sft_trainer_class():
    from trl import SFTTrainer

    class GuardedSFTTrainer(SFTTrainer):
        """SFTTrainer that stops on a non-finite loss (naming the step) and counts real tokens for tok/s.

        Neither needs the GPU to finish the step: a host sync per step leaves the GPU idle while the next batch is
        collated and launched (~2-4 % of a step on an H100). The first bad step is recorded on the device and
        looked at only where the Trainer waits anyway: logging steps, checkpoint steps and the last step.
        """

        real_tokens = 0
        _first_bad = None  # device tensor [optimizer step, loss] of the first non-finite loss; step 0 = none

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            enable_fsdp_on_cpu(self)  # a no-op unless train.distributed is fsdp on a CPU (tests)

        def save_model(self, output_dir=None, _internal_call=False):
            """Under FSDP, gather the LoRA weights only (the Trainer would gather the whole model, 4-bit base included,
            to keep its LoRA part) and save them from rank 0 in PEFT's layout; otherwise the Trainer's own save."""
            if not self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call)
            state = full_adapter_state_dict(self.model)  # every rank takes part
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=state)
                unwrap_adapter_file(output_dir or self.args.output_dir)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if "attention_mask" in inputs:  # padded rows: count the real tokens (waits for the GPU; padded path)
                self.real_tokens += int(inputs["attention_mask"].sum())
            else:  # padding-free rows hold real tokens only
                self.real_tokens += inputs["input_ids"].numel()
            step = self.state.global_step + 1
            value = loss.detach().float()
            this = torch.stack([torch.where(torch.isfinite(value), 0.0, float(step)), value])
            self._first_bad = (
                this if self._first_bad is None else torch.where(self._first_bad[0] > 0, self._first_bad, this)
            )
            args = self.args
            if step % args.logging_steps == 0 or step % args.save_steps == 0 or step >= self.state.max_steps:
                self.raise_if_diverged()
            return loss

        def raise_if_diverged(self):
            if self._first_bad is None:
                return
            step, value = self._first_bad.tolist()
            if step > 0:
                raise TrainingError(
                    f"loss is {value} at optimizer step {int(step)}: training diverged. Lower "
                    "train.learning_rate, keep train.max_grad_norm small (0.3), or check the data "
                    "of this step; the last checkpoint is kept"
                )

    return GuardedSFTTrainer


def checkpointing_argument(config_class) -> str:
    """The Trainer's switch for activation checkpointing by its current name: newer transformers (5.24) renamed
    TrainingArguments.gradient_checkpointing to activation_checkpointing and warn (FutureWarning) whenever the old
    name is given, even as False, which TRL's configs default to True; 5.18 has the old name only."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


# ---------------------------------------------------------------------------------------------------------------
# metrics: what DVC tracks is what a person compares, and the same for a resumed run as for one that never stopped


def is_compared(key: str) -> bool:
    """False for wall-clock figures (runtime, throughput) and FLOP counts: they go to logs/train/train_run.json."""
    return not is_wall_clock(key)


def mean_train_loss(log_history: list[dict]) -> float | None:
    """Mean loss per optimizer step over the whole run, from the logged intervals (each log holds the mean since the
    previous one; the last step is always logged). The Trainer's own train_loss covers one train() call only, so it
    changes when a run is resumed."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else None


def write_training_metrics(folder: Path, log_history: list[dict], train_loss: float | None, summary: dict) -> None:
    """metrics/train rewritten from the run's log history, which a resumed run restores from its checkpoint (the
    curves streamed during a resumed run hold only the steps since the resume)."""
    from dvclive import Live
    from dvclive.utils import standardize_metric_name

    shutil.rmtree(folder, ignore_errors=True)
    live = Live(dir=str(folder), dvcyaml=False, save_dvc_exp=False, report=None)
    for entry in log_history:
        values = {
            key: value
            for key, value in entry.items()
            if key not in ("step", "epoch") and is_compared(key) and isinstance(value, (int, float))
        }
        if not values:
            continue
        if "train_loss" in values:
            values["train_loss"] = train_loss
        live.step = entry["step"]
        # sorted: a resumed run's older entries come from trainer_state.json (sorted keys), and the summary file
        # keeps the order metrics were first logged in
        for key, value in sorted({**values, "epoch": entry.get("epoch", 0)}.items()):
            live.log_metric(standardize_metric_name(key, "dvclive.huggingface"), value)
        live.next_step()
    live.summary.update(summary)
    live.end()


# ---------------------------------------------------------------------------------------------------------------
# the trainer


class QLoRATrainer:
    """Fine-tune `base_model` on `data_dir`/{train,val}.jsonl and save a LoRA adapter."""

    def __init__(
        self,
        config: TrainingConfig,
        *,
        lora: LoRAConfig,
        quantization: QuantizationConfig,
        seed: int,
        base_model: str | Path,
        data_dir: str | Path,
        checkpoint_dir: str | Path,
        metrics_dir: str | Path | None,
        log_dir: str | Path | None,
        profile: str | None = None,
    ):
        """Every setting is given (params.yaml is the one place a default lives: QLoRATrainer.from_params, or the
        dataclasses' defaults, which equal it). ``profile``: the hardware profile the params were resolved for,
        recorded with the adapter."""
        self.config, self.lora, self.quantization, self.seed = config, lora, quantization, seed
        self.profile = profile
        self.base_model, self.data_dir = Path(base_model), Path(data_dir)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metrics_dir = Path(metrics_dir) if metrics_dir else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.trainer = None

    @classmethod
    def from_params(cls, params: Params, **paths) -> QLoRATrainer:
        """From resolved params (Params.resolve(), or the train stage's metrics/params/train.json)."""
        return cls(
            params.train,
            lora=params.lora,
            quantization=params.quantization,
            seed=params.base.seed,
            profile=params.profile,
            **paths,
        )

    # -- setup ----------------------------------------------------------------------------------------------------
    def resolved_config(self) -> dict:
        return {
            "train": dataclasses.asdict(self.config),
            "lora": dataclasses.asdict(self.lora),
            "quantization": dataclasses.asdict(self.quantization),
            "seed": self.seed,
            "profile": self.profile,
            # what the plan decided that changes the maths (memory choices such as checkpointing do not)
            **{k: getattr(self.plan, k) for k in ("device", "weights_dtype", "quant_compute_dtype", "bf16", "fp8")},
            "world_size": self.plan.world_size,
        }

    @functools.cached_property
    def _input_hashes(self) -> dict:
        # the resume check, every checkpoint and the saved adapter all record these; the files do not change
        # during a run, so they are hashed once
        inputs = {name: sha256_file(self.data_dir / f"{name}.jsonl") for name in ("train", "val")}
        info = self.base_model / "base_info.json"
        base = json.loads(info.read_text()).get("weights_sha256") if info.exists() else None
        return {"data_sha256": inputs, "base_weights_sha256": base}

    def fingerprint(self) -> dict:
        return {"config": self.resolved_config(), **self._input_hashes, "code": code_fingerprint()}

    def _setup_logging(self) -> None:
        if self.log_dir is None or not is_main_process():
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.log_dir / "training.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("expqa", "transformers.trainer"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)

    def _sft_config(self, has_eval: bool, model=None):
        from trl import SFTConfig

        c = self.config
        report_to = ["tensorboard"] if self.log_dir else []
        plan = self.plan
        fsdp = fsdp_trainer_args(model, plan.checkpointing.mode != "off") if plan.distributed == "fsdp" else {}
        # a token budget: TRL packs conversations best-fit (never split) into rows of at most that many tokens and
        # one such row is a micro-batch; otherwise a micro-batch is per_device_train_batch_size conversations
        packed = c.tokens_per_micro_batch > 0
        batch = 1 if packed else c.per_device_train_batch_size
        if self.log_dir:  # transformers 5 reads the TensorBoard folder from the environment only
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.log_dir / "tensorboard")
        config = SFTConfig(
            output_dir=str(self.checkpoint_dir),
            seed=self.seed,
            data_seed=self.seed,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch,
            packing=packed,
            packing_strategy="bfd",
            gradient_accumulation_steps=c.gradient_accumulation_steps,
            learning_rate=c.learning_rate,
            lr_scheduler_type=c.lr_scheduler_type,
            warmup_steps=c.warmup_ratio,  # float < 1 = ratio
            num_train_epochs=c.num_train_epochs,
            max_steps=c.max_steps,
            optim=c.optim,
            weight_decay=c.weight_decay,
            max_grad_norm=c.max_grad_norm,
            # build_sft_dataset already truncated each conversation to train.max_seq_length; with packing this is
            # the size of a pack
            max_length=c.tokens_per_micro_batch if packed else None,
            # off: already enabled on the model (non-reentrant) by load_for_training; under FSDP, FSDP's own
            # (fsdp_config) instead
            **{checkpointing_argument(SFTConfig): False},
            bf16=plan.bf16,
            use_cpu=plan.device == "cpu",
            logging_steps=c.logging_steps,
            logging_first_step=True,
            logging_nan_inf_filter=False,  # its per-step isnan() waits for the GPU; a non-finite loss stops us anyway
            eval_strategy="steps" if has_eval else "no",
            eval_steps=c.eval_steps,
            eval_on_start=has_eval,
            save_strategy="steps",
            save_steps=c.save_steps,
            save_total_limit=c.save_total_limit,
            report_to=report_to,
            padding_free=plan.padding_free,
            use_liger_kernel=c.use_liger_kernel,
            ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient every step
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=False,
            **fsdp,
        )
        set_fsdp_mixed_precision(config, config.bf16)
        return config

    def setup(self):
        """Load model and data and build the SFTTrainer (called by train(); useful alone in tests)."""
        from transformers import set_seed

        if self.config.use_liger_kernel:
            import importlib.util

            if importlib.util.find_spec("liger_kernel") is None:
                raise TrainingError(
                    "train.use_liger_kernel is true but liger-kernel is not installed: "
                    "pip install -e '.[gpu]' (CUDA only), or -S train.use_liger_kernel=false"
                )

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        set_seed(self.seed)
        plan = self.plan  # decided once, before anything loads (training/plan.py); printed once
        if is_main_process():
            print("\n".join(f"train: {line}" for line in plan.describe()), flush=True)
        for line in plan.describe():
            log.info(line)
        model, tokenizer = load_for_training(self.base_model, self.quantization, self.lora, plan)
        self.tokenizer = tokenizer
        if plan.model_checkpointing:
            checkpointing.apply(model, plan.checkpointing)
        if plan.fp8_cache:
            from expqa.model.fused_lora import cache_fp8_weights

            held = cache_fp8_weights(model)
            if is_main_process():
                print(f"train: FP8 weight cache {held / 2**30:.1f} GiB, filled at first use", flush=True)
        train_data = build_sft_dataset(self.data_dir / "train.jsonl", tokenizer, self.config.max_seq_length)
        val_path = self.data_dir / "val.jsonl"
        val_data = (
            build_sft_dataset(val_path, tokenizer, self.config.max_seq_length)
            if val_path.exists() and val_path.stat().st_size
            else None
        )
        self.stop_on_signal = StopOnSignal()
        callbacks = [self.stop_on_signal, LogLastStep(), WriteFingerprint(self.fingerprint())]
        if self.metrics_dir is not None and is_main_process():
            from dvclive import Live

            live = Live(dir=str(self.metrics_dir), dvcyaml=False, save_dvc_exp=False, report=None)
            # which checkpointing ran, in metrics/train
            live.summary.update({k: v for k, v in self.run_choices().items() if v is not None})
            callbacks.append(DVCLiveMetrics(live=live, log_model=False))
        self.trainer = make_sft_trainer_class()(
            model=model,
            args=self._sft_config(val_data is not None, model),
            train_dataset=train_data,
            eval_dataset=val_data,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        from transformers import ProgressCallback

        self.trainer.remove_callback(ProgressCallback)  # the Trainer's own bar, replaced by one with numeric logs
        self.trainer.add_callback(MetricsLine())
        if self.config.lm_head_loss == "expqa":  # after SFTTrainer, which patched the base model with its own head
            from expqa.model.lm_head import add_label_lm_head

            add_label_lm_head(model.get_base_model())
        return self.trainer

    # -- train / evaluate / save ---------------------------------------------------------------------------------
    def train(self) -> dict:
        self._setup_logging()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        resume = find_resumable_checkpoint(self.checkpoint_dir, self.fingerprint(), remove_foreign=is_main_process())
        if self.metrics_dir is not None and resume is None and is_main_process():
            shutil.rmtree(self.metrics_dir, ignore_errors=True)  # a fresh run starts fresh curves
        trainer = self.setup()
        resume = agree_across_processes(self.fingerprint(), resume)  # several machines: same inputs, same checkpoint
        self.stop_on_signal.install()
        if resume is not None:
            log.warning("resuming from %s", resume)
            print(f"train: resuming from {resume}", flush=True)
            trainer.args.eval_on_start = False  # the checkpoint's log history holds the eval before training
            trainer._total_train_tokens = tokens_logged_at_checkpoint(resume)
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.cuda.OutOfMemoryError as exc:
            raise TrainingError(OOM_ADVICE) from exc
        if self.stop_on_signal.received is not None:
            raise TrainingInterrupted(
                f"stopped at step {trainer.state.global_step}; checkpoint saved in "
                f"{self.checkpoint_dir}. Run the stage again to resume."
            )
        metrics = dict(result.metrics)
        metrics["train_loss"] = mean_train_loss(trainer.state.log_history)
        if trainer.is_fsdp_enabled and is_main_process():
            print("train: " + fsdp_summary(trainer.model), flush=True)
        tokens = torch.tensor(float(trainer.real_tokens), device=trainer.args.device)
        if world_size() > 1:  # every process counted its own shard
            torch.distributed.all_reduce(tokens)
        metrics["real_tokens_per_second"] = float(tokens) / max(metrics.get("train_runtime", 0), 1e-9)
        metrics["global_step"] = trainer.state.global_step
        metrics.update(self.run_choices())
        metrics["resumed_from_step"] = int(resume.name.split("-")[-1]) if resume else 0
        before = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0]
        if before:  # eval_on_start: the base model's val loss (LoRA B starts at zero)
            metrics["eval_loss_before_training"] = before[0]
        if trainer.eval_dataset is not None:
            final = [
                e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == trainer.state.global_step
            ]
            metrics.update({"eval_loss": final[-1]["eval_loss"]} if final else self.evaluate())
        self.metrics = metrics
        if is_main_process():
            self._write_metrics()
        return metrics

    def run_choices(self) -> dict:
        """What `auto` settings chose on this machine: gradient checkpointing and FP8 matmuls (metrics/train)."""
        return self.plan.metrics()

    @functools.cached_property
    def plan(self) -> RunPlan:
        """The run plan for this machine (training/plan.py), made at first use: before loading anything."""
        from transformers import AutoConfig

        return plan_run(
            self.config, self.lora, self.quantization, AutoConfig.from_pretrained(self.base_model), machine_facts()
        )

    def _write_metrics(self) -> None:
        """metrics/train (DVC-tracked: curves and values that are the same whenever the run is reproduced) and
        logs/train/train_run.json (not compared: wall time, throughput, the step a run resumed from)."""
        metrics = self.metrics
        if self.metrics_dir is not None:
            summary = {k: v for k, v in self.run_choices().items() if v is not None}
            if self.profile is not None:  # `dvc metrics diff` / `exp show` tell a cpu run from a gpu run
                summary["profile"] = self.profile
            if "eval_loss_before_training" in metrics:
                summary["eval_loss_before_training"] = metrics["eval_loss_before_training"]
            write_training_metrics(self.metrics_dir, self.trainer.state.log_history, metrics["train_loss"], summary)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            run = {k: v for k, v in metrics.items() if not is_compared(k) or k == "resumed_from_step"}
            (self.log_dir / "train_run.json").write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")

    def evaluate(self) -> dict:
        """Loss on the val split with the current weights."""
        if self.trainer is None:
            self.setup()
        return self.trainer.evaluate()

    def save_model(self, path: str | Path) -> None:
        """Adapter + tokenizer/chat template + resolved config and input hashes, written atomically (rank 0).

        Under FSDP every process must call it: the LoRA weights are gathered from all of them first."""
        state = full_adapter_state_dict(self.trainer.model) if self.trainer.is_fsdp_enabled else None
        if not is_main_process():
            return
        with atomic_dir(Path(path)) as tmp:
            self.trainer.model.save_pretrained(tmp, state_dict=state)
            if state is not None:
                unwrap_adapter_file(tmp)
            # PEFT writes target_modules from a set, in hash-seed order: sort it so reruns are byte-identical
            config_path = tmp / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            if isinstance(adapter_config.get("target_modules"), list):
                adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
            config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
            self.tokenizer.save_pretrained(tmp)
            # wall-clock figures (runtime, tokens/s), the step a run resumed from (logs/train/train_run.json) and the
            # checkpointing `auto` chose and the FP8 weight cache (they depend on the card's free memory, not on the
            # maths; in metrics/) are left out: the adapter folder stays byte-identical when a run is reproduced or
            # resumed
            metrics = {
                k: v
                for k, v in getattr(self, "metrics", {}).items()
                if is_compared(k)
                and k != "resumed_from_step"
                and not k.startswith(("gradient_checkpointing", "fp8_weight_cache"))
            }
            record = {
                **self.fingerprint(),
                "base_model": str(self.base_model),
                "metrics": metrics,
                "versions": library_versions(),
            }
            (tmp / "training_config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
