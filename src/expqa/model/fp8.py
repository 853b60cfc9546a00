"""FP8 (e4m3) matmuls for the frozen base weights of a LoRA layer: forward (x W^T) and input gradient (g W).

On Hopper and newer GPUs tensor cores multiply e4m3 at twice the bf16 rate, and in a QLoRA step with a frozen base
these two matmuls are most of the work (the profile of the 3B default: GEMMs 70 % of CUDA time; the LoRA matmuls are
thin). Only the base matmuls change precision: the LoRA path, the adapter gradients, norms, attention and the loss
stay in the compute dtype, and the weights stay 4-bit in memory (dequantised per use as before, then scaled to e4m3).

Scaling is per row on both sides (what torch._scaled_mm's row-wise mode takes): every token row of x (or of the
output gradient g) and every output row of W (for g W: every input column) gets its own float32 scale amax / 448, so
an outlier token or channel only costs its own row precision. e4m3 keeps 3 mantissa bits: each element is off by at
most 1/16 of its value (relative), the same order as the NF4 grid the weights already sit on; tests bound the effect
on outputs, gradients and the loss of the embedded model (tests/model/test_fp8.py).

A Triton kernel quantises a row in one read of it on CUDA (torch ops would take four passes over a 16k-token
activation); elsewhere the same arithmetic runs as torch ops, and the matmul in float32 on the e4m3 values (tests
compare the kernel with the torch ops, and CUDA's matmul with the float32 one, on a GPU).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
TINY = 1e-12  # amax floor: an all-zero row gets a finite scale and stays zero


def supported_on(capability: tuple[int, int] | None, bf16: bool) -> tuple[bool, str]:
    """Whether FP8 tensor cores run the base matmuls here (for `auto`), and why: a CUDA GPU of compute capability
    capability (None: no GPU) computing in bf16."""
    if capability is None:
        return False, "cpu: no FP8 tensor cores (on forces the emulated path)"
    if not bf16:
        return False, "no bf16 on this GPU (FP8 replaces bf16 matmuls)"
    major, minor = capability
    if (major, minor) < (9, 0):  # row-wise scaled FP8 GEMMs: Hopper (sm_90) and newer
        return False, f"compute capability {major}.{minor} < 9.0"
    return True, f"compute capability {major}.{minor}"


def eligible(in_features: int, out_features: int) -> bool:
    """FP8 GEMMs need both matrix dimensions to be multiples of 16; other layers stay in the compute dtype."""
    return in_features % 16 == 0 and out_features % 16 == 0


def _quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=TINY)
    scale = amax / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


_triton_kernel = None


def _kernel():
    """The Triton row-quantisation kernel, compiled on first use (None without Triton)."""
    global _triton_kernel
    if _triton_kernel is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _triton_kernel = False
            return None

        @triton.jit
        def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n_cols, x_stride, q_stride, BLOCK: tl.constexpr,
                                 ONE_BLOCK: tl.constexpr):  # fmt: skip
            row = tl.program_id(0).to(tl.int64)
            x_row, q_row = x_ptr + row * x_stride, q_ptr + row * q_stride
            if ONE_BLOCK:  # the whole row in registers: one read
                offsets = tl.arange(0, BLOCK)
                mask = offsets < n_cols
                x = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
                scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
                tl.store(q_row + offsets, tl.math.div_rn(x, scale).to(q_ptr.dtype.element_ty), mask=mask)
            else:  # longer rows: amax first, then a second read (from L2) to scale and round
                amax = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    offsets = start + tl.arange(0, BLOCK)
                    x = tl.load(x_row + offsets, mask=offsets < n_cols, other=0.0).to(tl.float32)
                    amax = tl.maximum(amax, tl.abs(x))
                scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
                for start in range(0, n_cols, BLOCK):
                    offsets = start + tl.arange(0, BLOCK)
                    mask = offsets < n_cols
                    x = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
                    # IEEE division (Triton's default fp32 `/` is approximate) and round-to-nearest-even, as torch
                    tl.store(q_row + offsets, tl.math.div_rn(x, scale).to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(scale_ptr + row, scale)

        _triton_kernel = quantize_rows_kernel
    return _triton_kernel or None


ROW_BLOCK = 8192  # longest row the kernel keeps in registers (the 3B's 8192-wide MLP rows: one read)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, cols) -> (e4m3 values, float32 scales (rows, 1)) with x ~= values * scales, row by row."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes a matrix, got shape {tuple(x.shape)}")
    kernel = _kernel() if x.is_cuda else None
    if kernel is None:
        return _quantize_rows_torch(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, cols = x.shape
    values = torch.empty((rows, cols), dtype=E4M3, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(max(next_power_of_2(cols), 128), ROW_BLOCK)
        kernel[(rows,)](
            x, values, scales, cols, x.stride(0), values.stride(0), BLOCK=block, ONE_BLOCK=cols <= block,
            num_warps=max(1, min(16, block // 512)),
        )  # fmt: skip
    return values, scales


def matmul_rows(a: torch.Tensor, a_scale: torch.Tensor, b_rows: torch.Tensor, b_scale: torch.Tensor, out_dtype):
    """a (M, K) e4m3 times b_rows (N, K) e4m3 transposed -> (M, N) in out_dtype; scales (M, 1) and (N, 1).

    CUDA: one row-wise scaled FP8 GEMM (fp32 accumulation). Elsewhere the same product in float32 (e4m3 values and
    their products are exact there): torch's CPU FP8 matmul takes only per-tensor scales in some versions.
    """
    if a.is_cuda:
        return torch._scaled_mm(a, b_rows.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype)
    return ((a.float() @ b_rows.float().t()) * a_scale * b_scale.view(1, -1)).to(out_dtype)


def linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype):
    """x W^T from the quantised rows of x and of W (out, in) (quantize_rows of each)."""
    return matmul_rows(x_q, x_scale, w_q, w_scale, out_dtype)


def input_grad(grad_y: torch.Tensor, wt_q: torch.Tensor, wt_scale: torch.Tensor) -> torch.Tensor:
    """g W (the gradient of x W^T with respect to x), g (tokens, out) dense, W given as the quantised rows of W^T
    (per input column of W: quantize_rows(W.t().contiguous()))."""
    g_q, g_scale = quantize_rows(grad_y)
    return matmul_rows(g_q, g_scale, wt_q, wt_scale, grad_y.dtype)
