"""Preference records for the align stage: reading with located errors, the leakage guard and the held-out split.

A record is one JSON object per line of data/raw/preferences.jsonl:
  {"prompt": a user's question, "chosen": a correct answer, "rejected": an answer of the same length and register
   that carries one specific misconception, "topic": ..., "source_id": the training conversation it draws on}
`load_preferences` checks each line (JSON, the five keys as non-empty strings and no others, chosen differing from
rejected, no duplicate pair) and collects every problem with its file:line. The leakage guard (`leaks`) rejects a
record whose prompt or answers share a run of LEAK_WORDS words with a critical question (question, options,
explanation) or a val/test conversation, or contain a critical question or one of its longer options whole: the
evaluation must measure what the model learnt from other words, not recall of its own. Records whose source_id is
not in the train split (a different data.seed moves conversations to val/test) are left out of training, counted.
`split_preferences` holds out align.eval_fraction of the prompts (by a seeded hash of the normalised prompt, so the
split does not move when records are added) for reward accuracy on pairs the model never saw.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("prompt", "chosen", "rejected", "topic", "source_id")
LEAK_WORDS = 10  # a shared run of this many words (normalised) is copying, not a common phrase
WHOLE_OPTION_WORDS = 5  # options at least this long must not appear whole in a record


class PreferenceError(ValueError):
    """Invalid preference records; the message lists every problem with its file:line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(
            f"{len(problems)} invalid preference record{'s' if len(problems) != 1 else ''}:\n  "
            + "\n  ".join(shown)
            + more
            + "\nFix the lines (or set data.on_invalid: skip to quarantine them)."
        )


def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space: what the guard and the duplicate check compare."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def word_runs(text: str, n: int = LEAK_WORDS) -> set[str]:
    words = normalise(text).split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class Guard:
    """What preference records must not copy: runs of words and whole texts of the evaluation's inputs."""

    runs: set[str] = field(default_factory=set)
    whole: list[str] = field(default_factory=list)  # normalised question texts and longer options

    @classmethod
    def build(cls, questions: list[dict], held_out: list[dict]) -> Guard:
        """questions: the critical questions; held_out: the val and test conversations (ChatML rows)."""
        guard = cls()
        for q in questions:
            for text in (q["question"], q.get("explanation", ""), *q["options"]):
                guard.runs |= word_runs(text)
            guard.whole.append(normalise(q["question"]))
            guard.whole += [normalise(o) for o in q["options"] if len(normalise(o).split()) >= WHOLE_OPTION_WORDS]
        for row in held_out:
            for message in row["messages"]:
                guard.runs |= word_runs(message["content"])
        return guard


def leaks(record: dict, guard: Guard) -> str | None:
    """Why the record copies evaluation text (the first field and text found), or None."""
    for key in ("prompt", "chosen", "rejected"):
        text = f" {normalise(record[key])} "
        for whole in guard.whole:
            if f" {whole} " in text:
                return f"{key} contains a critical question's text whole: {whole!r}"
        shared = word_runs(record[key]) & guard.runs
        if shared:
            return (
                f"{key} shares {LEAK_WORDS} words with a critical question or a val/test conversation: {min(shared)!r}"
            )
    return None


def check_record(record, known: dict) -> str | None:
    """The problem with one parsed line, or None. known: normalised (prompt, chosen, rejected) -> first line."""
    if not isinstance(record, dict):
        return f"expected a JSON object with {', '.join(FIELDS)}, got {type(record).__name__}"
    missing = [k for k in FIELDS if k not in record]
    unknown = sorted(set(record) - set(FIELDS))
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown key {', '.join(unknown)} (allowed: {', '.join(FIELDS)})"] if unknown else []
        )
        return "; ".join(parts)
    bad = [k for k in FIELDS if not isinstance(record[k], str) or not record[k].strip()]
    if bad:
        return f"{', '.join(bad)} must be non-empty text"
    if normalise(record["chosen"]) == normalise(record["rejected"]):
        return "chosen and rejected are the same text: a pair must differ"
    key = (normalise(record["prompt"]), normalise(record["chosen"]), normalise(record["rejected"]))
    if key in known:
        return f"the same pair as line {known[key]}"
    return None


def load_preferences(path: str | Path, guard: Guard | None = None, on_invalid: str = "error") -> tuple[list, list]:
    """(records, quarantined) from a JSONL file; each record gains its "line". on_invalid error: any problem raises
    PreferenceError listing all of them; skip: bad lines go to quarantined as {"line", "error", "text"}."""
    path = Path(path)
    records, problems, quarantined, known = [], [], [], {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PreferenceError(
            [f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"]
        ) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
        else:
            problem = check_record(record, known)
            if problem is None and guard is not None:
                problem = leaks(record, guard)
        if problem is not None:
            problems.append(f"{path}:{number}: {problem}")
            quarantined.append({"line": number, "error": problem, "text": line})
            continue
        known[(normalise(record["prompt"]), normalise(record["chosen"]), normalise(record["rejected"]))] = number
        records.append({**record, "line": number})
    if problems and on_invalid == "error":
        raise PreferenceError(problems)
    if not records:
        raise PreferenceError([f"{path}: no valid preference record (the file is empty or every line is invalid)"])
    return records, quarantined


def split_preferences(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a record is held out when the seeded hash of its normalised prompt falls below
    eval_fraction, so every pair of one prompt lands on the same side."""
    train, held_out = [], []
    for record in records:
        digest = hashlib.sha256(f"{seed}:{normalise(record['prompt'])}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else train).append(record)
    return train, held_out


def as_conversations(records: list[dict], template_kwargs: dict) -> list[dict]:
    """TRL's conversational preference form: the prompt a user turn, each answer an assistant turn, rendered with
    the same chat-template arguments as SFT (expqa.data.dataset.TEMPLATE_KWARGS)."""
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "chat_template_kwargs": template_kwargs,
        }
        for r in records
    ]
