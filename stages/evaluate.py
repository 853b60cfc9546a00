"""Stage `evaluate`: base vs fine-tuned on the test split and the critical questions -> metrics/eval.json.

Params: eval (max_new_tokens, batch_size, max_examples, critical_questions, bootstrap_samples, num_processes,
num_threads), base.seed (bootstrap),
train.max_seq_length (+ cpu). --train: the split that trained the model, for the taught / not taught split.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from expqa.chatml import load_chatml_dataset
from expqa.config import ConfigError, load_params
from expqa.evaluate import compare_models, evaluate_models, load_questions, taught_question_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa evaluate", description=__doc__)
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--tuned", type=Path, default=Path("models/merged"))
    parser.add_argument("--test", type=Path, default=Path("data/processed/test.jsonl"))
    parser.add_argument("--train", type=Path, default=Path("data/processed/train.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--examples", type=Path, default=Path("metrics/eval_examples.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("metrics/plots/eval_rougeL.csv"))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params).for_device(torch.cuda.is_available())
        questions = load_questions(params.eval.critical_questions)
        test_rows = load_chatml_dataset(args.test)
        taught = taught_question_ids(questions, [row["id"] for row in load_chatml_dataset(args.train)])
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if params.eval.max_examples:
        test_rows = test_rows[: params.eval.max_examples]  # test.jsonl is in hash order: a fixed sample
    results = evaluate_models({"base": args.base, "tuned": args.tuned}, test_rows, questions,
                              max_length=params.train.max_seq_length, max_new_tokens=params.eval.max_new_tokens,
                              batch_size=params.eval.batch_size, processes=params.eval.num_processes,
                              threads=params.eval.num_threads)
    examples = {name: rows for name, (_, rows) in results.items()}
    report = compare_models(examples["base"], examples["tuned"], taught, samples=params.eval.bootstrap_samples,
                            seed=params.base.seed)
    for path in (args.out, args.examples, args.plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    with open(args.examples, "w", encoding="utf-8") as handle:
        for base_row, tuned_row in zip(examples["base"], examples["tuned"]):
            handle.write(json.dumps({"id": base_row["id"], "base": base_row, "tuned": tuned_row},
                                    ensure_ascii=False, sort_keys=True) + "\n")
    args.plot.write_text("id,base,tuned\n" + "".join(
        f"{b['id']},{b['rougeL']:.4f},{t['rougeL']:.4f}\n"
        for b, t in zip(examples["base"], examples["tuned"]) if "rougeL" in b))
    critical = report["critical_questions"]
    print("evaluate: " + ", ".join(f"{k} {v['base']:.3f} -> {v['tuned']:.3f} (p {v['p_value']:.3g})" for k, v in (
        ("perplexity", report["perplexity"]), ("rougeL", report["rougeL"]), ("stop_rate", report["stop_rate"]),
        ("critical questions (length_norm)", critical["length_norm"]),
        ("critical questions (calibrated)", critical["calibrated"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
