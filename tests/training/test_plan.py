"""expqa.training.plan: every choice about how training runs, decided once from params + model config + machine
facts, for machines this one is not (a CPU, an 80 GB and a 141 GB GPU, a 24 GB GPU, 2 processes)."""

import dataclasses

import pytest

from expqa.config import load_params
from expqa.model.checkpointing import GIB
from expqa.training.plan import Machine, PlanError, fp8_cache_bytes, plan_run, weight_bytes
from helpers import REPO, llama_config

GPU = load_params(REPO / "params.yaml").resolve(cuda=True)  # the shipped GPU profile (Llama 3.2 3B recipe)
CPU = load_params(REPO / "params.yaml").resolve(cuda=False)
LLAMA_3B = llama_config("llama-3.2-3b")


def gpu(total_gib: float, capability=(9, 0), world_size=1, bf16=True) -> Machine:
    # a CUDA context and nothing else: 0.5 GiB of the card in use before loading
    return Machine(True, max(world_size, 1), capability, bf16, total_gib * GIB, (total_gib - 0.5) * GIB, 16, world_size)


CPU_MACHINE = Machine(False, 0, None, False, 24 * GIB, 20 * GIB, 2, 2)


def plan(params, machine, config=LLAMA_3B, **train):
    return plan_run(dataclasses.replace(params.train, **train), params.lora, params.quantization, config, machine)


def test_the_cpu_profile_on_a_cpu():
    p = plan(CPU, CPU_MACHINE, config=llama_config("llama-3.2-3b", num_hidden_layers=2))
    assert (p.device, p.weights_dtype, p.bf16, p.world_size, p.distributed, p.backend) == (
        "cpu",
        "float32",
        False,
        2,
        "ddp",
        "gloo",
    )
    assert (p.padding_free, p.attention, p.fused_lora, p.grouped_lora) == (True, "expqa_varlen", True, True)
    assert p.checkpointing.mode == "off" and not p.model_checkpointing
    assert (p.fp8, p.fp8_reason, p.fp8_cache) == (
        False,
        "auto: cpu: no FP8 tensor cores (on forces the emulated path)",
        False,
    )
    assert p.metrics()["fp8_matmul"] == "off" and p.metrics()["fp8_matmul_requested"] == "auto"


@pytest.mark.parametrize("total_gib", [80, 141], ids=["H100-80GB", "H200-141GB"])
def test_the_gpu_profile_on_a_hopper_card_runs_everything_in_memory_with_fp8_and_its_cache(total_gib):
    p = plan(GPU, gpu(total_gib))
    assert (p.device, p.weights_dtype, p.quant_compute_dtype, p.bf16, p.distributed) == (
        "cuda",
        "bfloat16",
        "bfloat16",
        True,
        "none",
    )
    # 16k-token micro-batches of the 3B shape without checkpointing: ~45 GiB measured, fits either card
    assert p.checkpointing.mode == "off" and p.checkpointing.estimate_gib < total_gib
    assert p.fp8 and p.fp8_reason == "auto: compute capability 9.0" and p.fp8_cache
    assert p.checkpointing.available_gib - p.checkpointing.estimate_gib >= fp8_cache_bytes(LLAMA_3B, GPU.lora) / GIB


def test_a_24_gib_card_checkpoints_some_layers_and_skips_the_cache():
    p = plan(GPU, gpu(24, capability=(8, 9)))
    assert p.checkpointing.mode == "selective" and 0 < len(p.checkpointing.checkpointed_layers) < 28
    weights_gib = weight_bytes(LLAMA_3B, GPU.quantization, 2) / GIB  # in the estimate, already off the available
    assert p.model_checkpointing and p.checkpointing.estimate_gib - weights_gib <= p.checkpointing.available_gib
    assert (p.fp8, p.fp8_reason, p.fp8_cache) == (False, "auto: compute capability 8.9 < 9.0", False)


def test_auto_offloads_when_not_even_full_checkpointing_fits_and_fp8_stays_off_then():
    p = plan(GPU, gpu(6))  # a 6 GiB card: the 3B weights (~2.2 GiB) and a 16k-token full-checkpointing peak do not fit
    assert p.checkpointing.mode == "offload" and p.model_checkpointing
    assert (p.fp8, p.fp8_reason) == (False, "auto: checkpointing offload saves memory first")
    assert plan(GPU, gpu(6), fp8_matmul="on").fp8  # on means on


def test_two_processes_never_get_offload_from_auto_and_are_refused_it_when_asked():
    """auto used to pick offload and then fail after the model, FP8 and the cache were set up."""
    p = plan(GPU, gpu(6, world_size=2))
    assert (p.checkpointing.mode, p.distributed, p.backend) == ("full", "ddp", "nccl")
    assert p.fp8  # full, not offload: auto keeps FP8 on
    with pytest.raises(PlanError, match="offload runs in one process \\(2 here\\)"):
        plan(GPU, gpu(80, world_size=2), gradient_checkpointing="offload")
    with pytest.raises(PlanError, match="offload runs in one process \\(1 here, FSDP\\)"):
        plan(GPU, gpu(80), gradient_checkpointing="offload", distributed="fsdp")


def test_fsdp_checkpoints_through_its_own_wrapper_and_never_caches():
    p = plan(GPU, gpu(80, world_size=2), distributed="fsdp")
    assert p.distributed == "fsdp" and p.checkpointing.mode == "full" and not p.model_checkpointing
    assert p.fp8 and not p.fp8_cache


def test_derived_settings_instead_of_keys_that_must_agree():
    """A token budget packs (padding-free), packed rows get the varlen attention; fused_lora off means no FP8."""
    packed = plan(GPU, gpu(80), padding_free=False)  # a token budget packs whatever padding_free says
    assert (packed.padding_free, packed.attention) == (True, "expqa_varlen")
    padded = plan(CPU, CPU_MACHINE, micro_batch="2 conversations", padding_free=False)
    assert (padded.padding_free, padded.attention) == (False, "sdpa")
    peft = plan(GPU, gpu(80), fused_lora="off")
    assert (peft.fused_lora, peft.grouped_lora, peft.fp8, peft.fp8_reason) == (
        False,
        False,
        False,
        "train.fused_lora: off",
    )
    assert plan(GPU, gpu(80), fused_lora="per_projection").grouped_lora is False


def test_bf16_and_the_4bit_compute_dtype_follow_the_hardware():
    old_gpu = plan(GPU, gpu(16, capability=(7, 0), bf16=False))  # a V100: no bf16
    assert (old_gpu.bf16, old_gpu.weights_dtype, old_gpu.quant_compute_dtype) == (False, "float32", "float16")
    amx = plan(CPU, dataclasses.replace(CPU_MACHINE, bf16=True))  # avx512_bf16 / AMX: bf16 autocast, fp32 weights
    assert (amx.bf16, amx.weights_dtype) == (True, "float32")
    assert not plan(CPU, dataclasses.replace(CPU_MACHINE, bf16=True), bf16=False).bf16


def test_the_weight_estimate_matches_the_3b_shapes_size():
    """3.21 B parameters: 4-bit decoder projections (2.82 B at 0.5 + 1/64 bytes) and bf16 tied embeddings."""
    estimate = weight_bytes(LLAMA_3B, GPU.quantization, 2) / GIB
    assert 2.0 < estimate < 2.4
    assert weight_bytes(LLAMA_3B, dataclasses.replace(GPU.quantization, load_in_4bit=False), 2) / GIB == pytest.approx(
        6.0, rel=0.01
    )


def test_the_plan_says_what_it_decided_in_a_few_lines():
    lines = plan(GPU, gpu(141)).describe()
    assert lines[0] == "cuda, 1 process, weights bfloat16, bf16 autocast on"
    assert lines[1] == "padding-free packed rows, attention expqa_varlen, LoRA fused, grouped"
    assert lines[2].startswith("gradient checkpointing off: 0 of 28 layers (auto: estimated peak ")
    assert (
        lines[3] == "fp8 matmuls of the frozen base on (auto: compute capability 9.0), weights quantised once (cache)"
    )
