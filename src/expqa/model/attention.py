"""Document-masked attention for padding-free batches: several conversations packed into one row, each one
attending causally to itself only, without a dense (tokens x tokens) mask and without padding.

Registered with transformers as `expqa_varlen` (select it with `train.attn_implementation: expqa_varlen`).
Sequence boundaries come from TRL's padding-free collator (`cu_seq_lens_q`, computed on the CPU, so no layer
waits for the GPU) or else from `position_ids`, which restart at 0 for every packed conversation. On CUDA the
kernel is torch's Flash-Attention varlen (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10) with grouped-query
heads read in place where that torch supports it; elsewhere each sequence runs through SDPA in turn, which is
slower but gives the same result, so the CPU tests check the same code path.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "expqa_varlen"


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts (int32, with the total at the end) and the longest sequence length."""
    positions = position_ids.reshape(-1)
    starts = (positions == 0).nonzero().reshape(-1)
    if starts.numel() == 0 or starts[0] != 0:
        raise ValueError("position_ids of a packed row must start at 0 and restart at 0 for every sequence")
    bounds = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


_cache: dict = {}


def _bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    # every layer sees the same position_ids tensor: compute the boundaries (a host sync) once per forward
    key = (position_ids.data_ptr(), position_ids.shape, position_ids._version)
    if _cache.get("key") != key:
        _cache.update(key=key, value=cu_seqlens(position_ids))
    return _cache["value"]


def _attend_each_sequence(q, k, v, bounds: torch.Tensor, scaling: float | None) -> torch.Tensor:
    out = torch.empty_like(q)
    edges = bounds.tolist()
    for start, end in zip(edges[:-1], edges[1:]):
        seg = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, heads, len, dim)
        out[start:end] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling)[0].transpose(0, 1)
    return out


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query (1, heads, tokens, dim) -> output (1, tokens, heads, dim)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or attention_mask is not None:
        # not a packed row (e.g. generation with padding): ordinary SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    bounds, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if bounds is None or longest is None:
        bounds, longest = _bounds(position_ids)
    bounds = bounds.to(device=q.device, dtype=torch.int32)
    flash = _flash_varlen() if q.is_cuda else None
    if flash is None or (groups > 1 and not _flash_has_gqa()):
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))  # grouped-query heads repeated for the kernel
    if flash is not None:
        dtype = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16  # flash: 16-bit only
        extra = {"enable_gqa": True} if groups > 1 and _flash_has_gqa() else {}
        out = flash(
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            bounds,
            bounds,
            longest,
            longest,
            scale=scaling,
            window_size=(-1, 0),
            **extra,
        ).to(q.dtype)
    else:
        out = _attend_each_sequence(q, k, v, bounds, scaling)
    return out.unsqueeze(0), None


def _flash_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _flash_has_gqa() -> bool:
    return "enable_gqa" in inspect.signature(_flash_varlen()).parameters


def register() -> str:
    """Make `attn_implementation="expqa_varlen"` available to transformers models; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME
