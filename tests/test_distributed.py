"""DDP on CPU (gloo): 2 processes with the same global batch learn what 1 process learns."""

import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO


def train(tmp_path, tiny_base, processed_dir, name, processes, micro_batch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["lora"].update(r=4, alpha=8, dropout=0.0)  # dropout draws different random numbers per process
    params["cpu"]["train"].update(max_steps=3, eval_steps=3, save_steps=100, logging_steps=1, max_seq_length=128,
                                  per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
                                  learning_rate=1e-2, warmup_ratio=0.0, num_threads=1, num_processes=processes)
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train.py"), "--params", str(run_dir / "params.yaml"),
         "--base", str(tiny_base), "--data", str(processed_dir), "--out", str(run_dir / "adapter"),
         "--checkpoints", str(run_dir / "ckpt"), "--metrics", str(run_dir / "metrics")],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_base, processed_dir, tmp_path):
    one, _ = train(tmp_path, tiny_base, processed_dir, "one", processes=1, micro_batch=4)
    two, log = train(tmp_path, tiny_base, processed_dir, "two", processes=2, micro_batch=2)
    assert "launching 2 processes" in log.stdout
    assert log.stdout.count("train: {") == 1, "only rank 0 reports"
    record_one = json.loads((one / "adapter" / "training_config.json").read_text())
    record_two = json.loads((two / "adapter" / "training_config.json").read_text())
    assert record_two["config"]["world_size"] == 2 and record_one["config"]["world_size"] == 1
    # the same loss at every step and the same val loss after training. (Weights are compared through the loss:
    # Adam divides by sqrt(v), so rounding differences in the all-reduce of near-zero gradients move individual
    # weights by up to lr while leaving the function the model computes unchanged.)
    def losses(run_dir):
        rows = (run_dir / "metrics" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
        return [float(row.split("\t")[1]) for row in rows]

    assert len(losses(one)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert record_two["metrics"]["eval_loss"] == pytest.approx(record_one["metrics"]["eval_loss"], rel=1e-4)
    assert record_two["metrics"]["eval_loss"] < record_two["metrics"]["eval_loss_before_training"]
    weights_two = load_file(two / "adapter" / "adapter_model.safetensors")
    assert max(w.abs().max().item() for k, w in weights_two.items() if "lora_B" in k) > 1e-3
    # only rank 0 wrote the dvclive folder and a single set of checkpoints
    assert (two / "metrics" / "metrics.json").exists()
