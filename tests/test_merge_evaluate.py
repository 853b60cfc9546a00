"""Merge equivalence, the multiple-choice scorer, perplexity on a known case, and `expqa ask`."""

import json

import pytest
import torch

from expqa.evaluate import (choose_option, critical_questions_accuracy, option_example, perplexity,
                            sequence_logprobs)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, tmp_path_factory):
    """A LoRA adapter with non-zero weights on the tiny base (as if trained), saved like the train stage does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(out)
    (out / "training_config.json").write_text(json.dumps({"config": {"lora": {"r": 4}},
                                                           "data_sha256": {"train": "x", "val": "y"},
                                                           "metrics": {"eval_loss": 1.0}}))
    return out


def test_merged_model_matches_base_plus_adapter(tiny_base, tiny_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from expqa.merge import merge_adapter

    report = merge_adapter(tiny_base, tiny_adapter, tmp_path / "merged")
    assert report["passed"] and report["greedy_equal"] and report["max_abs_logit_diff"] <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-4, rtol=0)
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-2  # the adapter really changed it
    assert merged.generation_config.eos_token_id == [2]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "tiny-random-llama" in card and "train.jsonl" in card


def test_merge_onto_a_bf16_base_saves_bf16_and_passes_the_bf16_check(tiny_base, tiny_adapter, tmp_path):
    """Llama 3.2 ships in bf16: the merged model is saved in bf16 and checked at the bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    from expqa.merge import merge_adapter

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / name).write_bytes((tiny_base / name).read_bytes())
    # a folder made outside the base stage (benchmarks/random_llama.py) has no weight hashes
    (bf16 / "base_info.json").write_text(json.dumps({"name": "bf16-random", "source": "test"}))
    report = merge_adapter(bf16, tiny_adapter, tmp_path / "merged")
    assert report["saved_dtype"] == "bfloat16" and report["tolerance"] == 0.5 and report["device"] == "cpu"
    assert report["passed"] and 0 < report["max_abs_logit_diff"] <= 0.5  # rounding to bf16 is visible, small
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert "weights: not hashed" in (tmp_path / "merged" / "README.md").read_text()


def test_merge_check_tolerates_greedy_flips_only_at_near_ties():
    from expqa.merge import compare

    sequence = torch.tensor([5, 1, 2])  # prompt [5], reference continuation [1, 2]
    reference = torch.zeros(3, 4)
    reference[0, 1], reference[1, 2] = 1.0, 0.01  # position 1: token 2 beats token 3 by a hair (0.01)
    flipped = reference.clone()
    flipped[1, 3] = 0.02  # merged model prefers token 3 there: a near-tie flip, logits differ by 0.02
    report = compare([reference], [flipped], [sequence], [1], tolerance=0.5)
    assert report["greedy_flips"] == 1 and report["greedy_flips_at_near_ties"] == 1 and report["passed"]
    clear = reference.clone()
    clear[0, 1], clear[0, 0], reference[0, 1] = 0.25, 0.35, 0.6  # the reference's choice wins by 0.6 > tolerance
    report = compare([reference], [clear], [sequence], [1], tolerance=0.5)
    assert report["max_abs_logit_diff"] == pytest.approx(0.35)  # within tolerance, yet a flip that is no tie
    assert report["greedy_flips"] == 1 and report["greedy_flips_at_near_ties"] == 0 and not report["passed"]
    assert compare([reference], [reference], [sequence], [1], tolerance=1e-3)["greedy_equal"]


def test_choose_option_is_length_normalised_hand_computed():
    # option 0: total -2.0 over 2 tokens (mean -1.0); option 1: -3.0 over 6 tokens (mean -0.5); option 2: -0.9/1
    assert choose_option([(-2.0, 2), (-3.0, 6), (-0.9, 1)]) == 1
    assert choose_option([(-1.0, 1), (-1.0, 1)]) == 0  # ties go to the first option


def test_multiple_choice_scores_match_a_manual_log_softmax(tiny_base, embedded_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    example = option_example(embedded_tokenizer, "Is 0.03 < 0.05?", "Yes, so reject H0.")
    n_option = sum(label != -100 for label in example["labels"])
    assert embedded_tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != -100]) \
        == "Yes, so reject H0."
    [(total, count)] = sequence_logprobs(model, [example["input_ids"]], [example["labels"]])
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    manual = sum(logprobs[i - 1, ids[0, i]].item() for i in range(ids.shape[1]) if example["labels"][i] != -100)
    assert count == n_option and total == pytest.approx(manual, abs=1e-4)
    questions = [{"id": "q", "question": "Is 0.03 < 0.05?", "options": ["Yes, so reject H0.", "No."], "answer": 0}]
    result = critical_questions_accuracy(model, embedded_tokenizer, questions, batch_size=2)
    assert result["accuracy"] in (0.0, 1.0) and result["per_question"][0]["answer"] == 0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_base, embedded_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # tied: zero logits everywhere -> uniform next-token distribution
    conversations = [[{"role": "user", "content": "Power?"}, {"role": "assistant", "content": "P(reject | H1)."}],
                     [{"role": "user", "content": "Alpha?"}, {"role": "assistant", "content": "0.05 usually."}]]
    result = perplexity(model, embedded_tokenizer, conversations, max_length=256, batch_size=1)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    batched = perplexity(model, embedded_tokenizer, conversations, max_length=256, batch_size=2)
    assert batched["assistant_tokens"] == result["assistant_tokens"] > 0


def test_ask_answers_with_tiny_model_and_explains_missing_models(tiny_base, embedded_tokenizer, capsys, tmp_path,
                                                                 monkeypatch):
    from expqa import ask
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    text = ask.answer(model, embedded_tokenizer, "What is CUPED?", max_new_tokens=5, temperature=0.0)
    again = ask.answer(model, embedded_tokenizer, "What is CUPED?", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str) and text == again
    monkeypatch.chdir(tmp_path)
    assert ask.main(["What is CUPED?"]) == 2
    assert "models/merged does not exist yet: build it with `dvc repro merge`" in capsys.readouterr().err
    assert ask.main(["What is CUPED?", "--model", str(tiny_base), "--max-new-tokens", "3"]) == 0


@pytest.mark.slow
def test_evaluating_in_two_processes_gives_what_one_process_gives(tiny_base):
    from conftest import conversation
    from expqa.evaluate import evaluate_models

    rows = [conversation(i) for i in range(3)]
    questions = [{"id": "q", "question": "Is 0.03 < 0.05?", "options": ["Yes, so reject H0.", "No."], "answer": 0,
                  "taught_by": []}]
    options = dict(max_length=128, max_new_tokens=4, batch_size=2)
    one = evaluate_models({"base": tiny_base}, rows, questions, **options)
    two = evaluate_models({"base": tiny_base, "again": tiny_base}, rows, questions, processes=2, threads=1, **options)
    assert two["base"] == two["again"]
    for row_two, row_one in zip(two["base"][1], one["base"][1], strict=True):  # per-item rows
        assert row_two.keys() == row_one.keys()
        for key, value in row_one.items():  # other thread counts may round sums differently in the last bits
            assert row_two[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
    assert two["base"][0]["perplexity"] == pytest.approx(one["base"][0]["perplexity"], rel=1e-5)
