"""ChatML JSONL rows: validation, line-accurate error reporting and loading.

A dataset file holds one JSON object per line::

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "id": str,            # optional; a content-hash id is derived when absent
     "source": str,        # required, e.g. "cross_validated" or "arxiv_synthetic"
     ...}                  # any other keys are kept as metadata

A conversation is an optional system message, then user/assistant turns that alternate,
start with the user and end with the assistant's answer.

Every problem is reported as ``path:line: reason`` (``DataError``) so that it can be
fixed in an editor. Lines are counted physically (blank lines count but are skipped).
``normalise_text`` is a message's text as compared for near-duplicates (combine's
deduplication and split, generate's repeated questions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

ALLOWED_ROLES = ("system", "user", "assistant")
ON_INVALID_CHOICES = ("error", "skip")
SPLITS = ("train", "val", "test")  # the <split>.jsonl files combine writes and the later stages read
AUTO_ID_PREFIX = "sha256-"
# Deeper rows are refused: json's C parser and encoder recurse per level, so a row a few hundred levels deep
# would parse but crash later while it is hashed or written. ChatML rows need about 4.
MAX_NESTING = 64

FORMAT_HINT = (
    'expected {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}], "source": "...", "id": "..."}'
)


class DataError(ValueError):
    """A problem with one line of a dataset file, reported as ``path:line: reason``.

    ``unit="row"`` locates a row of a dataset that has no lines (a Hugging Face dataset folder): ``path: row N``.
    """

    def __init__(self, path: str | Path, line: int, reason: str, hint: str = "", unit: str = "line") -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        self.hint = hint
        message = f"{self.path}:{line}: {reason}" if unit == "line" else f"{self.path}: {unit} {line}: {reason}"
        if hint:
            message += f"\n  hint: {hint}"
        super().__init__(message)


class RawLine(NamedTuple):
    """One non-blank line of a JSONL file, as bytes, with where it starts."""

    line: int  # 1-based physical line number
    offset: int  # byte offset of the line start, for re-reading with seek()
    data: bytes  # the line including its newline


# --- validation -----------------------------------------------------------------------------

_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def json_type_name(value: object) -> str:
    """The JSON name of a parsed value's type, for error messages ("an array", "null")."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def validate_conversation(row: object) -> None:
    """Raise ValueError(reason) unless ``row`` is a well-formed ChatML conversation."""
    if not isinstance(row, dict):
        raise ValueError(f"row is {json_type_name(row)}, expected an object with 'messages'")
    if "messages" not in row:
        raise ValueError("missing 'messages' (a list of {role, content} objects)")
    messages = row["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"'messages' is {json_type_name(messages)}, expected a list")
    if not messages:
        raise ValueError("'messages' is empty; a conversation needs a user and an assistant turn")
    for index, message in enumerate(messages):
        _validate_message(index, message)
    _validate_turn_order(messages)
    _validate_optional_id(row)
    _validate_source(row)


def _validate_message(index: int, message: object) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} is {json_type_name(message)}, expected an object with 'role' and 'content'")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"{where} has no '{key}'")
    role, content = message["role"], message["content"]
    if role not in ALLOWED_ROLES:
        raise ValueError(f"{where}.role is {role!r}; allowed: {', '.join(ALLOWED_ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"{where}.content is {json_type_name(content)}, expected a string")
    if not content.strip():
        kind = "empty" if not content else "only whitespace"
        raise ValueError(f"{where}.content is {kind}")


def _validate_turn_order(messages: list[dict[str, Any]]) -> None:
    roles = [message["role"] for message in messages]
    for index, role in enumerate(roles):
        if role == "system" and index > 0:
            raise ValueError(f"messages[{index}] is a system message; a system message is only allowed as messages[0]")
    first_turn = 1 if roles[0] == "system" else 0
    for index in range(first_turn, len(roles)):
        expected = "user" if (index - first_turn) % 2 == 0 else "assistant"
        if roles[index] != expected:
            raise ValueError(
                f"messages[{index}].role is {roles[index]!r} but {expected!r} was expected; "
                "turns must alternate user/assistant, starting with user"
            )
    if "assistant" not in roles:
        raise ValueError("no assistant message; add the assistant's answer after the user turn")
    if roles[-1] != "assistant":
        last = len(roles) - 1
        raise ValueError(
            f"last message (messages[{last}]) is a {roles[-1]} message; "
            "a conversation must end with the assistant's answer"
        )


def _validate_optional_id(row: dict[str, Any]) -> None:
    if "id" not in row:
        return
    row_id = row["id"]
    if not isinstance(row_id, str) or not row_id.strip():
        raise ValueError(
            f"'id' is {row_id!r} ({json_type_name(row_id)}); expected a non-empty string, "
            "or leave 'id' out to get a content-hash id"
        )


def _validate_source(row: dict[str, Any]) -> None:
    if "source" not in row:
        raise ValueError("missing 'source' (e.g. 'cross_validated' or 'arxiv_synthetic')")
    source = row["source"]
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"'source' is {source!r} ({json_type_name(source)}); expected a non-empty string")


# --- ids --------------------------------------------------------------------------------------


def canonical_messages(messages: list[dict[str, Any]]) -> str:
    """The messages as canonical JSON: the same conversation always gives the same text."""
    return json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def content_id(messages: list[dict[str, Any]]) -> str:
    """A deterministic id for a row without one.

    It is ``"sha256-"`` + the first 16 hex digits of the SHA-256 of the canonical JSON of
    ``messages`` (roles, contents and any extra message keys; not the row's metadata), so it
    is the same on every machine and every run, and identical conversations share it.
    """
    digest = hashlib.sha256(canonical_messages(messages).encode("utf-8")).hexdigest()
    return AUTO_ID_PREFIX + digest[:16]


def row_id(row: dict[str, Any]) -> str:
    """The row's own id, or its content-hash id when it has none (see ``content_id``)."""
    return row["id"] if "id" in row else content_id(row["messages"])


# --- normalised text (near-duplicates) --------------------------------------------------------


def normalise_text(text: str) -> str:
    """Text as compared for near-duplicates: NFKC, lowercase, single spaces, no edge punctuation."""
    # split()/join() collapses Unicode whitespace runs several times faster than re.sub.
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_junk(char: str) -> bool:
    return char == " " or unicodedata.category(char).startswith("P")


# --- reading ----------------------------------------------------------------------------------


def iter_raw_lines(path: str | Path) -> Iterator[RawLine]:
    """Yield the non-blank lines of a file as bytes, with line numbers and byte offsets."""
    offset = 0
    with open(path, "rb") as file:
        for line_number, data in enumerate(file, start=1):
            if data.strip():
                yield RawLine(line_number, offset, data)
            offset += len(data)


def parse_json_line(data: bytes) -> object:
    """Decode one JSONL line; raise ValueError(reason) for bad UTF-8, bad JSON or text that is not text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 (byte 0x{data[err.start]:02x} at column {err.start + 1})") from None
    # A byte-order mark is legal UTF-8 but not JSON; editors on Windows add one to line 1. The line end goes
    # too, or a string left open reports the newline as an "invalid control character" instead.
    text = text.lstrip("\ufeff").rstrip("\r\n")
    value = _loads(text)
    _check_value(value, text)
    return value


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # json's messages end in " at" before the position ("Unterminated string starting at").
        raise ValueError(f"invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}") from None
    except RecursionError:
        raise ValueError(f"invalid JSON: nested deeper than {MAX_NESTING} levels") from None
    except ValueError as err:  # not a syntax error, e.g. an integer of more than 4300 digits
        raise ValueError(f"invalid JSON: {err}") from None


# A NUL or a lone UTF-16 surrogate can only enter a string through a \u escape: raw NUL bytes are a JSON
# error and raw surrogates are not UTF-8. Rows without such an escape skip the (slower) walk over strings.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")


def _check_value(value: object, text: str) -> None:
    """Refuse rows nested deeper than MAX_NESTING and strings holding NUL or a lone surrogate.

    A lone surrogate cannot be encoded as UTF-8, so hashing or writing the row would crash; NUL is never
    part of text and tokenizers treat it inconsistently. Both are rejected rather than stripped, so the
    row is fixed at its source (or quarantined with this reason) instead of changed silently.
    """
    check_strings = _SUSPECT_ESCAPE.search(text) is not None
    if not check_strings and text.count("[") + text.count("{") <= MAX_NESTING:
        return
    stack: list[tuple[object, str, int]] = [(value, "row", 0)]  # iterative: the depth is what is checked
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"invalid JSON: nested deeper than {MAX_NESTING} levels (at {where})")
        children: list[tuple[object, str, int]] = []
        if isinstance(node, dict):
            for key, item in node.items():
                if check_strings:
                    _check_string(key, f"a key of {where}")
                children.append((item, key if where == "row" else f"{where}.{key}", depth + 1))
        elif isinstance(node, list):
            children = [(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(node)]
        elif isinstance(node, str) and check_strings:
            _check_string(node, where)
        stack.extend(reversed(children))  # reversed: the first bad value in reading order is reported


def _check_string(text: str, where: str) -> None:
    match = _BAD_CHARACTER.search(text)
    if match is None:
        return
    position = match.start() + 1
    if match.group() == "\x00":
        raise ValueError(f"{where} holds a NUL character (\\u0000) at character {position}")
    raise ValueError(
        f"{where} holds a lone surrogate \\u{ord(match.group()):04x} at character {position} "
        "(half of a UTF-16 pair; it cannot be written as UTF-8)"
    )


def hint_for(reason: str) -> str:
    """A short how-to-fix for a reason from ``parse_json_line``/``validate_conversation``."""
    if reason.startswith("not valid UTF-8"):
        return "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    if reason.startswith("invalid JSON: nested deeper"):
        return f"flatten the row: a ChatML row needs only a few levels of nesting (limit {MAX_NESTING})"
    if reason.startswith("invalid JSON"):
        return "each line must be one complete JSON object; check quotes and escapes"
    if "holds a NUL character" in reason:
        return "remove the \\u0000 escapes; NUL is never part of text"
    if "holds a lone surrogate" in reason:
        return "write the character itself, or both halves of its pair (e.g. \\ud83d\\ude00)"
    return FORMAT_HINT


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line_number, row)`` for each non-blank line; DataError on bad UTF-8 or JSON."""
    for raw in iter_raw_lines(path):
        try:
            row = parse_json_line(raw.data)
        except ValueError as err:
            raise DataError(path, raw.line, str(err), hint_for(str(err))) from None
        yield raw.line, row


def check_on_invalid(on_invalid: str) -> None:
    """Raise ValueError unless ``on_invalid`` is a known policy."""
    if on_invalid not in ON_INVALID_CHOICES:
        raise ValueError(f"on_invalid is {on_invalid!r}; allowed: {', '.join(ON_INVALID_CHOICES)}")


def load_chatml_dataset(path: str | Path, on_invalid: str = "error") -> list[dict[str, Any]]:
    """Load and validate a ChatML JSONL file into a list of rows.

    ``on_invalid="error"`` raises DataError (``path:line: reason``) at the first invalid row;
    ``"skip"`` drops invalid rows and logs one warning with their count. Rows without an
    ``id`` get the deterministic content-hash id from ``content_id``.
    """
    check_on_invalid(on_invalid)
    rows: list[dict[str, Any]] = []
    skipped_count, first_skipped = 0, None
    for raw in iter_raw_lines(path):
        try:
            row = parse_json_line(raw.data)
            validate_conversation(row)
        except ValueError as err:
            error = DataError(path, raw.line, str(err), hint_for(str(err)))
            if on_invalid == "error":
                raise error from None
            skipped_count += 1
            first_skipped = first_skipped or error
            continue
        assert isinstance(row, dict)  # validate_conversation guarantees it
        row.setdefault("id", content_id(row["messages"]))
        rows.append(row)
    if first_skipped is not None:
        logger.warning(
            "%s: skipped %d invalid row(s); first: line %d: %s",
            path,
            skipped_count,
            first_skipped.line,
            first_skipped.reason,
        )
    return rows
