"""Resuming the train stage: a killed `dvc repro` resumes from the last complete checkpoint whose fingerprint
(resolved params, data, base weights, this code and the library versions) matches the run; anything else in the
checkpoint folder is skipped or cleared, so an experiment with other params never resumes a stranger."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger("expqa.train")

FINGERPRINT_FILE = "expqa_fingerprint.json"
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", FINGERPRINT_FILE)
# under FSDP the Trainer writes the optimizer state and the (adapter-only) model state in Accelerate's FSDP names
FSDP_CHECKPOINT_FILES = (
    "trainer_state.json",
    "adapter_model.safetensors",
    "optimizer.bin",
    "pytorch_model_fsdp.bin",
    "scheduler.pt",
    FINGERPRINT_FILE,
)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_is_complete(folder: Path, fingerprint: dict) -> tuple[bool, str]:
    fsdp = fingerprint.get("config", {}).get("train", {}).get("distributed") == "fsdp"
    missing = [name for name in (FSDP_CHECKPOINT_FILES if fsdp else CHECKPOINT_FILES) if not (folder / name).is_file()]
    if missing:
        return False, f"missing {', '.join(missing)}"
    try:
        if json.loads((folder / FINGERPRINT_FILE).read_text()) != fingerprint:
            return False, "written by a run with other params, data or base weights"
        json.loads((folder / "trainer_state.json").read_text())
        from safetensors import safe_open

        with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
            handle.keys()
        torch.load(folder / "scheduler.pt", weights_only=True)
    except Exception as exc:  # any unreadable file makes the checkpoint unusable
        return False, f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    return True, "ok"


def find_resumable_checkpoint(checkpoint_dir: Path, fingerprint: dict, remove_foreign: bool = True) -> Path | None:
    """Newest complete checkpoint of this run; warns about and skips broken ones; clears foreign ones (when
    remove_foreign: only one process of a distributed run may delete)."""
    folders = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for folder in folders:
        ok, why = checkpoint_is_complete(folder, fingerprint)
        if ok:
            return folder
        if why.startswith("written by a run with other") and remove_foreign:
            _warn(f"removing {folder}: {why}", remove_foreign)
            shutil.rmtree(folder)
        else:
            _warn(f"skipping checkpoint {folder} ({why}); falling back to the one before", remove_foreign)
    return None


def _warn(message: str, on_console: bool) -> None:
    """Log to logs/train/training.log and, from one process only, print it: why a run did not resume is news."""
    log.warning(message)
    if on_console:
        print(f"train: {message}", file=sys.stderr, flush=True)


def tokens_logged_at_checkpoint(checkpoint: Path) -> int:
    """TRL's count of trained tokens at a checkpoint (it restarts at 0 on resume; its last log holds the total)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    logged = [entry["num_tokens"] for entry in state.get("log_history", []) if "num_tokens" in entry]
    return int(logged[-1]) if logged else 0


# ---------------------------------------------------------------------------------------------------------------
# fingerprints


@functools.cache
def code_fingerprint(package: Path = Path(__file__).parent.parent) -> dict:
    """The training code: a checkpoint written by other code is not resumed (after a fix to the trainer, the final
    checkpoint of the old run would otherwise be "resumed" into the old adapter without training a step). package:
    src/expqa, every module of it, subpackages included."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    versions = library_versions()
    return {
        "expqa_sha256": digest.hexdigest(),
        **{name: versions[name] for name in ("torch", "transformers", "peft", "trl")},
    }


def library_versions() -> dict:
    import peft
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
