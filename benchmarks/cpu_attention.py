"""CPU attention for packed conversations: one causal SDPA per conversation (what `expqa_varlen` does off CUDA) vs
one SDPA over the whole packed row with a block-diagonal causal mask vs the padded batch with a padding mask (the
old CPU profile), forward + backward, SmolLM2-135M's heads (9 query, 3 key/value, dim 64), one thread.

    python benchmarks/cpu_attention.py [--lengths 512 493 301 410] [--repeats 5]

The lengths default to 4 train conversations cut at 512 tokens. Variants alternate within each repeat; the median
time per variant is printed with the spread (min-max). Results -> benchmarks/results/cpu_attention_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

from expqa.model.attention import _attend_each_sequence

HEADS, KV_HEADS, DIM = 9, 3, 64


def per_sequence(q, k, v, bounds):  # (tokens, heads, dim); the CPU path of expqa.model.attention.varlen_attention
    return _attend_each_sequence(
        q, k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1), bounds, None
    )


def block_mask(q, k, v, bounds):
    total = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff())
    mask = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    seg = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*seg, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)


def padded(q, k, v, bounds):
    lengths, width = bounds.diff().tolist(), int(bounds.diff().max())

    def pad(t):
        rows = [F.pad(t[s:e], (0, 0, 0, 0, 0, width - (e - s))) for s, e in pairwise(bounds.tolist())]
        return torch.stack(rows).transpose(1, 2)  # (batch, heads, width, dim)

    keep = torch.tensor([[i < n for i in range(width)] for n in lengths])
    mask = keep[:, None, None, :] & torch.ones(width, width, dtype=torch.bool).tril()  # as transformers builds it
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, enable_gqa=True)
    return torch.cat([out[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 493, 301, 410])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bounds = torch.tensor([0] + args.lengths).cumsum(0)
    total = int(bounds[-1])
    q = torch.randn(total, HEADS, DIM, requires_grad=True)
    k, v = (torch.randn(total, KV_HEADS, DIM, requires_grad=True) for _ in range(2))
    grad = torch.randn(total, HEADS, DIM)
    variants = {"per_sequence": per_sequence, "block_mask": block_mask, "padded": padded}
    reference = per_sequence(q, k, v, bounds)
    for name, fn in variants.items():  # all three are the same attention
        torch.testing.assert_close(fn(q, k, v, bounds), reference, atol=1e-5, rtol=1e-5, msg=name)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(q, k, v, bounds).backward(grad)
            times[name].append(time.perf_counter() - start)
    load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    result = {
        "lengths": args.lengths,
        "load_average": load,
        "threads": 1,
        "ms_forward_backward": {
            n: {
                "median": round(1e3 * statistics.median(t), 1),
                "min": round(1e3 * min(t), 1),
                "max": round(1e3 * max(t), 1),
            }
            for n, t in times.items()
        },
    }
    out = Path(__file__).resolve().parent / "results" / f"cpu_attention_{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
