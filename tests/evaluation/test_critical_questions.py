"""The critical-questions evaluation set (data/eval/critical_questions.jsonl): schema, balance, provenance links,
and no overlap with the training data.

Each row: id (cq-NNN), topic (one of TOPICS), question, options (exactly 4), answer (index of the correct option),
explanation, taught_by (ids of shipped training conversations in data/raw/*.jsonl whose assistant answer teaches
the fact needed to answer; an empty list means "not taught").
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import REPO

QUESTIONS = REPO / "data" / "eval" / "critical_questions.jsonl"
RAW = REPO / "data" / "raw"

# The fixed topic vocabulary of the question set.
TOPICS = frozenset(
    {
        "p-values",
        "confidence intervals",
        "power and sample size",
        "type I/II errors",
        "peeking/sequential testing",
        "multiple comparisons",
        "CUPED/variance reduction",
        "sample ratio mismatch",
        "novelty effects",
        "ratio metrics/delta method",
        "Bayesian A/B",
        "bandits",
        "heterogeneous effects/subgroups",
        "interference/SUTVA",
        "difference-in-differences",
        "regression discontinuity",
        "synthetic control",
        "randomisation and confounding",
        "t-test assumptions/CLT",
        "practical vs statistical significance",
        "bootstrap/nonparametric tests",
        "heavy tails/outliers",
        "non-inferiority/equivalence",
        "metrics and guardrails",
        "experiment design",
        "instrumental variables",
        "observational methods",
    }
)
FIELDS = {"id", "topic", "question", "options", "answer", "explanation", "taught_by"}
N_OPTIONS = 4
MIN_QUESTIONS = 200
POSITION_TOLERANCE = 0.02  # each answer index holds 25 % +/- 2 % of the questions
MIN_MESSAGE_CHARS = 30  # user messages at least this long (normalised) may not appear inside a question


def normalise(text: str) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed: how question/message overlap is compared."""
    kept = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower())
    return " ".join(kept.split())


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def overlaps(questions: list[dict], user_messages: list[tuple[str, str]]) -> list[str]:
    """Questions whose normalised text equals or is contained in a user message, or contains a long one."""
    found = []
    for q in questions:
        question = normalise(q["question"])
        for row_id, message in user_messages:
            if question in message or (len(message) > MIN_MESSAGE_CHARS and message in question):
                found.append(f"{q['id']} overlaps a user message of {row_id}")
    return found


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    return load_rows(QUESTIONS)


@pytest.fixture(scope="module")
def raw_rows() -> list[dict]:
    # the ChatML files in git that the combine stage reads (data/raw also holds the arXiv metadata generate reads)
    combine = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["combine"]["deps"]
    files = [REPO / dep for dep in combine if dep.startswith("data/raw/") and dep.endswith(".jsonl")]
    rows = [row for path in files for row in load_rows(path)]
    assert rows, f"no training rows found in {files}"
    return rows


@pytest.fixture(scope="module")
def user_messages(raw_rows) -> list[tuple[str, str]]:
    return [(row["id"], normalise(m["content"])) for row in raw_rows for m in row["messages"] if m["role"] == "user"]


def test_schema(questions):
    assert len(questions) >= MIN_QUESTIONS
    for q in questions:
        where = q.get("id", q)
        assert set(q) == FIELDS, f"{where}: fields {sorted(q)}"
        assert re.fullmatch(r"cq-\d{3}", q["id"]), where
        assert q["topic"] in TOPICS, f"{where}: topic {q['topic']!r} is not in the vocabulary"
        assert isinstance(q["question"], str) and q["question"].strip(), where
        assert isinstance(q["explanation"], str) and q["explanation"].strip(), where
        assert isinstance(q["options"], list) and len(q["options"]) == N_OPTIONS, where
        assert all(isinstance(o, str) and o.strip() for o in q["options"]), where
        assert len({normalise(o) for o in q["options"]}) == N_OPTIONS, f"{where}: duplicate options"
        assert not any(
            "all of the above" in normalise(o) or "none of the above" in normalise(o) for o in q["options"]
        ), where
        assert type(q["answer"]) is int and 0 <= q["answer"] < N_OPTIONS, where
        assert isinstance(q["taught_by"], list) and all(isinstance(t, str) for t in q["taught_by"]), where
        assert len(set(q["taught_by"])) == len(q["taught_by"]), f"{where}: repeated taught_by id"


def test_unique_ids_and_questions(questions):
    ids = collections.Counter(q["id"] for q in questions)
    assert [i for i, n in ids.items() if n > 1] == []
    texts = collections.Counter(normalise(q["question"]) for q in questions)
    assert [t for t, n in texts.items() if n > 1] == []


def test_answer_positions_are_balanced(questions):
    counts = collections.Counter(q["answer"] for q in questions)
    for index in range(N_OPTIONS):
        share = counts[index] / len(questions)
        assert abs(share - 1 / N_OPTIONS) <= POSITION_TOLERANCE, f"answer index {index}: {share:.1%} of questions"


def test_taught_by_ids_exist(questions, raw_rows):
    known = {row["id"] for row in raw_rows}
    missing = [(q["id"], t) for q in questions for t in q["taught_by"] if t not in known]
    assert missing == []


def test_questions_do_not_appear_in_the_training_data(questions, user_messages):
    assert overlaps(questions, user_messages) == []


def test_overlap_check_catches_a_planted_duplicate(questions, user_messages, raw_rows):
    """The check above can fail: a question copied from a training row (or containing one) is reported."""
    row = next(r for r in raw_rows if r["id"] == "cv-0017")
    message = next(m["content"] for m in row["messages"] if m["role"] == "user")
    copied = {"id": "cq-999", "question": message.upper() + " !!"}
    containing = {"id": "cq-998", "question": "Context: " + message + " Which option fits best?"}
    found = overlaps(questions + [copied, containing], user_messages)
    assert any(f.startswith("cq-999") for f in found) and any(f.startswith("cq-998") for f in found)


def test_loader_accepts_the_set(questions):
    from expqa.evaluation.evaluate import load_questions

    assert [q["id"] for q in load_questions(QUESTIONS)] == [q["id"] for q in questions]
