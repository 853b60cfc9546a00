"""Which align settings teach the critical questions: variants of the align stage scored side by side.

    python benchmarks/align_sweep.py --results DIR [NAME:key=value,key=value ...]     (after `dvc repro`)

For each variant (params.yaml's align section with the given keys changed, e.g. `ipo:method=ipo,beta=0.5`; the
shipped section itself is `default:`) the align stage's trainer continues the SFT adapter (models/adapter) on
data/raw/preferences.jsonl as the stage does, then the SFT + preference model (the adapter merged in memory) is
scored as the evaluate stage scores it: the 204 critical questions (length_norm and calibrated; all, taught,
untaught) and the test split's perplexity; the base and SFT models once, for reference. The held-out pairs' reward
accuracy comes from the trainer. Writes DIR/align_sweep.json and .md (one row per model, the paired tests against
base and SFT of the critical questions, calibrated). Uses the machine's profile (params.yaml resolved here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    values = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        values[key] = value if key == "method" else float(value) if "." in value or "e" in value else int(value)
    return name, values


def score(model_dir, adapter, questions, test_rows, batch, max_length) -> tuple[dict, list]:
    from expqa.evaluation.evaluate import critical_questions_accuracy, perplexity
    from expqa.model.loading import load_for_inference

    model, tokenizer = load_for_inference(model_dir, adapter_dir=adapter)
    if adapter is not None:
        model = model.merge_and_unload()
    mc = critical_questions_accuracy(model, tokenizer, questions, batch)
    ppl = perplexity(model, tokenizer, [r["messages"] for r in test_rows], max_length, batch)
    del model
    return {"perplexity": ppl["perplexity"]}, mc["per_question"]


def accuracies(per_question: list, taught: set) -> dict:
    out = {}
    for field, name in (("chosen", "length_norm"), ("chosen_calibrated", "calibrated")):
        subsets = {"": lambda q: True, "_taught": lambda q: q["id"] in taught}
        subsets["_untaught"] = lambda q: q["id"] not in taught
        for sub, keep in subsets.items():
            rows = [q for q in per_question if keep(q)]
            out[name + sub] = sum(q[field] == q["answer"] for q in rows) / len(rows)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["default:"])
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)

    from expqa.config import load_params
    from expqa.data.chatml import load_chatml_dataset
    from expqa.evaluation.evaluate import load_questions, taught_question_ids
    from expqa.evaluation.significance import bootstrap_indices, compare_proportions
    from expqa.training.align import AlignTrainer, preference_data

    params = load_params(REPO / "params.yaml").resolve()
    questions = load_questions(REPO / params.eval.critical_questions)
    test_rows = load_chatml_dataset(REPO / "data/processed/test.jsonl")
    if params.eval.max_examples:
        test_rows = test_rows[: params.eval.max_examples]
    taught = taught_question_ids(questions, [r["id"] for r in load_chatml_dataset(REPO / "data/processed/train.jsonl")])
    batch, max_length = params.eval.batch_size, params.train.max_seq_length
    rows, per_q = {}, {}
    for name, adapter in (("base", None), ("sft", REPO / "models/adapter")):
        summary, per_q[name] = score(REPO / "models/base", adapter, questions, test_rows, batch, max_length)
        rows[name] = {**summary, **accuracies(per_q[name], taught)}
        print(name, json.dumps(rows[name]), flush=True)
    for text in args.variants:
        name, values = parse_variant(text)
        run_params = dataclasses.replace(params, align=dataclasses.replace(params.align, **values))
        work = Path(f"/tmp/align_sweep/{name}")
        trainer = AlignTrainer(
            run_params,
            base_model=REPO / "models/base",
            adapter=REPO / "models/adapter",
            preferences=REPO / "data/raw/preferences.jsonl",
            questions=REPO / params.eval.critical_questions,
            data_dir=REPO / "data/processed",
            checkpoint_dir=work / "ckpt",
            metrics_dir=work / "metrics",
            log_dir=work / "logs",
        )
        data = preference_data(trainer.preferences, trainer.questions, trainer.data_dir, run_params)
        started = time.perf_counter()
        metrics = trainer.train(data)
        trainer.save_model(work / "adapter", data)
        seconds = time.perf_counter() - started
        del trainer
        summary, per_q[name] = score(REPO / "models/base", work / "adapter", questions, test_rows, batch, max_length)
        rows[name] = {
            "align": {k: v for k, v in dataclasses.asdict(run_params.align).items()},
            "align_seconds": seconds,
            "held_out_reward_accuracy": metrics.get("rewards/accuracies"),
            "held_out_margin": metrics.get("rewards/margins"),
            "train_loss": metrics.get("train_loss"),
            **summary,
            **accuracies(per_q[name], taught),
        }
        for against in ("base", "sft"):
            for sub, keep in (("", lambda q: True), ("_taught", lambda q: q["id"] in taught)):
                pairs = [(a, b) for a, b in zip(per_q[against], per_q[name]) if keep(a)]
                test = compare_proportions(
                    [a["chosen_calibrated"] == a["answer"] for a, _ in pairs],
                    [b["chosen_calibrated"] == b["answer"] for _, b in pairs],
                    bootstrap_indices(len(pairs), 2000, 42),
                )
                keys = ("delta", "delta_ci95_lo", "delta_ci95_hi", "p_value")
                rows[name][f"calibrated{sub}_vs_{against}"] = {k: test[k] for k in keys}
        print(name, json.dumps(rows[name]), flush=True)
        (args.results / "align_sweep.json").write_text(json.dumps(rows, indent=2))
    table = [
        "| model | cal. all | cal. taught | cal. untaught | len-norm all | test ppl | held-out reward acc "
        "| p taught vs base | p all vs base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        vs = r.get("calibrated_taught_vs_base", {}).get("p_value")
        vs_all = r.get("calibrated_vs_base", {}).get("p_value")
        acc = r.get("held_out_reward_accuracy")
        table.append(
            f"| {name} | {r['calibrated']:.3f} | {r['calibrated_taught']:.3f} | {r['calibrated_untaught']:.3f} | "
            f"{r['length_norm']:.3f} | {r['perplexity']:.2f} | {'' if acc is None else f'{acc:.2f}'} | "
            f"{'' if vs is None else f'{vs:.2g}'} | {'' if vs_all is None else f'{vs_all:.2g}'} |"
        )
    (args.results / "align_sweep.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
