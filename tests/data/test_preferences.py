"""Preference records: located errors, quarantine, the leakage guard, the held-out split, and the shipped file."""

import collections
import json

import pytest

from expqa.data.chatml import load_chatml_dataset
from expqa.data.preferences import (
    Guard,
    PreferenceError,
    load_preferences,
    normalise,
    split_preferences,
    word_runs,
)
from helpers import REPO

SHIPPED = REPO / "data" / "raw" / "preferences.jsonl"
QUESTIONS = REPO / "data" / "eval" / "critical_questions.jsonl"
PROCESSED = REPO / "data" / "processed"


def record(i: int = 0, **changes) -> dict:
    base = {
        "prompt": f"Question number {i}: is a p-value the probability that the null is true?",
        "chosen": f"No ({i}). It is the probability of data at least this extreme if the null were true.",
        "rejected": f"Yes ({i}). It is the probability that the null hypothesis is true given the data.",
        "topic": "p-values",
        "source_id": "cv-0017",
    }
    return {**base, **changes}


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_valid_records_load_with_their_line_numbers(tmp_path):
    path = write(tmp_path / "p.jsonl", [record(0), "", record(1)])
    records, quarantined = load_preferences(path)
    assert [r["line"] for r in records] == [1, 3]
    assert quarantined == []


def test_every_bad_line_is_reported_at_once_with_file_and_line(tmp_path):
    lines = [
        record(0),
        "{not json",
        {k: v for k, v in record(2).items() if k != "rejected"},
        record(3, extra="x"),
        record(4, topic="  "),
        record(5, rejected=record(5)["chosen"].upper()),
        record(0),  # the same pair as line 1
        ["a", "list"],
    ]
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(PreferenceError) as caught:
        load_preferences(path)
    problems = caught.value.problems
    assert len(problems) == 7
    expected = [
        (2, "not valid JSON"),
        (3, "missing rejected"),
        (4, "unknown key extra"),
        (5, "topic must be non-empty text"),
        (6, "chosen and rejected are the same text"),
        (7, "the same pair as line 1"),
        (8, "expected a JSON object"),
    ]
    for problem, (line, words) in zip(problems, expected):
        assert problem.startswith(f"{path}:{line}: ") and words in problem, problem
    assert "data.on_invalid: skip" in str(caught.value)


def test_skip_quarantines_bad_lines_and_keeps_the_rest(tmp_path):
    path = write(tmp_path / "p.jsonl", [record(0), "{oops", record(2)])
    records, quarantined = load_preferences(path, on_invalid="skip")
    assert [r["line"] for r in records] == [1, 3]
    assert quarantined == [{"line": 2, "error": quarantined[0]["error"], "text": "{oops"}]
    assert "not valid JSON" in quarantined[0]["error"]


def test_a_file_with_no_valid_record_is_an_error_even_when_skipping(tmp_path):
    with pytest.raises(PreferenceError, match="no valid preference record"):
        load_preferences(write(tmp_path / "p.jsonl", ["{oops"]), on_invalid="skip")


QUESTION = {
    "question": "What does a p-value of 0.03 in a correctly run test mean?",
    "options": [
        "The probability that the null hypothesis is true is three percent",
        "Data at least this extreme would occur three percent of the time under the null",
        "0.97",
        "Nothing",
    ],
    "explanation": "A p-value is computed assuming the null hypothesis is true and says nothing about its probability.",
}
HELD_OUT = [
    {
        "id": "t-1",
        "messages": [{"role": "user", "content": "how do I size a test for a two percent lift in conversion rate"}],
    }
]


@pytest.mark.parametrize(
    "field,text,why",
    [
        ("prompt", "Quick one. What does a p-value of 0.03 in a correctly run test mean?", "whole"),
        ("rejected", "Simple: the probability that the null hypothesis is true is three percent here.", "whole"),
        ("chosen", "It is computed assuming the null hypothesis is true and says nothing about it at all.", "words"),
        ("prompt", "Tell me how do I size a test for a two percent lift in conversion rate please", "words"),
    ],
    ids=["question-whole", "long-option-whole", "explanation-10-words", "test-conversation-10-words"],
)
def test_the_guard_rejects_copies_of_evaluation_text(tmp_path, field, text, why):
    guard = Guard.build([QUESTION], HELD_OUT)
    path = write(tmp_path / "p.jsonl", [record(0, **{field: text})])
    with pytest.raises(PreferenceError) as caught:
        load_preferences(path, guard)
    message = caught.value.problems[0]
    assert message.startswith(f"{path}:1: {field} ")
    assert ("shares 10 words" if why == "words" else "contains a critical question's text whole") in message


def test_the_guard_lets_common_phrases_and_short_options_through(tmp_path):
    guard = Guard.build([QUESTION], HELD_OUT)
    # 9 words of the explanation in a row (p-value is two), and the short option "0.97" inside a sentence
    text = "A p-value is computed assuming the null hypothesis holds, never 0.97 of anything."
    records, _ = load_preferences(write(tmp_path / "p.jsonl", [record(0, chosen=text)]), guard)
    assert len(records) == 1


def test_split_is_by_prompt_seeded_and_stable_when_records_are_added():
    records = [record(i) for i in range(400)] + [record(7, chosen="Another correct answer for the same prompt.")]
    train, held = split_preferences(records, 0.1, seed=42)
    assert 20 <= len(held) <= 65
    held_prompts = {normalise(r["prompt"]) for r in held}
    assert not held_prompts & {normalise(r["prompt"]) for r in train}  # one prompt, one side
    again_train, again_held = split_preferences(records[:200], 0.1, seed=42)
    assert {r["prompt"] for r in again_held} == {r["prompt"] for r in held if r in records[:200]}
    _, other_seed = split_preferences(records, 0.1, seed=1)
    assert {r["prompt"] for r in other_seed} != {r["prompt"] for r in held}


def test_word_runs_ignore_case_and_punctuation():
    assert word_runs("A, b! c d e f g h i J k", 10) == {"a b c d e f g h i j", "b c d e f g h i j k"}


# ---------------------------------------------------------------------------------------------------------------
# the shipped preference data


def shipped_ids() -> set[str]:
    """The ids of the shipped conversations (data/processed is a DVC output: a fresh clone has only data/raw)."""
    raw = REPO / "data" / "raw"
    return {json.loads(line)["id"] for f in ("cross_validated.jsonl", "arxiv_synthetic.jsonl") for line in
            (raw / f).read_text().splitlines() if line.strip()}  # fmt: skip


@pytest.fixture(scope="module")
def shipped():
    """The shipped pairs through the guard: against the critical questions always, and against the val and test
    conversations where `dvc repro` has made the splits here (the align stage checks them whenever it runs)."""
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    held_out = []
    if (PROCESSED / "val.jsonl").exists():
        held_out = load_chatml_dataset(PROCESSED / "val.jsonl") + load_chatml_dataset(PROCESSED / "test.jsonl")
    records, quarantined = load_preferences(SHIPPED, Guard.build(questions, held_out))
    return records, quarantined, questions


def test_shipped_preferences_are_valid_and_copy_no_evaluation_text(shipped):
    records, quarantined, _ = shipped
    assert quarantined == []
    assert len(records) >= 400


def test_shipped_preferences_draw_on_train_conversations_and_cover_the_taught_topics(shipped):
    records, _, questions = shipped
    if (PROCESSED / "train.jsonl").exists():
        train_ids = {row["id"].split("#")[0] for row in load_chatml_dataset(PROCESSED / "train.jsonl")}
        assert {r["source_id"] for r in records} <= train_ids
    assert {r["source_id"] for r in records} <= shipped_ids()
    taught_topics = {q["topic"] for q in questions if set(q.get("taught_by", [])) & {r["source_id"] for r in records}}
    per_topic = collections.Counter(r["topic"] for r in records)
    assert taught_topics <= set(per_topic)
    # several phrasings per misconception: no prompt repeats, answers are of comparable length
    assert len({normalise(r["prompt"]) for r in records}) == len(records)
    ratios = [len(r["rejected"].split()) / len(r["chosen"].split()) for r in records]
    assert 0.6 <= min(ratios) and max(ratios) <= 1.67


def test_shipped_preferences_hold_out_a_tenth_for_reward_accuracy(shipped):
    records = shipped[0]
    train, held = split_preferences(records, 0.1, seed=42)
    assert 0.05 * len(records) <= len(held) <= 0.15 * len(records)
