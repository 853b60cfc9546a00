"""Gradient checkpointing as a choice made from memory: off, selective (some layers) or full (every layer).

`train.gradient_checkpointing`:
- off: every decoder layer keeps its activations for backward: the fastest (4N FLOPs per token for a frozen base
  instead of 6N), and the most memory (~2.5 MB per token on the Llama-3.2-3B shape in bf16);
- full: every layer keeps only its input and recomputes its forward in backward (~6 KB per token and layer);
- selective: the first half of the layers are checkpointed: about half the memory and half the recompute of full,
  the same on every card;
- offload: full, and each layer's input waits for backward in pinned host memory instead of on the GPU (copied out
  on a side stream while the next layer runs, copied back when backward reaches the layer): what stays on the GPU
  is the weights and one layer's recompute. The lean setting, in the way Unsloth's checkpointing saves memory;
  one process only (it is a reentrant checkpoint, which DDP/FSDP do not handle);
- auto: planned (expqa.training.plan): the device's free memory minus the weights loading will take and a headroom,
  against an estimate of the peak for the longest micro-batch (the token budget, or conversations x
  max_seq_length); off when it fits, else the fewest checkpointed layers that fit, else full, else offload (one
  process only; with several, full).
Checkpointed layers are always the first k: backward reaches them last, when the other layers' activations are
freed already, so recomputing one of them adds nothing to the peak (a checkpointed top layer would be recomputed
while every layer below still holds its activations).
The maths is the same in every mode (tests/model/test_checkpointing.py): only speed and memory differ.

Why whole layers: recomputing a region costs its matmuls, and per byte of activations dropped the regions of a
Llama layer cost about the same (MLP: 151 MFLOP per token for 27.6k saved values, ~5.5k FLOP each; attention block:
50 MFLOP + attention for 11.3k values, ~4.4k; whole layer: 201 MFLOP for 39k values, ~5.2k, 3B shape), so the lever
that matters is *how much* is recomputed, and layer granularity lets `auto` drop just as many bytes as the card
needs (1/28 steps on the 3B shape) with PyTorch's own checkpointing (transformers' per-layer flag), no custom code
in the layer.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from expqa.config import CHECKPOINTING_MODES as MODES

log = logging.getLogger("expqa.train")
GIB = 2**30
# kept free for the CUDA context, allocator fragmentation and transient buffers: a share of the card, at least 2 GiB
HEADROOM_FRACTION = 0.10
HEADROOM_MIN = 2 * GIB
# the estimate below counts the tensors autograd keeps; what it misses (allocator rounding, small buffers) was 7 % on
# the 3B shape with checkpointing off (45 GiB measured, benchmarks/results/gpu_train_2026-11-25_*)
CALIBRATION = 1.10


@dataclasses.dataclass
class Shape:
    """What the memory estimate needs to know about the model and the run."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    lora_rank: int
    lora_targets: int
    liger: bool
    fused_lora: bool
    lora_dropout: float
    activation_bytes: int = 2  # bf16; float32 where the run does not compute in bf16

    @classmethod
    def of(cls, config, **run) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            q_dim=heads * head_dim,
            kv_dim=getattr(config, "num_key_value_heads", heads) * head_dim,
            vocab=config.vocab_size,
            **run,
        )

    def layer_bytes(self) -> float:
        """Bytes per token one decoder layer keeps for backward without checkpointing."""
        s, h, i = self.activation_bytes, self.hidden, self.intermediate
        # residual inputs of both norms and their outputs (the projections' input), q, k, v, attention output,
        # gate, up and the SwiGLU product (Liger's kernels keep no more; the fused LoRA function keeps x once per
        # group and the rank-r activations); fp32 norm statistics and attention log-sum-exp are a few bytes
        values = 4 * h + 2 * self.q_dim + 2 * self.kv_dim + 3 * i + self.lora_targets * self.lora_rank
        extra = 0.0
        if not self.liger:  # eager RMSNorm keeps an fp32 copy and its output; eager SiLU keeps one more i-vector
            extra += 2 * (4 * h + s * h) + s * i
        if not self.fused_lora:  # PEFT's forward keeps the dropout output and the rank activations per projection
            extra += s * (4 * h + i)
        if self.lora_dropout > 0:  # a dropped-out copy (PEFT) or a 1-byte mask (fused) of each projection's input
            extra += (s if not self.fused_lora else 1) * (5 * h + i)
        return s * values + extra

    def checkpointed_layer_bytes(self, offload: bool = False) -> float:
        """Bytes per token a checkpointed layer keeps on the device: its input (none when offloaded)."""
        return 0.0 if offload else self.activation_bytes * self.hidden

    def other_bytes(self) -> float:
        """Per token, outside the layers: embeddings, final norm, loss, and backward's transient gradients."""
        s, h = self.activation_bytes, self.hidden
        loss = (4 + 2 * s) * h if self.liger else (s + 8) * self.vocab  # Liger: chunked; else full fp32 logits
        return 2 * s * h + loss + 2 * s * self.intermediate

    def peak_bytes(self, tokens: int, checkpointed: int, offload: bool = False) -> float:
        """Estimated activation peak of one micro-batch with `checkpointed` of the layers checkpointed."""
        full, kept = self.layer_bytes(), checkpointed * self.checkpointed_layer_bytes(offload)
        # the checkpointed layers are the first ones: backward reaches them after the others freed their activations,
        # so the peak is either the start of backward or the recompute of one checkpointed layer
        layers = max((self.layers - checkpointed) * full, full if checkpointed else 0.0)
        return CALIBRATION * tokens * (layers + kept + self.other_bytes())


@dataclasses.dataclass
class Choice:
    requested: str
    mode: str  # off | selective | full | offload
    checkpointed_layers: list[int]
    layers: int
    tokens: int
    estimate_gib: float | None = None  # estimated peak of the choice (weights included)
    available_gib: float | None = None  # free for training after the model was loaded, headroom taken off

    def metrics(self) -> dict:
        return {
            "gradient_checkpointing": self.mode,
            "gradient_checkpointing_requested": self.requested,
            "gradient_checkpointing_layers": len(self.checkpointed_layers),
            "gradient_checkpointing_estimate_gib": self.estimate_gib,
            "gradient_checkpointing_available_gib": self.available_gib,
        }

    def describe(self) -> str:
        text = f"gradient checkpointing {self.mode}: {len(self.checkpointed_layers)} of {self.layers} layers"
        if self.requested == "auto":
            text += (
                f" (auto: estimated peak {self.estimate_gib:.1f} GiB for {self.tokens:,}-token micro-batches, "
                f"{self.available_gib:.1f} GiB available after the headroom)"
            )
        return text


def choose(
    requested: str,
    shape: Shape,
    tokens: int,
    *,
    available_bytes: float | None = None,
    static_bytes: float = 0.0,
    resident_bytes: float = 0.0,
    offload_allowed: bool = True,
) -> Choice:
    """The checkpointing for a run; `available_bytes` (free device memory, the weights and a headroom taken off)
    only for auto.

    static_bytes: what training adds besides activations (LoRA gradients, optimizer state); resident_bytes: the
    weights, only for the reported estimate. offload_allowed: one process (auto never picks offload for several:
    full, however far its estimate is over).
    """
    if requested not in MODES:
        raise ValueError(f"gradient checkpointing mode {requested!r}; allowed: {', '.join(MODES)}")
    n = shape.layers
    fixed = {"off": 0, "full": n, "selective": n // 2, "offload": n}
    offload = requested == "offload"
    if requested in fixed:
        count = fixed[requested]
    else:
        if available_bytes is None:
            raise ValueError("gradient_checkpointing: auto needs the available memory")
        count = next((k for k in range(n + 1) if shape.peak_bytes(tokens, k) + static_bytes <= available_bytes), n)
        offload = offload_allowed and shape.peak_bytes(tokens, n) + static_bytes > available_bytes  # not even full
    layers = list(range(count))  # the first ones: see Shape.peak_bytes
    mode = "offload" if offload else "off" if count == 0 else "full" if count == n else "selective"
    estimate = (shape.peak_bytes(tokens, count, offload) + static_bytes + resident_bytes) / GIB
    return Choice(
        requested,
        mode,
        layers,
        n,
        tokens,
        round(estimate, 2),
        None if available_bytes is None else round(available_bytes / GIB, 2),
    )


def decoder_layers(model) -> list:
    """The model's decoder layers in order (transformers' GradientCheckpointingLayer instances)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply(model, choice: Choice) -> None:
    """Checkpoint exactly the chosen layers of a model loaded with checkpointing enabled (load_for_training does
    that when the plan checkpoints any layer)."""
    layers = decoder_layers(model)
    if len(layers) != choice.layers:
        raise ValueError(f"the model has {len(layers)} decoder layers, the choice was made for {choice.layers}")
    chosen = set(choice.checkpointed_layers)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
        if choice.mode == "offload":
            layer._gradient_checkpointing_func = offloaded_checkpoint


def longest_micro_batch(tokens_per_micro_batch: int, conversations: int, max_seq_length: int) -> int:
    """Tokens in the largest micro-batch a run can see: the token budget, else conversations x max_seq_length."""
    return tokens_per_micro_batch if tokens_per_micro_batch > 0 else conversations * max_seq_length


# ---------------------------------------------------------------------------------------------------------------
# offload: a reentrant checkpoint whose saved input lives in host memory


def offloaded_checkpoint(run, hidden, *args):
    """transformers calls a checkpointed layer as func(partial(layer.forward, **kwargs), hidden_states)."""
    if torch.is_grad_enabled() and not hidden.requires_grad:
        # a reentrant checkpoint is differentiated through its tensor inputs only: the LoRA weights inside would
        # silently get no gradient (load_for_training makes the embeddings' output require grad for this)
        raise RuntimeError("gradient_checkpointing offload needs the layer input to require grad")
    return OffloadedLayer.apply(run, hidden, *args)


_copy_streams: dict = {}


class OffloadedLayer(torch.autograd.Function):
    """Forward without keeping anything but the input, which goes to pinned host memory on a side stream (the
    next layer's forward overlaps the copy); backward copies it back, recomputes the layer with the same RNG and
    autocast state, and differentiates through it (LoRA weight gradients accumulate as in any reentrant checkpoint)."""

    @staticmethod
    def forward(ctx, run, hidden, *args):
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        device_type = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        with torch.no_grad():
            out = run(hidden, *args)
        if hidden.is_cuda:
            stream = _copy_streams.setdefault(hidden.device, torch.cuda.Stream(hidden.device))
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
            hidden.record_stream(stream)  # its memory is not reused before the copy has read it
            ctx.copied = stream.record_event()
            ctx.stored = host
        else:  # on the CPU there is nowhere else to keep it: the same maths, for the tests
            ctx.copied, ctx.stored = None, hidden.detach()
        return out

    @staticmethod
    def backward(ctx, *grads):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
            hidden = ctx.stored.to(ctx.device, non_blocking=True)
        else:
            hidden = ctx.stored
        hidden = hidden.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        others = len(ctx.args)
        ctx.stored = ctx.run = ctx.args = None
        return (None, hidden.grad, *([None] * others))
