"""data.sources: datasets in common formats converted to ChatML rows and combined like the built-in sources."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from expqa.config import ConfigError, DataConfig, SourceConfig, load_params
from expqa.data.chatml import DataError, content_id
from expqa.data.combine import combine_datasets
from expqa.pipeline.combine import main as combine_stage
from helpers import REPO

BUILT_IN = {"cross_validated": 1.0, "arxiv_synthetic": 1.0}
BUILT_IN_ROW = {
    "id": "cv-1",
    "source": "cross_validated",
    "messages": [
        {"role": "user", "content": "Built-in question?"},
        {"role": "assistant", "content": "Built-in answer."},
    ],
}

MY_ROW = {"messages": [{"role": "user", "content": "My question?"}, {"role": "assistant", "content": "Mine."}]}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def entry(path: Path, format: str, name: str) -> SourceConfig:
    """A data.sources entry for ``path``, a file (or hf_disk folder) in the test's sources folder, tmp_path."""
    return SourceConfig(file=path.name, format=format, weight=1.0, name=name)


def data_config(sources: list[SourceConfig], on_invalid: str = "error") -> DataConfig:
    return DataConfig(weights=BUILT_IN, test_fraction=0.0, val_fraction=0.0, on_invalid=on_invalid, sources=sources)


def combine(tmp_path: Path, source: SourceConfig, on_invalid: str = "error") -> dict[str, Any]:
    """Combine one built-in row and ``source`` (its file in tmp_path); returns {"manifest", "rows": the source's
    train rows, "quarantine"}."""
    built_in = write_jsonl(tmp_path / "built_in.jsonl", [BUILT_IN_ROW])
    out = tmp_path / "out"
    manifest = combine_datasets([built_in], out, data_config([source], on_invalid), seed=42, sources_dir=tmp_path)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    return {
        "manifest": manifest,
        "rows": sorted((r for r in rows if r["source"] == source.name), key=lambda r: r["id"]),
        "quarantine": quarantine,
    }


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


# --- good rows convert exactly ---------------------------------------------------------------

SHAREGPT = [
    {
        "id": "a1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is a p-value?"},
            {"from": "gpt", "value": "A tail probability under H0."},
        ],
        "lang": "en",
    },
    {"conversations": [{"from": "human", "value": "What is power?"}, {"from": "gpt", "value": "1 - beta."}]},
]
SHAREGPT_ROWS = [
    {
        "id": "faq:a1",
        "source": "faq",
        "metadata": {"lang": "en"},
        "messages": turns(
            ("system", "Be brief."), ("user", "What is a p-value?"), ("assistant", "A tail probability under H0.")
        ),
        "origin": {"file": "{file}", "format": "sharegpt", "line": 1},
    },
    {
        "source": "faq",
        "messages": turns(("user", "What is power?"), ("assistant", "1 - beta.")),
        "origin": {"file": "{file}", "format": "sharegpt", "line": 2},
    },
]


def expected(rows: list[dict[str, Any]], file: str, lines: list[int]) -> list[dict[str, Any]]:
    """Rows as combine writes them: the file name and lines filled in, content-hash ids where none was given."""
    out = []
    for row, line in zip(rows, lines):
        row = json.loads(json.dumps(row).replace("{file}", file))
        row["origin"][next(k for k in ("line", "row") if k in row["origin"])] = line
        row.setdefault("id", content_id(row["messages"]))
        out.append(row)
    return sorted(out, key=lambda r: r["id"])


def test_sharegpt_jsonl_converts_exactly(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "faq.jsonl", SHAREGPT)
    result = combine(tmp_path, entry(path, "sharegpt", "faq"))
    assert result["rows"] == expected(SHAREGPT_ROWS, "faq.jsonl", [1, 2])
    assert result["manifest"]["sources"]["faq"]["kept"] == 2


def test_sharegpt_json_list_converts_exactly_with_the_line_of_each_element(tmp_path: Path) -> None:
    path = tmp_path / "faq.json"
    path.write_text("[\n  " + ",\n\n  ".join(json.dumps(r) for r in SHAREGPT) + "\n]\n", encoding="utf-8")
    result = combine(tmp_path, entry(path, "sharegpt", "faq"))
    assert result["rows"] == expected(SHAREGPT_ROWS, "faq.json", [2, 4])


def test_alpaca_converts_exactly(tmp_path: Path) -> None:
    path = tmp_path / "howto.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "Summarise the test.", "input": "n=100, p=0.03", "output": "Significant at 5 %."},
                {
                    "instruction": "Define MDE.",
                    "input": "",
                    "output": "Minimum detectable effect.",
                    "system": "Be brief.",
                },
            ]
        ),
        encoding="utf-8",
    )
    result = combine(tmp_path, entry(path, "alpaca", "howto"))
    assert result["rows"] == expected(
        [
            {
                "source": "howto",
                "messages": turns(
                    ("user", "Summarise the test.\n\nn=100, p=0.03"), ("assistant", "Significant at 5 %.")
                ),
                "origin": {"file": "howto.json", "format": "alpaca", "line": 1},
            },
            {
                "source": "howto",
                "messages": turns(
                    ("system", "Be brief."), ("user", "Define MDE."), ("assistant", "Minimum detectable effect.")
                ),
                "origin": {"file": "howto.json", "format": "alpaca", "line": 1},
            },
        ],
        "howto.json",
        [1, 1],
    )


def test_openai_messages_convert_exactly(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Why randomise?"},
                    {"role": "assistant", "content": "To break confounding.", "weight": 1},
                ]
            },
        ],
    )
    result = combine(tmp_path, entry(path, "openai", "chat"))
    assert result["rows"] == expected(
        [
            {
                "source": "chat",
                "messages": turns(("user", "Why randomise?"), ("assistant", "To break confounding.")),
                "origin": {"file": "chat.jsonl", "format": "openai", "line": 1},
            }
        ],
        "chat.jsonl",
        [1],
    )


def test_chatml_rows_keep_id_and_metadata_and_get_the_source_name(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "own.jsonl",
        [
            {
                "id": "own-1",
                "source": "notes",
                "topic": "power",
                "messages": turns(("user", "Q?"), ("assistant", "A.")),
            },
        ],
    )
    result = combine(tmp_path, entry(path, "chatml", "own"))
    assert result["rows"] == [
        {
            "id": "own-1",
            "source": "own",
            "topic": "power",
            "messages": turns(("user", "Q?"), ("assistant", "A.")),
            "origin": {"file": "own.jsonl", "format": "chatml", "line": 1, "source": "notes"},
        }
    ]


@pytest.mark.parametrize(
    "records, shape",
    [
        ([{"messages": turns(("user", "Q?"), ("assistant", "A.")), "lang": "en"}], "openai"),
        (
            [{"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "lang": "en"}],
            "sharegpt",
        ),
        ([{"instruction": "Q?", "input": "", "output": "A.", "lang": "en"}], "alpaca"),
    ],
    ids=["openai", "sharegpt", "alpaca"],
)
def test_hf_disk_dataset_converts_exactly_whatever_its_shape(tmp_path: Path, records, shape) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    result = combine(tmp_path, entry(tmp_path / "hf", "hf_disk", "hf"))
    assert result["rows"] == expected(
        [
            {
                "source": "hf",
                "metadata": {"lang": "en"},
                "messages": turns(("user", "Q?"), ("assistant", "A.")),
                "origin": {"file": "hf", "format": "hf_disk", "row": 0},
            }
        ],
        "hf",
        [0],
    )


# --- bad rows: located errors, or quarantined with their reason ------------------------------

BAD_ROWS = [
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "bot", "value": "A."}]},
        "conversations[1].from is 'bot'; allowed: human, gpt, system",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": ""}]},
        "conversations[1].value is empty",
    ),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt"}]},
        "conversations[1] has no 'value'",
    ),
    ("sharegpt", {"messages": []}, "missing 'conversations'"),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "human", "value": "Q2?"}]},
        "messages[1].role is 'user' but 'assistant' was expected",
    ),
    ("alpaca", {"instruction": "Q?"}, "missing 'output'"),
    ("alpaca", {"instruction": "Q?", "output": 42}, "'output' is a number, expected a string"),
    ("alpaca", {"instruction": " ", "output": "A."}, "'instruction' is only whitespace"),
    (
        "openai",
        {"messages": turns(("user", "Q?"), ("tool", "A."))},
        "messages[1].role is 'tool'; allowed: system, user, assistant",
    ),
    ("openai", {"messages": "Q? A."}, "'messages' is a string, expected a list"),
    (
        "openai",
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": None}]},
        "messages[1].content is null, expected a string",
    ),
    ("chatml", {"messages": turns(("user", "Q?"))}, "no assistant message"),
    ("chatml", '{"messages": [', "invalid JSON"),
    ("chatml", ["not", "an", "object"], "record is an array, expected an object"),
]


@pytest.mark.parametrize("format, bad, reason", BAD_ROWS, ids=[f"{f}-{r[:30]}" for f, _, r in BAD_ROWS])
def test_bad_row_is_a_located_error(tmp_path: Path, format: str, bad: Any, reason: str) -> None:
    good = {
        "chatml": MY_ROW,
        "openai": MY_ROW,
        "sharegpt": SHAREGPT[1],
        "alpaca": {"instruction": "Q?", "output": "A."},
    }[format]
    path = write_jsonl(tmp_path / "mine.jsonl", [good, bad])
    with pytest.raises(DataError) as caught:
        combine(tmp_path, entry(path, format, "mine"))
    assert str(caught.value).startswith(f"{path}:2: {reason}")
    assert "\n  hint: " in str(caught.value)


@pytest.mark.parametrize("format, bad, reason", BAD_ROWS, ids=[f"{f}-{r[:30]}" for f, _, r in BAD_ROWS])
def test_bad_row_is_quarantined_with_its_reason_under_skip(tmp_path: Path, format: str, bad: Any, reason: str) -> None:
    good = {
        "chatml": MY_ROW,
        "openai": MY_ROW,
        "sharegpt": SHAREGPT[1],
        "alpaca": {"instruction": "Q?", "output": "A."},
    }[format]
    path = write_jsonl(tmp_path / "mine.jsonl", [bad, good])
    result = combine(tmp_path, entry(path, format, "mine"), on_invalid="skip")
    (record,) = result["quarantine"]
    assert (record["path"], record["line"]) == ("mine.jsonl", 1) and record["reason"].startswith(reason)
    assert record["raw"] == (bad if isinstance(bad, str) else json.dumps(bad))
    counts = result["manifest"]["sources"]["mine"]
    assert (counts["read"], counts["kept"], counts["invalid"]) == (2, 1, 1)


def test_hf_disk_bad_row_is_located_by_row_index(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [
        {"messages": turns(("user", "Q?"), ("assistant", "A."))},
        {"messages": turns(("user", "Q2?"), ("robot", "A."))},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    source = entry(tmp_path / "hf", "hf_disk", "hf")
    with pytest.raises(DataError, match=r"hf: row 1: messages\[1\].role is 'robot'"):
        combine(tmp_path, source)
    (record,) = combine(tmp_path, source, on_invalid="skip")["quarantine"]
    assert (record["path"], record["row"]) == ("hf", 1)


def test_json_list_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "faq.json"
    path.write_text('[\n  {"instruction": "Q?", "output": "A."}\n  {"instruction": "Q2?", "output": "A."}\n]\n')
    with pytest.raises(DataError, match=r"faq.json:3: expected ',' or ']' after a list element"):
        combine(tmp_path, entry(path, "alpaca", "howto"))


@pytest.mark.parametrize("levels", [1_000, 100_000])
def test_json_list_element_nested_past_the_recursion_limit_is_an_invalid_record(tmp_path: Path, levels: int) -> None:
    """json recurses per level: such an element raised RecursionError; now it is an invalid record at its line, with
    the JSONL rows' message and limit, and the elements after it (brackets and quotes in strings too) still read."""
    deep = "[" * levels + "]" * levels
    path = tmp_path / "howto.json"
    path.write_text(
        '[\n  {"instruction": "Q?", "output": "A."},\n  {"instruction": "Deep?", "output": "A.", "x": '
        + deep
        + '},\n  {"instruction": "Brackets ] } [ { \\" in text?", "output": "A."}\n]\n'
    )
    with pytest.raises(DataError) as caught:
        combine(tmp_path, entry(path, "alpaca", "howto"))
    # Python 3.11's json recurses past its limit at 1,000 levels, 3.12's parses them (a larger C stack) and the row
    # check then names the place: the same error either way, with or without "(at ...)"
    at = r"( \(at [\[\]0-9.a-z]*\))?"
    assert re.match(
        rf"{re.escape(str(path))}:3: invalid JSON: nested deeper than 64 levels{at}\n  hint: flatten", str(caught.value)
    )
    result = combine(tmp_path, entry(path, "alpaca", "howto"), on_invalid="skip")
    (record,) = result["quarantine"]
    assert (record["line"], record["raw"]) == (3, '{"instruction": "Deep?", "output": "A.", "x": ' + deep + "}")
    assert re.fullmatch(rf"invalid JSON: nested deeper than 64 levels{at}", record["reason"])
    kept = sorted(row["messages"][0]["content"] for row in result["rows"])
    assert kept == ['Brackets ] } [ { " in text?', "Q?"]


def test_json_list_element_nested_past_the_recursion_limit_that_never_closes_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "howto.json"
    path.write_text('[\n  {"instruction": "Q?", "output": "A."},\n  {"x": ' + "[" * 100_000 + "\n")
    with pytest.raises(DataError) as caught:
        combine(tmp_path, entry(path, "alpaca", "howto"), on_invalid="skip")
    assert str(caught.value).startswith(
        f"{path}:3: invalid JSON in the list: an element nested deeper than 64 levels never closes"
    )


def test_a_source_without_records_is_a_warning_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "faq.jsonl"
    path.write_bytes(b"")
    with caplog.at_level("WARNING", logger="expqa.data.combine"):
        result = combine(tmp_path, entry(path, "sharegpt", "faq"))
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: no records, so no rows from source faq; a warning, not an error, since other inputs have rows; add "
        "its records, or remove its data.sources entry"
    ]
    assert result["manifest"]["sources"]["faq"]["read"] == 0


def test_json_list_is_read_as_jsonl_for_a_jsonl_format(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"messages": turns(("user", "Q?"), ("assistant", "A."))}]))
    with pytest.raises(DataError, match="chat.json:1: record is an array, expected an object"):
        combine(tmp_path, entry(path, "openai", "chat"))


# --- config ------------------------------------------------------------------------------------


def test_sources_without_a_sources_folder_are_a_config_error(tmp_path: Path) -> None:
    built_in = write_jsonl(tmp_path / "built_in.jsonl", [BUILT_IN_ROW])
    data = data_config([entry(write_jsonl(tmp_path / "faq.jsonl", [MY_ROW]), "chatml", "faq")])
    with pytest.raises(ConfigError, match=r"^data.sources lists 1 file\(s\) but no --sources folder was given"):
        combine_datasets([built_in], tmp_path / "out", data, seed=42)
    assert not (tmp_path / "out").exists()


def test_a_source_file_missing_from_the_sources_folder_is_a_config_error(tmp_path: Path) -> None:
    built_in = write_jsonl(tmp_path / "built_in.jsonl", [BUILT_IN_ROW])
    data = data_config([entry(tmp_path / "gone.jsonl", "chatml", "gone")])
    with pytest.raises(ConfigError, match=rf"^data.sources\[0\].file 'gone.jsonl' not found in {tmp_path}/"):
        combine_datasets([built_in], tmp_path / "out", data, seed=42, sources_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def load_with_sources(tmp_path: Path, entries: str) -> None:
    """load_params on the shipped params.yaml with data.sources set to ``entries`` (YAML block list)."""
    (tmp_path / "sources").mkdir(exist_ok=True)
    (tmp_path / "sources" / "faq.jsonl").write_text("")
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  sources:\n" + entries)
    load_params(REPO / "params.yaml", override, sources_dir=tmp_path / "sources")


GOOD_ENTRY = "  - file: faq.jsonl\n    format: sharegpt\n    weight: 1.0\n    name: faq\n"


@pytest.mark.parametrize(
    "entry, message",
    [
        (GOOD_ENTRY.replace("sharegpt", "xml"), ":4: data.sources[0].format is 'xml'; allowed: chatml, sharegpt"),
        (GOOD_ENTRY.replace("faq.jsonl", "gone.jsonl"), ":3: data.sources[0].file 'gone.jsonl' not found in"),
        (GOOD_ENTRY.replace("faq.jsonl", "../faq.jsonl"), ":3: data.sources[0].file is '../faq.jsonl'; give a name"),
        (GOOD_ENTRY + GOOD_ENTRY, ":10: data.sources[1].name is 'faq', already the name of data.sources[0]"),
        (GOOD_ENTRY.replace("1.0", ".nan"), ":5: data.sources[0].weight is nan; expected a finite number"),
        (GOOD_ENTRY.replace("1.0", "-1"), ":5: data.sources[0].weight is -1; use 0 (drops the source) to 1000"),
        (GOOD_ENTRY.replace("1.0", "1001"), ":5: data.sources[0].weight is 1001; use 0 (drops the source) to 1000"),
        (
            GOOD_ENTRY.replace("name: faq", "name: cross_validated"),
            ":6: data.sources[0].name is 'cross_validated', a built-in source (data.weights)",
        ),
        (GOOD_ENTRY + "    colour: red\n", ":7: unknown key 'data.sources[0].colour'"),
        (GOOD_ENTRY.replace("    name: faq\n", ""), ":3: data.sources[0] has no name; each entry needs file, format"),
        ("  - faq.jsonl\n", ":3: data.sources[0] is 'faq.jsonl' (str); expected a mapping"),
    ],
    ids=[
        "format",
        "missing-file",
        "outside-folder",
        "duplicate-name",
        "nan-weight",
        "negative-weight",
        "huge-weight",
        "built-in-name",
        "unknown-key",
        "missing-key",
        "not-a-mapping",
    ],
)
def test_config_error_is_located(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_with_sources(tmp_path, entry)
    assert f"{tmp_path / 'override.yaml'}{message}" in str(caught.value)


def test_a_folder_where_the_format_reads_a_file_is_a_located_error(tmp_path: Path, capsys) -> None:
    """It was a bare `[Errno 21] Is a directory` from the combine stage; now the entry's line says what to do, from
    the params stage (load_params with the sources folder) and from the combine stage run by hand."""
    sources = tmp_path / "sources"
    (sources / "faq_dir").mkdir(parents=True)
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  sources:\n" + GOOD_ENTRY.replace("faq.jsonl", "faq_dir"))
    expected = (
        f"{override}:3: data.sources[0].file 'faq_dir' is a folder in {sources}/, but format sharegpt reads one "
        "file; give the file (JSONL, or a JSON list for sharegpt/alpaca), or set format: hf_disk for a folder "
        "written by datasets' save_to_disk"
    )
    with pytest.raises(ConfigError) as caught:
        load_params(REPO / "params.yaml", override, sources_dir=sources)
    assert str(caught.value) == expected
    built_in = write_jsonl(tmp_path / "built_in.jsonl", [BUILT_IN_ROW])
    argv = [str(built_in), "--out", str(tmp_path / "out"), "--sources", str(sources)]
    assert combine_stage([*argv, "--params", str(REPO / "params.yaml"), "--config", str(override)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"
    assert not (tmp_path / "out").exists()


def test_a_file_where_hf_disk_reads_a_folder_is_a_located_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_with_sources(tmp_path, GOOD_ENTRY.replace("sharegpt", "hf_disk"))
    assert str(caught.value).startswith(
        f"{tmp_path / 'override.yaml'}:3: data.sources[0].file 'faq.jsonl' is a file in {tmp_path / 'sources'}/, "
        "but format hf_disk reads a folder written by datasets' save_to_disk"
    )


def test_config_reports_every_source_problem_together(tmp_path: Path) -> None:
    entries = GOOD_ENTRY.replace("sharegpt", "xml") + GOOD_ENTRY.replace("faq", "gone")
    with pytest.raises(ConfigError) as caught:
        load_with_sources(tmp_path, entries)
    assert "2 configuration problems" in str(caught.value)


def test_good_sources_entry_loads(tmp_path: Path) -> None:
    load_with_sources(tmp_path, GOOD_ENTRY)


# --- end to end: the stage ---------------------------------------------------------------------


def test_stage_puts_a_weight_2_source_twice_in_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sources = tmp_path / "data" / "raw" / "sources"
    sources.mkdir(parents=True)
    write_jsonl(
        sources / "faq.jsonl",
        [{"conversations": [{"from": "human", "value": "Only from my data?"}, {"from": "gpt", "value": "Yes."}]}],
    )
    override = tmp_path / "override.yaml"
    override.write_text(
        "data:\n  test_fraction: 0.0\n  val_fraction: 0.0\n  sources:\n" + GOOD_ENTRY.replace("1.0", "2.0")
    )
    built_in = write_jsonl(tmp_path / "built_in.jsonl", [BUILT_IN_ROW])
    stage = {"main": combine_stage}
    assert (
        stage["main"](
            [
                str(built_in),
                "--out",
                str(tmp_path / "out"),
                "--params",
                str(REPO / "params.yaml"),
                "--config",
                str(override),
                "--sources",
                str(sources),
            ]
        )
        == 0
    )
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    mine = [row for row in train if row["source"] == "faq"]
    assert len(mine) == 2 and mine[0]["messages"] == mine[1]["messages"]
    assert sorted(row["id"] for row in mine)[1] == sorted(row["id"] for row in mine)[0] + "#w2"
    assert "faq (sharegpt" in capsys.readouterr().out
