"""Loading the base model for training (4-bit QLoRA or plain LoRA) and for inference, on CUDA or CPU."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from expqa.config import LoRAConfig, QuantizationConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (avx512_bf16 / AMX); elsewhere bf16 autocast is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def disable_bnb_cpu_repack(model) -> int:
    """Guard against bitsandbytes 0.50 silently dropping LoRA gradients on CPU.

    On CPUs with avx512_bf16 a Linear4bit that runs an eval/generate forward repacks its weight into a CPU-only
    layout; backprop through that layout has no autograd kernel and LoRA gradients become 0 or wrong, with no
    error. Turning the repack off before any forward keeps gradients exact. Returns the number of layers guarded.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def check_target_modules(model, targets: list[str]) -> None:
    """Every LoRA target must name linear layers of this model; say which names exist otherwise."""
    linear_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit"
    }
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise ValueError(
            f"lora.target_modules: {', '.join(missing)} not found in this model; its linear "
            f"layers are: {', '.join(sorted(linear_names))}"
        )


def quantization_config(quant: QuantizationConfig, compute_dtype: str):
    """bitsandbytes' 4-bit config; compute_dtype: what the 4-bit layers dequantise to (the run plan's: params'
    bnb_4bit_compute_dtype where the hardware has it)."""
    from transformers import BitsAndBytesConfig

    compute = DTYPES[compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (expqa.model.checkpointing.apply then picks
    which), by transformers' current name: newer versions (5.24) renamed gradient_checkpointing_enable to
    activation_checkpointing_enable and the old name prints a FutureWarning on every run; 5.18 has the old one only."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_for_training(base_dir: str | Path, quant: QuantizationConfig, lora: LoRAConfig, plan):
    """The frozen base (4-bit or full precision) with fresh LoRA adapters, as the run plan (expqa.training.plan)
    says: device, weights' dtype, attention kernel, checkpointing enabled only when it checkpoints a layer of the
    model's own (expqa.model.checkpointing.apply then picks them), fused (grouped) LoRA layers and FP8 base matmuls.
    Returns (peft_model, tokenizer)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[plan.weights_dtype]
    if plan.attention == "expqa_varlen":
        from expqa.model.attention import register

        register()
    kwargs = dict(dtype=dtype, attn_implementation=plan.attention, use_safetensors=True, trust_remote_code=False)
    if quant.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(quant, plan.quant_compute_dtype)
    if plan.device == "cuda":
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_target_modules(model, lora.target_modules)
    if quant.load_in_4bit:
        disable_bnb_cpu_repack(model)
    recompute = plan.model_checkpointing
    if quant.load_in_4bit and dtype is torch.float32:
        # checkpointing enabled here, not by peft: peft calls it by its deprecated name (enable_checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if recompute:
            enable_checkpointing(model)
    else:
        # bf16 4-bit skips prepare_model_for_kbit_training's upcast of norms and embeddings to float32: those
        # weights are bf16 values already, RMSNorm computes in float32 inside, and an fp32 residual stream doubles
        # the activations that gradient checkpointing keeps (measured on the 3B shape, see benchmarks/results).
        for param in model.parameters():
            param.requires_grad_(False)  # get_peft_model does this too; frozen before the hooks below
        if recompute:
            enable_checkpointing(model)
            model.enable_input_require_grads()
    model.config.use_cache = False
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_config)
    if plan.fused_lora:
        from expqa.model.fused_lora import patch_lora_layers

        patch_lora_layers(model, grouped=plan.grouped_lora, fp8=plan.fp8)
    return model, tokenizer


def load_for_inference(model_dir: str | Path, adapter_dir: str | Path | None = None, dtype=None):
    """A full-precision model (optionally with an adapter applied, unmerged) in eval mode, and its tokenizer.

    The tokenizer (and so the chat template) comes from the adapter when given: it is the one training used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False, device_map={"": 0} if cuda else None
    )
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer
