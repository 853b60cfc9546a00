"""The multiple-choice scorer, perplexity on a known case, evaluation in two processes, and the evaluate stage's
function, outputs and summary line."""

import dataclasses
import json

import pytest
import torch

from expqa.config import EvalConfig, GenerationConfig
from expqa.evaluation.evaluate import (
    choose_option,
    critical_questions_accuracy,
    eval_summary,
    evaluate_base_vs_tuned,
    headline,
    option_example,
    perplexity,
    sequence_logprobs,
    write_eval_outputs,
)


def test_choose_option_is_length_normalised_hand_computed():
    # option 0: total -2.0 over 2 tokens (mean -1.0); option 1: -3.0 over 6 tokens (mean -0.5); option 2: -0.9/1
    assert choose_option([(-2.0, 2), (-3.0, 6), (-0.9, 1)]) == 1
    assert choose_option([(-1.0, 1), (-1.0, 1)]) == 0  # ties go to the first option


def test_multiple_choice_scores_match_a_manual_log_softmax(tiny_base, embedded_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    example = option_example(embedded_tokenizer, "Is 0.03 < 0.05?", "Yes, so reject H0.")
    n_option = sum(label != -100 for label in example["labels"])
    assert (
        embedded_tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
        == "Yes, so reject H0."
    )
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
    conversations = [
        [{"role": "user", "content": "Power?"}, {"role": "assistant", "content": "P(reject | H1)."}],
        [{"role": "user", "content": "Alpha?"}, {"role": "assistant", "content": "0.05 usually."}],
    ]
    result = perplexity(model, embedded_tokenizer, conversations, max_length=256, batch_size=1)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    batched = perplexity(model, embedded_tokenizer, conversations, max_length=256, batch_size=2)
    assert batched["assistant_tokens"] == result["assistant_tokens"] > 0


def test_prefix_trees_score_what_separate_sequences_score(tiny_base, embedded_tokenizer):
    """Shared prefixes computed once give each example the sums it gets alone (within 1e-4 in fp32), also for
    identical options, an option that is a prefix of another, the empty user turn, trees cut by their size and an
    example longer than a tree may be."""
    from transformers import AutoModelForCausalLM

    from expqa.evaluation.evaluate import pack_prefix_trees, score_examples, score_shared_prefixes

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    options = ["Yes.", "Yes, so reject H0.", "No.", "Yes.", "Only with a pre-registered stopping rule."]
    prompts = ["Is 0.03 < 0.05?", "", "Can I stop when p < 0.05?", "Is power P(reject | H1)? " * 12]
    examples = [option_example(embedded_tokenizer, q, o) for q in prompts for o in options]
    alone = score_examples(model, examples, batch_size=3)
    for budget in (40, 256):
        trees = pack_prefix_trees(examples, budget)
        assert sum(len(tree["targets"]) for tree in trees) == sum(count for _, count in alone)
        if budget == 256:  # every prompt's options in one tree: far fewer tokens than the examples hold
            assert sum(len(tree["ids"]) for tree in trees) < sum(len(e["input_ids"]) for e in examples) / 3
        else:  # the long prompt (> 40 tokens) alone in its trees
            assert any(len(tree["ids"]) > budget for tree in trees)
    shared = score_shared_prefixes(model, examples, batch_size=2)
    for (lp_alone, n_alone), (lp_shared, n_shared) in zip(alone, shared, strict=True):
        assert n_shared == n_alone > 0 and lp_shared == pytest.approx(lp_alone, abs=1e-4)


@pytest.mark.slow
def test_evaluating_in_two_processes_gives_what_one_process_gives(tiny_base, capfd):
    from expqa.evaluation.evaluate import evaluate_models
    from helpers import conversation

    rows = [conversation(i) for i in range(3)]
    questions = [
        {"id": "q", "question": "Is 0.03 < 0.05?", "options": ["Yes, so reject H0.", "No."], "answer": 0},
        {"id": "r", "question": "Is power P(reject | H0)?", "options": ["Yes.", "No, P(reject | H1)."], "answer": 1},
        {"id": "s", "question": "Peeking?", "options": ["Fine.", "Inflates alpha.", "Lowers power."], "answer": 1},
    ]
    config = dataclasses.replace(EvalConfig(), max_new_tokens=4, batch_size=2, num_processes=1, num_threads=0)
    one = evaluate_models({"base": tiny_base}, rows, questions, config, GenerationConfig(), max_length=128)
    assert capfd.readouterr().out.startswith("evaluate base: cpu, batch 2: perplexity ")
    two = evaluate_models(
        {"base": tiny_base, "again": tiny_base},
        rows,
        questions,
        dataclasses.replace(config, num_processes=2, num_threads=1),
        GenerationConfig(),
        max_length=128,
    )
    # each process takes every other item of both models, and its timing lines say which model and part they timed
    timed = sorted(line.split(":")[0] for line in capfd.readouterr().out.splitlines() if "tokens/s" in line)
    assert timed == [f"evaluate {name} (part {k} of 2)" for name in ("again", "base") for k in (1, 2)]
    # exact on any CPU: the same model, rows and batches in two processes of 1 thread each (same kernels and order)
    assert two["base"] == two["again"]
    # put back in the order of the items, with the summary of all of them
    assert [row["id"] for row in two["base"][1]] == [row["id"] for row in one["base"][1]]
    for row_two, row_one in zip(two["base"][1], one["base"][1], strict=True):  # per-item rows
        assert row_two.keys() == row_one.keys()
        # other thread counts and batches may round sums differently in the last bits (one: torch's default and
        # all items, two: 1 thread each and half the items): floats get rel=1e-5; the rest (greedy answers, chosen
        # options) are argmaxes whose margins (top-2 logit gaps, option score gaps) are far over such rounding
        for key, value in row_one.items():
            assert row_two[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
    assert two["base"][0] == pytest.approx(one["base"][0], rel=1e-5)


QUESTIONS = [
    {"id": "q-taught", "question": "Is 0.03 < 0.05?", "options": ["Yes.", "No."], "answer": 0, "taught_by": ["t-3"]},
    {
        "id": "q-new",
        "question": "Is power P(reject | H0)?",
        "options": ["Yes.", "No."],
        "answer": 1,
        "taught_by": ["t-999"],
    },
]


def small_eval_config(tmp_path):
    """QUESTIONS in tmp_path and an eval config that scores them and 2 test conversations in seconds."""
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return dataclasses.replace(
        EvalConfig(),
        max_new_tokens=2,
        batch_size=4,
        max_examples=2,
        bootstrap_samples=20,
        critical_questions=str(tmp_path / "questions.jsonl"),
        num_processes=1,
        num_threads=0,
    )


def test_evaluate_base_vs_tuned_takes_the_first_max_examples_and_marks_taught_questions(
    tiny_base, processed_dir, tmp_path
):
    from expqa.data.chatml import load_chatml_dataset

    config = small_eval_config(tmp_path)
    report, examples = evaluate_base_vs_tuned(
        tiny_base,
        tiny_base,
        processed_dir / "test.jsonl",
        processed_dir / "train.jsonl",
        config,
        GenerationConfig(),
        seed=7,
        max_length=128,
    )
    first_two = [row["id"] for row in load_chatml_dataset(processed_dir / "test.jsonl")[:2]]
    assert [row["id"] for row in examples["base"]] == first_two + ["q-taught", "q-new"]
    assert examples["base"] == examples["tuned"]  # the same model twice: same process, kernels, threads -> exact
    assert report["test_examples"] == 2 and report["perplexity"]["delta"] == 0.0
    critical = report["critical_questions"]
    assert critical["questions"] == 2 and critical["taught"] == 1  # t-3 is in train, t-999 nowhere
    assert "length_norm_taught" in critical and "length_norm_untaught" in critical


def test_evaluate_base_vs_tuned_rejects_bad_inputs_before_loading_a_model(processed_dir, tmp_path):
    (tmp_path / "questions.jsonl").write_text(json.dumps({"id": "q", "question": "?", "options": ["a"]}) + "\n")
    config = dataclasses.replace(EvalConfig(), critical_questions=str(tmp_path / "questions.jsonl"))
    missing = tmp_path / "no-model"
    with pytest.raises(ValueError, match=r"questions.jsonl:1: needs 'question', 'options' \(>= 2\)"):
        evaluate_base_vs_tuned(
            missing,
            missing,
            processed_dir / "test.jsonl",
            processed_dir / "train.jsonl",
            config,
            GenerationConfig(),
            seed=0,
            max_length=128,
        )
    (tmp_path / "questions.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n")
    with pytest.raises(OSError):
        evaluate_base_vs_tuned(
            missing,
            missing,
            tmp_path / "test.jsonl",
            processed_dir / "train.jsonl",
            config,
            GenerationConfig(),
            seed=0,
            max_length=128,
        )


def test_write_eval_outputs_writes_report_examples_and_rouge_plot(tmp_path):
    report = {"test_examples": 1, "rougeL": {"base": 0.25, "tuned": 0.5}}
    examples = {
        "base": [{"id": "t-1", "answer": "café", "rougeL": 0.123456}, {"id": "q", "chosen": 0}],
        "tuned": [{"id": "t-1", "answer": "tea", "rougeL": 0.5}, {"id": "q", "chosen": 1}],
    }
    out, rows, plot = tmp_path / "m" / "eval.json", tmp_path / "m" / "ex.jsonl", tmp_path / "m" / "plots" / "r.csv"
    write_eval_outputs(report, examples, out=out, examples_path=rows, plot=plot)
    assert out.read_text() == ('{\n  "rougeL": {\n    "base": 0.25,\n    "tuned": 0.5\n  },\n  "test_examples": 1\n}\n')
    assert rows.read_text(encoding="utf-8").splitlines() == [
        (
            '{"base": {"answer": "café", "id": "t-1", "rougeL": 0.123456}, "id": "t-1", '
            '"tuned": {"answer": "tea", "id": "t-1", "rougeL": 0.5}}'
        ),
        '{"base": {"chosen": 0, "id": "q"}, "id": "q", "tuned": {"chosen": 1, "id": "q"}}',
    ]
    assert plot.read_text() == "id,base,tuned\nt-1,0.1235,0.5000\n"  # question rows have no ROUGE


def test_eval_and_merge_summaries():
    def metric(base, tuned, p):
        return {"base": base, "tuned": tuned, "p_value": p}

    report = {
        "perplexity": metric(12.3456, 9.87654, 0.0001234),
        "rougeL": metric(0.1, 0.25, 0.04),
        "stop_rate": metric(0.5, 1.0, 1.0),
        "critical_questions": {"length_norm": metric(0.25, 0.5, 0.5), "calibrated": metric(0.5, 0.5, 1.0)},
    }
    assert eval_summary(report) == (
        "evaluate base -> tuned: perplexity 12.346 -> 9.877 (p 0.000123), rougeL 0.100 -> 0.250 (p 0.04), "
        "stop_rate 0.500 -> 1.000 (p 1), critical questions (length_norm) 0.250 -> 0.500 (p 0.5), critical "
        "questions (calibrated) 0.500 -> 0.500 (p 1)"
    )


def test_three_models_give_one_summary_line_per_comparison_and_sft_in_the_headline():
    def block(base, tuned, p):
        metric = {"base": base, "tuned": tuned, "p_value": p}
        critical = {"length_norm": metric, "calibrated": metric, "calibrated_taught": metric}
        return {"perplexity": metric, "rougeL": metric, "stop_rate": metric, "critical_questions": critical}

    report = {**block(0.25, 0.5, 0.01), "sft_vs_base": block(0.25, 0.3, 0.5), "tuned_vs_sft": block(0.3, 0.5, 0.02)}
    lines = eval_summary(report).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "evaluate base -> sft",
        "evaluate sft -> tuned",
        "evaluate base -> tuned",
    ]
    assert "taught (calibrated) 0.300 -> 0.500 (p 0.02)" in lines[1]
    assert headline(report)["cq"] == {"base": 0.25, "tuned": 0.5, "p": 0.01, "sft": 0.3, "p_vs_sft": 0.02}


@pytest.mark.slow
def test_evaluate_with_an_sft_adapter_compares_three_models(tiny_base, processed_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    sft.save_pretrained(tmp_path / "sft")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "sft")  # train saves it with the adapter
    config = small_eval_config(tmp_path)
    report, examples = evaluate_base_vs_tuned(
        tiny_base,
        tiny_base,
        processed_dir / "test.jsonl",
        processed_dir / "train.jsonl",
        config,
        GenerationConfig(),
        seed=7,
        max_length=128,
        sft_adapter=tmp_path / "sft",
    )
    assert list(examples) == ["base", "sft", "tuned"] and report["models"] == ["base", "sft", "tuned"]
    assert report["perplexity"]["delta"] == 0.0  # tuned is the base here: the top level is still base vs tuned
    sft_ppl = report["sft_vs_base"]["perplexity"]["tuned"]
    assert sft_ppl != report["perplexity"]["base"]  # the adapter was applied
    assert report["tuned_vs_sft"]["perplexity"]["base"] == pytest.approx(sft_ppl)
    assert report["sft_vs_base"]["compared"] == ["base", "sft"] and report["tuned_vs_sft"]["compared"] == [
        "sft",
        "tuned",
    ]
    assert {"calibrated_taught", "calibrated_untaught"} <= set(report["tuned_vs_sft"]["critical_questions"])
    rows = tmp_path / "ex.jsonl"
    write_eval_outputs(report, examples, out=tmp_path / "e.json", examples_path=rows, plot=tmp_path / "p.csv")
    assert set(json.loads(rows.read_text().splitlines()[0])) == {"id", "base", "sft", "tuned"}


def test_the_timing_line_names_its_model_and_counts_in_words():
    from expqa.evaluation.evaluate import timing_line

    assert timing_line("evaluate tuned", "cpu", 8, 1, 1, (1.25, 0.5, 2.0)) == (
        "evaluate tuned: cpu, batch 8: perplexity 1.2 s; generation 1 token in 0.5 s (2 tokens/s); 1 question x "
        "options scored in 2.0 s"
    )
    assert timing_line("evaluate base", "cuda", 16, 2048, 40, (3.0, 8.0, 1.0)).startswith(
        "evaluate base: cuda, batch 16: perplexity 3.0 s; generation 2,048 tokens in 8.0 s (256 tokens/s); 40 questions"
    )


def test_headline_is_the_reports_key_numbers_rounded():
    # the blocks headline reads, as a real CPU run wrote them (metrics/eval.json, 2026-12-06); the rest of the report
    # (intervals, counts) stays out of the headline
    report = {
        "perplexity": {"base": 29.17634794140654, "tuned": 19.90008508, "p_value": 3.0517578125e-05, "n": 16},
        "rougeL": {"base": 0.1030407352402872, "tuned": 0.10874286936060769, "p_value": 1.0, "tuned_better": 8},
        "critical_questions": {
            "calibrated": {"base": 0.25, "tuned": 0.24019607843137256, "p_value": 0.8679394004284404, "n": 204},
            "length_norm": {"base": 0.2, "tuned": 0.19, "p_value": 0.5},
        },
    }
    assert headline(report) == {
        "ppl": {"base": 29.18, "tuned": 19.9, "p": 3e-05},  # 3.05e-05: 2 digits, 5 decimals
        "rougeL": {"base": 0.103, "tuned": 0.1087, "p": 1.0},
        "cq": {"base": 0.25, "tuned": 0.2402, "p": 0.87},
    }


def test_headline_hides_noise_in_the_sixth_digit_and_never_writes_minus_zero():
    def report(value, p):
        block = {"base": value, "tuned": value, "p_value": p}
        return {"perplexity": block, "rougeL": block, "critical_questions": {"calibrated": block}}

    # a rerun on another CPU: the same run up to the 6th significant digit gives the same headline (no row in
    # `dvc metrics diff`), a change in the 4th does not
    assert headline(report(29.176348, 0.80362)) == headline(report(29.176351, 0.80359))
    assert headline(report(29.17, 0.8)) != headline(report(29.18, 0.8))
    # DVC prints 5 decimals: p-values that would print the same are the same number
    assert headline(report(1.0, 3.1e-05)) == headline(report(1.0, 3.0e-05))
    assert headline(report(0.001234, 1.0))["rougeL"]["tuned"] == 0.00123
    zero = headline(report(-0.0, -0.0))
    assert all(str(value) == "0.0" for block in zero.values() for value in block.values()), zero
