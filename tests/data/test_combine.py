"""Combining ChatML sources: validation, dedup, leak-free splits, weighting, determinism."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

import expqa.data.combine as combine_module
from expqa.config import MAX_WEIGHT, ConfigError, DataConfig
from expqa.data.chatml import DataError, content_id, normalise_text
from expqa.data.combine import (
    MANIFEST_FILE,
    OUTPUT_FILES,
    SPLITS,
    UNKNOWN_SOURCE,
    EmptySplitError,
    KeptRows,
    combine_datasets,
    train_copies,
)
from expqa.pipeline.combine import main as combine_stage
from helpers import REPO

WEIGHTS = {"cross_validated": 2.0, "arxiv_synthetic": 1.0}
DATA = DataConfig(weights=WEIGHTS, test_fraction=0.10, val_fraction=0.05, on_invalid="error", sources=[])
NO_HOLDOUT = {"test_fraction": 0.0, "val_fraction": 0.0}  # for a few rows: test and val need 3 conversations
ALL_FILES = (*OUTPUT_FILES, MANIFEST_FILE)


def conversation(
    question: str,
    answer: str = "An answer.",
    *,
    source: str = "cross_validated",
    id: str | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    row: dict[str, Any] = {"messages": messages, "source": source}
    if id is not None:
        row["id"] = id
    return row


def write_jsonl(path: Path, rows: list[dict[str, Any] | str | bytes]) -> Path:
    lines = []
    for row in rows:
        if isinstance(row, dict):
            row = json.dumps(row)
        lines.append(row if isinstance(row, bytes) else row.encode("utf-8"))
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(inputs: list[Path], out_dir: Path, *, seed: int = 7, **data_overrides: Any) -> dict[str, Any]:
    """combine_datasets with DATA, some of its fields replaced."""
    return combine_datasets(inputs, out_dir, dataclasses.replace(DATA, **data_overrides), seed=seed)


def split_rows(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {split: read_jsonl(out_dir / f"{split}.jsonl") for split in SPLITS}


def base_id(output_id: str) -> str:
    return re.sub(r"#w\d+$", "", output_id)


def distinct_questions(n: int, source: str = "cross_validated") -> list[dict[str, Any]]:
    return [conversation(f"Question number {i} from {source}?", source=source, id=f"{source}-{i}") for i in range(n)]


def assert_counts_add_up(manifest: dict[str, Any]) -> None:
    for counts in [*manifest["sources"].values(), manifest["totals"]]:
        outcomes = ("kept", "invalid", "duplicates_exact", "duplicates_normalised", "dropped_weight0")
        assert counts["read"] == sum(counts[key] for key in outcomes)
        assert counts["kept"] == sum(counts[f"{split}_conversations"] for split in SPLITS)


# --- invalid rows -----------------------------------------------------------------------------

INVALID_ROWS = {
    "bad JSON": ("{not json", "invalid JSON: "),
    "bad UTF-8": (b'{"a": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at column 11)"),
    "no assistant": (
        json.dumps({"messages": [{"role": "user", "content": "q"}], "source": "x"}),
        "no assistant message",
    ),
    "unknown role": (
        json.dumps({"messages": [{"role": "bot", "content": "q"}], "source": "x"}),
        "messages[0].role is 'bot'; allowed: system, user, assistant",
    ),
}


@pytest.mark.parametrize("bad_row, reason", INVALID_ROWS.values(), ids=INVALID_ROWS.keys())
def test_invalid_row_raises_with_file_line_and_writes_nothing(
    tmp_path: Path, bad_row: str | bytes, reason: str
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [conversation("Fine?"), bad_row])
    with pytest.raises(DataError) as caught:
        run([path], tmp_path / "out")
    assert str(caught.value).startswith(f"{path}:2: ")
    assert reason in caught.value.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no outputs, no temp dirs


def test_skip_quarantines_invalid_rows_and_counts_add_up(tmp_path: Path) -> None:
    no_assistant = {"messages": [{"role": "user", "content": "q"}], "source": "arxiv_synthetic"}
    rows: list[Any] = [
        conversation("Good one?"),
        "{not json",
        b'{"a": "caf\xe9"}',
        json.dumps(no_assistant),
        conversation("Another good one?", source="arxiv_synthetic"),
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    manifest = run([path], tmp_path / "out", on_invalid="skip", **NO_HOLDOUT)
    quarantine = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert [(q["path"], q["line"]) for q in quarantine] == [("in.jsonl", 2), ("in.jsonl", 3), ("in.jsonl", 4)]
    assert quarantine[0]["raw"] == "{not json"
    assert quarantine[1]["raw"] == '{"a": "caf\\xe9"}'
    assert quarantine[2]["reason"].startswith("no assistant message")
    assert manifest["sources"]["arxiv_synthetic"]["invalid"] == 1
    assert manifest["sources"][UNKNOWN_SOURCE]["invalid"] == 2
    assert manifest["totals"]["read"] == 5 and manifest["totals"]["kept"] == 2
    assert manifest["outputs"]["quarantine.jsonl"]["rows"] == 3
    assert_counts_add_up(manifest)


# Rows whose JSON is valid but whose text is not (json.dumps writes the \ud800 and \u0000 escapes).
BAD_TEXT_ROWS = {
    "lone surrogate": (conversation("Bad \ud800 text?"), "messages[0].content holds a lone surrogate \\ud800"),
    "surrogate in metadata": ({**conversation("Bad id?"), "id": "x\udc00"}, "id holds a lone surrogate \\udc00"),
    "NUL": (conversation("Fine?", "Bad\x00answer"), "messages[1].content holds a NUL character (\\u0000)"),
    "nested 100,000 levels": ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested deeper than 64 levels"),
}


@pytest.mark.parametrize("bad_row, reason", BAD_TEXT_ROWS.values(), ids=BAD_TEXT_ROWS.keys())
def test_bad_text_is_an_error_or_quarantined_with_its_reason(
    tmp_path: Path, bad_row: dict[str, Any] | str, reason: str
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [*distinct_questions(5), bad_row])
    with pytest.raises(DataError, match=re.escape(f"{path}:6: {reason}")):
        run([path], tmp_path / "out")
    manifest = run([path], tmp_path / "out", on_invalid="skip")
    (quarantined,) = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert quarantined["line"] == 6 and quarantined["reason"].startswith(reason)
    assert manifest["totals"]["invalid"] == 1 and manifest["totals"]["kept"] == 5
    assert_counts_add_up(manifest)


EMPTY_INPUTS = {
    "0 bytes": (b"", "no rows in in.jsonl (0 bytes)"),
    "blank lines": (b"\n  \n\t\r\n", "no rows in in.jsonl (only blank lines)"),
    "all invalid": (
        b"{}\n[1]\n",
        "read 2 row(s): 2 invalid, 0 duplicate(s), 0 dropped by weight 0; "
        "first invalid row: in.jsonl:1: missing 'messages'",
    ),
}


@pytest.mark.parametrize("content, why", EMPTY_INPUTS.values(), ids=EMPTY_INPUTS.keys())
def test_no_kept_conversation_is_an_error_that_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, why: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_bytes(content)
    with pytest.raises(EmptySplitError) as caught:
        run([Path("in.jsonl")], Path("out"), on_invalid="skip")
    assert str(caught.value).startswith("no conversation kept, so train/val/test would be empty; ")
    assert why in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no outputs, no temp dirs


@pytest.mark.parametrize(
    "questions, empty_split",
    [(["One?", "Two?"], "test"), (["Same?"] * 4, "val")],
    ids=["two conversations", "one question"],
)
def test_a_split_left_empty_by_too_few_questions_is_an_error(
    tmp_path: Path, questions: list[str], empty_split: str
) -> None:
    rows = [conversation(q, f"Answer {i}.", id=f"c{i}") for i, q in enumerate(questions)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    message = rf"^{empty_split} split would be empty: {len(rows)} conversation\(s\) kept, with {len(set(questions))}"
    with pytest.raises(EmptySplitError, match=message) as caught:
        run([path], tmp_path / "out")
    assert f"set data.{empty_split}_fraction: 0" in str(caught.value)
    run([path], tmp_path / "out", **NO_HOLDOUT)  # without holdout the same rows are fine


def test_weights_that_leave_train_without_rows_are_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(4))
    with pytest.raises(
        EmptySplitError,
        match=r"^train split has 2 conversation\(s\) but 0 rows after weighting: "
        r"data.weights \(arxiv_synthetic 1, cross_validated 0.001\)",
    ):
        run([path], tmp_path / "out", weights={**WEIGHTS, "cross_validated": 0.001})


def test_a_directory_as_input_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=f"input {tmp_path} is a directory; give the JSONL files in it"):
        run([tmp_path], tmp_path / "out")


def test_stage_reports_an_empty_split_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stage = {"main": combine_stage}
    path = write_jsonl(tmp_path / "in.jsonl", [])
    assert (
        stage["main"](
            [
                str(path),
                "--out",
                str(tmp_path / "out"),
                "--sources",
                str(tmp_path),
                "--params",
                str(REPO / "params.yaml"),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error: no conversation kept")


def test_an_input_that_adds_no_row_next_to_others_is_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty or all-invalid input among several used to pass silently (its rows only missing from the counts):
    now one warning line each, and the run still writes every output, quarantined rows included."""
    good = write_jsonl(tmp_path / "good.jsonl", distinct_questions(5))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n")
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{}", "[1]"])
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="expqa.data.combine"):
        manifest = run([good, empty, blank, bad], out, on_invalid="skip", **NO_HOLDOUT)
    assert [record.getMessage() for record in caplog.records] == [
        f"{empty}: empty (0 bytes), so no rows from it; a warning, not an error, since other inputs have rows and an "
        "empty one can be on purpose (generate's output while generate.enabled is false); if it should have rows, "
        "rebuild it",
        f"{blank}: empty (only blank lines), so no rows from it; a warning, not an error, since other inputs have "
        "rows and an empty one can be on purpose (generate's output while generate.enabled is false); if it should "
        "have rows, rebuild it",
        f"{bad}: all 2 row(s) invalid, so no rows from it; quarantined in {out / 'quarantine.jsonl'} (first: line 1: "
        "missing 'messages' (a list of {role, content} objects)); fix the file, or set data.on_invalid: error to stop "
        "at the first bad row",
    ]
    assert manifest["totals"]["kept"] == 5 and len(read_jsonl(out / "quarantine.jsonl")) == 2
    stage_args = [str(good), str(empty), "--out", str(out), "--sources", str(tmp_path)]
    assert combine_stage([*stage_args, "--params", str(REPO / "params.yaml")]) == 0
    assert capsys.readouterr().err == f"warning: {caplog.records[0].getMessage()}\n"
    # dvc.yaml names generate's output, empty while generate.enabled is false: no warning on every default run
    assert combine_stage([*stage_args, "--may-be-empty", str(empty), "--params", str(REPO / "params.yaml")]) == 0
    assert capsys.readouterr().err == ""


def test_quarantine_is_written_empty_when_every_row_is_valid(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(5))
    run([path], tmp_path / "out", on_invalid="skip")
    assert (tmp_path / "out" / "quarantine.jsonl").read_bytes() == b""


@pytest.mark.parametrize("on_invalid", ["error", "skip"])
def test_unknown_source_names_source_location_and_allowed_keys(tmp_path: Path, on_invalid: str) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [conversation("q?"), conversation("r?", source="reddit")])
    with pytest.raises(DataError) as caught:
        run([path], tmp_path / "out", on_invalid=on_invalid)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: source 'reddit' has no weight")
    assert "allowed sources: arxiv_synthetic, cross_validated" in message
    assert "data.weights in params.yaml" in message


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), MAX_WEIGHT + 1])
def test_bad_weight_is_rejected(tmp_path: Path, weight: float) -> None:
    """DataConfig.validate's message, also for a config built in Python rather than loaded from params.yaml."""
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(3))
    with pytest.raises(ConfigError, match=rf"^data.weights.arxiv_synthetic is {weight:g}; use 0 \(drops the source\)"):
        run([path], tmp_path / "out", weights={**WEIGHTS, "arxiv_synthetic": weight})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_weight_zero_drops_the_source(tmp_path: Path) -> None:
    rows = distinct_questions(10) + distinct_questions(4, source="arxiv_synthetic")
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    manifest = run([path], tmp_path / "out", weights={**WEIGHTS, "arxiv_synthetic": 0})
    assert manifest["sources"]["arxiv_synthetic"]["dropped_weight0"] == 4
    assert manifest["sources"]["arxiv_synthetic"]["kept"] == 0
    sources = {row["source"] for rows in split_rows(tmp_path / "out").values() for row in rows}
    assert sources == {"cross_validated"}
    assert_counts_add_up(manifest)


# --- deduplication ----------------------------------------------------------------------------


def test_exact_and_normalised_duplicates_are_dropped_keeping_the_first(tmp_path: Path) -> None:
    first = conversation("What is a p-value?", "A probability.", id="first")
    exact_copy = {**first, "id": "exact-copy"}
    variant = conversation("  WHAT is a\tp-value ", "a probability", id="variant")  # case, space, punct
    fullwidth = conversation("Ｗhat is a p-value?", "A probability.", id="fullwidth")  # NFKC
    other_answer = conversation("What is a p-value?", "Something else.", id="other-answer")
    file_a = write_jsonl(tmp_path / "a.jsonl", [first, variant])
    file_b = write_jsonl(tmp_path / "b.jsonl", [{**exact_copy, "source": "cross_validated"}, fullwidth, other_answer])
    manifest = run([file_a, file_b], tmp_path / "out", weights={**WEIGHTS, "cross_validated": 1.0}, **NO_HOLDOUT)
    counts = manifest["sources"]["cross_validated"]
    assert (counts["duplicates_exact"], counts["duplicates_normalised"], counts["kept"]) == (1, 2, 2)
    ids = {row["id"] for rows in split_rows(tmp_path / "out").values() for row in rows}
    assert ids == {"first", "other-answer"}
    assert_counts_add_up(manifest)


def test_normalise_text() -> None:
    assert normalise_text("  Ｈello,\n\tWORLD?! ") == "hello, world"
    assert normalise_text("¿Qué?") == "qué"


def test_reused_id_for_a_different_conversation_is_invalid(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [conversation("a?", id="x"), conversation("b?", id="x")])
    with pytest.raises(DataError, match=r"in.jsonl:2: id 'x' is already used"):
        run([path], tmp_path / "out")
    manifest = run([path], tmp_path / "out", on_invalid="skip", **NO_HOLDOUT)
    assert manifest["totals"]["invalid"] == 1


# --- splits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, test_fraction, val_fraction, expected",
    [(100, 0.10, 0.05, (85, 5, 10)), (3, 0.10, 0.05, (1, 1, 1)), (20, 0.0, 0.25, (15, 5, 0))],
)
def test_split_sizes_follow_the_fractions(
    tmp_path: Path, n: int, test_fraction: float, val_fraction: float, expected: tuple[int, ...]
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(n))
    manifest = run([path], tmp_path / "out", test_fraction=test_fraction, val_fraction=val_fraction)
    totals = manifest["totals"]
    assert tuple(totals[f"{split}_conversations"] for split in SPLITS) == expected


def random_dataset(rng: random.Random, n_questions: int) -> list[dict[str, Any]]:
    """Questions asked several times: reworded variants, follow-ups and different answers."""
    rows = []
    for q in range(n_questions):
        for variant in range(rng.choice([1, 1, 2, 3])):
            question = f"How do I test hypothesis {q}?"
            question = question.upper() if variant == 1 else question
            follow_up = variant == 2
            row = conversation(
                question + ("" if variant != 1 else " ..."),
                f"Answer {q}/{variant}",
                source=rng.choice(list(WEIGHTS)),
                id=None if rng.random() < 0.2 else f"q{q}-v{variant}",
            )
            if follow_up:
                row["messages"] += [
                    {"role": "user", "content": "And why?"},
                    {"role": "assistant", "content": "Because."},
                ]
            rows.append(row)
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("seed", range(12))
def test_no_group_or_id_appears_in_two_splits(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    rows = random_dataset(rng, n_questions=rng.randint(3, 60))
    half = len(rows) // 2
    inputs = [write_jsonl(tmp_path / "a.jsonl", rows[:half]), write_jsonl(tmp_path / "b.jsonl", rows[half:])]
    weights = {"cross_validated": rng.choice([1.0, 2.0, 2.5]), "arxiv_synthetic": rng.choice([0.5, 1.0])}
    manifest = run(inputs, tmp_path / "out", seed=seed, weights=weights, test_fraction=0.2, val_fraction=0.2)
    splits = split_rows(tmp_path / "out")
    groups = {s: {normalise_text(r["messages"][0]["content"]) for r in rows_} for s, rows_ in splits.items()}
    ids = {s: {base_id(r["id"]) for r in rows_} for s, rows_ in splits.items()}
    for one, other in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not groups[one] & groups[other]
        assert not ids[one] & ids[other]
    assert_counts_add_up(manifest)


# --- weighting --------------------------------------------------------------------------------


def test_integer_weights_copy_train_rows_only(tmp_path: Path) -> None:
    rows = distinct_questions(40) + distinct_questions(40, source="arxiv_synthetic")
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    manifest = run([path], tmp_path / "out", weights={"cross_validated": 3.0, "arxiv_synthetic": 1.0})
    splits = split_rows(tmp_path / "out")
    train_ids = [row["id"] for row in splits["train"]]
    cv_train = {base_id(i) for i in train_ids if i.startswith("cross_validated")}
    for conversation_id in cv_train:
        assert {conversation_id, f"{conversation_id}#w2", f"{conversation_id}#w3"} <= set(train_ids)
    assert all("#w" not in i for i in train_ids if i.startswith("arxiv_synthetic"))
    assert all("#w" not in row["id"] for split in ("val", "test") for row in splits[split])
    counts = manifest["sources"]["cross_validated"]
    cv_rows = sum(i.startswith("cross_validated") for i in train_ids)
    assert counts["train_rows"] == 3 * counts["train_conversations"] == cv_rows


def test_fractional_weight_is_deterministic_and_close_to_the_expected_rate(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(4000))
    weights = {"cross_validated": 1.5, "arxiv_synthetic": 1.0}
    first = run([path], tmp_path / "one", weights=weights, test_fraction=0.0, val_fraction=0.0)
    second = run([path], tmp_path / "two", weights=weights, test_fraction=0.0, val_fraction=0.0)
    counts = first["sources"]["cross_validated"]
    assert counts["train_conversations"] == 4000
    # Binomial(4000, 0.5) extra copies: the standard deviation of the rate is 0.008.
    assert counts["train_rows"] / 4000 == pytest.approx(1.5, abs=0.04)
    assert (tmp_path / "one" / "train.jsonl").read_bytes() == (tmp_path / "two" / "train.jsonl").read_bytes()
    assert second["totals"] == first["totals"]


def test_weights_below_one_keep_some_conversations_once(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(1000))
    weights = {"cross_validated": 0.25, "arxiv_synthetic": 1.0}
    manifest = run([path], tmp_path / "out", weights=weights, test_fraction=0.0, val_fraction=0.0)
    train_ids = [row["id"] for row in read_jsonl(tmp_path / "out" / "train.jsonl")]
    assert len(train_ids) == manifest["totals"]["train_rows"]
    assert len(train_ids) / 1000 == pytest.approx(0.25, abs=0.05)
    assert all("#w" not in i for i in train_ids)


# --- determinism --------------------------------------------------------------------------------


def mixed_inputs(tmp_path: Path, rows: list[dict[str, Any]]) -> list[Path]:
    half = len(rows) // 2
    return [write_jsonl(tmp_path / "cv.jsonl", rows[:half]), write_jsonl(tmp_path / "ax.jsonl", rows[half:])]


def test_two_runs_are_byte_identical(tmp_path: Path) -> None:
    inputs = mixed_inputs(tmp_path, random_dataset(random.Random(1), n_questions=80))
    run(inputs, tmp_path / "one", on_invalid="skip")
    run(inputs, tmp_path / "two", on_invalid="skip")
    for name in ALL_FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_shuffling_rows_within_files_keeps_split_membership(tmp_path: Path) -> None:
    rows = distinct_questions(60) + distinct_questions(60, source="arxiv_synthetic")
    # Same questions as cross_validated-0..9 with other answers: same groups, not duplicates.
    rows += [
        conversation(f"Question number {i} from cross_validated?", "Another answer.", id=f"alt-{i}") for i in range(10)
    ]
    random.Random(3).shuffle(rows)
    manifest = run(mixed_inputs(tmp_path, rows), tmp_path / "ordered")
    # Without duplicates nothing depends on which occurrence comes first.
    assert manifest["totals"]["kept"] == manifest["totals"]["read"]
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    half = len(rows) // 2
    first_file, second_file = rows[:half], rows[half:]
    random.Random(4).shuffle(first_file)
    random.Random(5).shuffle(second_file)
    run(mixed_inputs(shuffled, first_file + second_file), tmp_path / "shuffled_out")
    assert (shuffled / "cv.jsonl").read_bytes() != (tmp_path / "cv.jsonl").read_bytes()
    before, after = split_rows(tmp_path / "ordered"), split_rows(tmp_path / "shuffled_out")
    for split in SPLITS:
        assert {row["id"] for row in before[split]} == {row["id"] for row in after[split]}, split
        # Rows are ordered by keyed hash, not input order, so even the bytes match.
        name = f"{split}.jsonl"
        assert (tmp_path / "ordered" / name).read_bytes() == (tmp_path / "shuffled_out" / name).read_bytes()


def test_manifest_records_params_hashes_and_no_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    write_jsonl(Path("data/cv.jsonl"), distinct_questions(10))
    manifest = run([Path("data/cv.jsonl")], tmp_path / "data" / "combined")
    text = (tmp_path / "data" / "combined" / MANIFEST_FILE).read_text()
    assert json.loads(text) == manifest
    assert str(tmp_path) not in text
    assert manifest["inputs"][0]["path"] == "data/cv.jsonl"
    assert manifest["params"]["weights"] == WEIGHTS and manifest["params"]["seed"] == 7
    assert set(manifest["outputs"]) == set(OUTPUT_FILES)


def test_rows_without_id_get_their_content_hash_id_in_outputs(tmp_path: Path) -> None:
    row = conversation("Only one?")
    path = write_jsonl(tmp_path / "in.jsonl", [row])
    run([path], tmp_path / "out", test_fraction=0.0, val_fraction=0.0)
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    expected = content_id(row["messages"])
    assert sorted(r["id"] for r in train) == [expected, expected + "#w2"]


# --- atomic writes ------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_failing_run_leaves_the_previous_outputs_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", distinct_questions(20))
    run([good], tmp_path / "out")
    before = snapshot(tmp_path / "out")
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation("q?"), "{broken"])
    with pytest.raises(DataError):
        run([bad], tmp_path / "out")
    assert snapshot(tmp_path / "out") == before

    def fail_while_writing(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise OSError("disk full")

    monkeypatch.setattr(combine_module, "build_manifest", fail_while_writing)
    with pytest.raises(OSError, match="disk full"):
        run([good], tmp_path / "out", seed=99)
    assert snapshot(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]


def test_a_rerun_replaces_outputs_but_keeps_foreign_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(20))
    run([path], tmp_path / "out", seed=1)
    (tmp_path / "out" / ".gitignore").write_text("/train.jsonl\n")
    run([path], tmp_path / "out", seed=2)
    assert (tmp_path / "out" / ".gitignore").read_text() == "/train.jsonl\n"
    assert json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]


# --- weights of other sources -------------------------------------------------------------------


def test_a_source_of_any_name_is_weighted_by_data_weights(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", distinct_questions(10, source="forum"))
    manifest = run([path], tmp_path / "out", seed=5, weights={**WEIGHTS, "forum": 3.0}, **NO_HOLDOUT)
    params = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["params"]
    assert params["weights"] == {"arxiv_synthetic": 1.0, "cross_validated": 2.0, "forum": 3.0}
    assert manifest["sources"]["forum"]["train_rows"] == 3 * 10


def test_the_largest_allowed_weight_fits_the_stored_copy_counts() -> None:
    """data.weights goes up to config.MAX_WEIGHT; KeptRows keeps each conversation's copies in 16 bits."""
    KeptRows().copies.append(train_copies(MAX_WEIGHT, seed=0, conversation_id="x"))  # OverflowError if not
