"""User datasets in common formats (``data.sources`` in params.yaml) converted to ChatML rows.

Formats, one record each (a file is JSONL, one record a line, or for sharegpt/alpaca also one JSON list):

- ``chatml``: our own rows, ``{"messages": [{"role", "content"}], "id"?, ...}``
- ``openai``: OpenAI chat fine-tuning JSONL, ``{"messages": [{"role", "content"}]}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}``
- ``alpaca``: ``{"instruction": "...", "input": "..." (may be empty or absent), "output": "..."}``
- ``hf_disk``: a folder written by ``datasets.Dataset.save_to_disk`` whose columns are one of the shapes above
  (detected from the column names).

Each record becomes one row ``{"messages": [...], "source": <name>, "origin": {...}, "id"?, "metadata"?}``:
``origin`` says where it came from (file, line or row, format), the record's own id (if any) becomes
``<name>:<id>`` so two sources cannot collide, and any other keys of the record are kept under ``metadata``.
This module only converts, naming the record's own fields when one is missing or of the wrong type; the rows then
go through ``chatml.validate_conversation`` in the combine stage like every other row, so the same on_invalid
rules (error or quarantine) apply.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from expqa.data.chatml import MAX_NESTING, DataError, hint_for, iter_raw_lines, json_type_name, parse_json_line

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# How a converted row's messages map back to the record, for the hint under a validation error.
FORMAT_HINTS = {
    "chatml": 'expected {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "openai": 'expected {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "sharegpt": 'messages[i] is conversations[i] ("human" -> user, "gpt" -> assistant); expected {"conversations": '
    '[{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "alpaca": "messages are [system,] user (instruction + input), assistant (output); expected "
    '{"instruction": "...", "input": "", "output": "..."}',
}


@dataclass(frozen=True)
class UserSource:
    """One ``data.sources`` entry with its path resolved."""

    path: Path
    format: str
    name: str
    weight: float

    @property
    def unit(self) -> str:
        """How records are located: by line in a file, by row index in an hf_disk folder."""
        return "row" if self.format == "hf_disk" else "line"


class SourceRecord(NamedTuple):
    """One record of a source: its converted row, or why it could not be converted."""

    location: int  # 1-based line in a file, or 0-based row index of an hf_disk dataset
    raw: str  # the record as it was, for quarantine.jsonl
    row: dict[str, Any] | None
    error: str = ""  # reason, when row is None
    hint: str = ""  # how to fix the record (of an invalid row, when validation rejects the converted row)


def iter_source_records(source: UserSource) -> Iterator[SourceRecord]:
    """Every record of ``source`` in order, converted; DataError for a problem with the whole file."""
    if source.format == "hf_disk":
        yield from _iter_hf_disk(source)
        return
    if source.format in ("sharegpt", "alpaca") and _starts_with_bracket(source.path):
        records = _iter_json_list(source.path)
    else:
        records = _iter_jsonl(source.path)
    for line, raw, record in records:
        yield _convert_record(source, source.format, line, raw, record)


def _convert_record(source: UserSource, format: str, location: int, raw: str, record: object) -> SourceRecord:
    if isinstance(record, ValueError):  # a JSONL line that is not JSON
        return SourceRecord(location, raw, None, str(record), hint_for(str(record)))
    try:
        row = convert(
            record, format, source.name, {"file": source.path.name, source.unit: location, "format": source.format}
        )
    except ValueError as err:
        return SourceRecord(location, raw, None, str(err), FORMAT_HINTS[format])
    return SourceRecord(location, raw, row, hint=FORMAT_HINTS[format])


# --- converters -------------------------------------------------------------------------------


def convert(record: object, format: str, name: str, origin: dict[str, Any]) -> dict[str, Any]:
    """The ChatML row for one record of ``format``; ValueError(reason) naming the record's own field."""
    if not isinstance(record, dict):
        raise ValueError(f"record is {json_type_name(record)}, expected an object")
    extra = dict(record)
    if format in ("chatml", "openai"):
        messages = _messages_from_openai(extra.pop("messages", None))
    elif format == "sharegpt":
        messages = _messages_from_sharegpt(extra.pop("conversations", None))
    else:
        messages = _messages_from_alpaca(extra)
        for key in ("instruction", "input", "output", "system"):
            extra.pop(key, None)
    row: dict[str, Any] = {"messages": messages, "source": name}
    record_id = extra.pop("id", None)
    if isinstance(record_id, (str, int)) and not isinstance(record_id, bool) and str(record_id).strip():
        row["id"] = str(record_id) if format == "chatml" else f"{name}:{record_id}"
    elif record_id is not None:
        raise ValueError(
            f"'id' is {record_id!r} ({json_type_name(record_id)}); expected a non-empty string or "
            "number, or leave 'id' out to get a content-hash id"
        )
    own_source = extra.pop("source", None)
    row["origin"] = {**origin, **({"source": own_source} if own_source not in (None, name) else {})}
    if format == "chatml":
        row.update(extra)  # our own rows keep their metadata keys (topic, ...) as they are
    elif extra:
        row["metadata"] = extra
    return row


def _messages_from_openai(messages: object) -> list[dict[str, Any]]:
    if messages is None:
        raise ValueError("missing 'messages' (a list of {role, content} objects)")
    items = _list_of_objects(messages, "messages", ("role", "content"))
    # Only role and content: other message keys (name, weight, tool_calls) have no place in a ChatML row.
    return [{"role": item["role"], "content": item["content"]} for item in items]


def _messages_from_sharegpt(conversations: object) -> list[dict[str, Any]]:
    if conversations is None:
        raise ValueError("missing 'conversations' (a list of {from, value} objects)")
    messages = []
    for index, turn in enumerate(_list_of_objects(conversations, "conversations", ("from", "value"))):
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"conversations[{index}].from is {turn['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        _check_text(turn["value"], f"conversations[{index}].value")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _messages_from_alpaca(record: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("instruction", "output"):
        if key not in record:
            raise ValueError(f"missing '{key}'; an alpaca record needs 'instruction' and 'output'")
        _check_text(record[key], f"'{key}'")
    question = record["instruction"]
    extra_input = record.get("input")
    if extra_input is not None:
        if not isinstance(extra_input, str):
            raise ValueError(f"'input' is {json_type_name(extra_input)}, expected a string (may be empty)")
        if extra_input.strip():
            question = f"{question}\n\n{extra_input}"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}]
    system = record.get("system")
    if system is not None:
        _check_text(system, "'system'")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _list_of_objects(value: object, key: str, fields: tuple[str, str]) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"'{key}' is {json_type_name(value)}, expected a list")
    if not value:
        raise ValueError(f"'{key}' is empty; a conversation needs a user and an assistant turn")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(
                f"{key}[{index}] is {json_type_name(item)}, expected an object with '{fields[0]}' and '{fields[1]}'"
            )
        for field in fields:
            if field not in item:
                raise ValueError(f"{key}[{index}] has no '{field}'")
    return value


def _check_text(value: object, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where} is {json_type_name(value)}, expected a string")
    if not value.strip():
        raise ValueError(f"{where} is {'empty' if not value else 'only whitespace'}")


# --- reading files ----------------------------------------------------------------------------


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte-order mark, then whitespace
    return head.startswith(b"[")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, object]]:
    """(line, text, record or the ValueError that parsing it raised) for each non-blank line."""
    for raw in iter_raw_lines(path):
        text = raw.data.decode("utf-8", "backslashreplace").rstrip("\r\n")
        try:
            yield raw.line, text, parse_json_line(raw.data)
        except ValueError as err:
            yield raw.line, text, err


def _iter_json_list(path: Path) -> Iterator[tuple[int, str, object]]:
    """(line, text, record) of each element of a file holding one JSON list, element by element.

    A syntax error is a DataError for the whole file: after it, where the next element starts is unknown.
    """
    try:
        text = path.read_bytes().decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(
            path,
            1,
            f"not valid UTF-8 (byte offset {err.start})",
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None
    decoder = json.JSONDecoder()
    position, line = _skip_space(text, text.index("[") + 1), 1
    counted_to = 0

    def line_at(offset: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        return line

    if text.startswith("]", position):
        return _check_end(path, text, position + 1, line_at)
    while True:
        try:
            _, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise DataError(
                path,
                err.lineno,
                f"invalid JSON in the list: {err.msg} at column {err.colno}",
                "check quotes, escapes and the commas between elements",
            ) from None
        except RecursionError:
            # json recurses once per level, so an element nested past Python's limit cannot be decoded: find its end
            # by its brackets, and it becomes an invalid record (nested deeper than MAX_NESTING) like such a JSONL row
            end = _element_end(text, position)
            if end is None:
                raise DataError(
                    path,
                    line_at(position),
                    f"invalid JSON in the list: an element nested deeper than {MAX_NESTING} levels never closes",
                    "check the element's brackets; a record needs only a few levels of nesting",
                ) from None
        element = text[position:end]
        try:  # parsed again by the JSONL rules, which also refuse NUL, lone surrogates and deep nesting
            record = parse_json_line(element.encode("utf-8", "surrogatepass"))
        except ValueError as err:
            record = err
        yield line_at(position), element, record
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif text.startswith("]", position):
            return _check_end(path, text, position + 1, line_at)
        else:
            raise DataError(
                path, line_at(position), "expected ',' or ']' after a list element", "check the commas between elements"
            )


_BRACKET_OR_QUOTE = re.compile(r'[\[\]{}"]')
_QUOTE_OR_ESCAPE = re.compile(r'["\\]')


def _element_end(text: str, position: int) -> int | None:
    """Where the JSON value at ``position`` ends, by counting brackets outside strings (no recursion); None when
    its brackets never close."""
    depth = 0
    while match := _BRACKET_OR_QUOTE.search(text, position):
        position = match.end()
        if match.group() == '"':  # skip the string: an escaped character is the one after the backslash
            while (found := _QUOTE_OR_ESCAPE.search(text, position)) and found.group() == "\\":
                position = found.end() + 1
            if found is None:
                return None
            position = found.end()
            continue
        depth += 1 if match.group() in "[{" else -1
        if depth == 0:
            return position
    return None


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _check_end(path: Path, text: str, position: int, line_at) -> None:
    position = _skip_space(text, position)
    if position < len(text):
        raise DataError(
            path,
            line_at(position),
            "text after the end of the JSON list",
            "a file holds one JSON list, or one JSON object per line (JSONL)",
        )


# --- Hugging Face datasets on disk ------------------------------------------------------------


def _iter_hf_disk(source: UserSource) -> Iterator[SourceRecord]:
    format = detect_hf_format(source.path)
    import datasets  # imported here: only hf_disk sources need it, and it takes a second

    dataset = datasets.load_from_disk(str(source.path))
    for index, record in enumerate(dataset):
        raw = json.dumps(record, ensure_ascii=False, sort_keys=True, default=str)
        yield _convert_record(source, format, index, raw, record)


def detect_hf_format(folder: Path) -> str:
    """Which record shape an hf_disk folder holds, from its column names (dataset_info.json)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise DataError(
            folder,
            1,
            f"a DatasetDict with splits {', '.join(splits)}, not one Dataset",
            f"save one split, e.g. dataset_dict['{splits[0] if splits else 'train'}'].save_to_disk(...)",
        )
    info_file = folder / "dataset_info.json"
    if not info_file.is_file():
        raise DataError(
            folder,
            1,
            "no dataset_info.json: not a folder written by datasets.Dataset.save_to_disk",
            "save it with dataset.save_to_disk(folder), or convert it to JSONL and use another format",
        )
    columns = set(json.loads(info_file.read_text(encoding="utf-8")).get("features") or {})
    if "conversations" in columns:
        return "sharegpt"
    if "messages" in columns:
        return "openai"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    raise DataError(
        folder,
        1,
        f"cannot tell the record shape from its columns ({', '.join(sorted(columns))})",
        "give it a 'messages' (openai), 'conversations' (sharegpt) or 'instruction' + 'output' (alpaca) column",
    )


def source_sha256(path: Path) -> str:
    """SHA-256 of a source file, or of an hf_disk folder's files (relative path and content, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
