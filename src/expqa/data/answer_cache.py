"""The generate stage's answer cache: every text a teacher wrote, by what was asked, in a DVC-tracked JSON-lines file.

A key is the SHA-256 of what decides the answer: the prompt version and text, the teacher's identity (model id or
weights hash) with its sampling settings, the paper id and the pair number. The stage asks a teacher only for keys
the file does not hold, so a rerun with the same teacher and prompts asks nothing, and a changed prompt re-asks only
the pairs whose prompt changed. Thresholds are applied to the cached texts on every run: changing a check asks
nothing either.

Append-only, one line per answer, flushed as it comes: a run that stops (a server error, Ctrl-C, a crash) keeps
every answer it got, and the next run continues from there. A line cut short by a crash is the last one; it is cut
off when the file is opened again. dvc.yaml declares the file an output with `persist: true`, so DVC keeps it
between runs instead of deleting it before the stage, and caches each version like any output.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

from expqa.data.chatml import DataError, iter_jsonl


def answer_key(**parts: Any) -> str:
    """SHA-256 of the parts as canonical JSON (sorted keys): equal parts, equal key."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class AnswerCache:
    """The answers in `path` by key (a later line wins), and `add` for new ones. Use as a context manager."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()  # an empty cache is a valid output (the stage off, or nothing asked yet)
        _cut_torn_line(self.path)
        self.entries: dict[str, dict] = {}
        for line, entry in iter_jsonl(self.path):
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise DataError(
                    self.path, line, "not an answer of the cache (a JSON object with a key)", "delete the file"
                )
            self.entries[entry["key"]] = entry
        self.added = 0
        self._out: IO[str] | None = None

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def add(self, entry: dict) -> None:
        """Append one answer (a dict with its `key`) and flush it to the operating system at once."""
        if self._out is None:
            self._out = open(self.path, "a", encoding="utf-8", newline="\n")
        self._out.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        self._out.flush()
        self.entries[entry["key"]] = entry
        self.added += 1


def _cut_torn_line(path: Path) -> None:
    """Drop what follows the last newline: the part of a line a killed run did not finish writing."""
    size = path.stat().st_size
    if not size:
        return
    with open(path, "rb+") as stream:
        stream.seek(max(0, size - (1 << 20)))
        tail = stream.read()
        if tail.endswith(b"\n"):
            return
        end = tail.rfind(b"\n")
        if end < 0 and size > len(tail):  # a last line over 1 MiB: no answer is that long, leave it to the reader
            return
        stream.truncate(size - len(tail) + end + 1)
        stream.flush()
        os.fsync(stream.fileno())
