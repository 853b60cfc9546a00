"""The merge stage: fold the LoRA adapter into full-precision base weights and prove the result is the same model.

The base is reloaded in float32 (never merged onto 4-bit weights: rounding the merged sum back to nf4 loses the
update), the adapter applied, `merge_and_unload`, and the model saved in the base's own dtype. Verification
reloads what was saved and compares it with base + adapter on fixed prompts: max |logit difference| within a
tolerance that depends on the saved dtype, and identical greedy continuations.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from expqa.dataset import end_of_turn_ids, render
from expqa.files import replace_dir

VERIFY_PROMPTS = [
    "What is a p-value?",
    "How many users do I need per arm to detect a 5% relative lift on a 4% conversion rate?",
    "Explain CUPED in two sentences.",
]
# float32 merges differ from the unmerged sum only by summation order; bf16 storage rounds every weight.
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}
VERIFY_NEW_TOKENS = 24


def encode_prompts(tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    return [tokenizer(render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True),
                      add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]


@torch.no_grad()
def logits_and_greedy(model, prompts_ids: list[torch.Tensor], eos_ids: list[int]) -> list[tuple]:
    results = []
    for ids in prompts_ids:
        ids = ids.to(model.device)
        logits = model(input_ids=ids).logits[0].float().cpu()
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=VERIFY_NEW_TOKENS, eos_token_id=eos_ids,
                                   pad_token_id=eos_ids[0])[0, ids.shape[1]:].tolist()
        results.append((logits, generated))
    return results


def write_model_card(out_dir: Path, base_dir: Path, adapter_dir: Path, report: dict) -> None:
    base_info = json.loads((base_dir / "base_info.json").read_text())
    training = json.loads((adapter_dir / "training_config.json").read_text())
    metrics = training.get("metrics", {})
    lines = [
        f"# expqa fine-tune of {base_info['name']}", "",
        "LoRA fine-tune for experimentation and statistics Q&A (A/B tests, power, sequential testing, variance "
        "reduction, causal inference), merged into the base weights. Built by `dvc repro` from the expqa "
        "repository; `dvc.lock` pins every input below.", "",
        "## Base model", f"- name: `{base_info['name']}`", f"- source: `{base_info['source']}`",
        *[f"- `{name}` sha256: `{digest}`" for name, digest in base_info["weights_sha256"].items()], "",
        "## Training data (sha256)",
        *[f"- {split}.jsonl: `{digest}`" for split, digest in training["data_sha256"].items()], "",
        "## Parameters", "```json", json.dumps(training["config"], indent=2, sort_keys=True), "```", "",
        "## Metrics",
        f"- val loss before training: {metrics.get('eval_loss_before_training', 'n/a')}",
        f"- val loss after training: {metrics.get('eval_loss', 'n/a')}",
        f"- merge check: max |logit diff| {report['max_abs_logit_diff']:.2e} (tolerance "
        f"{report['tolerance']:.0e}), greedy continuations equal: {report['greedy_equal']}",
        "- held-out evaluation (perplexity, ROUGE, critical questions, stop rate): `metrics/eval.json`", "",
        "## Use", "```bash", "expqa ask \"What is CUPED?\"", "```", "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> dict:
    """Merge, save atomically, verify the saved copy; return the verification report (metrics/merge.json)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the template training used
    eos_ids = end_of_turn_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    saved_dtype = getattr(base.config, "dtype", None) or torch.float32
    saved_dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype
    unmerged = PeftModel.from_pretrained(base, adapter_dir).eval()
    prompts = encode_prompts(tokenizer, VERIFY_PROMPTS)
    reference = logits_and_greedy(unmerged, prompts, eos_ids)

    merged = unmerged.merge_and_unload().to(saved_dtype)
    merged.generation_config.eos_token_id = eos_ids
    merged.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else eos_ids[0]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged, unmerged, base
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True).eval()
        check = logits_and_greedy(reloaded, prompts, eos_ids)
        diffs = [(ref[0] - got[0]).abs().max().item() for ref, got in zip(reference, check)]
        report = {"max_abs_logit_diff": max(diffs), "tolerance": LOGIT_TOLERANCE[saved_dtype],
                  "greedy_equal": all(ref[1] == got[1] for ref, got in zip(reference, check)),
                  "prompts": len(prompts), "saved_dtype": str(saved_dtype).replace("torch.", "")}
        report["passed"] = report["max_abs_logit_diff"] <= report["tolerance"] and report["greedy_equal"]
        if not report["passed"]:
            raise RuntimeError(f"merged model differs from base + adapter: {report}; models/merged not written")
        write_model_card(tmp, base_dir, adapter_dir, report)
        replace_dir(tmp, out_dir)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
