"""The frozen base's matmuls of one LoRA projection, bf16 vs FP8 (expqa.model.fp8), on a Llama decoder layer's shapes.

Per projection and micro-batch of `--tokens` tokens: forward x W^T and input gradient g W, each as the trainer runs it
(FP8: quantise the activation rows, quantise the dense weight, scaled matmul; "cached": the weight quantised once, as
the trainer's weight cache), with the time of the row quantisation alone, CUDA events, median of --repeat (a call of
a few 10 us includes its launch). Prints a table and writes JSON to --out.

    python benchmarks/fp8_matmul.py --arch llama-3.2-3b --tokens 16384 --out results/fp8_matmul.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from expqa.model import fp8

# (in, out) of q, k/v, o, gate/up, down
SHAPES = {
    "llama-3.2-3b": {"q": (3072, 3072), "k/v": (3072, 1024), "o": (3072, 3072), "gate/up": (3072, 8192),
                     "down": (8192, 3072)},
    "llama-3.1-8b": {"q": (4096, 4096), "k/v": (4096, 1024), "o": (4096, 4096), "gate/up": (4096, 14336),
                     "down": (14336, 4096)},
}  # fmt: skip
COUNT = {"q": 1, "k/v": 2, "o": 1, "gate/up": 2, "down": 1}  # projections of that shape per layer


def timed(fn, repeat: int) -> float:
    """Median milliseconds of fn() on the current stream."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, k: int, n: int, tokens: int, repeat: int) -> dict:
    """One projection shape (in k, out n): bf16 and FP8 timings of its forward and input-gradient matmuls."""
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    xq, xs = fp8.quantize_rows(x)
    wq, ws = fp8.quantize_rows(w)
    wtq, wts = fp8.quantize_rows(w.t().contiguous())
    row = {"projection": name, "in": k, "out": n, "tokens": tokens, "per_layer": COUNT[name]}
    row["fwd_bf16_ms"] = timed(lambda: x @ w.t(), repeat)
    # as the trainer runs them: the weight quantised per use, or once (the weight cache)
    row["fwd_fp8_ms"] = timed(lambda: fp8.linear(*fp8.quantize_rows(x), *fp8.quantize_rows(w), w.dtype), repeat)
    row["fwd_fp8_cached_ms"] = timed(lambda: fp8.linear(*fp8.quantize_rows(x), wq, ws, w.dtype), repeat)
    row["grad_bf16_ms"] = timed(lambda: g @ w, repeat)
    row["grad_fp8_ms"] = timed(lambda: fp8.input_grad(g, *fp8.quantize_rows(w.t().contiguous())), repeat)
    row["grad_fp8_cached_ms"] = timed(lambda: fp8.input_grad(g, wtq, wts), repeat)
    row["fwd_fp8_gemm_only_ms"] = timed(lambda: fp8.matmul_rows(xq, xs, wq, ws, torch.bfloat16), repeat)
    row["quantize_x_ms"] = timed(lambda: fp8.quantize_rows(x), repeat)
    flops = 2 * tokens * k * n
    row["bf16_tflops"] = flops / row["fwd_bf16_ms"] / 1e9
    row["fp8_gemm_tflops"] = flops / row["fwd_fp8_gemm_only_ms"] / 1e9
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(SHAPES), default="llama-3.2-3b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [measure(name, k, n, args.tokens, args.repeat) for name, (k, n) in SHAPES[args.arch].items()]
    total = {
        key: sum(r[key] * r["per_layer"] for r in rows)
        for key in (
            "fwd_bf16_ms",
            "fwd_fp8_ms",
            "fwd_fp8_cached_ms",
            "grad_bf16_ms",
            "grad_fp8_ms",
            "grad_fp8_cached_ms",
        )
    }
    print(f"{args.arch}, {args.tokens} tokens, {torch.cuda.get_device_name()}")
    print("| projection | fwd bf16 ms | fwd fp8 ms | grad bf16 ms | grad fp8 ms | fp8 GEMM only ms | quantise x ms |"
          " bf16 TFLOP/s | fp8 GEMM TFLOP/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['projection']} | {r['fwd_bf16_ms']:.3f} | {r['fwd_fp8_ms']:.3f} | {r['grad_bf16_ms']:.3f} | "
            f"{r['grad_fp8_ms']:.3f} | {r['fwd_fp8_gemm_only_ms']:.3f} | {r['quantize_x_ms']:.3f} | "
            f"{r['bf16_tflops']:.0f} | {r['fp8_gemm_tflops']:.0f} |"
        )
    bf16_ms, fp8_ms = total["fwd_bf16_ms"] + total["grad_bf16_ms"], total["fwd_fp8_ms"] + total["grad_fp8_ms"]
    cached_ms = total["fwd_fp8_cached_ms"] + total["grad_fp8_cached_ms"]
    print(
        f"per layer (7 projections, forward + input gradient): bf16 {bf16_ms:.2f} ms, fp8 {fp8_ms:.2f} ms "
        f"({bf16_ms / fp8_ms:.2f}x), fp8 with cached weights {cached_ms:.2f} ms ({bf16_ms / cached_ms:.2f}x)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows, "per_layer_ms": total},
                                       indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
