"""Training on a tiny random Llama: adapters move, the base does not, checkpoints resume, failures are clear."""

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from expqa.config import LoRAConfig
from expqa.training import callbacks as callbacks_module
from expqa.training import resume as resume_module
from expqa.training.callbacks import StopOnSignal
from expqa.training.resume import FINGERPRINT_FILE, find_resumable_checkpoint
from expqa.training.trainer import QLoRATrainer, TrainingError
from helpers import REPO, make_tiny_llama, tiny_training_config, write_params


def make_trainer(base, data, tmp_path, quantized=False, **overrides):
    params, train = tiny_training_config(**overrides)
    return QLoRATrainer(
        train,
        lora=LoRAConfig(r=4, alpha_ratio=2.0, dropout=0.0, target_modules=params.lora.target_modules),
        quantization=dataclasses.replace(params.quantization, load_in_4bit=quantized),
        seed=params.base.seed,
        base_model=base,
        data_dir=data,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_dir=tmp_path / "metrics",
        log_dir=tmp_path / "logs",
    )


FAST_PATH = dict(micro_batch="256 tokens", fused_lora="grouped")  # a token budget packs: padding-free, varlen


@pytest.mark.slow
@pytest.mark.parametrize(
    "quantized,packed",
    [(False, False), (True, False), (False, True), (True, "fast")],
    ids=["lora", "qlora-4bit", "lora-padding-free", "qlora-token-budget-fused"],
)
def test_training_moves_lora_weights_only_and_saves_a_complete_adapter(
    tiny_base, processed_dir, tmp_path, quantized, packed
):
    extra = FAST_PATH if packed == "fast" else dict(padding_free=True) if packed else dict(padding_free=False)
    trainer = make_trainer(tiny_base, processed_dir, tmp_path, quantized=quantized, **extra)
    metrics = trainer.train()
    assert metrics["global_step"] == 4 and metrics["eval_loss"] < metrics["eval_loss_before_training"]
    model = trainer.trainer.model
    base_weights = load_file(tiny_base / "model.safetensors")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            assert param.abs().sum() > 0, f"{name} did not move (LoRA B starts at zero)"
        elif not quantized and "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(param.detach().float(), base_weights[key].float(), msg=key)
            assert not param.requires_grad
    out = tmp_path / "adapter"
    trainer.save_model(out)
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "training_config.json",
    } <= names
    record = json.loads((out / "training_config.json").read_text())
    assert set(record["data_sha256"]) == {"train", "val"} and record["config"]["lora"]["r"] == 4
    assert record["config"]["quantization"]["load_in_4bit"] is quantized
    # the checkpointing that ran (the CPU profile: off) is in the metrics and the log, not in the adapter's record
    summary = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert summary["gradient_checkpointing"] == metrics["gradient_checkpointing"] == "off"
    assert summary["gradient_checkpointing_layers"] == 0
    assert not any(k.startswith("gradient_checkpointing") for k in record["metrics"])
    assert "gradient checkpointing off" in (tmp_path / "logs" / "training.log").read_text()


@pytest.mark.slow
def test_corrupt_last_checkpoint_falls_back_and_foreign_ones_are_removed(tiny_base, processed_dir, tmp_path, caplog):
    trainer = make_trainer(tiny_base, processed_dir, tmp_path)
    trainer.train()
    ckpt = tmp_path / "ckpt"
    fingerprint = trainer.fingerprint()
    assert find_resumable_checkpoint(ckpt, fingerprint).name == "checkpoint-4"
    (ckpt / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # killed mid-write
    assert find_resumable_checkpoint(ckpt, fingerprint).name == "checkpoint-2"
    assert "skipping checkpoint" in caplog.text
    other = {**fingerprint, "config": {**fingerprint["config"], "seed": 7}}
    assert find_resumable_checkpoint(ckpt, other) is None
    assert not list(ckpt.glob("checkpoint-*")), "checkpoints of another configuration must not be resumed"


def test_checkpoints_of_other_code_are_not_resumed(tmp_path):
    """A fix to the trainer re-runs the stage (DVC) and must train again, not resume the old run's last checkpoint."""
    package = tmp_path / "expqa"
    package.mkdir()
    (package / "trainer.py").write_text("x = 1\n")
    before = resume_module.code_fingerprint(package)
    assert before == resume_module.code_fingerprint(package)
    (package / "trainer.py").write_text("x = 2\n")
    resume_module.code_fingerprint.cache_clear()
    assert resume_module.code_fingerprint(package)["expqa_sha256"] != before["expqa_sha256"]
    assert {"torch", "transformers", "peft", "trl"} <= set(before)


@pytest.mark.slow
@pytest.mark.parametrize("logging_steps", [1, 3])
def test_non_finite_loss_stops_naming_the_step(tiny_base, processed_dir, tmp_path, embedded_tokenizer, logging_steps):
    """Checked where the Trainer syncs anyway (logging steps here), but always naming the first bad step."""
    from safetensors.torch import save_file

    broken = make_tiny_llama(tmp_path / "broken", embedded_tokenizer)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    trainer = make_trainer(broken, processed_dir, tmp_path, eval_steps=100, logging_steps=logging_steps, save_steps=99)
    trainer.config = dataclasses.replace(trainer.config, max_steps=5)
    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 1"):
        trainer.train()


def test_signal_asks_for_a_checkpoint_and_a_stop_at_the_next_logged_step(capsys):
    from types import SimpleNamespace

    from transformers import TrainerControl

    callback, control = StopOnSignal(), TrainerControl()
    args = SimpleNamespace(logging_steps=5)
    callback.on_step_end(args, SimpleNamespace(global_step=5, max_steps=20), control)
    assert not control.should_save
    callback._handle(signal.SIGINT, None)
    assert "saving a checkpoint at the next logged step" in capsys.readouterr().out
    for step in (6, 7, 8, 9):  # a checkpoint between logged steps would resume into another loss curve
        callback.on_step_end(args, SimpleNamespace(global_step=step, max_steps=20), control)
        assert not control.should_save and not control.should_training_stop, step
    callback.on_step_end(args, SimpleNamespace(global_step=10, max_steps=20), control)
    assert control.should_save and control.should_training_stop
    control = TrainerControl()
    callback.on_step_end(args, SimpleNamespace(global_step=12, max_steps=12), control)  # or the last step
    assert control.should_save and control.should_training_stop


def test_second_signal_exits_at_once_with_one_line(monkeypatch, capsys):
    def exit_instead(code):
        raise SystemExit(code)

    monkeypatch.setattr(callbacks_module.os, "_exit", exit_instead)  # the real one would end pytest
    callback = StopOnSignal()
    callback._handle(signal.SIGINT, None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        callback._handle(signal.SIGINT, None)
    assert stopped.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "train: aborted by a second signal (SIGINT); the next run resumes from the last complete checkpoint"
    ]


def test_why_a_checkpoint_is_skipped_is_printed_once(tmp_path, capsys):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    assert find_resumable_checkpoint(tmp_path, {}, remove_foreign=False) is None
    assert capsys.readouterr().err == ""  # not the main process: it only logs
    assert find_resumable_checkpoint(tmp_path, {}) is None
    assert capsys.readouterr().err == (
        f"train: skipping checkpoint {folder} (missing adapter_model.safetensors, "
        f"optimizer.pt, scheduler.pt, {FINGERPRINT_FILE}); falling back to the one "
        "before\n"
    )


def run_stage(repo_params, base, data, out, ckpt, metrics, cwd=None):
    if cwd is not None:
        cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "stages" / "train.py"),
            "--params",
            str(repo_params),
            "--base",
            str(base),
            "--data",
            str(data),
            "--out",
            str(out),
            "--checkpoints",
            str(ckpt),
            "--metrics",
            str(metrics),
            "--log-folder",
            str(ckpt.parent / "logs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd or ckpt.parent,
    )  # logs/ lands next to the outputs


@pytest.mark.slow
def test_killed_run_resumes_from_last_complete_checkpoint(tiny_base, processed_dir, tmp_path):
    train = dict(
        max_steps=8,
        save_steps=2,
        eval_steps=4,
        logging_steps=1,
        micro_batch="2 conversations",
        max_seq_length=128,
        num_threads=1,
    )
    params_file = write_params(tmp_path / "params.yaml", {"cpu.train": train, "lora": dict(r=4, alpha_ratio=2.0)})
    ckpt, out, metrics = tmp_path / "ckpt", tmp_path / "adapter", tmp_path / "metrics"
    first = run_stage(params_file, tiny_base, processed_dir, out, ckpt, metrics)
    deadline = time.time() + 240
    while not (ckpt / "checkpoint-4" / FINGERPRINT_FILE).exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline, "no checkpoint-4 within 240 s"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # no chance to clean up, like a power cut or the OOM killer
    first.wait()
    assert not out.exists()
    second = run_stage(params_file, tiny_base, processed_dir, out, ckpt, metrics)
    log, _ = second.communicate(timeout=300)
    assert second.returncode == 0, log
    resumed = [line for line in log.splitlines() if line.startswith("train: resuming from")]
    assert resumed and int(resumed[0].rsplit("-", 1)[-1]) >= 4, log
    summary = json.loads(log.strip().splitlines()[-1].removeprefix("train: "))
    assert summary["global_step"] == 8
    assert json.loads((tmp_path / "logs" / "train_run.json").read_text())["resumed_from_step"] >= 4

    # the same run, never stopped: every output file is the same, byte for byte. Exact on any CPU: both runs on this
    # machine with num_threads 1; the resumed one reloads bit-exact fp32 adapter, optimizer and RNG state and then
    # runs the same kernels on the same batches as the uninterrupted one
    uninterrupted = tmp_path / "uninterrupted"
    third = run_stage(
        params_file,
        tiny_base,
        processed_dir,
        uninterrupted / "adapter",
        uninterrupted / "ckpt",
        uninterrupted / "metrics",
        cwd=uninterrupted,
    )
    log, _ = third.communicate(timeout=300)
    assert third.returncode == 0, log

    def hashes(folder):
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    for resumed, clean in ((out, uninterrupted / "adapter"), (metrics, uninterrupted / "metrics")):
        assert hashes(resumed) == hashes(clean), (
            resumed,
            json.loads((metrics / "metrics.json").read_text()),
            json.loads((uninterrupted / "metrics" / "metrics.json").read_text()),
        )
    assert "train/runtime.tsv" not in "".join(hashes(metrics))  # wall time is not a DVC-tracked metric
    assert json.loads((uninterrupted / "logs" / "train_run.json").read_text())["resumed_from_step"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_under_the_two_process_launch(tiny_base, processed_dir, tmp_path, presses):
    """Ctrl-C in a terminal signals the foreground process group (here: the stage; torchrun and its workers run in a
    session of their own and get it from the stage). Once: a checkpoint at the next logged step, exit code 130.
    Twice: one line, exit 130. Never a traceback."""
    train = dict(
        max_steps=400,
        save_steps=200,
        eval_steps=400,
        logging_steps=20,
        micro_batch="2 conversations",
        max_seq_length=128,
        num_threads=1,
    )
    params_file = write_params(tmp_path / "params.yaml", {"cpu.train": train, "lora": dict(r=4, alpha_ratio=2.0)})
    ckpt, out, metrics = tmp_path / "ckpt", tmp_path / "adapter", tmp_path / "metrics"
    stage = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "stages" / "train.py"),
            "--params",
            str(params_file),
            "--base",
            str(tiny_base),
            "--data",
            str(processed_dir),
            "--out",
            str(out),
            "--checkpoints",
            str(ckpt),
            "--metrics",
            str(metrics),
            "--log-folder",
            str(ckpt.parent / "logs"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (metrics / "plots" / "metrics" / "loss.tsv").exists():  # training has started
        assert stage.poll() is None, stage.stdout.read()
        assert time.time() < deadline, "training did not start within 240 s"
        time.sleep(0.2)
    for _ in range(presses):
        os.killpg(stage.pid, signal.SIGINT)
        time.sleep(0.3)
    log, _ = stage.communicate(timeout=240)
    assert stage.returncode == 130, log
    assert "Traceback" not in log and "Exception ignored" not in log and "ChildFailedError" not in log, log
    saved = [int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*") if (p / FINGERPRINT_FILE).exists()]
    if presses == 1:
        assert log.count("Run the stage again to resume") == 1, log
        assert len(saved) == 1 and saved[0] % 20 == 0 and saved[0] < 400, (saved, log)
    else:
        assert log.count("train: aborted by a second signal (SIGINT)") == 1, log
        assert not saved, saved
    assert not out.exists()


@pytest.mark.slow
def test_cpu_training_is_reproducible(tiny_base, processed_dir, tmp_path):
    """Same data, params, seed and thread count -> the same losses and the same adapter, bit for bit."""
    runs = []
    for name in ("first", "second"):
        trainer = make_trainer(tiny_base, processed_dir, tmp_path / name, num_threads=1)
        metrics = trainer.train()
        trainer.save_model(tmp_path / name / "adapter")
        runs.append((metrics, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")))
    (first, weights_first), (second, weights_second) = runs
    # exact on any CPU: one process, one thread, the same kernels on the same shapes in the same order twice
    assert first["train_loss"] == second["train_loss"] and first["eval_loss"] == second["eval_loss"]
    for key in weights_first:
        assert torch.equal(weights_first[key], weights_second[key]), key
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_config.json"):
        assert (tmp_path / "first" / "adapter" / name).read_bytes() == (
            tmp_path / "second" / "adapter" / name
        ).read_bytes(), name


@pytest.mark.slow
def test_offload_checkpointing_trains_like_no_checkpointing(tiny_base, processed_dir, tmp_path):
    """The lean setting through the Trainer (autocast, optimizer, the loss guard): the same losses as off."""
    runs = {}
    for mode in ("off", "offload"):
        trainer = make_trainer(tiny_base, processed_dir, tmp_path / mode, gradient_checkpointing=mode)
        metrics = trainer.train()
        runs[mode] = (metrics, [e["loss"] for e in trainer.trainer.state.log_history if "loss" in e])
    assert runs["offload"][0]["gradient_checkpointing"] == "offload"
    assert runs["offload"][1] == pytest.approx(runs["off"][1], rel=1e-5)
    assert runs["offload"][0]["eval_loss"] == pytest.approx(runs["off"][0]["eval_loss"], rel=1e-5)


def test_liger_requested_without_the_package_is_a_clear_error(tiny_base, processed_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    trainer = make_trainer(tiny_base, processed_dir, tmp_path, use_liger_kernel=True)
    with pytest.raises(TrainingError, match=r"train.use_liger_kernel is true but liger-kernel is not installed"):
        trainer.setup()


def test_token_budget_packs_whole_conversations_into_bounded_micro_batches(tiny_base, processed_dir, tmp_path):
    trainer = make_trainer(tiny_base, processed_dir, tmp_path, **FAST_PATH)
    sft = trainer.setup()
    from expqa.data.dataset import build_sft_dataset

    conversations = build_sft_dataset(processed_dir / "train.jsonl", trainer.tokenizer, 128)["input_ids"]
    seen, sizes = [], []
    for batch in sft.get_train_dataloader():
        ids, positions = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
        assert len(ids) <= 256 and batch["input_ids"].shape[0] == 1
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        assert starts[0] == 0 and positions == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        seen += [ids[a:b] for a, b in zip(starts, starts[1:])]
        sizes.append(len(ids))
    # every conversation exactly once, none split, and packs well filled (24 conversations of ~40-80 tokens)
    assert sorted(seen) == sorted(conversations)
    assert len(sizes) < len(conversations) / 2 and sum(sizes) / len(sizes) > 128


def test_token_budget_below_max_seq_length_is_a_config_error():
    from expqa.config import TrainingConfig

    problems = TrainingConfig(micro_batch="1024 tokens", max_seq_length=2048, padding_free=True).validate()
    assert problems == [
        "train.micro_batch is '1024 tokens', below train.max_seq_length 2048: the longest "
        "conversation would not fit; raise it or lower max_seq_length"
    ]
    # a token budget packs whatever padding_free says (it applies to conversations micro-batches): nothing to agree on
    assert TrainingConfig(micro_batch="4096 tokens", padding_free=False).validate() == []


@pytest.mark.slow
def test_fp8_matmuls_train_close_to_the_compute_dtype(tiny_base, processed_dir, tmp_path, monkeypatch):
    """train.fp8_matmul: on through the Trainer: recorded in the metrics, the weight cache taken when `auto`
    checkpointing measured room for it (the same values as quantising per use: tests/model/test_fp8.py), and losses
    within a few percent of the run without FP8. bf16 on every CPU: the path of an avx512_bf16 CPU (float32 weights,
    bf16 autocast), where a cache filled in the weights' dtype once gave other losses than per-use quantisation."""
    import expqa.model.loading

    monkeypatch.setattr(expqa.model.loading, "cpu_has_bf16", lambda: True)  # emulated (slower) where the CPU lacks it
    runs = {}
    for mode, checkpointing in (("off", "off"), ("on", "auto"), ("on", "off")):
        trainer = make_trainer(
            tiny_base,
            processed_dir,
            tmp_path / f"{mode}-{checkpointing}",
            fp8_matmul=mode,
            gradient_checkpointing=checkpointing,
        )
        metrics = trainer.train()
        runs[mode, checkpointing] = (metrics, [e["loss"] for e in trainer.trainer.state.log_history if "loss" in e])
    assert runs["off", "off"][0]["fp8_matmul"] == "off" and not runs["off", "off"][0]["fp8_weight_cache"]
    assert runs["on", "auto"][0]["fp8_matmul"] == "on" and runs["on", "auto"][0]["fp8_weight_cache"]
    assert not runs["on", "off"][0]["fp8_weight_cache"]  # checkpointing set by hand: nothing measured
    # cached or not: the same numbers, exactly, on any CPU: the cache holds what quantize_rows returns per use
    # (elementwise amax, IEEE division, round-to-nearest cast: no ISA-dependent rounding) and matmul_rows runs the same
    # float32 matmul on same-shaped contiguous operands, 1 thread. Only if the cache is quantised from the weight in the
    # dtype the layers compute in: bf16 under the autocast of avx512_bf16/AMX CPUs (docs/exactness_audit.md)
    assert runs["on", "auto"][1] == runs["on", "off"][1]
    assert runs["on", "off"][1] == pytest.approx(runs["off", "off"][1], rel=0.03)
    metrics = json.loads((tmp_path / "on-auto" / "metrics" / "metrics.json").read_text())
    assert metrics["fp8_matmul"] == "on" and metrics["fp8_matmul_requested"] == "on"


@pytest.mark.slow
def test_fp8_auto_stays_off_with_the_lean_setting(tiny_base, processed_dir, tmp_path, monkeypatch):
    """Checkpointing offload puts memory first: `auto` (here made to find FP8 hardware) turns FP8 off again."""
    import expqa.model.fp8

    monkeypatch.setattr(expqa.model.fp8, "supported_on", lambda capability, bf16: (True, "test: as if on a Hopper GPU"))
    trainer = make_trainer(tiny_base, processed_dir, tmp_path, fp8_matmul="auto", gradient_checkpointing="offload")
    trainer.setup()
    model = trainer.trainer.model
    assert trainer.run_choices()["fp8_matmul"] == "off" and not trainer.run_choices()["fp8_weight_cache"]
    assert not any(getattr(m, "_expqa_fp8", False) for m in model.modules())
    trainer = make_trainer(tiny_base, processed_dir, tmp_path / "auto", fp8_matmul="auto", gradient_checkpointing="off")
    trainer.setup()
    assert trainer.run_choices()["fp8_matmul"] == "on"


@pytest.mark.slow
def test_a_two_process_stage_run_prints_no_library_noise_and_numeric_metrics(tiny_base, processed_dir, tmp_path):
    """What a new user's `dvc exp run` showed (issue 32): the deprecation warnings of the renamed checkpointing
    arguments, torchrun's OMP_NUM_THREADS banner, the Trainer's "share your model" line and metrics as quoted
    strings. The cpu profile's 2-process launch is the path that printed all of them."""
    train = dict(max_steps=2, save_steps=2, eval_steps=2, logging_steps=1, micro_batch="2 conversations")
    train.update(max_seq_length=128, num_threads=1)
    params_file = write_params(tmp_path / "params.yaml", {"cpu.train": train, "lora": dict(r=4, alpha_ratio=2.0)})
    stage = run_stage(params_file, tiny_base, processed_dir, tmp_path / "adapter", tmp_path / "ckpt", tmp_path / "m")
    log, _ = stage.communicate(timeout=300)
    assert stage.returncode == 0, log
    assert "launching 2 processes" in log, log  # the launch whose banner this checks for
    for noise in (
        "FutureWarning",
        "DeprecationWarning",
        "huggingface.co/models",
        "OMP_NUM_THREADS environment variable",
    ):
        assert noise not in log, log
    metrics = [line for line in log.splitlines() if line.startswith("train: step ")]
    # the val loss before training and at step 2, steps 1 and 2, the Trainer's run summary: numbers, never '3.389'
    assert len(metrics) == 5 and not any("'" in line for line in metrics), log
    assert re.match(r"train: step 0/2: eval_loss \d+\.\d+, ", metrics[0]), metrics
    assert re.match(r"train: step 1/2: loss \d+\.\d+, grad_norm \d", metrics[1]), metrics
    assert "{'" not in log, log


def test_the_trainers_logs_print_as_numbers():
    from expqa.training.callbacks import metrics_line

    logs = {"loss": 3.3894, "grad_norm": 0.43941, "learning_rate": 0.00019991, "num_tokens": 17710.0, "epoch": 0.0102}
    assert metrics_line(10, 98, {**logs, "total_flos": 1e12}) == (
        "train: step 10/98: loss 3.389, grad_norm 0.4394, learning_rate 0.0001999, num_tokens 17710, epoch 0.0102"
    )
    assert metrics_line(0, 98, {"eval_loss": 3.21, "epoch": 0}) == "train: step 0/98: eval_loss 3.21, epoch 0"
