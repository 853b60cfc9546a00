"""`expqa ask` with several questions and --file: one model load, answers labelled with their questions, clear
errors for unreadable question files."""

from __future__ import annotations

import dataclasses

import pytest

from expqa.config import GenerationConfig, load_params
from expqa.serving import ask
from helpers import REPO

SHIPPED = load_params(REPO / "params.yaml").generation  # what ask runs with in the project (or outside one)


def test_several_questions_and_a_file_share_one_model_load(talkative_base, tmp_path, monkeypatch, capsys):
    import expqa.model.loading

    loads = []
    real_load = expqa.model.loading.load_for_inference

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(expqa.model.loading, "load_for_inference", counting_load)
    questions_file = tmp_path / "questions.txt"
    questions_file.write_text("# warm-up questions\n\nWhat is a p-value?\n   \n  What is CUPED?  \n")
    assert (
        ask.main(
            [
                "What is power?",
                "Why randomise?",
                "--file",
                str(questions_file),
                "--model",
                str(talkative_base),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert len(loads) == 1
    out = capsys.readouterr().out
    model, tokenizer = real_load(talkative_base)
    questions = ["What is power?", "Why randomise?", "What is a p-value?", "What is CUPED?"]
    starts = [out.index(f"Q{n}: {q}\nA{n}: ") for n, q in enumerate(questions, 1)]
    assert starts == sorted(starts) and starts[0] == 0
    # exact on any CPU: the same greedy generation in this process, one model load or two (same weights and kernels)
    for n, (question, start, end) in enumerate(zip(questions, starts, starts[1:] + [len(out)]), 1):
        expected = ask.answer(model, tokenizer, question, dataclasses.replace(SHIPPED, max_new_tokens=4))["answer"]
        block = out[start + len(f"Q{n}: {question}\nA{n}: ") : end]
        assert expected and block.strip() == expected, (question, block)


def test_one_question_prints_the_answer_alone(talkative_base, capsys):
    assert ask.main(["What is power?", "--model", str(talkative_base), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert not out.startswith("Q1:") and out.strip()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "questions.txt: file not found; give a text file with one question per line"),
        (b"What is CUPED?\n\xe9t\xe9?\n", "questions.txt:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"),
        (b"# only a comment\n\n", "questions.txt: no questions (every line is blank or a # comment)"),
    ],
)
def test_unreadable_question_files_are_clear_errors(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "questions.txt").write_bytes(content)
    assert ask.main(["--file", "questions.txt"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_no_question_at_all_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        ask.main([])
    assert info.value.code == 2 and "give a question" in capsys.readouterr().err


def test_ask_answers_with_tiny_model_and_explains_missing_models(
    tiny_base, embedded_tokenizer, capsys, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    from expqa.serving import ask

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    settings = GenerationConfig(max_new_tokens=5)
    text = ask.answer(model, embedded_tokenizer, "What is CUPED?", settings)["answer"]
    again = ask.answer(model, embedded_tokenizer, "What is CUPED?", settings)["answer"]
    assert isinstance(text, str) and text == again  # the same computation twice: exact on any CPU
    monkeypatch.chdir(tmp_path)
    assert ask.main(["What is CUPED?"]) == 2
    assert "models/merged does not exist yet: build it with `dvc repro merge`" in capsys.readouterr().err
    assert ask.main(["What is CUPED?", "--model", str(tiny_base), "--max-new-tokens", "3"]) == 0


def test_an_answer_cut_at_the_token_limit_says_so_on_stderr(talkative_base, capsys):
    from expqa.model.loading import load_for_inference

    model, tokenizer = load_for_inference(talkative_base)
    assert not ask.answer(model, tokenizer, "What is power?", dataclasses.replace(SHIPPED, max_new_tokens=3))["stopped"]
    assert ask.main(["What is power?", "--model", str(talkative_base), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "[cut at 3 tokens: raise --max-new-tokens]"
    assert "[cut" not in captured.out  # stdout holds the answer alone


def test_an_answer_that_ends_gets_no_note(talkative_base, capsys, monkeypatch):
    ended = {"answer": "Power is 1 - beta.", "stopped": True, "new_tokens": 7}
    monkeypatch.setattr(ask, "answer", lambda *args, **kwargs: ended)  # the model's own end-of-turn, not the limit
    assert ask.main(["What is power?", "--model", str(talkative_base), "--max-new-tokens", "7"]) == 0
    assert "[cut" not in capsys.readouterr().err


def test_help_shows_the_generation_defaults_from_params_yaml(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        ask.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size"):
        assert f"(default: {getattr(SHIPPED, key)}, params.yaml generation.{key})" in text, key
