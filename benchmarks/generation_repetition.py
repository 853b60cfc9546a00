"""Which decoding settings stop the fine-tuned model's answers from looping without costing ROUGE-L (issue 32).

    PYTHONPATH=src python benchmarks/generation_repetition.py --model models/merged --data data/processed \\
        --out benchmarks/results/generation_repetition_<date>.json

Answers the test split's prompts (ROUGE-L against the reference answers, the evaluate stage's scorer) and a few
A/B-testing questions of the kind that looped in issue 32 (no reference: repetition only) under each setting, with
serving/inference.py's generate_answers, as the evaluate stage and ask do. Per setting: the share of answers with a
repeated line (a line of >= 12 characters written twice or more: "Estimate the sample size from the data:" x 18),
the share with a loop (a 5-word sequence three times or more), mean distinct-2 (distinct / all word pairs of an
answer), mean ROUGE-L and its paired difference from greedy with a bootstrap 95 % interval, the stop rate (answers
that ended before the token limit) and mean answer length. Greedy with a repetition penalty is deterministic, so one
run per setting is the measurement; the interval is over prompts.

no_repeat_ngram_size is measured for comparison only: llama.cpp and Ollama have no such option, so a setting that
needs it could not be carried into the Modelfile.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from expqa.config import GenerationConfig
from expqa.evaluation.evaluate import rouge_scores
from expqa.evaluation.significance import bootstrap_indices, percentile_interval
from expqa.model.loading import load_for_inference
from expqa.serving.inference import decoding_options, generate_answers


class AnswerRepetitionPenalty:
    """transformers' repetition penalty over the answer's own tokens only (the prompt's are not penalised): each step
    adds one token, so an input that is not one token longer than the last starts a generate() call, and its width is
    the (padded) prompt."""

    def __init__(self, penalty: float):
        self.penalty, self.start, self.seen = penalty, 0, -1

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.seen + 1:  # not the next step: a new generate() call (the next batch)
            self.start = input_ids.shape[1]
        self.seen = input_ids.shape[1]
        answer = input_ids[:, self.start :]
        if answer.shape[1] == 0:
            return scores
        picked = torch.gather(scores, 1, answer)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, answer, picked)


def answer_only(penalty: float) -> dict:
    from transformers import LogitsProcessorList

    return {"logits_processor": LogitsProcessorList([AnswerRepetitionPenalty(penalty)])}


# name -> (generation settings, other generate() options). transformers' repetition_penalty divides the logits of
# every token in the prompt and the answer; "answer only" penalises the answer's own tokens
SETTINGS = {
    "greedy": (GenerationConfig(repetition_penalty=1.0), {}),
    "answer-only penalty 1.2": (GenerationConfig(repetition_penalty=1.0), answer_only(1.2)),
    "answer-only penalty 1.1": (GenerationConfig(repetition_penalty=1.0), answer_only(1.1)),
    "repetition_penalty 1.1": (GenerationConfig(repetition_penalty=1.1), {}),
    "answer-only penalty 1.3": (GenerationConfig(repetition_penalty=1.0), answer_only(1.3)),
    "repetition_penalty 1.2": (GenerationConfig(repetition_penalty=1.2), {}),
    "repetition_penalty 1.05": (GenerationConfig(repetition_penalty=1.05), {}),
    "answer-only penalty 1.05": (GenerationConfig(repetition_penalty=1.0), answer_only(1.05)),
    "no_repeat_ngram_size 4": (GenerationConfig(repetition_penalty=1.0), {"no_repeat_ngram_size": 4}),
    "no_repeat_ngram_size 4 + repetition_penalty 1.05": (
        GenerationConfig(repetition_penalty=1.05),
        {"no_repeat_ngram_size": 4},
    ),
}
# questions of the kind issue 32's user asked (A/B testing, sample size, the data-science role); no reference
AB_QUESTIONS = [
    "How do I estimate the sample size for an A/B test?",
    "What does a data scientist do in an A/B test?",
    "How long should I run an A/B test?",
    "What is the minimum detectable effect in an A/B test?",
    "Should I stop my A/B test as soon as it is significant?",
    "How do I choose the metrics for an A/B test?",
]
LINE_CHARS = 12  # a repeated line shorter than this is markup or a heading, not a loop
LOOP_WORDS, LOOP_TIMES = 5, 3


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def repeated_line(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= LINE_CHARS]
    return len(lines) != len(set(lines))


def looped(text: str) -> bool:
    w = words(text)
    grams = [tuple(w[i : i + LOOP_WORDS]) for i in range(len(w) - LOOP_WORDS + 1)]
    return any(grams.count(g) >= LOOP_TIMES for g in set(grams))


def distinct_2(text: str) -> float:
    w = words(text)
    pairs = list(zip(w, w[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def measure(model, tokenizer, prompts, references, settings, extra, max_new_tokens, batch_size) -> dict:
    started = time.perf_counter()
    decoding = {**decoding_options(settings), **extra}
    out = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, "benchmark", decoding=decoding)
    seconds = time.perf_counter() - started
    answers = [o["answer"] for o in out]
    rouge = [r["rougeL"] for r in rouge_scores(answers[: len(references)], references)]
    return {
        "decoding": {k: v if k != "logits_processor" else "answer-only penalty" for k, v in decoding.items()},
        "seconds": round(seconds, 1),
        "repeated_line": float(np.mean([repeated_line(a) for a in answers])),
        "looped": float(np.mean([looped(a) for a in answers])),
        "distinct_2": float(np.mean([distinct_2(a) for a in answers])),
        "rougeL": float(np.mean(rouge)),
        "stop_rate": float(np.mean([o["stopped"] for o in out])),
        "mean_new_tokens": float(np.mean([o["new_tokens"] for o in out])),
        "per_answer": [
            {"answer": a, "new_tokens": o["new_tokens"], "repeated_line": repeated_line(a), "looped": looped(a)}
            | ({"rougeL": rouge[i]} if i < len(rouge) else {})
            for i, (a, o) in enumerate(zip(answers, out))
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/merged"))
    parser.add_argument("--data", type=Path, default=Path("data/processed"), help="folder with test.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2-core machine is shared)")
    parser.add_argument("--seed", type=int, default=42, help="bootstrap resampling")
    parser.add_argument("--only", nargs="*", help="measure these settings (names as in SETTINGS) only")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in (args.data / "test.jsonl").read_text().splitlines() if line.strip()]
    prompts = [r["messages"][:-1] for r in rows] + [[{"role": "user", "content": q}] for q in AB_QUESTIONS]
    references = [r["messages"][-1]["content"] for r in rows]
    model, tokenizer = load_for_inference(args.model)

    # --resume: keep the settings an earlier run (of the same script and model) measured, measure the rest
    results = json.loads(args.out.read_text())["results"] if args.resume and args.out.exists() else {}
    for name, (settings, extra) in SETTINGS.items():
        if (args.only and name not in args.only) or name in results:
            continue
        results[name] = measure(
            model, tokenizer, prompts, references, settings, extra, args.max_new_tokens, args.batch_size
        )
        r = results[name]
        print(f"{name}: repeated line {r['repeated_line']:.2f}, looped {r['looped']:.2f}, ROUGE-L {r['rougeL']:.4f}")
        write_report(args, results, len(references), len(prompts))


def write_report(args, results: dict, n_references: int, n_prompts: int) -> None:
    """The JSON and the Markdown table of the settings measured so far (written after each: a run takes minutes per
    setting on the 2-core CPU)."""
    # paired ROUGE-L difference from greedy, resampling prompts
    indices = bootstrap_indices(n_references, 10000, args.seed)
    greedy = np.array([a["rougeL"] for a in results["greedy"]["per_answer"][:n_references]])
    for r in results.values():
        diff = np.array([a["rougeL"] for a in r["per_answer"][:n_references]]) - greedy
        r["rougeL_minus_greedy"] = float(diff.mean())
        r["rougeL_minus_greedy_ci95"] = [float(x) for x in percentile_interval(diff[indices].mean(axis=1))]

    report = {
        "machine": f"2-core AMD EPYC CPU ({platform.machine()}), {args.threads} torch thread(s), shared with a "
        "training run",
        "model": str(args.model),
        "test_prompts": n_references,
        "ab_questions": len(AB_QUESTIONS),
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = [
        "| setting | repeated line | loop (5-gram x3) | distinct-2 | ROUGE-L | vs greedy (95 % CI) | stop rate "
        "| tokens | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        low, high = r["rougeL_minus_greedy_ci95"]
        table.append(
            f"| {name} | {r['repeated_line']:.2f} | {r['looped']:.2f} | {r['distinct_2']:.3f} | {r['rougeL']:.4f} | "
            f"{r['rougeL_minus_greedy']:+.4f} ({low:+.4f}, {high:+.4f}) | {r['stop_rate']:.2f} | "
            f"{r['mean_new_tokens']:.0f} | {r['seconds']:.0f} |"
        )
    header = (
        f"{n_references} test prompts + {len(AB_QUESTIONS)} A/B questions (repetition shares over all "
        f"{n_prompts}; ROUGE-L over the test prompts), {args.max_new_tokens} new tokens at most, {report['machine']}"
    )
    args.out.with_suffix(".md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header + "\n" + "\n".join(table))


if __name__ == "__main__":
    main()
