"""serving/inference.py's generation settings: params.yaml's generation section as generate()'s arguments, the ask and
chat options that default to it (shown by --help) and override it, and what the repetition penalty does."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from expqa.config import GenerationConfig, load_params
from expqa.serving.inference import (
    add_generation_options,
    answer,
    chosen_generation,
    decoding_options,
    generate_answers,
    generation_defaults,
)
from helpers import REPO, write_params


def test_decoding_options_are_greedy_at_temperature_zero_and_sample_above():
    greedy = GenerationConfig(temperature=0.0, top_p=0.5, top_k=7, repetition_penalty=1.3, no_repeat_ngram_size=3)
    assert decoding_options(greedy) == {  # top_p/top_k: sampling only
        "do_sample": False,
        "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 3,
    }
    sampled = dataclasses.replace(greedy, temperature=0.7)
    assert decoding_options(sampled) == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.5,
        "top_k": 7,  # always passed: transformers would otherwise apply its own 50
        "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 3,
    }


def parser_in(folder, monkeypatch) -> argparse.ArgumentParser:
    monkeypatch.chdir(folder)
    parser = argparse.ArgumentParser(prog="expqa ask")
    add_generation_options(parser)
    return parser


def test_options_default_to_the_params_yaml_of_the_current_folder_and_help_shows_them(tmp_path, monkeypatch):
    path = write_params(tmp_path / "params.yaml", {"generation": {"repetition_penalty": 1.35}})
    parser = parser_in(tmp_path, monkeypatch)
    assert parser.parse_args([]).repetition_penalty == 1.35
    help_text = " ".join(parser.format_help().split())
    assert "(default: 1.35, params.yaml generation.repetition_penalty)" in help_text
    shipped = load_params(REPO / "params.yaml").generation
    assert f"(default: {shipped.max_new_tokens}, params.yaml generation.max_new_tokens)" in help_text
    args = parser.parse_args(["--temperature", "0.5", "--max-new-tokens", "12"])
    assert chosen_generation(parser, args) == dataclasses.replace(
        load_params(path).generation, temperature=0.5, max_new_tokens=12
    )


def test_outside_a_project_the_shipped_values_apply(tmp_path, monkeypatch):
    parser = parser_in(tmp_path, monkeypatch)
    assert chosen_generation(parser, parser.parse_args([])) == load_params(REPO / "params.yaml").generation


def test_bad_options_and_a_bad_params_yaml_are_usage_errors_naming_them(tmp_path, monkeypatch, capsys):
    parser = parser_in(tmp_path, monkeypatch)
    with pytest.raises(SystemExit):
        chosen_generation(parser, parser.parse_args(["--top-p", "0", "--repetition-penalty", "0.5"]))
    err = capsys.readouterr().err
    assert "--top-p is 0.0; use a share in (0, 1]" in err and "--repetition-penalty is 0.5; use 1.0 (off)" in err
    write_params(tmp_path / "params.yaml", {"generation": {"top_k": -1}})
    with pytest.raises(SystemExit):
        generation_defaults(argparse.ArgumentParser(prog="expqa chat"))
    assert "generation.top_k is -1; use 0 (no limit) or a positive count" in capsys.readouterr().err


def test_the_repetition_penalty_reaches_generate(tiny_base):
    from expqa.model.loading import load_for_inference

    # the tiny model with tied embeddings repeats its last prompt token (a newline) again and again: a loop
    model, tokenizer = load_for_inference(tiny_base)
    question = "What is CUPED?"
    plain = GenerationConfig(max_new_tokens=12, repetition_penalty=1.0, no_repeat_ngram_size=0)
    greedy = answer(model, tokenizer, question, plain)
    # the same process, model and prompt: generate's plain greedy path and penalty 1.0 give the same tokens exactly
    assert greedy == generate_answers(model, tokenizer, [[{"role": "user", "content": question}]], 12, 1)[0]
    penalised = answer(model, tokenizer, question, dataclasses.replace(plain, repetition_penalty=2.0))
    assert greedy["answer"] == "" and penalised["answer"] != ""  # the penalty breaks the loop of newlines
    banned = answer(model, tokenizer, question, dataclasses.replace(plain, no_repeat_ngram_size=2))
    assert banned["answer"] != ""  # so does the n-gram ban: "\n\n" may come once
    batch = generate_answers(
        model,
        tokenizer,
        [[{"role": "user", "content": question}]],
        12,
        1,
        decoding=decoding_options(dataclasses.replace(plain, repetition_penalty=2.0)),
    )
    assert batch[0] == penalised
