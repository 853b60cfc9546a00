"""Quick critical-question scoring of base + adapter (merged in memory): all / taught / untaught, both scorings.
usage: cq.py ADAPTER_OR_base OUT.json [threads]"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, "/work/main/src")
from expqa.evaluation.evaluate import critical_questions_accuracy, load_questions, taught_question_ids
from expqa.data.chatml import load_chatml_dataset
from expqa.model.loading import load_for_inference
R = Path("/work/main")
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
qs = load_questions(R / "data/eval/critical_questions.jsonl")
taught = taught_question_ids(qs, [r["id"] for r in load_chatml_dataset(R / "data/processed/train.jsonl")])
if sys.argv[1] == "base":
    model, tok = load_for_inference(R / "models/base")
else:
    model, tok = load_for_inference(R / "models/base", adapter_dir=sys.argv[1]); model = model.merge_and_unload()
mc = critical_questions_accuracy(model, tok, qs, 8)
out = {}
for field, name in (("chosen", "length_norm"), ("chosen_calibrated", "calibrated")):
    for sub, keep in (("all", lambda q: True), ("taught", lambda q: q["id"] in taught), ("untaught", lambda q: q["id"] not in taught)):
        rows = [q for q in mc["per_question"] if keep(q)]
        out[f"{name}_{sub}"] = sum(q[field] == q["answer"] for q in rows) / len(rows)
out["per_question"] = mc["per_question"]
Path(sys.argv[2]).write_text(json.dumps(out))
print(sys.argv[1], {k: round(v, 3) for k, v in out.items() if k != "per_question"})
