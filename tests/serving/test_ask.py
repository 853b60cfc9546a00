"""`expqa ask` with several questions and --file: one model load, answers labelled with their questions, clear
errors for unreadable question files."""

from __future__ import annotations

import pytest

from expqa.serving import ask


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
        expected = ask.answer(model, tokenizer, question, max_new_tokens=4, temperature=0)
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
    text = ask.answer(model, embedded_tokenizer, "What is CUPED?", max_new_tokens=5, temperature=0.0)
    again = ask.answer(model, embedded_tokenizer, "What is CUPED?", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str) and text == again  # the same computation twice: exact on any CPU
    monkeypatch.chdir(tmp_path)
    assert ask.main(["What is CUPED?"]) == 2
    assert "models/merged does not exist yet: build it with `dvc repro merge`" in capsys.readouterr().err
    assert ask.main(["What is CUPED?", "--model", str(tiny_base), "--max-new-tokens", "3"]) == 0
