"""Progress bars (expqa.progress): drawn on a terminal or when forced, never into a log; the stage loops use them."""

import io
import json
import sys

import pytest
from tqdm import tqdm

from expqa import progress as progress_module
from expqa.data import stats as stats_module
from expqa.data.stackexchange import collect_stackexchange
from expqa.data.stats import get_dataset_stats
from expqa.progress import byte_progress, progress
from helpers import COLLECT_CONFIG, SAMPLE_POSTS, fake_tokenize, row


class Terminal(io.StringIO):
    """What tqdm draws on, standing in for a terminal's stderr."""

    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch) -> Terminal:
    """stderr replaced by a terminal, inside the test: pytest puts its own capture back between setup and call."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


@pytest.fixture(autouse=True)
def unforced(monkeypatch):
    monkeypatch.delenv(progress_module.ENV_VAR, raising=False)


def test_not_a_terminal_gets_the_iterable_itself_and_no_output(capfd):
    items = [1, 2, 3]
    assert not sys.stderr.isatty()  # pytest's capture, like a CI log
    assert progress(items, desc="score") is items
    with byte_progress(10, desc="read") as bar:
        bar.update(10)
    assert bar.disable and capfd.readouterr() == ("", "")


def test_terminal_gets_a_bar_with_count_and_unit(monkeypatch):
    terminal = on_terminal(monkeypatch)
    assert list(progress(iter(range(3)), desc="evaluate base: generate", total=3, unit="batch")) == [0, 1, 2]
    drawn = terminal.getvalue()
    assert "evaluate base: generate" in drawn and "3/3" in drawn and "batch/s" in drawn


def test_byte_bar_shows_bytes_read_of_the_total(monkeypatch):
    terminal = on_terminal(monkeypatch)
    with byte_progress(2048, desc="collect: index Posts.xml") as bar:
        bar.update(1024)
        bar.update(1024)
    assert "collect: index Posts.xml" in terminal.getvalue() and "2.00k/2.00k" in terminal.getvalue()


def test_environment_forces_bars_on_in_a_log_and_off_on_a_terminal(monkeypatch):
    terminal = on_terminal(monkeypatch)
    monkeypatch.setenv(progress_module.ENV_VAR, "0")
    items = [1, 2]
    assert progress(items, desc="x") is items and terminal.getvalue() == ""
    monkeypatch.setenv(progress_module.ENV_VAR, "1")
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress(items, desc="forced")) == items
    assert "forced" in log.getvalue() and "2/2" in log.getvalue()


def test_unknown_setting_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(progress_module.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"EXPQA_PROGRESS='yes': use 1 .* 0 .* or leave it unset"):
        progress([1], desc="x")


# --- the stage loops --------------------------------------------------------------------------------------------


def test_collect_draws_no_bar_into_a_log_and_two_byte_bars_on_a_terminal(tmp_path, capfd, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    counts = collect_stackexchange(SAMPLE_POSTS, out, COLLECT_CONFIG)
    assert counts["pairs_written"] > 0
    assert capfd.readouterr().err == ""
    screen = on_terminal(monkeypatch)
    collect_stackexchange(SAMPLE_POSTS, out, COLLECT_CONFIG)
    total = tqdm.format_sizeof(SAMPLE_POSTS.stat().st_size, divisor=1024)  # e.g. 43.9k
    for desc in ("collect: index Posts.xml", "collect: convert chosen posts"):
        assert f"{desc}: 100%" in screen.getvalue() and f"{total}/{total}" in screen.getvalue()


def test_stats_tokenizes_with_a_bar_per_split_only_on_a_terminal(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(stats_module, "tokenize_conversation", fake_tokenize)
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row(f"{split} {i}?", 4)) + "\n" for i in range(n)))
    quiet = get_dataset_stats(tmp_path, tokenizer=None, max_seq_lengths=[8])
    assert capfd.readouterr().err == ""
    screen = on_terminal(monkeypatch)
    assert get_dataset_stats(tmp_path, tokenizer=None, max_seq_lengths=[8]) == quiet
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        assert f"stats: tokenize {split}: 100%" in screen.getvalue() and f"{n}/{n}" in screen.getvalue()


def test_evaluate_bars_name_the_model_and_count_batches(tiny_base, embedded_tokenizer, capfd, monkeypatch):
    from transformers import AutoModelForCausalLM

    from expqa.evaluation.evaluate import evaluate_model
    from helpers import conversation

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    rows = [conversation(i) for i in range(3)]
    questions = [{"id": "q", "question": "Is 0.03 < 0.05?", "options": ["Yes.", "No."], "answer": 0}]
    options = dict(max_length=128, max_new_tokens=2, batch_size=2, label="evaluate base")
    capfd.readouterr()
    quiet = evaluate_model(model, embedded_tokenizer, rows, questions, **options)
    assert capfd.readouterr().err == ""
    screen = on_terminal(monkeypatch)
    assert evaluate_model(model, embedded_tokenizer, rows, questions, **options) == quiet
    drawn = screen.getvalue()
    # 3 conversations in batches of 2; the 2 options alone and with their question: 1 prefix tree, 1 batch
    for desc, batches in (("perplexity", 2), ("generate", 2), ("critical questions", 1)):
        assert f"evaluate base: {desc}: 100%" in drawn and f"{batches}/{batches} [" in drawn, desc
