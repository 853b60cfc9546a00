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

Projections that read the same input (q/k/v, gate/up) run as one group (`LoRAGroupFunction`, dropout 0): the input
is read once for all their adapters (one thin matmul into the concatenated ranks, x [A_q; A_k; A_v]^T), and in
backward every base matmul and the concatenated adapter term accumulate into one buffer for x's gradient (no
autograd sums of three full-size gradients), with one matmul for all A gradients. The first projection of a group
that is called computes the whole group; its siblings, called next with the same input tensor, take their outputs
(`ProjectionGroup`), so the model's own attention/MLP forward is left as it is.

Same maths as PEFT (tests/model/test_fused_lora.py compares outputs and gradients); `patch_lora_layers` swaps the
forward of plain LoRA layers on nn.Linear or bitsandbytes Linear4bit bases and leaves every other case to PEFT.
"""

from __future__ import annotations

import types

import torch

from expqa.model import fp8 as fp8_ops


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


def fp8_weight(base: torch.nn.Module, dtype: torch.dtype, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen weight as quantised rows for an FP8 matmul: of W (forward) or of W^T (x's gradient), from the
    frozen weight in `dtype`, the dtype the forward computes in. With a cache (cache_fp8_weights) both orientations
    are quantised at the first use in a dtype and kept: the same function on the same values as per use, so the
    same numbers (a cache filled ahead in the weights' own dtype differed from per use wherever the model computes in
    another one: float32 weights under bf16 autocast, the CPU profile on an avx512_bf16 CPU)."""
    cache = getattr(base, "_expqa_fp8_cache", None)
    if cache is None:
        weight = dense_weight(base, dtype)
        return fp8_ops.quantize_rows(weight.t().contiguous() if transposed else weight)
    if cache.get("dtype") != dtype:
        cache.clear()  # the old dtype's copy first: never two copies at once
        weight = dense_weight(base, dtype)
        cache.update(rows=(fp8_ops.quantize_rows(weight), fp8_ops.quantize_rows(weight.t().contiguous())), dtype=dtype)
        del weight
    return cache["rows"][transposed]


def fp8_layers(model) -> list:
    """The base layers whose matmuls run in FP8 (patch_lora_layers with fp8=True)."""
    return [m.get_base_layer() for m in model.modules() if getattr(m, "_expqa_fp8", False)]


def fp8_cache_bytes(model) -> int:
    """What cache_fp8_weights would hold: one byte per weight for each orientation, plus the scales."""
    return sum(2 * b.in_features * b.out_features + 4 * (b.in_features + b.out_features) for b in fp8_layers(model))


def cache_fp8_weights(model) -> int:
    """Keep every FP8 layer's frozen weight quantised, both orientations, instead of dequantising the 4-bit weight and
    quantising it again in every forward and backward (the trainer does this only when memory is plentiful: ~2 bytes
    per base weight). Filled at each layer's first use (fp8_weight). Returns the bytes it will hold."""
    for base in fp8_layers(model):
        base._expqa_fp8_cache = {}
    return fp8_cache_bytes(model)


def dropout_with_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x), keep mask); one fused kernel. A function of its own so tests can fix the mask."""
    return torch.native_dropout(x, p, True)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, base, scale, p, dtype, fp8=False):
        ctx.device_type = x.device.type
        with torch.autocast(ctx.device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            if fp8:
                y = fp8_ops.linear(*fp8_ops.quantize_rows(x2), *fp8_weight(base, dtype, False), dtype)
            else:
                weight = dense_weight(base, dtype)
                y = x2 @ weight.t()
                del weight
            if base.bias is not None:
                y += base.bias.to(dtype)
            mask = None
            if p > 0:
                dropped, mask = dropout_with_mask(x2, p)
                h = dropped @ a.t()
                del dropped
            else:
                h = x2 @ a.t()
            y.addmm_(h, b.t(), alpha=scale)
        ctx.base, ctx.scale, ctx.p, ctx.dtype, ctx.x_dtype, ctx.x_shape = base, scale, p, dtype, x.dtype, x.shape
        ctx.fp8 = fp8
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
                if ctx.fp8:
                    grad_x = fp8_ops.input_grad(gy, *fp8_weight(ctx.base, dtype, True))
                else:
                    grad_x = gy @ dense_weight(ctx.base, dtype)
                if mask is None:
                    grad_x.addmm_(grad_h, a)
                else:
                    grad_x += torch.ops.aten.native_dropout_backward(grad_h @ a, mask, keep_scale)
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_a.to(lora_A.dtype), grad_b.to(lora_B.dtype), None, None, None, None, None


class LoRAGroupFunction(torch.autograd.Function):
    """y_i = x W_i^T + scale_i (x A_i^T) B_i^T for sibling projections i of one input x, dropout 0.

    Arguments after `fp8`: the adapters' A weights, then their B weights, in `bases` order; returns one output per
    projection. Saved for backward: x (once), the concatenated rank activations h and the adapter weights. With fp8
    the base matmuls run in FP8 (expqa.model.fp8), x quantised once for all of them.
    """

    @staticmethod
    def forward(ctx, x, bases, scales, dtype, fp8, *adapters):
        count = len(bases)
        lora_as, lora_bs = adapters[:count], adapters[count:]
        ctx.device_type = x.device.type
        with torch.autocast(ctx.device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            h = x2 @ torch.cat([a.to(dtype) for a in lora_as]).t()  # (tokens, sum of ranks): one read of x
            x_q = fp8_ops.quantize_rows(x2) if fp8 else None
            outputs, start = [], 0
            for base, lora_b, scale in zip(bases, lora_bs, scales):
                if fp8:
                    y = fp8_ops.linear(*x_q, *fp8_weight(base, dtype, False), dtype)
                else:
                    weight = dense_weight(base, dtype)
                    y = x2 @ weight.t()
                    del weight
                if base.bias is not None:
                    y += base.bias.to(dtype)
                rank = lora_b.shape[1]
                y.addmm_(h[:, start : start + rank], lora_b.to(dtype).t(), alpha=scale)
                start += rank
                outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.bases, ctx.scales, ctx.dtype, ctx.x_dtype, ctx.x_shape = bases, scales, dtype, x.dtype, x.shape
        ctx.fp8 = fp8
        ctx.save_for_backward(x, h, *adapters)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_ys):
        x, h, *adapters = ctx.saved_tensors
        count, dtype = len(ctx.bases), ctx.dtype
        lora_as, lora_bs = adapters[:count], adapters[count:]
        with torch.autocast(ctx.device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            gys = [g.reshape(-1, g.shape[-1]).to(dtype) for g in grad_ys]
            bs = [b.to(dtype) for b in lora_bs]
            grad_h = torch.cat([(gy @ b).mul_(scale) for gy, b, scale in zip(gys, bs, ctx.scales)], dim=1)
            grad_bs, start = [], 0
            for gy, b, scale, lora_b in zip(gys, bs, ctx.scales, lora_bs):
                grad_bs.append((gy.t() @ h[:, start : start + b.shape[1]]).mul_(scale).to(lora_b.dtype))
                start += b.shape[1]
            grad_a = grad_h.t() @ x2  # all A gradients in one matmul: one read of x
            grad_as, start = [], 0
            for lora_a in lora_as:
                grad_as.append(grad_a[start : start + lora_a.shape[0]].to(lora_a.dtype))
                start += lora_a.shape[0]
            grad_x = None
            if ctx.needs_input_grad[0]:
                for gy, base in zip(gys, ctx.bases):  # base matmuls accumulate in place into one buffer
                    if ctx.fp8 and (grad_x is None or base.out_features >= base.in_features):
                        # a scaled FP8 matmul cannot accumulate into its output: a sibling adds its part. For narrow
                        # ones (k/v: 1024 of 3072) the bf16 matmul accumulating in place is faster than FP8 + the
                        # add (benchmarks/fp8_matmul.py on an H200), so they stay bf16
                        part = fp8_ops.input_grad(gy, *fp8_weight(base, dtype, True))
                        grad_x = part if grad_x is None else grad_x.add_(part)
                        del part
                    else:
                        weight = dense_weight(base, dtype)
                        grad_x = gy @ weight if grad_x is None else grad_x.addmm_(gy, weight)
                        del weight
                grad_x.addmm_(grad_h, torch.cat([a.to(dtype) for a in lora_as]))
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None, None, None, None, *grad_as, *grad_bs)


def compute_dtype(module, x: torch.Tensor) -> torch.dtype:
    """What PEFT/bitsandbytes would multiply in: the autocast dtype, else the 4-bit compute dtype, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return getattr(module.get_base_layer(), "compute_dtype", None) or x.dtype


def single_adapter(layer) -> str | None:
    """The name of the one plain adapter this LoRA layer runs, or None when PEFT's own forward must run it."""
    adapters = layer.active_adapters
    if (
        layer.disable_adapters
        or layer.merged
        or len(adapters) != 1
        or adapters[0] not in layer.lora_A
        or adapters[0] in getattr(layer, "lora_variant", {})
    ):
        return None
    return adapters[0]


def dropout_p(layer, name: str) -> float:
    dropout = layer.lora_dropout[name]
    return dropout.p if isinstance(dropout, torch.nn.Dropout) and layer.training else 0.0


class ProjectionGroup:
    """Patched LoRA layers of one module that read the same input: q/k/v of an attention block, gate/up of an MLP.

    The first member called with an input x computes every member's output in one LoRAGroupFunction; the others,
    called next with the same tensor (the model's forward hands all of them one `hidden_states`), get theirs from
    `pending`. A member called with any other input, or a group that cannot run fused (dropout > 0, another
    adapter setup), computes alone, so the result never depends on the call order.
    """

    def __init__(self, members: list):
        self.members = members
        self.pending_input = None
        self.pending: dict[int, torch.Tensor] = {}

    def output(self, layer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if self.pending_input is x and id(layer) in self.pending:
            y = self.pending.pop(id(layer))
            if not self.pending:
                self.pending_input = None
            return y
        names = [single_adapter(m) for m in self.members]
        if None in names or any(dropout_p(m, n) > 0 for m, n in zip(self.members, names)):
            return None
        outputs = LoRAGroupFunction.apply(
            x,
            [m.get_base_layer() for m in self.members],
            [m.scaling[n] for m, n in zip(self.members, names)],
            dtype,
            all(m._expqa_fp8 for m in self.members),
            *[m.lora_A[n].weight for m, n in zip(self.members, names)],
            *[m.lora_B[n].weight for m, n in zip(self.members, names)],
        )
        self.pending_input = x
        self.pending = {id(m): y for m, y in zip(self.members, outputs) if m is not layer}
        return outputs[self.members.index(layer)]


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replacement forward of a PEFT LoRA layer; anything but one plain adapter goes to PEFT's own forward."""
    name = None if args or kwargs else single_adapter(self)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    dtype = compute_dtype(self, x)
    group = getattr(self, "_expqa_group", None)
    y = group.output(self, x, dtype) if group is not None else None
    if y is None:
        y = LoRALinearFunction.apply(
            x,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.get_base_layer(),
            self.scaling[name],
            dropout_p(self, name),
            dtype,
            self._expqa_fp8,
        )
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


# projections that read the same input, by attribute name within their parent module (Llama, Mistral, Qwen, ...)
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def patch_lora_layers(model, *, grouped: bool, fp8: bool) -> int:
    """Give every plain LoRA layer (nn.Linear or bnb Linear4bit base, frozen) the fused forward; returns how many.

    grouped: also make sibling projections that share an input one ProjectionGroup each (PROJECTION_GROUPS).
    fp8: the base matmuls of layers whose dimensions allow it run in FP8 (expqa.model.fp8; the run plan decides).
    """
    from peft.tuners.lora import LoraLayer

    patched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, "_peft_forward"):
            continue
        base = module.get_base_layer()
        if base.weight.requires_grad or not (isinstance(base, torch.nn.Linear) or type(base).__name__ == "Linear4bit"):
            continue
        module._peft_forward = module.forward
        module._expqa_fp8 = fp8 and fp8_ops.eligible(base.in_features, base.out_features)
        module.forward = types.MethodType(fused_forward, module)
        patched += 1
    if grouped:
        group_projections(model)
    return patched


def group_projections(model) -> int:
    """ProjectionGroups for the patched sibling projections of every module; returns how many groups."""
    groups = 0
    for module in model.modules():
        children = dict(module.named_children())
        for names in PROJECTION_GROUPS:
            members = [children[n] for n in names if hasattr(children.get(n), "_peft_forward")]
            if len(members) < 2 or len({m.get_base_layer().in_features for m in members}) != 1:
                continue
            group = ProjectionGroup(members)
            for member in members:
                member._expqa_group = group
            groups += 1
    return groups
