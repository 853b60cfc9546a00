"""The merge stage: fold the LoRA adapter into full-precision base weights and prove the result is the same model.

The base is reloaded in float32 (never merged onto 4-bit weights: rounding the merged sum back to nf4 loses the
update), the adapter applied, `merge_and_unload`, and the model saved in the base's own dtype (bf16 for Llama 3.2).
All of it runs on the GPU when there is one (a 3B model in float32 is 13 GB; when that does not fit in free GPU
memory the stage says so and merges on the CPU). Verification reloads what was saved and compares it with
base + adapter (float32) on fixed prompts, teacher-forced over the reference's own greedy continuation
(model/equivalence.py, which the export stage uses too):
- max |logit difference| within a tolerance that depends on the saved dtype (float32: summation order only;
  bf16: every merged weight is rounded to 8 bits of mantissa);
- greedy tokens: identical, or different only where the reference itself is a near-tie (its top token beats the
  merged model's choice by less than the tolerance). A random-weight model (benchmarks) has near-ties everywhere;
  a trained one rarely does, and the report counts them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from expqa.data.dataset import end_of_turn_ids
from expqa.files import atomic_dir
from expqa.model.equivalence import VERIFY_PROMPTS, compare, encode_prompts, reference_continuations, sequence_logits

# float32 merges differ from the unmerged sum only by summation order; bf16 storage rounds every weight.
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the weights are stored in, from config.json ("dtype"; "torch_dtype" before transformers 5)."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in ("float32", "float16", "bfloat16") else torch.float32


def merge_device(base_dir: Path) -> torch.device:
    """The GPU when the float32 copy of the base fits in its free memory (with room for activations)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    from safetensors import safe_open

    params = 0
    for path in base_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            params += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    free, _ = torch.cuda.mem_get_info()
    needed = params * 4 * 1.6  # float32 weights + the bf16 copy being saved + activations of a short prompt
    if needed > free:
        print(
            f"merge: the float32 base needs ~{needed / 2**30:.1f} GiB, the GPU has {free / 2**30:.1f} GiB free: "
            "merging on the CPU (slower, same result)",
            flush=True,
        )
        return torch.device("cpu")
    return torch.device("cuda", 0)


def write_model_card(out_dir: Path, base_dir: Path, adapter_dir: Path, report: dict) -> None:
    base_info = json.loads((base_dir / "base_info.json").read_text())
    training = json.loads((adapter_dir / "training_config.json").read_text())
    metrics = training.get("metrics", {})
    lines = [
        f"# expqa fine-tune of {base_info['name']}",
        "",
        "LoRA fine-tune for experimentation and statistics Q&A (A/B tests, power, sequential testing, variance "
        "reduction, causal inference), merged into the base weights. Built by `dvc repro` from the expqa "
        "repository; `dvc.lock` pins every input below.",
        "",
        "## Base model",
        f"- name: `{base_info['name']}`",
        f"- source: `{base_info['source']}`",
        *(
            [f"- `{name}` sha256: `{digest}`" for name, digest in base_info["weights_sha256"].items()]
            if "weights_sha256" in base_info
            else ["- weights: not hashed (a folder not written by the base stage)"]
        ),
        "",
        "## Training data (sha256)",
        *[f"- {split}.jsonl: `{digest}`" for split, digest in training["data_sha256"].items()],
        "",
        "## Parameters",
        "```json",
        json.dumps(training["config"], indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics",
        f"- val loss before training: {metrics.get('eval_loss_before_training', 'n/a')}",
        f"- val loss after training: {metrics.get('eval_loss', 'n/a')}",
        f"- merge check: max |logit diff| {report['max_abs_logit_diff']:.2e} (tolerance "
        f"{report['tolerance']:.0e}), greedy continuations equal: {report['greedy_equal']}",
        "- held-out evaluation (perplexity, ROUGE, critical questions, stop rate): `metrics/eval.json`",
        "",
        "## Use",
        "```bash",
        'expqa ask "What is CUPED?"',
        "```",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> dict:
    """Merge, save atomically, verify the saved copy; return the verification report (metrics/merge.json)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the template training used
    eos_ids = end_of_turn_ids(tokenizer)
    device = merge_device(base_dir)
    load = dict(dtype=torch.float32, use_safetensors=True)
    if device.type == "cuda":
        load["device_map"] = {"": device.index}
    saved_dtype = stored_dtype(base_dir)  # read before loading: loading in float32 rewrites config.dtype
    base = AutoModelForCausalLM.from_pretrained(base_dir, **load)
    unmerged = PeftModel.from_pretrained(base, adapter_dir).eval()
    prompts = encode_prompts(tokenizer, VERIFY_PROMPTS)
    sequences = reference_continuations(unmerged, prompts, eos_ids, desc="merge: base + adapter, generate")
    reference = sequence_logits(unmerged, sequences, desc="merge: base + adapter, logits")

    merged = unmerged.merge_and_unload().to(saved_dtype)
    merged.generation_config.eos_token_id = eos_ids
    merged.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del merged, unmerged, base
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, **load).eval()
        report = compare(
            reference,
            sequence_logits(reloaded, sequences, desc="merge: merged, logits"),
            sequences,
            [len(p[0]) for p in prompts],
            LOGIT_TOLERANCE[saved_dtype],
        )
        del reloaded
        report.update(prompts=len(prompts), saved_dtype=str(saved_dtype).replace("torch.", ""), device=device.type)
        if not report["passed"]:
            raise RuntimeError(f"merged model differs from base + adapter: {report}; models/merged not written")
        write_model_card(tmp, base_dir, adapter_dir, report)
    return report


def merge_summary(report: dict, out: Path) -> str:
    """One line: where the merged model is and how closely it matches base + adapter. (The report itself is written
    with expqa.files.write_json.)"""
    return f"merge: {out} (max |logit diff| {report['max_abs_logit_diff']:.2e}, greedy equal: {report['greedy_equal']})"
