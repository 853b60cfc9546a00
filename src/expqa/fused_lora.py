"""LoRA layers in one autograd function: y = x W^T + scale * dropout(x) A^T B^T, forward and backward by hand.

PEFT's LoRA forward is written for every case (merged, mixed adapters, DoRA, ...) and costs, per projection, a
defensive copy of the 4-bit output, a separate `* scale` and `+` over the whole (tokens x out) output, casts of the
adapter weights, and in backward one more full-size multiply plus the sums autograd builds for x's gradient. On a
GPU those memory-bound kernels and their launches took ~30 % of a QLoRA step (benchmarks/results). Here:
- forward: one matmul for the frozen weight, one thin matmul into rank r, and the LoRA term added inside the second
  thin matmul's epilogue (addmm_, alpha = scale): no extra passes over the output;
- backward: x's gradient is the base matmul with the LoRA term accumulated in place (addmm_), the adapter
  gradients are thin matmuls; the 4-bit weight is dequantised again instead of being kept (as bitsandbytes does);
- dropout 0 skips the mask entirely; dropout > 0 keeps a 1-byte mask instead of the dropped-out activations.

Same maths as PEFT (tests/test_fused_lora.py compares outputs and gradients); `patch_lora_layers` swaps the
forward of plain LoRA layers on nn.Linear or bitsandbytes Linear4bit bases and leaves every other case to PEFT.
"""

from __future__ import annotations

import types

import torch


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight (out, in) in `dtype`; 4-bit weights are dequantised (a transient copy)."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:  # FSDP2 gathers a packed 4-bit weight into a plain tensor; the state stays on the layer
        quant_state = getattr(base, "quant_state", None)
    if quant_state is not None or type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)
    return weight.to(dtype)


def dropout_with_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x), keep mask); one fused kernel. A function of its own so tests can fix the mask."""
    return torch.native_dropout(x, p, True)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, base, scale, p, dtype):
        ctx.device_type = x.device.type
        with torch.autocast(ctx.device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            weight, a, b = dense_weight(base, dtype), lora_A.to(dtype), lora_B.to(dtype)
            y = x2 @ weight.t()
            if base.bias is not None:
                y += base.bias.to(dtype)
            del weight
            mask = None
            if p > 0:
                dropped, mask = dropout_with_mask(x2, p)
                h = dropped @ a.t()
                del dropped
            else:
                h = x2 @ a.t()
            y.addmm_(h, b.t(), alpha=scale)
        ctx.base, ctx.scale, ctx.p, ctx.dtype, ctx.x_dtype, ctx.x_shape = base, scale, p, dtype, x.dtype, x.shape
        ctx.save_for_backward(x, mask, h, lora_A, lora_B)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, mask, h, lora_A, lora_B = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        with torch.autocast(ctx.device_type, enabled=False):
            gy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            grad_h = (gy @ b).mul_(scale)  # (tokens, r)
            grad_b = (gy.t() @ h).mul_(scale)  # (out, r)
            keep_scale = 1.0 / (1.0 - ctx.p)
            # masked scaling through aten's dropout-backward kernel: one vectorised pass (a bf16 x bool multiply
            # falls back to a slow mixed-dtype kernel)
            grad_a = grad_h.t() @ (x2 if mask is None else torch.ops.aten.native_dropout_backward(x2, mask, keep_scale))
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = gy @ dense_weight(ctx.base, dtype)
                if mask is None:
                    grad_x.addmm_(grad_h, a)
                else:
                    grad_x += torch.ops.aten.native_dropout_backward(grad_h @ a, mask, keep_scale)
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_a.to(lora_A.dtype), grad_b.to(lora_B.dtype), None, None, None, None


def compute_dtype(module, x: torch.Tensor) -> torch.dtype:
    """What PEFT/bitsandbytes would multiply in: the autocast dtype, else the 4-bit compute dtype, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return getattr(module.get_base_layer(), "compute_dtype", None) or x.dtype


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replacement forward of a PEFT LoRA layer; anything but one plain adapter goes to PEFT's own forward."""
    adapters = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] not in self.lora_A or adapters[0] in getattr(self, "lora_variant", {})):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    dtype = compute_dtype(self, x)
    y = LoRALinearFunction.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(),
                                 self.scaling[name], p, dtype)
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def patch_lora_layers(model) -> int:
    """Give every plain LoRA layer (nn.Linear or bnb Linear4bit base, frozen) the fused forward; returns how many."""
    from peft.tuners.lora import LoraLayer

    patched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, "_peft_forward"):
            continue
        base = module.get_base_layer()
        if base.weight.requires_grad or not (isinstance(base, torch.nn.Linear) or type(base).__name__ == "Linear4bit"):
            continue
        module._peft_forward = module.forward
        module.forward = types.MethodType(fused_forward, module)
        patched += 1
    return patched
