"""The merge stage: fold the LoRA adapter into full-precision base weights and prove the result is the same model.

The base is reloaded in float32 (never merged onto 4-bit weights: rounding the merged sum back to nf4 loses the
update), the adapter applied, `merge_and_unload`, and the model saved in the base's own dtype (bf16 for Llama 3.2).
All of it runs on the GPU when there is one (a 3B model in float32 is 13 GB; when that does not fit in free GPU
memory the stage says so and merges on the CPU). Verification reloads what was saved and compares it with
base + adapter (float32) on fixed prompts, teacher-forced over the reference's own greedy continuation:
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

from expqa.data.dataset import end_of_turn_ids, render
from expqa.files import atomic_dir
from expqa.progress import progress

VERIFY_PROMPTS = [
    "What is a p-value?",
    "How many users do I need per arm to detect a 5% relative lift on a 4% conversion rate?",
    "Explain CUPED in two sentences.",
]
# float32 merges differ from the unmerged sum only by summation order; bf16 storage rounds every weight.
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.5}
VERIFY_NEW_TOKENS = 24


def encode_prompts(tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    return [
        tokenizer(
            render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True),
            add_special_tokens=False,
            return_tensors="pt",
        )["input_ids"]
        for p in prompts
    ]


@torch.no_grad()
def reference_continuations(
    model, prompts_ids: list[torch.Tensor], eos_ids: list[int], desc: str = "greedy continuations"
) -> list[torch.Tensor]:
    """Prompt + greedy continuation of each prompt (the sequences both models are then scored on)."""
    sequences = []
    for ids in progress(prompts_ids, desc=desc, unit="prompt"):
        ids = ids.to(model.device)
        sequences.append(
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=VERIFY_NEW_TOKENS,
                eos_token_id=eos_ids,
                pad_token_id=eos_ids[0],
            )[0].cpu()
        )
    return sequences


@torch.no_grad()
def sequence_logits(model, sequences: list[torch.Tensor], desc: str = "logits") -> list[torch.Tensor]:
    return [
        model(input_ids=seq.unsqueeze(0).to(model.device)).logits[0].float().cpu()
        for seq in progress(sequences, desc=desc, unit="prompt")
    ]


def compare(
    reference: list[torch.Tensor],
    merged: list[torch.Tensor],
    sequences: list[torch.Tensor],
    prompt_lengths: list[int],
    tolerance: float,
    near_tie: float | None = None,
) -> dict:
    """Logit differences and greedy agreement over each prompt + its reference continuation; a greedy flip is
    accepted where the reference's own token led the other model's choice by at most near_tie (default: the
    tolerance)."""
    near_tie = tolerance if near_tie is None else near_tie
    max_diff = max((r - m).abs().max().item() for r, m in zip(reference, merged))
    mean_diff = sum((r - m).abs().mean().item() for r, m in zip(reference, merged)) / len(reference)
    flips, near_ties, steps = 0, 0, 0
    for ref, got, seq, start in zip(reference, merged, sequences, prompt_lengths):
        # position p predicts token p + 1; the continuation starts at token `start`
        steps += len(seq) - start
        for pos in range(start - 1, len(seq) - 1):
            chosen = int(got[pos].argmax())
            if chosen != int(seq[pos + 1]):
                flips += 1
                near_ties += (ref[pos, seq[pos + 1]] - ref[pos, chosen]).item() <= near_tie
    return {
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": mean_diff,
        "tolerance": tolerance,
        "greedy_equal": flips == 0,
        "greedy_steps": steps,
        "greedy_flips": flips,
        "greedy_flips_at_near_ties": near_ties,
        "passed": max_diff <= tolerance and flips == near_ties,
    }


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
