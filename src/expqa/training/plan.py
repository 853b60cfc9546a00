"""The run plan: every choice about how training runs, made once, before anything loads.

Device, dtypes, processes and their backend, the attention kernel, the fused LoRA layers, gradient checkpointing
(offload included), FP8 base matmuls and their weight cache. `plan_run` is a pure function of the params, the base
model's config and the machine's facts (`Machine`), so tests plan for a CPU, an 80 GB or a 141 GB GPU, a 24 GB GPU or
2 processes without having them; `machine_facts()` reads this machine's. The trainer prints the plan once, records
it (metrics/train, the adapter's training_config.json) and hands it down: loading, checkpointing and the fused LoRA
layers carry it out and decide nothing themselves.

Memory (`auto` checkpointing, the FP8 weight cache) is planned from the free device memory before loading minus an
estimate of the weights that loading will take (`weight_bytes`: 4-bit linear layers at 0.5 bytes per weight plus
their block scales, the rest in the weights' dtype), against checkpointing's estimate of the activation peak.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from expqa.config import LoRAConfig, QuantizationConfig, TrainingConfig
from expqa.model import checkpointing, fp8
from expqa.model.checkpointing import GIB, Choice, Shape

NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one scale per 64 weights (an 8-bit one with double quantisation)


class PlanError(ValueError):
    """Params this machine cannot run as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Machine:
    """What a plan needs to know about the machine, read once (machine_facts) or written by a test."""

    cuda: bool
    gpus: int  # visible CUDA devices
    capability: tuple[int, int] | None  # of this process's GPU
    bf16: bool  # native bf16: the GPU's, or avx512_bf16 / AMX on a CPU
    memory_bytes: float  # total memory of this process's device (GPU memory, or RAM)
    free_bytes: float  # free on it now, before this run loads anything
    cpu_cores: int
    world_size: int  # processes of this run (WORLD_SIZE inside a launch)


def machine_facts() -> Machine:
    """This machine, as this process sees it (under torchrun: its LOCAL_RANK's GPU)."""
    import torch

    from expqa.model.loading import cpu_has_bf16
    from expqa.training.distributed import cpu_cores, world_size

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        free, total = torch.cuda.mem_get_info(device)
        return Machine(
            cuda=True,
            gpus=torch.cuda.device_count(),
            capability=tuple(torch.cuda.get_device_capability(device)),
            bf16=torch.cuda.is_bf16_supported(),
            memory_bytes=float(total),
            free_bytes=float(free),
            cpu_cores=cpu_cores(),
            world_size=world_size(),
        )
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0]) * 1024
    return Machine(
        cuda=False,
        gpus=0,
        capability=None,
        bf16=cpu_has_bf16(),
        memory_bytes=float(info.get("MemTotal", 0)),
        free_bytes=float(info.get("MemAvailable", info.get("MemFree", 0))),
        cpu_cores=cpu_cores(),
        world_size=world_size(),
    )


@dataclasses.dataclass(frozen=True)
class RunPlan:
    device: str  # cuda | cpu
    weights_dtype: str  # the loaded weights (4-bit layers aside): bfloat16 on a bf16 GPU, else float32
    quant_compute_dtype: str  # what 4-bit layers dequantise to: bnb_4bit_compute_dtype where the hardware has it
    bf16: bool  # bf16 mixed precision (the Trainer's autocast)
    world_size: int
    distributed: str  # none | ddp | fsdp
    backend: str  # nccl | gloo | none
    padding_free: bool  # conversations packed into one row per micro-batch, no padding
    attention: str  # expqa_varlen (document-masked, for packed rows) | sdpa
    fused_lora: bool
    grouped_lora: bool
    checkpointing: Choice  # which decoder layers recompute (under FSDP: FSDP's own, every layer)
    fp8: bool
    fp8_reason: str
    fp8_requested: str
    fp8_cache: bool

    @property
    def model_checkpointing(self) -> bool:
        """The model's own per-layer checkpointing (not FSDP's) recomputes at least one layer."""
        return self.distributed != "fsdp" and bool(self.checkpointing.checkpointed_layers)

    def metrics(self) -> dict:
        """What `auto` settings chose on this machine (metrics/train; the keys earlier runs recorded)."""
        return {
            **self.checkpointing.metrics(),
            "fp8_matmul": "on" if self.fp8 else "off",
            "fp8_matmul_requested": self.fp8_requested,
            "fp8_weight_cache": self.fp8_cache,
        }

    def describe(self) -> list[str]:
        processes = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        if self.distributed != "none":
            processes += f" ({self.distributed}, {self.backend})"
        return [
            f"{self.device}, {processes}, weights {self.weights_dtype}, bf16 autocast {'on' if self.bf16 else 'off'}",
            f"{'padding-free packed rows' if self.padding_free else 'padded rows'}, attention {self.attention}, "
            f"LoRA {'fused, grouped' if self.grouped_lora else 'fused' if self.fused_lora else 'PEFT forward'}",
            self.checkpointing.describe() + (" (FSDP's, every layer)" if self.distributed == "fsdp" else ""),
            f"fp8 matmuls of the frozen base {'on' if self.fp8 else 'off'} ({self.fp8_reason})"
            + (", weights quantised once (cache)" if self.fp8_cache else ""),
        ]


def weight_bytes(config, quant: QuantizationConfig, dtype_bytes: int) -> float:
    """Bytes the frozen base takes once loaded: decoder linear layers in 4-bit (0.5 byte per weight plus a scale
    per NF4_BLOCK weights: 1 byte with double quantisation, else 4) or in the weights' dtype; embeddings, norms and an
    untied head in the weights' dtype."""
    shape = Shape.of(config, lora_rank=0, lora_targets=0, liger=False, fused_lora=False, lora_dropout=0.0)
    h, i = shape.hidden, shape.intermediate
    linear = shape.layers * (h * shape.q_dim + 2 * h * shape.kv_dim + shape.q_dim * h + 3 * h * i)
    embeddings = shape.vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    norms = (2 * shape.layers + 1) * h
    if quant.load_in_4bit:
        per_weight = 0.5 + (1 if quant.bnb_4bit_use_double_quant else 4) / NF4_BLOCK
        return linear * per_weight + (embeddings + norms) * dtype_bytes
    return (linear + embeddings + norms) * dtype_bytes


def lora_parameters(config, lora: LoRAConfig) -> int:
    """Trainable LoRA weights: r x (in + out) per targeted projection and layer."""
    shape = Shape.of(config, lora_rank=0, lora_targets=0, liger=False, fused_lora=False, lora_dropout=0.0)
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    sizes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return shape.layers * sum(lora.r * sum(sizes[t]) for t in lora.target_modules if t in sizes)


def fp8_cache_bytes(config, lora: LoRAConfig) -> float:
    """What the FP8 weight cache holds: each targeted projection's weight in both orientations (1 byte each) plus
    a float32 scale per row of each (fused_lora.fp8_cache_bytes counts the same on a loaded model)."""
    shape = Shape.of(config, lora_rank=0, lora_targets=0, liger=False, fused_lora=False, lora_dropout=0.0)
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    sizes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    per_layer = sum(
        2 * a * b + 4 * (a + b)
        for t in lora.target_modules
        if t in sizes and fp8.eligible(*sizes[t])
        for a, b in [sizes[t]]
    )
    return shape.layers * per_layer


def plan_run(
    train: TrainingConfig, lora: LoRAConfig, quant: QuantizationConfig, model_config, machine: Machine
) -> RunPlan:
    """Decide once, in order: device and dtypes, processes, batching and attention, checkpointing (which may need
    to give way to the processes: offload is one process only), then FP8 (auto stays off under offload, the
    memory-first setting) and its weight cache (only where `auto` checkpointing measured room for it)."""
    device = "cuda" if machine.cuda else "cpu"
    bf16 = train.bf16 and machine.bf16
    weights_dtype = "bfloat16" if machine.cuda and bf16 else "float32"
    quant_compute_dtype = quant.bnb_4bit_compute_dtype
    if quant_compute_dtype == "bfloat16" and not machine.bf16:
        quant_compute_dtype = "float16" if machine.cuda else "float32"
    distributed = "fsdp" if train.distributed == "fsdp" else "ddp" if machine.world_size > 1 else "none"
    backend = "none" if distributed == "none" else "nccl" if machine.cuda else "gloo"
    padding_free = train.padding_free or train.tokens_per_micro_batch > 0  # a token budget always packs
    fused = train.fused_lora != "off"

    shape = Shape.of(
        model_config,
        lora_rank=lora.r,
        lora_targets=len(lora.target_modules),
        activation_bytes=2 if bf16 else 4,
        liger=train.use_liger_kernel,
        fused_lora=fused,
        lora_dropout=lora.dropout,
    )
    tokens = checkpointing.longest_micro_batch(
        train.tokens_per_micro_batch, train.per_device_train_batch_size, train.max_seq_length
    )
    # the LoRA weights' gradients and AdamW's two moments, float32
    static = 3.0 * 4 * lora_parameters(model_config, lora)
    resident = weight_bytes(model_config, quant, 2 if weights_dtype == "bfloat16" else 4)
    requested = train.gradient_checkpointing
    one_process = machine.world_size == 1 and distributed != "fsdp"
    if requested == "offload" and not one_process:
        raise PlanError(
            f"train.gradient_checkpointing offload runs in one process ({machine.world_size} here"
            f"{', FSDP' if distributed == 'fsdp' else ''}): a reentrant checkpoint does not mix with DDP/FSDP's "
            "gradient hooks; use full, or train.num_processes: 1"
        )
    available = None
    if requested == "auto":
        headroom = max(checkpointing.HEADROOM_MIN, checkpointing.HEADROOM_FRACTION * machine.memory_bytes)
        available = machine.free_bytes - resident - headroom
    choice = checkpointing.choose(
        requested,
        shape,
        tokens,
        available_bytes=available,
        static_bytes=static,
        resident_bytes=resident if requested == "auto" else 0.0,
        offload_allowed=one_process,
    )
    if distributed == "fsdp" and requested != "off":  # FSDP checkpoints through its own wrapper, every layer
        choice = dataclasses.replace(choice, mode="full", checkpointed_layers=list(range(choice.layers)))

    if not fused:
        use_fp8, why = False, "train.fused_lora: off"
    elif train.fp8_matmul == "off":
        use_fp8, why = False, "train.fp8_matmul: off"
    elif train.fp8_matmul == "on":
        use_fp8, why = True, "train.fp8_matmul: on"
    elif choice.mode == "offload":
        use_fp8, why = False, "auto: checkpointing offload saves memory first"
    else:
        use_fp8, why = fp8.supported_on(machine.capability, bf16)
        why = f"auto: {why}"
    cache = (  # only where `auto` measured room for it beside the estimated peak; never sharded away by FSDP
        use_fp8
        and requested == "auto"
        and choice.mode == "off"
        and distributed != "fsdp"
        and choice.available_gib - choice.estimate_gib >= fp8_cache_bytes(model_config, lora) / GIB
    )
    return RunPlan(
        device=device,
        weights_dtype=weights_dtype,
        quant_compute_dtype=quant_compute_dtype,
        bf16=bf16,
        world_size=machine.world_size,
        distributed=distributed,
        backend=backend,
        padding_free=padding_free,
        attention="expqa_varlen" if padding_free else "sdpa",
        fused_lora=fused,
        grouped_lora=train.fused_lora == "grouped",
        checkpointing=choice,
        fp8=use_fp8,
        fp8_reason=why,
        fp8_requested=train.fp8_matmul,
        fp8_cache=bool(cache),
    )
