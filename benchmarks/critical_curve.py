"""Critical-question accuracy and test perplexity over training steps, from a run's checkpoints.

    python benchmarks/critical_curve.py --checkpoints models/checkpoints --name full-3ep

For the base model (step 0) and every `checkpoint-N` (base + that checkpoint's adapter, unmerged): accuracy on
data/eval/critical_questions.jsonl under both scorings (length_norm, calibrated; see expqa.evaluation.evaluate), all /
taught / not taught (taught: a `taught_by` row in data/processed/train.jsonl), with Wilson 95 % intervals and the exact
McNemar p-value against the base; test perplexity on params' eval.max_examples test conversations. Two processes of
one thread each (CPU). Results -> benchmarks/results/critical_curve_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def score(
    base: str, adapter: str | None, questions: list[dict], test_rows: list[dict], max_length: int, batch_size: int
) -> dict:
    import torch

    from expqa.evaluation.evaluate import critical_questions_accuracy, perplexity
    from expqa.model.loading import load_for_inference

    torch.set_num_threads(1)
    model, tokenizer = load_for_inference(base, adapter)
    mc = critical_questions_accuracy(model, tokenizer, questions, batch_size)
    ppl = perplexity(model, tokenizer, [r["messages"] for r in test_rows], max_length, batch_size)
    return {"per_question": mc["per_question"], "perplexity": ppl["perplexity"]}


def summarise(step: int, result: dict, base: dict, taught: set[str]) -> dict:
    from expqa.evaluation.significance import mcnemar_exact, wilson_interval

    row = {"step": step, "perplexity": round(result["perplexity"], 3)}
    for scoring, field in (("length_norm", "chosen"), ("calibrated", "chosen_calibrated")):
        for subset, keep in (
            ("all", lambda q: True),
            ("taught", lambda q: q["id"] in taught),
            ("untaught", lambda q: q["id"] not in taught),
        ):
            hits = [q[field] == q["answer"] for q in result["per_question"] if keep(q)]
            base_hits = [q[field] == q["answer"] for q in base["per_question"] if keep(q)]
            lo, hi = wilson_interval(sum(hits), len(hits))
            row[f"{scoring}_{subset}"] = {
                "accuracy": round(sum(hits) / len(hits), 4),
                "ci95": [round(lo, 4), round(hi, 4)],
                "p_vs_base": mcnemar_exact(base_hits, hits)["p_value"],
            }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    from expqa.config import load_params
    from expqa.data.chatml import load_chatml_dataset
    from expqa.evaluation.evaluate import load_questions, taught_question_ids

    params = load_params(args.params).resolve(cuda=False)
    questions = load_questions(ROOT / params.eval.critical_questions)
    taught = taught_question_ids(questions, [r["id"] for r in load_chatml_dataset(args.data / "train.jsonl")])
    test_rows = load_chatml_dataset(args.data / "test.jsonl")[: params.eval.max_examples or None]
    steps = sorted((int(p.name.split("-")[-1]), p) for p in args.checkpoints.glob("checkpoint-*"))
    jobs = [(0, None)] + [(step, str(path)) for step, path in steps]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            (
                step,
                pool.submit(
                    score,
                    str(args.base),
                    adapter,
                    questions,
                    test_rows,
                    params.train.max_seq_length,
                    params.eval.batch_size,
                ),
            )
            for step, adapter in jobs
        ]
        results = {step: future.result() for step, future in futures}
    rows = [summarise(step, results[step], results[0], taught) for step, _ in jobs]
    out = ROOT / "benchmarks" / "results" / f"critical_curve_{args.name}"
    out.with_suffix(".json").write_text(
        json.dumps(
            {"checkpoints": str(args.checkpoints), "taught": len(taught), "questions": len(questions), "rows": rows},
            indent=2,
        )
        + "\n"
    )
    lines = [
        "| step | test ppl | length_norm all | taught | not taught | calibrated all | taught | not taught |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{row[f'{s}_{k}']['accuracy']:.1%} (p {row[f'{s}_{k}']['p_vs_base']:.2g})"
            for s in ("length_norm", "calibrated")
            for k in ("all", "taught", "untaught")
        ]
        lines.append(f"| {row['step']} | {row['perplexity']:.2f} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
