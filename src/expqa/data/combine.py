"""Combine collected ChatML files into deduplicated, leak-free, weighted train/val/test splits.

One call of ``combine_datasets`` does four steps:

1. Scan every input once, in the given order, then every user source (``data.sources``,
   converted to ChatML rows by expqa.data.sources into a scratch file that is read back like an
   input): parse and validate each row, check that its source has a weight, drop weight-0
   sources, then drop exact and normalised duplicates (the first occurrence wins). Per kept
   conversation only fixed-size keys are kept (64-bit hashes, file index, byte offset), never
   its text, so memory grows by roughly 300 bytes per row instead of by the data size (see
   benchmarks/collect_combine_memory.py).
2. Split by group. A group is every conversation whose first user message normalises to the
   same text, so a question and its follow-up variants never cross splits. Groups are
   ordered by sha256(f"{seed}:{group_key}") and cut into test, val and train by
   conversation counts.
3. Weight the train split only: val and test keep natural source frequencies, which is what
   evaluation should see. Copies of a conversation stay in its split.
4. Write train/val/test by seeking back to each kept row's byte offset, plus
   quarantine.jsonl and manifest.json, into a temporary directory that then replaces
   ``out_dir``. Outputs depend only on input bytes and parameters (no timestamps, no
   absolute paths), so they are byte-identical on every machine.

Keys are the first 64 bits of SHA-256. Two different conversations share a key with
probability about n**2 / 2**65 (3e-8 for a million rows): accepted in exchange for memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from expqa.config import ConfigError, DataConfig
from expqa.data.chatml import (
    SPLITS,
    DataError,
    RawLine,
    canonical_messages,
    hint_for,
    iter_raw_lines,
    normalise_text,
    parse_json_line,
    row_id,
    validate_conversation,
)
from expqa.data.sources import UserSource, iter_source_records, source_sha256
from expqa.files import atomic_dir, sha256_file
from expqa.wording import plural

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.jsonl"
MANIFEST_FILE = "manifest.json"
OUTPUT_FILES = tuple(f"{split}.jsonl" for split in SPLITS) + (QUARANTINE_FILE,)
UNKNOWN_SOURCE = "(unknown)"  # invalid rows whose source cannot be read
# Every read row ends up in exactly one of these, so read == their sum.
OUTCOME_FIELDS = ("kept", "invalid", "duplicates_exact", "duplicates_normalised", "dropped_weight0")
SPLIT_FIELDS = tuple(f"{split}_conversations" for split in SPLITS)
STAT_FIELDS = ("read", *OUTCOME_FIELDS, *SPLIT_FIELDS, "train_rows")
_HASH_END = 1 << 64  # all 64-bit keys are below this


class EmptySplitError(ValueError):
    """A split would be written empty; the message says why and what was dropped on the way."""


# --- keys -----------------------------------------------------------------------------------


def hash64(text: str) -> int:
    """The first 64 bits of SHA-256(text): a compact key that is the same on every machine."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


class ConversationKeys(NamedTuple):
    """What deduplication and splitting need to know about one conversation."""

    row_id: str
    id_key: int  # hash of row_id, to catch an id reused by a different conversation
    exact: int  # same messages (canonical JSON)
    normalised: int  # same roles and normalised contents
    group: int  # keyed hash of the normalised first user message; decides the split


def conversation_keys(row: Mapping[str, Any], seed: int) -> ConversationKeys:
    """Keys of a validated row."""
    messages = row["messages"]
    normalised = [(message["role"], normalise_text(message["content"])) for message in messages]
    first_user_text = next(text for role, text in normalised if role == "user")
    conversation_id = row_id(row)
    return ConversationKeys(
        row_id=conversation_id,
        id_key=hash64(conversation_id),
        exact=hash64(canonical_messages(messages)),
        normalised=hash64(json.dumps(normalised, ensure_ascii=False)),
        group=hash64(f"{seed}:{first_user_text}"),
    )


def train_copies(weight: float, seed: int, conversation_id: str) -> int:
    """How many rows a train conversation becomes.

    ``floor(weight)`` copies, plus one more when the keyed hash of its id, mapped to [0, 1),
    is below the fractional part: deterministic, independent of row order, and over many
    conversations the mean number of copies approaches ``weight``.
    """
    whole = int(weight)
    fraction = weight - whole
    extra = fraction > 0 and hash64(f"{seed}:copy:{conversation_id}") / _HASH_END < fraction
    return whole + int(extra)


def copy_id(conversation_id: str, copy: int) -> str:
    """Id of the n-th weighted copy: the first keeps the id, later ones get '#w2', '#w3'..."""
    return conversation_id if copy == 1 else f"{conversation_id}#w{copy}"


def order_key(seed: int, output_id: str) -> int:
    """Position of a row in its output file: a keyed hash, so copies are spread out."""
    return hash64(f"{seed}:order:{output_id}")


# --- scan: validate, count, deduplicate ------------------------------------------------------


@dataclass
class KeptRows:
    """Fixed-size keys of every kept conversation, in input order.

    30 bytes per conversation, plus 8 per weighted copy beyond the first.
    """

    file_index: array = field(default_factory=lambda: array("H"))
    offset: array = field(default_factory=lambda: array("Q"))
    source_index: array = field(default_factory=lambda: array("H"))
    group: array = field(default_factory=lambda: array("Q"))
    order: array = field(default_factory=lambda: array("Q"))  # of the first copy
    copies: array = field(default_factory=lambda: array("H"))  # rows if it lands in train; config.MAX_WEIGHT fits
    extra_order: array = field(default_factory=lambda: array("Q"))  # copies 2.., flat

    def __len__(self) -> int:
        return len(self.offset)


class Where(NamedTuple):
    """Where a row came from, for errors and quarantine.jsonl."""

    path: Path
    location: int  # line of a file, or row index of a Hugging Face dataset folder
    unit: str  # "line" or "row"
    raw: str  # the row's text as read
    hint: str = ""  # how to fix an invalid row, when the generic ChatML hint would not fit (converted rows)


class Scanner:
    """Reads inputs once, keeping counts, dedup sets and ``KeptRows``; quarantines bad rows."""

    def __init__(
        self, weights: Mapping[str, float], seed: int, on_invalid: str, quarantine: IO[str], quarantine_name: str
    ) -> None:
        self.weights = weights
        self.sources = sorted(weights)
        self._source_index = {source: index for index, source in enumerate(self.sources)}
        self.seed = seed
        self.on_invalid = on_invalid
        self.quarantine = quarantine
        self.quarantine_name = quarantine_name  # where quarantine.jsonl ends up, for warnings
        self.stats: dict[str, Counter[str]] = {source: Counter() for source in self.sources}
        self.kept = KeptRows()
        self._seen_exact: set[int] = set()
        self._seen_normalised: set[int] = set()
        self._seen_ids: set[int] = set()
        self.empty_inputs: list[str] = []  # inputs without a single row, named in errors
        self.first_invalid = ""  # "path:line: reason" of the first quarantined row, for the same
        self.invalid_rows = 0  # quarantined so far, to tell an input whose every row was invalid
        self.file_first_invalid = ""  # the same as first_invalid, within the input being scanned
        # Inputs that add no row (one-line warnings, logged when others did add rows): empty, or every row invalid;
        # paths as given, as in DataError (these go to the log, not into outputs).
        self.inputs_without_rows: list[str] = []

    def scan_file(self, file_index: int, path: Path) -> None:
        rows, invalid_before = 0, self._start_input()
        for raw in iter_raw_lines(path):
            rows += 1
            self._scan_line(file_index, path, raw)
        if rows == 0:
            empty = "0 bytes" if path.stat().st_size == 0 else "only blank lines"
            self.empty_inputs.append(f"{display_path(path)} ({empty})")
            self.inputs_without_rows.append(
                f"{path}: empty ({empty}), so no rows from it; a warning, not an error, since other "
                "inputs have rows and an empty one can be on purpose (generate's output while generate.enabled is "
                "false); if it should have rows, rebuild it"
            )
        self._note_all_invalid(path, rows, invalid_before)

    def scan_source(self, file_index: int, source: UserSource, converted: IO[bytes]) -> None:
        """Convert a ``data.sources`` entry record by record into ``converted`` (ChatML JSONL, read back by
        offset like any input) and scan each row as a row of an input file; errors name the source's records."""
        rows, invalid_before = 0, self._start_input()
        for record in iter_source_records(source):
            rows += 1
            where = Where(source.path, record.location, source.unit, record.raw, record.hint)
            if record.row is None:
                self._reject(where, record.error, source.name, record.hint)
                continue
            offset = converted.tell()
            converted.write(json.dumps(record.row, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
            self._scan_row(file_index, offset, where, record.row)
        if rows == 0:
            self.empty_inputs.append(f"{display_path(source.path)} (no records)")
            self.inputs_without_rows.append(
                f"{source.path}: no records, so no rows from source {source.name}; a warning, not an "
                "error, since other inputs have rows; add its records, or remove its data.sources entry"
            )
        self._note_all_invalid(source.path, rows, invalid_before)

    def _start_input(self) -> int:
        self.file_first_invalid = ""
        return self.invalid_rows

    def _note_all_invalid(self, path: Path, rows: int, invalid_before: int) -> None:
        """With on_invalid skip an input whose every row is invalid adds nothing, yet each row only counts as
        quarantined: say so for the file (with on_invalid error its first row already stopped the run)."""
        if rows and self.invalid_rows - invalid_before == rows:
            self.inputs_without_rows.append(
                f"{path}: all {rows} row(s) invalid, so no rows from it; quarantined in "
                f"{self.quarantine_name} (first: {self.file_first_invalid}); fix the file, or set data.on_invalid: "
                "error to stop at the first bad row"
            )

    def forget_seen(self) -> None:
        """Free the dedup sets (the largest memory) once every input is scanned."""
        self._seen_exact, self._seen_normalised, self._seen_ids = set(), set(), set()

    def _scan_line(self, file_index: int, path: Path, raw: RawLine) -> None:
        where = Where(path, raw.line, "line", raw.data.decode("utf-8", "backslashreplace").rstrip("\r\n"))
        try:
            row = parse_json_line(raw.data)
        except ValueError as err:
            self._reject(where, str(err), UNKNOWN_SOURCE)
            return
        self._scan_row(file_index, raw.offset, where, row)

    def _scan_row(self, file_index: int, offset: int, where: Where, row: Any) -> None:
        try:
            validate_conversation(row)
        except ValueError as err:
            self._reject(where, str(err), self._attributed_source(row), where.hint)
            return
        source = row["source"]
        self._check_known_source(where, source)
        if self.weights[source] == 0:
            self._count(source, "dropped_weight0")
            return
        keys = conversation_keys(row, self.seed)
        if keys.exact in self._seen_exact:
            self._count(source, "duplicates_exact")
        elif keys.normalised in self._seen_normalised:
            self._count(source, "duplicates_normalised")
        elif keys.id_key in self._seen_ids:
            reason = f"id {keys.row_id!r} is already used by an earlier conversation"
            hint = "give every conversation a unique 'id', or leave 'id' out"
            self._reject(where, reason, source, hint)
        else:
            self._keep(file_index, offset, source, keys)

    def _keep(self, file_index: int, offset: int, source: str, keys: ConversationKeys) -> None:
        self._seen_exact.add(keys.exact)
        self._seen_normalised.add(keys.normalised)
        self._seen_ids.add(keys.id_key)
        self._count(source, "kept")
        kept = self.kept
        kept.file_index.append(file_index)
        kept.offset.append(offset)
        kept.source_index.append(self._source_index[source])
        kept.group.append(keys.group)
        kept.order.append(order_key(self.seed, keys.row_id))
        # Copies are decided now (the weight is known) though only train rows use them.
        copies = train_copies(self.weights[source], self.seed, keys.row_id)
        kept.copies.append(copies)
        for copy in range(2, copies + 1):
            kept.extra_order.append(order_key(self.seed, copy_id(keys.row_id, copy)))

    def _check_known_source(self, where: Where, source: str) -> None:
        # Always an error, even with on_invalid="skip": quarantining a whole source because
        # params.yaml lacks its weight would silently shrink the dataset.
        if source not in self.weights:
            raise DataError(
                where.path,
                where.location,
                f"source {source!r} has no weight; allowed sources: {', '.join(self.sources)}",
                f"add a weight for {source!r} under data.weights in params.yaml "
                "(0 drops the source), or fix the row's 'source'",
            )

    def _attributed_source(self, row: object) -> str:
        source = row.get("source") if isinstance(row, dict) else None
        return source if isinstance(source, str) and source in self.weights else UNKNOWN_SOURCE

    def _reject(self, where: Where, reason: str, source: str, hint: str = "") -> None:
        if self.on_invalid == "error":
            raise DataError(where.path, where.location, reason, hint or hint_for(reason), where.unit)
        self.stats.setdefault(source, Counter())
        self._count(source, "invalid")
        self.invalid_rows += 1
        location = f":{where.location}" if where.unit == "line" else f": {where.unit} {where.location}"
        self.first_invalid = self.first_invalid or f"{display_path(where.path)}{location}: {reason}"
        self.file_first_invalid = self.file_first_invalid or f"{where.unit} {where.location}: {reason}"
        record = {"path": display_path(where.path), where.unit: where.location, "reason": reason, "raw": where.raw}
        self.quarantine.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")

    def _count(self, source: str, outcome: str) -> None:
        self.stats[source]["read"] += 1
        self.stats[source][outcome] += 1


# --- split ------------------------------------------------------------------------------------


class SplitBounds(NamedTuple):
    """Group-hash thresholds: below ``val_start`` is test, below ``train_start`` val, else train."""

    val_start: int
    train_start: int

    def split_of(self, group: int) -> str:
        if group < self.val_start:
            return "test"
        return "val" if group < self.train_start else "train"


def target_count(n: int, fraction: float) -> int:
    """Conversations wanted in a split: round(n * fraction), but at least 1 when
    fraction > 0 and n >= 3 so a small dataset still gets a test and a val conversation."""
    count = round(n * fraction)
    return max(count, 1) if fraction > 0 and n >= 3 else count


def split_bounds(groups: Sequence[int], test_fraction: float, val_fraction: float) -> SplitBounds:
    """Cut the groups, ordered by keyed hash, into test, val and train by conversation counts.

    A group straddling a cut goes wholly to the earlier split, so no group is cut in two.
    """
    ordered = sorted(groups)
    test_end = _group_end(ordered, target_count(len(ordered), test_fraction))
    val_end = _group_end(ordered, test_end + target_count(len(ordered), val_fraction))
    return SplitBounds(_hash_at(ordered, test_end), _hash_at(ordered, val_end))


def _group_end(ordered: list[int], index: int) -> int:
    """The first position at or after ``index`` where a new group starts (or the end)."""
    index = min(index, len(ordered))
    while 0 < index < len(ordered) and ordered[index] == ordered[index - 1]:
        index += 1
    return index


def _hash_at(ordered: list[int], index: int) -> int:
    return ordered[index] if index < len(ordered) else _HASH_END


# --- write ------------------------------------------------------------------------------------

# Output positions are packed into one int (order key, row index, copy number) because a
# list of ints sorts in far less memory than a list of tuples.
_INDEX_BITS, _COPY_BITS = 32, 16


def _pack(order: int, index: int, copy: int) -> int:
    return (((order << _INDEX_BITS) | index) << _COPY_BITS) | copy


def _unpack(packed: int) -> tuple[int, int]:
    """(row index, copy number) of a packed output position."""
    copy = packed & ((1 << _COPY_BITS) - 1)
    index = (packed >> _COPY_BITS) & ((1 << _INDEX_BITS) - 1)
    return index, copy


def plan_outputs(
    kept: KeptRows, bounds: SplitBounds, sources: list[str], stats: dict[str, Counter[str]]
) -> dict[str, list[int]]:
    """Sorted packed output positions per split; counts split conversations and train rows."""
    plan: dict[str, list[int]] = {split: [] for split in SPLITS}
    extra = 0  # position of this row's copies 2.. in kept.extra_order
    for index in range(len(kept)):
        split = bounds.split_of(kept.group[index])
        copies = kept.copies[index]
        source_stats = stats[sources[kept.source_index[index]]]
        source_stats[f"{split}_conversations"] += 1
        if split != "train":
            plan[split].append(_pack(kept.order[index], index, 1))
        else:
            source_stats["train_rows"] += copies
            if copies:
                plan[split].append(_pack(kept.order[index], index, 1))
            for copy in range(2, copies + 1):
                plan[split].append(_pack(kept.extra_order[extra + copy - 2], index, copy))
        extra += max(copies - 1, 0)
    for positions in plan.values():
        positions.sort()
    return plan


class RowReader:
    """Re-reads kept rows from the inputs by byte offset."""

    def __init__(self, inputs: Sequence[Path]) -> None:
        self._files = [open(path, "rb") for path in inputs]

    def read(self, file_index: int, offset: int) -> dict[str, Any]:
        file = self._files[file_index]
        file.seek(offset)
        row = parse_json_line(file.readline())
        if not isinstance(row, dict):  # only if an input changed while combining
            raise RuntimeError(f"{file.name} changed while it was being combined; run again")
        return row

    def close(self) -> None:
        for file in self._files:
            file.close()


def write_rows(path: Path, positions: list[int], kept: KeptRows, reader: RowReader) -> int:
    """Write the planned rows of one split; weighted copies get '#wN' ids. Returns the count."""
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for packed in positions:
            index, copy = _unpack(packed)
            row = reader.read(kept.file_index[index], kept.offset[index])
            row["id"] = copy_id(row_id(row), copy)
            out.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return len(positions)


def display_path(path: Path) -> str:
    """A path as recorded in outputs: relative to the working directory when inside it, else
    as given when relative, else the bare file name (outputs never hold absolute paths)."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.name


# --- empty splits -------------------------------------------------------------------------------


def check_splits_not_empty(scanner: Scanner, params: Mapping[str, Any]) -> None:
    """Raise EmptySplitError for a split that would be empty although its fraction asks for rows.

    An empty train/val/test file would pass combine silently and fail (or train on nothing) later.
    """
    totals = Counter()
    for counts in scanner.stats.values():
        totals.update(counts)
    if totals["kept"] == 0:
        raise EmptySplitError(
            f"no conversation kept, so train/val/test would be empty; {_losses(totals)}"
            f"{_empty_inputs(scanner.empty_inputs)}{_first_invalid(scanner)}; "
            "fix the inputs (or run the collect stage again)"
        )
    wanted = {"test": params["test_fraction"], "val": params["val_fraction"], "train": 1.0}
    for split, fraction in wanted.items():
        if fraction > 0 and totals[f"{split}_conversations"] == 0:
            raise EmptySplitError(_too_few_groups(split, totals, len(set(scanner.kept.group))))
    if totals["train_rows"] == 0:
        weights = ", ".join(f"{source} {weight:g}" for source, weight in params["weights"].items())
        raise EmptySplitError(
            f"train split has {totals['train_conversations']} conversation(s) but 0 rows after weighting: "
            f"data.weights ({weights}) drew no copy of any; raise the weights (1 keeps each conversation once)"
        )


def _losses(totals: Mapping[str, int]) -> str:
    duplicates = totals["duplicates_exact"] + totals["duplicates_normalised"]
    return (
        f"read {totals['read']} row(s): {totals['invalid']} invalid, {duplicates} duplicate(s), "
        f"{totals['dropped_weight0']} dropped by weight 0"
    )


def _empty_inputs(empty: Sequence[str]) -> str:
    return f"; no rows in {', '.join(empty)}" if empty else ""


def _first_invalid(scanner: Scanner) -> str:
    return f"; first invalid row: {scanner.first_invalid}" if scanner.first_invalid else ""


def _too_few_groups(split: str, totals: Mapping[str, int], groups: int) -> str:
    fix = f"set data.{split}_fraction: 0" if split != "train" else "lower data.test_fraction/val_fraction"
    return (
        f"{split} split would be empty: {totals['kept']} conversation(s) kept, with {groups} distinct first "
        "question(s); test and val get one only from 3 conversations on, and all conversations of a question "
        f"go to the same split; add conversations with other questions, or {fix} ({_losses(totals)})"
    )


# --- manifest ---------------------------------------------------------------------------------


def build_manifest(
    inputs: Sequence[Path],
    out_dir: Path,
    stats: dict[str, Counter[str]],
    params: dict[str, Any],
    row_counts: dict[str, int],
    user_sources: Sequence[UserSource] = (),
) -> dict[str, Any]:
    """Counts per source and in total, the parameters, and SHA-256 of every input (``data.sources`` entries
    too, with their format and source name) and output."""
    sources = {name: {key: counts[key] for key in STAT_FIELDS} for name, counts in stats.items()}
    totals = {key: sum(counts[key] for counts in sources.values()) for key in STAT_FIELDS}
    for name, counts in {**sources, "totals": totals}.items():
        _check_counts_add_up(name, counts)
    return {
        "inputs": [{"path": display_path(p), "sha256": sha256_file(p)} for p in inputs]
        + [
            {"path": display_path(s.path), "sha256": source_sha256(s.path), "format": s.format, "source": s.name}
            for s in user_sources
        ],
        "outputs": {name: {"sha256": sha256_file(out_dir / name), "rows": row_counts[name]} for name in OUTPUT_FILES},
        "params": params,
        "sources": sources,
        "totals": totals,
    }


def _check_counts_add_up(name: str, counts: Mapping[str, int]) -> None:
    # Explicit raises rather than assert: these must hold even under python -O.
    if counts["read"] != sum(counts[key] for key in OUTCOME_FIELDS):
        raise AssertionError(f"{name}: read != kept + invalid + duplicates + dropped: {counts}")
    if counts["kept"] != sum(counts[key] for key in SPLIT_FIELDS):
        raise AssertionError(f"{name}: kept != train + val + test conversations: {counts}")


# --- entry point ------------------------------------------------------------------------------


def combine_datasets(
    inputs: Sequence[Path],
    out_dir: Path,
    data: DataConfig,
    *,
    seed: int,
    sources_dir: Path | None = None,
) -> dict[str, Any]:
    """Combine ChatML JSONL ``inputs`` and the ``data.sources`` files (read from ``sources_dir``) into
    ``out_dir``; returns the manifest (see module doc).

    Writes train.jsonl, val.jsonl, test.jsonl, quarantine.jsonl and manifest.json. With
    ``data.on_invalid="error"`` the first invalid row raises DataError and nothing is written;
    with ``"skip"`` invalid rows go to quarantine.jsonl. A source without a weight is
    always a DataError. Each ``data.sources`` entry is converted to ChatML rows named
    after it and weighted by its own weight; its rows are then checked like those of ``inputs``.
    ConfigError when ``data`` is invalid (DataConfig.validate) or a ``data.sources`` file is not in ``sources_dir``.
    An input that adds no row while others do (empty, or every row quarantined) is a logged warning naming it.
    """
    inputs = [Path(path) for path in inputs]
    out_dir = Path(out_dir)
    sources = _user_sources(data, sources_dir)
    _check_inputs(inputs)
    weights = {**data.weights, **{source.name: source.weight for source in sources}}
    params = {
        "weights": {source: float(weights[source]) for source in sorted(weights)},
        "test_fraction": float(data.test_fraction),
        "val_fraction": float(data.val_fraction),
        "on_invalid": data.on_invalid,
        "seed": seed,
    }
    if sources:  # only then, so that a pipeline without sources writes the same manifest as before
        params["sources"] = [
            {"file": display_path(s.path), "format": s.format, "name": s.name, "weight": float(s.weight)}
            for s in sources
        ]
    # files in out_dir that combine does not write (e.g. the .gitignore DVC writes there) survive the swap
    with atomic_dir(out_dir, carry_over=lambda name: name not in OUTPUT_FILES and name != MANIFEST_FILE) as work_dir:
        manifest, without_rows = _combine_into(inputs, work_dir, params, sources, str(out_dir / QUARANTINE_FILE))
    for message in without_rows:  # once the outputs are in place; if nothing was kept, EmptySplitError names them
        logger.warning(message)
    return manifest


def _user_sources(data: DataConfig, sources_dir: Path | None) -> list[UserSource]:
    """data.sources as files to read; ConfigError for an invalid ``data`` or a file missing from ``sources_dir``."""
    problems = data.validate()
    if data.sources and sources_dir is None:
        problems.append(
            f"data.sources lists {len(data.sources)} file(s) but no --sources folder was given "
            "(sources_dir: the folder that holds them, data/raw/sources in dvc.yaml)"
        )
    elif data.sources:
        problems.extend(data.check_source_files(Path(sources_dir)))
    if problems:
        raise ConfigError(problems)
    return [UserSource(Path(sources_dir) / s.file, s.format, s.name, s.weight) for s in data.sources]


def _combine_into(
    inputs: list[Path], work_dir: Path, params: dict[str, Any], sources: Sequence[UserSource], quarantine_name: str
) -> tuple[dict[str, Any], list[str]]:
    """The manifest, and a warning for each input that adds no row (see Scanner.inputs_without_rows)."""
    weights, seed = params["weights"], params["seed"]
    converted_dir = work_dir / ".converted"  # ChatML rows of the sources, read back like inputs; removed below
    converted_dir.mkdir()
    converted = [converted_dir / f"{index}.jsonl" for index in range(len(sources))]
    with open(work_dir / QUARANTINE_FILE, "w", encoding="utf-8", newline="\n") as quarantine:
        scanner = Scanner(weights, seed, params["on_invalid"], quarantine, quarantine_name)
        for file_index, path in enumerate(inputs):
            scanner.scan_file(file_index, path)
        for index, source in enumerate(sources):
            with open(converted[index], "wb") as converted_file:
                scanner.scan_source(len(inputs) + index, source, converted_file)
    scanner.forget_seen()
    kept, stats = scanner.kept, scanner.stats
    bounds = split_bounds(kept.group, params["test_fraction"], params["val_fraction"])
    plan = plan_outputs(kept, bounds, scanner.sources, stats)
    check_splits_not_empty(scanner, params)
    row_counts = {QUARANTINE_FILE: sum(counts["invalid"] for counts in stats.values())}
    reader = RowReader([*inputs, *converted])
    try:
        for split in SPLITS:
            row_counts[f"{split}.jsonl"] = write_rows(work_dir / f"{split}.jsonl", plan.pop(split), kept, reader)
    finally:
        reader.close()
    shutil.rmtree(converted_dir)
    manifest = build_manifest(inputs, work_dir, stats, params, row_counts, sources)
    logger.info(
        "combined %s: %s",
        plural(len(inputs), "file"),
        ", ".join(f"{name} {plural(count, 'row')}" for name, count in sorted(row_counts.items())),
    )
    manifest_text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (work_dir / MANIFEST_FILE).write_text(manifest_text, encoding="utf-8", newline="\n")
    return manifest, scanner.inputs_without_rows


def _check_inputs(inputs: list[Path]) -> None:
    if not inputs:
        raise ValueError("no input files given")
    for path in inputs:
        if path.is_dir():
            raise IsADirectoryError(f"input {path} is a directory; give the JSONL files in it, e.g. {path}/*.jsonl")
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path} (run the collect stage?)")
