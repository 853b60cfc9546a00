"""The LM head and loss of a training step, at label positions only (the CPU profile's `train.lm_head_loss: expqa`).

TRL's SFTTrainer patches the model with a chunked "fused LM head" that returns per-token log-probabilities, entropy and
top-1 hits instead of logits. Off CUDA its torch fallback scores every position of the batch (padding and prompt
tokens too), in tiles of 4096 tokens x 32768 vocabulary entries (512 MB each in float32) with about a dozen passes over
each tile, and recomputes every tile's matmul in backward. On a 2-core CPU that was a quarter of a training step
(torch.profiler, benchmarks/results). `add_label_lm_head` replaces it, keeping the same outputs and the same loss:

- only positions whose next-token label is not -100 are projected onto the vocabulary;
- each chunk's softmax is computed once and kept for backward, where it becomes the logits' gradient in place
  (softmax - one-hot): two vocabulary matmuls per token instead of three, no recomputation;
- entropy and top-1 hits (TRL's `entropy` / `mean_token_accuracy` metrics) come from the same chunk, without gradient.

Memory: the kept probabilities are (label tokens x vocabulary) float32, 0.2 GB per 1,000 label tokens for a 49k
vocabulary; bounded by the micro-batch. Models with logit soft-capping, logit scaling, a head bias, or calls with
pre-shifted labels or router logits go to TRL's head unchanged.
"""

from __future__ import annotations

import functools
import types

import torch

CHUNK_TOKENS = 1024  # label positions projected onto the vocabulary at once (1024 x 49k x 4 bytes = 200 MB)
_SCALING_ATTRIBUTES = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


class LabelLogProbs(torch.autograd.Function):
    """(log p(target), entropy, target is the argmax) per row of `hidden @ weight.T`; gradient for log p only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n, vocab = hidden.shape[0], weight.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy, top1 = torch.empty_like(log_probs), torch.empty(n, dtype=torch.bool, device=hidden.device)
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # forward always runs without grad mode
        probs = torch.empty(n, vocab, dtype=torch.float32, device=hidden.device) if keep else None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            z = (hidden[rows] @ weight.t()).float()  # (c, vocab); consumed in place below
            t = targets[rows]
            top1[rows] = z.argmax(-1) == t
            z.sub_(z.amax(-1, keepdim=True))
            p = torch.exp(z, out=probs[rows]) if keep else torch.exp(z)
            log_sum = p.sum(-1).log_()
            z.sub_(log_sum[:, None])  # z is now log p
            p.div_(log_sum.exp()[:, None])
            log_probs[rows] = z.gather(-1, t[:, None])[:, 0]
            entropy[rows] = -torch.linalg.vecdot(p, z)
            del z, p
        ctx.mark_non_differentiable(entropy, top1)
        ctx.save_for_backward(hidden, weight, targets, probs)
        ctx.chunk = chunk
        return log_probs, entropy, top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_top1):
        hidden, weight, targets, probs = ctx.saved_tensors
        if probs is None or grad_log_probs is None:
            return None, None, None, None
        w = weight.float()
        grad_hidden = (
            torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        )
        grad_weight = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            g, gl = probs[rows], grad_log_probs[rows].float()
            # d log p_t / d z = onehot(t) - p, in place on the kept probabilities (backward runs once)
            g.mul_(-gl[:, None])
            g.scatter_add_(-1, targets[rows, None], gl[:, None])
            if grad_hidden is not None:
                torch.mm(g, w, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), hidden[rows].float())
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None,
            None,
        )


def label_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_TOKENS):
    """Per-position (log_probs, entropy, is_top1, mask) of next-token `labels` (already shifted), zero where -100."""
    mask = labels != -100
    log_probs, entropy, top1 = LabelLogProbs.apply(hidden[mask], weight, labels[mask], chunk)

    def scatter(x):
        return x.new_zeros(mask.shape).masked_scatter(mask, x)

    return scatter(log_probs), scatter(entropy), scatter(top1), mask


def supports(model) -> bool:
    """A plain causal LM head: no bias, no logit scaling or soft-capping."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    return (
        head is not None
        and getattr(head, "bias", None) is None
        and all(getattr(config, name, None) in (None, 1.0) for name in _SCALING_ATTRIBUTES)
    )


def add_label_lm_head(model, chunk: int = CHUNK_TOKENS) -> bool:
    """Route `model(..., labels=..., fused_lm_head=True)` (TRL's SFTTrainer loss call) through `label_log_probs`.

    Call after TRL patched `model` (the base model under PEFT); anything else goes to TRL's forward. Returns whether
    the head was replaced.
    """
    if not supports(model):
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() validates kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if (
            not fused_lm_head
            or labels is None
            or kwargs.get("shift_labels") is not None
            or kwargs.get("output_router_logits")
        ):
            return trl_forward(
                *args, fused_lm_head=fused_lm_head, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        log_probs, entropy, top1, mask = label_log_probs(hidden, self.get_output_embeddings().weight, labels, chunk)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=top1, label_mask=mask)

    forward.expqa_label_head = True  # for tests and debugging: which head is installed
    model.forward = types.MethodType(forward, model)
    return True
