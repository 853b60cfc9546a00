"""Validation and loading of ChatML JSONL rows (expqa.data.chatml)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from expqa.data.chatml import (
    DataError,
    content_id,
    iter_jsonl,
    load_chatml_dataset,
    validate_conversation,
)

VALID = {
    "messages": [
        {"role": "user", "content": "What is a p-value?"},
        {"role": "assistant", "content": "The probability of data at least this extreme."},
    ],
    "source": "cross_validated",
    "id": "cv-1",
}


def user(text: str = "q") -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str = "a") -> dict[str, str]:
    return {"role": "assistant", "content": text}


def row_line(messages: object, **extra: object) -> str:
    return json.dumps({"messages": messages, "source": "cross_validated", **extra})


# (bad line, substring the reason must contain); each is written as line 3 of a file.
INVALID_LINES = {
    "bad JSON": ('{"messages": [', "invalid JSON: "),
    "not an object": ("[1, 2]", "row is an array, expected an object"),
    "missing messages": ('{"source": "cross_validated"}', "missing 'messages'"),
    "messages not a list": (row_line("hi"), "'messages' is a string, expected a list"),
    "empty messages": (row_line([]), "'messages' is empty"),
    "message not an object": (row_line(["hi", assistant()]), "messages[0] is a string"),
    "message without role": (row_line([{"content": "q"}, assistant()]), "messages[0] has no 'role'"),
    "message without content": (row_line([{"role": "user"}, assistant()]), "has no 'content'"),
    "unknown role": (
        row_line([user(), assistant(), user(), {"role": "bot", "content": "x"}]),
        "messages[3].role is 'bot'; allowed: system, user, assistant",
    ),
    "non-string content": (
        row_line([user(), {"role": "assistant", "content": ["a"]}]),
        "messages[1].content is an array, expected a string",
    ),
    "empty content": (row_line([user(""), assistant()]), "messages[0].content is empty"),
    "whitespace content": (row_line([user(), assistant(" \n")]), "messages[1].content is only whitespace"),
    "no assistant turn": (row_line([user()]), "no assistant message"),
    "assistant not last": (
        row_line([user(), assistant(), user()]),
        "last message (messages[2]) is a user message",
    ),
    "wrong turn order": (
        row_line([assistant(), user()]),
        "messages[0].role is 'assistant' but 'user' was expected",
    ),
    "two user turns": (row_line([user(), user(), assistant()]), "messages[1].role is 'user'"),
    "system not first": (
        row_line([user(), {"role": "system", "content": "s"}, assistant()]),
        "messages[1] is a system message; a system message is only allowed as messages[0]",
    ),
    "empty id": (row_line([user(), assistant()], id=""), "'id' is ''"),
    "non-string id": (row_line([user(), assistant()], id=7), "'id' is 7 (a number)"),
    "missing source": (json.dumps({"messages": [user(), assistant()]}), "missing 'source'"),
    "null source": (
        json.dumps({"messages": [user(), assistant()], "source": None}),
        "'source' is None (null)",
    ),
    # json.dumps writes these as \ud800 and \u0000 escapes, as a producer of bad JSONL would.
    "lone surrogate": (
        row_line([user("bad \ud800 x"), assistant()]),
        "messages[0].content holds a lone surrogate \\ud800 at character 5",
    ),
    "lone surrogate in a key": (
        row_line([user(), assistant()], meta={"k\udfff": 1}),
        "a key of meta holds a lone surrogate \\udfff",
    ),
    "NUL": (row_line([user(), assistant("a\x00")]), "messages[1].content holds a NUL character (\\u0000)"),
    "nested 100,000 levels": ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested deeper than 64 levels"),
    "nested 100 levels": (
        row_line([user(), assistant()], meta=json.loads("[" * 100 + "]" * 100)),
        "invalid JSON: nested deeper than 64 levels (at meta",
    ),
    "unterminated string": (
        '{"messages": [{"role": "user", "content": "abc',
        "invalid JSON: Unterminated string starting at column 43",
    ),
    "huge integer": ('{"id": ' + "9" * 5000 + "}", "invalid JSON: Exceeds the limit"),
}


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


@pytest.mark.parametrize("bad_line, reason", INVALID_LINES.values(), ids=INVALID_LINES.keys())
def test_invalid_row_reports_file_line_and_reason(tmp_path: Path, bad_line: str, reason: str) -> None:
    # Line 2 is blank: it is skipped but still counted, so the bad row is on line 3.
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(VALID), "", bad_line])
    with pytest.raises(DataError) as caught:
        load_chatml_dataset(path)
    error = caught.value
    assert (error.path, error.line) == (str(path), 3)
    assert reason in error.reason
    assert str(error).startswith(f"{path}:3: {error.reason}")
    assert "hint:" in str(error)


def test_valid_surrogate_pair_and_escaped_backslash_u_pass(tmp_path: Path) -> None:
    # An emoji written as its escaped pair, and a literal backslash followed by "ud800", are good text.
    row = {**VALID, "messages": [user("emoji \U0001f600 and \\ud800"), assistant()]}
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(row)])
    assert load_chatml_dataset(path) == [row]


def test_bad_utf8_names_the_byte_and_column(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "latin1.jsonl", [json.dumps(VALID), b'{"a": "caf\xe9"}'])
    with pytest.raises(DataError) as caught:
        list(iter_jsonl(path))
    assert str(caught.value).startswith(f"{path}:2: not valid UTF-8 (byte 0xe9 at column 11)")
    assert "re-encode the file as UTF-8" in str(caught.value)


def test_iter_jsonl_yields_line_numbers_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", ['{"a": 1}', "   ", "", '{"b": 2}'])
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_byte_order_mark_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(VALID).encode() + b"\r\n")
    assert load_chatml_dataset(path) == [VALID]


@pytest.mark.parametrize(
    "messages",
    [
        [user(), assistant()],
        [{"role": "system", "content": "Be brief."}, user(), assistant()],
        [user(), assistant(), user("follow-up"), assistant("more")],
    ],
)
def test_valid_conversations_pass(messages: list[dict[str, str]]) -> None:
    validate_conversation({"messages": messages, "source": "arxiv_synthetic"})


def test_skip_drops_invalid_rows_and_warns_with_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [json.dumps(VALID), "{oops", row_line([user()]), json.dumps({**VALID, "id": "cv-2"})]
    path = write_lines(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="expqa.data.chatml"):
        rows = load_chatml_dataset(path, on_invalid="skip")
    assert [row["id"] for row in rows] == ["cv-1", "cv-2"]
    assert "skipped 2 invalid row(s); first: line 2: invalid JSON" in caplog.text


def test_rows_without_id_get_a_deterministic_content_hash_id(tmp_path: Path) -> None:
    no_id = {key: value for key, value in VALID.items() if key != "id"}
    other = {**no_id, "messages": [user("other"), assistant()]}
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(no_id), json.dumps(other)])
    first, second = load_chatml_dataset(path)
    assert first["id"] == content_id(VALID["messages"])
    assert first["id"].startswith("sha256-") and len(first["id"]) == len("sha256-") + 16
    assert first["id"] != second["id"]
    assert [row["id"] for row in load_chatml_dataset(path)] == [first["id"], second["id"]]


def test_unknown_on_invalid_policy_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(VALID)])
    with pytest.raises(ValueError, match="on_invalid is 'ignore'; allowed: error, skip"):
        load_chatml_dataset(path, on_invalid="ignore")
