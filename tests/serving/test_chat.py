"""`expqa chat` on the tiny random Llama: history trimming, the conversation sent with each question, /reset and
/system, Ctrl-C during an answer, the note after an answer cut at the token limit, and the scripted (piped stdin)
mode through the real command line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import pytest
import torch

from expqa.config import load_params
from expqa.serving.chat import ChatSession, ContextFull, chat_loop, trim_history
from expqa.serving.inference import Engine, answer
from helpers import REPO

SHIPPED = load_params(REPO / "params.yaml").generation  # what `expqa chat` runs with in the project


def words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def exchange(i: int) -> list[dict]:
    return [{"role": "user", "content": f"question {i} here"}, {"role": "assistant", "content": f"answer {i}"}]


def test_trimming_drops_the_oldest_exchanges_and_keeps_the_system_prompt_and_the_question():
    system = [{"role": "system", "content": "be brief"}]
    question = [{"role": "user", "content": "newest question"}]
    messages = system + exchange(1) + exchange(2) + exchange(3) + question  # 2 + 3 * 5 + 2 = 19 words
    assert trim_history(messages, words, 19) == (messages, 0)
    kept, dropped = trim_history(messages, words, 18)
    assert dropped == 1 and kept == system + exchange(2) + exchange(3) + question
    kept, dropped = trim_history(messages, words, 4)
    assert dropped == 3 and kept == system + question
    with pytest.raises(ContextFull) as info:
        trim_history(messages, words, 3)
    assert (info.value.tokens, info.value.budget) == (4, 3)
    assert trim_history(exchange(1) + question, words, 2) == (question, 1)  # without a system prompt


def test_trimming_with_the_tokenizer_and_a_tiny_context_limit(embedded_tokenizer):
    from expqa.data.dataset import render

    def tokens(messages):
        return len(
            embedded_tokenizer(
                render(embedded_tokenizer, messages, add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
        )

    question = [{"role": "user", "content": "And with unequal variances?"}]
    messages = exchange(1) + exchange(2) + question
    limit = tokens(exchange(2) + question)  # room for exactly the last exchange and the question
    kept, dropped = trim_history(messages, tokens, limit)
    assert (kept, dropped) == (exchange(2) + question, 1) and tokens(kept) <= limit
    assert trim_history(messages, tokens, limit - 1) == (question, 2)


class RecordingEngine(Engine):
    """The real engine, remembering the messages of every prompt it builds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts: list[list[dict]] = []

    def prompt_ids(self, request):
        self.prompts.append([dict(m) for m in request.messages])
        return super().prompt_ids(request)


@pytest.fixture(scope="module")
def engine(talkative_base):
    from expqa.model.loading import load_for_inference

    model, tokenizer = load_for_inference(talkative_base)
    return RecordingEngine(model, tokenizer, "expqa", SHIPPED, max_tokens_limit=64)


def answer_text(engine, question: str, max_new_tokens: int) -> str:
    """`expqa ask`'s answer with the engine's settings: what the chat must say to a first question."""
    settings = dataclasses.replace(engine.settings, max_new_tokens=max_new_tokens)
    return answer(engine.model, engine.tokenizer, question, settings)["answer"]


def run_chat(session: ChatSession, lines: list[str]) -> tuple[list[str], list[str]]:
    """Feed lines to the chat loop; return (stdout pieces, notes)."""
    out, notes, pending = [], [], iter(lines)
    chat_loop(session, lambda: next(pending, None), out.append, notes.append)
    return out, notes


def test_answers_stream_and_the_conversation_goes_with_the_next_question(engine):
    session = ChatSession(engine, max_new_tokens=6)
    engine.prompts.clear()
    pieces, notes = [], []
    text = session.reply("What is CUPED?", pieces.append, notes.append)
    first = answer_text(engine, "What is CUPED?", 6)
    # streamed, adding up to the answer; exact on any CPU: the same model and prompt through model.generate in one
    # process with one thread count (the engine's generation thread inherits it)
    assert "".join(pieces).strip() == text == first and len(pieces) > 1
    run_chat(session, ["", "Why?"])
    assert engine.prompts[1] == [
        {"role": "user", "content": "What is CUPED?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Why?"},
    ]
    assert len(session.history) == 4 and notes == []


def test_reset_and_system_commands(engine):
    session = ChatSession(engine, max_new_tokens=4)
    engine.prompts.clear()
    out, notes = run_chat(
        session,
        [
            "/system",
            "Q1",
            "/system Answer in one word.",
            "/system",
            "Q2",
            "/reset",
            "Q3",
            "/nonsense",
            "/exit",
            "never asked",
        ],
    )
    notes = [n for n in notes if not n.startswith("[cut at 4 tokens")]  # every answer of the tiny model is cut
    assert notes[0].startswith("no system prompt set")
    assert notes[1].startswith("[system prompt set") and notes[2] == "system prompt: Answer in one word."
    system = {"role": "system", "content": "Answer in one word."}
    assert engine.prompts[0] == [{"role": "user", "content": "Q1"}]
    assert engine.prompts[1][0] == system and engine.prompts[1][-1] == {"role": "user", "content": "Q2"}
    assert len(engine.prompts[1]) == 4  # the first exchange was kept when the system prompt changed
    assert notes[3].startswith("[conversation forgotten")
    assert engine.prompts[2] == [system, {"role": "user", "content": "Q3"}]  # reset keeps the system prompt
    assert notes[4].startswith("unknown command /nonsense; commands: /reset")
    assert len(engine.prompts) == 3  # /exit stopped before "never asked"


def test_history_is_trimmed_to_the_context_window_and_the_chat_says_so(engine):
    session = ChatSession(engine, max_new_tokens=8)
    engine.prompts.clear()
    full_window = engine.context_window
    engine.context_window = 90  # the tiny model's 2048 would need a long chat
    try:
        out, notes = run_chat(session, [f"Question number {i} about sample sizes?" for i in range(6)])
    finally:
        engine.context_window = full_window
    trimmed = [n for n in notes if n.startswith("[history trimmed")]
    assert trimmed and "90-token context window (8 kept for the answer)" in trimmed[0]
    assert all(session.prompt_tokens(p) <= 90 - 8 for p in engine.prompts)
    assert engine.prompts[-1][-1]["content"] == "Question number 5 about sample sizes?"
    assert len(engine.prompts[-1]) < 11  # older exchanges were dropped, not all of them kept


def test_question_longer_than_the_window_is_refused_and_the_chat_goes_on(engine):
    session = ChatSession(engine, max_new_tokens=8)
    full_window = engine.context_window
    engine.context_window = 40
    try:
        out, notes = run_chat(session, ["word " * 60, "Short?"])
    finally:
        engine.context_window = full_window
    assert notes[0].startswith("error: the prompt for this question is") and "lower --max-new-tokens" in notes[0]
    assert session.history[0] == {"role": "user", "content": "Short?"} and len(session.history) == 2


def test_ctrl_c_stops_the_answer_not_the_chat(engine):
    session = ChatSession(engine, max_new_tokens=48)
    full = answer_text(engine, "Tell me everything.", 48)
    pieces, notes = [], []

    def write(piece: str) -> None:
        if pieces:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread while the answer streams
        pieces.append(piece)

    threads = threading.active_count()
    text = session.reply("Tell me everything.", write, notes.append)
    assert notes == [" [stopped]"] and threading.active_count() == threads  # generation thread ended
    assert text == "".join(pieces).strip() and len(text) < len(full)
    assert session.history[-1] == {"role": "assistant", "content": text}
    assert session.reply("Go on.", lambda piece: None, notes.append)  # the same session answers again


def test_an_answer_cut_at_the_limit_is_followed_by_a_note(engine):
    session = ChatSession(engine, max_new_tokens=3)
    said: list[tuple[str, str]] = []

    def loop(lines: list[str]) -> None:
        said.clear()
        pending = iter(lines)
        chat_loop(
            session, lambda: next(pending, None), lambda t: said.append(("out", t)), lambda t: said.append(("note", t))
        )

    loop(["What is CUPED?"])  # the tiny model does not end an answer within 3 tokens
    cut = ("note", "[cut at 3 tokens: raise --max-new-tokens]")
    assert session.cut and said[-3:] == [("out", "\n"), cut, ("out", "\n")]  # after the answer's line, before the gap
    loop(["/system"])
    assert [kind for kind, _ in said] == ["note"]  # a command's reply: no answer, so no cut note


@pytest.mark.slow
def test_piped_stdin_echoes_each_question_and_separates_the_answers(talkative_base, engine):
    stdin = "What is CUPED?\n/system\n/system Be brief.\n/reset\nWhat is CUPED?\n/exit\nnever asked\n"
    result = subprocess.run(
        [sys.executable, "-m", "expqa.cli", "chat", "--model", str(talkative_base), "--max-new-tokens", "5"],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        # this process's thread count, so both sides run the same kernels with the same partition: greedy tokens here
        # are as little as 4.6e-4 apart in logit (measured), too close to leave to another thread count's rounding
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert result.returncode == 0, result.stderr

    def streamed(system: str | None) -> str:
        pieces: list[str] = []
        ChatSession(engine, max_new_tokens=5, system=system).reply("What is CUPED?", pieces.append, print)
        return "".join(pieces)

    # the transcript a terminal shows: each question after "> ", its answer, a blank line
    assert result.stdout == f"> What is CUPED?\n{streamed(None)}\n\n> What is CUPED?\n{streamed('Be brief.')}\n\n"
    assert "no system prompt set" in result.stderr and "[system prompt set" in result.stderr
    assert result.stderr.count("[cut at 5 tokens: raise --max-new-tokens]") == 2  # the tiny model never stops in 5


def test_missing_model_is_reported(tmp_path, monkeypatch, capsys):
    from expqa.serving.chat import main

    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    assert "models/merged does not exist yet: build it with `dvc repro merge`" in capsys.readouterr().err
