"""Quick critical-question scoring of base + adapter (merged in memory): all / taught / untaught, both scorings.

Run from the repository root after `make install` and `dvc repro train`:
    .venv/bin/python benchmarks/results/align_cpu_2026-12-07/cq.py ADAPTER_DIR|base OUT.json [threads]
"""

import json
import sys
from pathlib import Path

import torch

from expqa.data.chatml import load_chatml_dataset
from expqa.evaluation.evaluate import critical_questions_accuracy, load_questions, taught_question_ids
from expqa.model.loading import load_for_inference

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
questions = load_questions(Path("data/eval/critical_questions.jsonl"))
train_ids = [r["id"] for r in load_chatml_dataset(Path("data/processed/train.jsonl"))]
taught = taught_question_ids(questions, train_ids)
if sys.argv[1] == "base":
    model, tok = load_for_inference(Path("models/base"))
else:
    model, tok = load_for_inference(Path("models/base"), adapter_dir=sys.argv[1])
    model = model.merge_and_unload()
scores = critical_questions_accuracy(model, tok, questions, 8)
subsets = {
    "all": lambda q: True,
    "taught": lambda q: q["id"] in taught,
    "untaught": lambda q: q["id"] not in taught,
}
out = {}
for field, name in (("chosen", "length_norm"), ("chosen_calibrated", "calibrated")):
    for sub, keep in subsets.items():
        rows = [q for q in scores["per_question"] if keep(q)]
        out[f"{name}_{sub}"] = sum(q[field] == q["answer"] for q in rows) / len(rows)
out["per_question"] = scores["per_question"]
Path(sys.argv[2]).write_text(json.dumps(out))
print(sys.argv[1], {k: round(v, 3) for k, v in out.items() if k != "per_question"})
