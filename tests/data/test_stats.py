"""Dataset statistics (expqa.data.stats): weighted copies are rows, not conversations; truncation is counted."""

import json

import pytest

from expqa.data import stats as stats_module
from expqa.data.stats import get_dataset_stats, summary_line, write_dataset_stats
from helpers import fake_tokenize, row


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(stats_module, "tokenize_conversation", fake_tokenize)
    long_one = row("Long?", 9)
    splits = {
        # combine's weighted copies: same messages, '#wN' ids
        "train": [long_one, {**long_one, "id": "Long?#w2"}, {**long_one, "id": "Long?#w3"}, row("Short?", 2)],
        "val": [row("Val?", 3, source="arxiv_synthetic")],
        "test": [row("Test?", 6)],
    }
    for split, rows in splits.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_weighted_copies_are_rows_and_truncation_is_counted(data_dir):
    stats = get_dataset_stats(data_dir, tokenizer=None, max_seq_lengths=[6, 8])
    train = stats["splits"]["train"]
    assert (train["conversations"], train["rows"], train["tokens"]) == (2, 4, 3 * 10 + 3)
    assert train["by_source"] == {"cross_validated": 2} and stats["sources"]["cross_validated"]["train"] == 2
    # lengths 10, 3 (train), 4 (val), 7 (test): each conversation once
    assert stats["truncated"] == {"6": 2, "8": 1}
    assert stats["truncated_share"] == {"6": 0.5, "8": 0.25}
    assert sum(b["conversations"] for b in stats["histogram"]) == 4
    assert stats["token_length"]["max"] == 10
    assert summary_line(stats) == (
        "stats: 4 conversations (6 rows with the weighted train copies); 2 longer than 6 "
        "tokens, 1 longer than 8 tokens; p50 4 tokens"
    )


def test_write_dataset_stats_writes_the_json_and_the_histogram_csv(data_dir, tiny_base, tmp_path):
    """The stage's files, byte for byte: sorted JSON with a final newline (no histogram in it) and the CSV."""
    out, histogram = tmp_path / "metrics" / "data_stats.json", tmp_path / "metrics" / "plots" / "token_lengths.csv"
    stats = write_dataset_stats(data_dir, tiny_base, [6, 8], out, histogram)
    expected = get_dataset_stats(data_dir, tokenizer=None, max_seq_lengths=[6, 8])
    assert expected.pop("histogram") == [{"tokens": 0, "conversations": 4}]
    assert stats == expected
    assert out.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"
    assert histogram.read_text() == "tokens,conversations\n0,4\n"
