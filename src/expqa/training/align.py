"""Preference tuning after SFT: TRL's DPOTrainer continues the SFT adapter on preference pairs.

Why this design: the reference model is the SFT model, and a second full copy of the base in memory is what a
separate reference would cost. TRL, given a PEFT model that already holds an adapter and no ref_model, copies that
adapter under the name "ref" and computes the reference log-probabilities by switching to it: one base in memory
(4-bit on a GPU), two small adapters. The reference log-probabilities are computed once per pair before training
(precompute_ref_log_probs), not on every step of every epoch: the reference does not change, so a step is one
forward and backward of the policy only. The saved adapter is the trained "default" alone, in the SFT adapter's
format, so merge, export and `expqa ask` take it as they take the SFT one.

The run plan (device, dtypes, processes, fused LoRA, FP8 base matmuls, checkpointing) is the train stage's
(expqa.training.plan) for padded rows of align.pairs_per_step x 2 sequences of at most align.max_length tokens:
TRL's DPO has no padding-free path in this version. Resumable like train: checkpoints in --checkpoints carry the
run's fingerprint (params, input hashes, code) and a rerun with the same fingerprint continues from the last one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import torch

from expqa.config import Params
from expqa.data.chatml import load_chatml_dataset
from expqa.data.dataset import TEMPLATE_KWARGS
from expqa.data.preferences import Guard, as_conversations, load_preferences, split_preferences
from expqa.files import atomic_dir, sha256_file, write_json
from expqa.training.callbacks import DVCLiveMetrics, LogLastStep, MetricsLine, StopOnSignal, WriteFingerprint
from expqa.training.distributed import is_main_process
from expqa.training.resume import code_fingerprint, find_resumable_checkpoint, library_versions

LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo", "apo_zero": "apo_zero"}  # align.method -> DPOConfig.loss_type
ADAPTER_KEYS = ("r", "lora_alpha", "target_modules")  # what the SFT adapter and params.yaml's lora must agree on


class AlignError(RuntimeError):
    """The align stage cannot run as asked; the message says what to change."""


def pass_through(adapter: Path, out: Path) -> None:
    """align.enabled false: the SFT adapter, byte for byte."""
    with atomic_dir(out) as tmp:
        for item in adapter.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)


# the curves dvc.yaml plots (dvclive's names): with align off they exist without rows
PLOTTED_CURVES = ("loss", "rewards/accuracies", "rewards/margins")


def write_disabled_outputs(metrics_dir: Path, log_dir: Path) -> None:
    """align.enabled false: dvclive's folder with the plotted curves empty and a log folder that says the stage was
    off. DVC fails a stage that leaves a declared output missing, and curves of an earlier run left in place would
    describe a model that is not the one shipped."""
    with atomic_dir(metrics_dir) as tmp:
        write_json(tmp / "metrics.json", {"enabled": False})
        for name in PLOTTED_CURVES:
            curve = tmp / "plots" / "metrics" / f"{name}.tsv"
            curve.parent.mkdir(parents=True, exist_ok=True)
            curve.write_text(f"step\t{name.rsplit('/', 1)[-1]}\n")
    with atomic_dir(log_dir) as tmp:
        write_json(tmp / "align_run.json", {"enabled": False})


def check_adapter(adapter: Path, lora) -> None:
    """The SFT adapter must have the shape params.yaml's lora section gives the fresh adapter it is loaded into."""
    saved = json.loads((adapter / "adapter_config.json").read_text())
    wanted = {"r": lora.r, "lora_alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
    found = {k: sorted(saved[k]) if k == "target_modules" else saved.get(k) for k in ADAPTER_KEYS}
    differ = [f"{k} {found[k]} (params.yaml: {wanted[k]})" for k in ADAPTER_KEYS if found[k] != wanted[k]]
    if differ:
        raise AlignError(
            f"{adapter} was trained with {', '.join(differ)}: run the train stage again with these params "
            "(dvc repro does)"
        )


def preference_data(preferences: Path, questions: Path, data_dir: Path, params: Params) -> dict:
    """Records read and guarded, split into train and held out, with counts for the report."""
    held_out_rows = [row for name in ("val", "test") for row in load_chatml_dataset(data_dir / f"{name}.jsonl")]
    questions_list = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    guard = Guard.build(questions_list, held_out_rows)
    records, quarantined = load_preferences(preferences, guard, params.data.on_invalid)
    trained_ids = {row["id"].split("#", 1)[0] for row in load_chatml_dataset(data_dir / "train.jsonl")}
    usable = [r for r in records if r["source_id"] in trained_ids]
    train, held_out = split_preferences(usable, params.align.eval_fraction, params.base.seed)
    return {
        "train": train,
        "held_out": held_out,
        "quarantined": quarantined,
        "counts": {
            "records": len(records) + len(quarantined),
            "quarantined": len(quarantined),
            "source_not_in_train_split": len(records) - len(usable),
            "train_pairs": len(train),
            "held_out_pairs": len(held_out),
        },
    }


def make_dpo_trainer_class():
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import DPOTrainer

    class EpochSeededSampler(LengthGroupedSampler):
        """transformers' length-grouped order, drawn from (seed, epoch) alone: a run resumed at an epoch boundary
        sees the same order as one that never stopped (the global generator's state there differs)."""

        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
            self.seed = seed

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before each epoch
            self.generator.manual_seed(self.seed + epoch)

    class LengthGroupedDPOTrainer(DPOTrainer):
        """DPOTrainer whose micro-batches hold pairs of similar length (in a seeded random order of such batches):
        TRL pads every chosen and rejected sequence of a micro-batch to its longest, and with random batches of the
        shipped pairs a CPU step spent about half its tokens on padding."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [
                len(prompt) + max(len(chosen), len(rejected))
                for prompt, chosen, rejected in zip(
                    dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
                )
            ]
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return EpochSeededSampler(batch, lengths, self.args.seed)

    return LengthGroupedDPOTrainer


class AlignTrainer:
    """DPO (or IPO, APO-zero) of the SFT adapter in `adapter` against itself as reference; see the module docstring."""

    def __init__(self, params: Params, *, base_model, adapter, preferences, questions, data_dir, checkpoint_dir,
                 metrics_dir, log_dir):  # fmt: skip
        self.params, self.align = params, params.align
        self.base_model, self.adapter = Path(base_model), Path(adapter)
        self.preferences, self.questions, self.data_dir = Path(preferences), Path(questions), Path(data_dir)
        self.checkpoint_dir, self.metrics_dir = Path(checkpoint_dir), Path(metrics_dir)
        self.log_dir = Path(log_dir)
        self.trainer = None

    @functools.cached_property
    def plan(self):
        """The train stage's run plan for padded rows of pairs_per_step x 2 sequences of max_length tokens."""
        from transformers import AutoConfig

        from expqa.training.plan import machine_facts, plan_run

        p = self.params
        rows = dataclasses.replace(
            p.train,
            micro_batch=f"{2 * self.align.pairs_per_step} conversations",
            padding_free=False,
            max_seq_length=self.align.max_length,
            gradient_accumulation_steps=1,
            use_liger_kernel=False,  # TRL's DPO computes log-probabilities with its own fused LM head
        )
        return plan_run(rows, p.lora, p.quantization, AutoConfig.from_pretrained(self.base_model), machine_facts())

    @functools.cached_property
    def _input_hashes(self) -> dict:
        data = {name: sha256_file(self.data_dir / f"{name}.jsonl") for name in ("train", "val", "test")}
        return {
            "preferences_sha256": sha256_file(self.preferences),
            "questions_sha256": sha256_file(self.questions),
            "data_sha256": data,
            "sft_adapter_sha256": sha256_file(self.adapter / "adapter_model.safetensors"),
            "base_weights_sha256": json.loads((self.base_model / "base_info.json").read_text()).get("weights_sha256"),
        }

    def fingerprint(self) -> dict:
        p, plan = self.params, self.plan
        config = {
            "align": dataclasses.asdict(p.align),
            "train": dataclasses.asdict(p.train),
            "lora": dataclasses.asdict(p.lora),
            "quantization": dataclasses.asdict(p.quantization),
            "seed": p.base.seed,
            "profile": p.profile,
            **{k: getattr(plan, k) for k in ("device", "weights_dtype", "quant_compute_dtype", "bf16", "fp8")},
            "world_size": plan.world_size,
        }
        return {"config": config, **self._input_hashes, "code": code_fingerprint()}

    def _dpo_config(self, has_eval: bool):
        from trl import DPOConfig

        from expqa.training.trainer import checkpointing_argument

        a, t, plan = self.align, self.params.train, self.plan
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.log_dir / "tensorboard")  # transformers 5 reads only this
        return DPOConfig(
            output_dir=str(self.checkpoint_dir),
            seed=self.params.base.seed,
            data_seed=self.params.base.seed,
            per_device_train_batch_size=a.pairs_per_step,
            per_device_eval_batch_size=a.pairs_per_step,
            gradient_accumulation_steps=1,
            learning_rate=a.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,  # a ratio: the first tenth of the steps
            num_train_epochs=a.num_train_epochs,
            optim=t.optim,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            loss_type=[LOSS_TYPES[a.method]],
            beta=a.beta,
            max_length=a.max_length,
            truncation_mode="keep_start",
            precompute_ref_log_probs=True,
            bf16=plan.bf16,
            use_cpu=plan.device == "cpu",
            # the plan's, enabled on the model by load_for_training (the argument by this version's name)
            **{checkpointing_argument(DPOConfig): False},
            logging_steps=a.logging_steps,
            logging_first_step=True,
            eval_strategy="epoch" if has_eval else "no",
            prediction_loss_only=True,  # else TRL's evaluation keeps every batch's full-vocabulary logits (OOM on CPU)
            save_strategy="steps",
            save_steps=a.logging_steps * 5,
            save_total_limit=2,
            report_to=["tensorboard"],
            ddp_find_unused_parameters=False,
            dataloader_num_workers=0,
            disable_tqdm=False,
        )

    def _datasets(self, data: dict):
        """The pairs as datasets stored in --checkpoints/pairs: TRL writes the tokenized pairs and the reference
        log-probabilities next to a dataset's files, and with several processes they must all read one copy (an
        in-memory dataset gets a temporary folder per process)."""
        from datasets import Dataset, load_from_disk

        from expqa.training.distributed import world_size

        folder = self.checkpoint_dir / "pairs"
        parts = {"train": data["train"], "held_out": data["held_out"]}
        if is_main_process():
            shutil.rmtree(folder, ignore_errors=True)
            for name, records in parts.items():
                if records:  # longest first: the reference pass's batches (in this order) hold similar lengths
                    ordered = sorted(
                        records, key=lambda r: -(len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])))
                    )
                    Dataset.from_list(as_conversations(ordered, TEMPLATE_KWARGS)).save_to_disk(str(folder / name))
        if world_size() > 1:
            torch.distributed.barrier()
        return tuple(load_from_disk(str(folder / name)) if records else None for name, records in parts.items())

    def setup(self, data: dict):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import ProgressCallback, set_seed

        from expqa.model import checkpointing
        from expqa.model.loading import load_for_training

        p, plan = self.params, self.plan
        check_adapter(self.adapter, p.lora)
        if p.train.num_threads:
            torch.set_num_threads(p.train.num_threads)
        set_seed(p.base.seed)
        if is_main_process():
            print("\n".join(f"align: {line}" for line in plan.describe()), flush=True)
        model, tokenizer = load_for_training(self.base_model, p.quantization, p.lora, plan)
        state = load_file(self.adapter / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, state)  # the fresh adapter becomes the SFT one
        if getattr(result, "unexpected_keys", None):
            raise AlignError(f"{self.adapter}: weights the model has no place for: {result.unexpected_keys[:3]}")
        if plan.model_checkpointing:
            checkpointing.apply(model, plan.checkpointing)
        if plan.fp8_cache:
            from expqa.model.fused_lora import cache_fp8_weights

            cache_fp8_weights(model)
        args = self._dpo_config(bool(data["held_out"]))  # sets up the processes (DDP) too
        train, held_out = self._datasets(data)
        self.stop_on_signal = StopOnSignal()
        callbacks = [self.stop_on_signal, LogLastStep(), WriteFingerprint(self.fingerprint())]
        if is_main_process():
            from dvclive import Live

            live = Live(dir=str(self.metrics_dir), dvcyaml=False, save_dvc_exp=False, report=None)
            callbacks.append(DVCLiveMetrics(live=live, log_model=False))
        self.tokenizer = tokenizer
        self.trainer = make_dpo_trainer_class()(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        self.trainer.remove_callback(ProgressCallback)
        self.trainer.add_callback(MetricsLine())
        return self.trainer

    def train(self, data: dict) -> dict:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        resume = find_resumable_checkpoint(self.checkpoint_dir, self.fingerprint(), remove_foreign=is_main_process())
        if resume is None and is_main_process():
            shutil.rmtree(self.metrics_dir, ignore_errors=True)  # a fresh run starts fresh curves
        trainer = self.setup(data)
        self.stop_on_signal.install()
        if resume is not None and is_main_process():
            print(f"align: resuming from {resume}", flush=True)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if self.stop_on_signal.received is not None:
            from expqa.training.trainer import TrainingInterrupted

            raise TrainingInterrupted(
                f"stopped at step {trainer.state.global_step}; checkpoint saved in {self.checkpoint_dir}. "
                "Run the stage again to resume."
            )
        metrics = {"global_step": trainer.state.global_step, "train_runtime": result.metrics.get("train_runtime")}
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        metrics["train_loss"] = sum(losses) / len(losses) if losses else None
        if trainer.eval_dataset is not None:
            final = trainer.evaluate()
            metrics.update({k.removeprefix("eval_"): v for k, v in final.items() if k.startswith("eval_rewards")})
            metrics["eval_loss"] = final.get("eval_loss")
        metrics["pairs_per_second"] = (
            len(data["train"]) * self.align.num_train_epochs / max(metrics["train_runtime"] or 0, 1e-9)
        )
        self.metrics = metrics
        return metrics

    def save_model(self, out: Path, data: dict) -> None:
        """The trained adapter alone (not TRL's "ref" copy), the tokenizer and the run's record."""
        if not is_main_process():
            return
        model = self.trainer.model
        with atomic_dir(Path(out)) as tmp:
            model.save_pretrained(tmp, selected_adapters=["default"])
            config_path = tmp / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            if isinstance(adapter_config.get("target_modules"), list):
                adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
            config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
            self.tokenizer.save_pretrained(tmp)
            record = {
                **self.fingerprint(),
                "base_model": str(self.base_model),
                "sft_adapter": str(self.adapter),
                "counts": data["counts"],
                "metrics": {k: v for k, v in self.metrics.items() if k not in ("train_runtime", "pairs_per_second")},
                "versions": library_versions(),
            }
            (tmp / "training_config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_align_report(path: Path, metrics: dict | None, counts: dict | None, enabled: bool) -> None:
    """metrics/align/metrics.json's summary beside dvclive's curves: what ran, on how many pairs, how it ended."""
    report = {"enabled": enabled}
    if counts:
        report.update(counts)
    if metrics:
        report.update({k: v for k, v in metrics.items() if k not in ("train_runtime", "pairs_per_second")})
    write_json(path, report)
