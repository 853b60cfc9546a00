"""Is one model the same as another: fixed prompts as the model's own chat prompt, the reference model's greedy
continuation of each, both models' logits teacher-forced over it, and the comparison (max and mean |logit
difference| against a tolerance, greedy flips outside near-ties). The merge stage checks the merged model against
base + adapter with it, the export stage each GGUF file against the merged model.
"""

from __future__ import annotations

import torch

from expqa.data.dataset import render
from expqa.progress import progress

VERIFY_PROMPTS = [
    "What is a p-value?",
    "How many users do I need per arm to detect a 5% relative lift on a 4% conversion rate?",
    "Explain CUPED in two sentences.",
]
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
    tolerance). greedy_agreed_tokens: the tokens, summed over the prompts, that the other model's own greedy answer
    shares with the reference's before they part (its first flip)."""
    near_tie = tolerance if near_tie is None else near_tie
    max_diff = max((r - m).abs().max().item() for r, m in zip(reference, merged))
    mean_diff = sum((r - m).abs().mean().item() for r, m in zip(reference, merged)) / len(reference)
    flips, near_ties, steps, agreed = 0, 0, 0, 0
    for ref, got, seq, start in zip(reference, merged, sequences, prompt_lengths):
        # position p predicts token p + 1; the continuation starts at token `start`
        steps += len(seq) - start
        prompt_flips = 0
        for pos in range(start - 1, len(seq) - 1):
            chosen = int(got[pos].argmax())
            if chosen != int(seq[pos + 1]):
                flips += 1
                prompt_flips += 1
                near_ties += (ref[pos, seq[pos + 1]] - ref[pos, chosen]).item() <= near_tie
            # the other model's own greedy answer is the reference's up to its first flip, whatever follows
            agreed += prompt_flips == 0
    return {
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": mean_diff,
        "tolerance": tolerance,
        "greedy_equal": flips == 0,
        "greedy_steps": steps,
        "greedy_flips": flips,
        "greedy_flips_at_near_ties": near_ties,
        "greedy_agreed_tokens": agreed,
        "passed": max_diff <= tolerance and flips == near_ties,
    }
