"""FP8 base matmuls (expqa.model.fp8): per-row e4m3 quantisation within its rounding bound, matmuls close to exact, the
fused LoRA layers close to their bf16 results (outputs, adapter gradients), the embedded model's loss on real
conversations nearly unchanged, and `train.fp8_matmul` resolved and validated. Off CUDA the FP8 product is computed
in float32 on the e4m3 values (exact products), so the maths is checked here; tests/pipeline/test_gpu.py compares the
Triton kernel and CUDA's scaled matmul with this path."""

import json

import pytest
import torch

import expqa.model.fused_lora as fused
from expqa.config import LoRAConfig, QuantizationConfig, TrainingConfig, load_params
from expqa.model import fp8
from expqa.model.loading import load_for_training
from helpers import lora_model as fused_lora_model
from helpers import loss_and_grads as fused_loss_and_grads
from helpers import plan_for, write_params


def rel_err(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_quantize_rows_rounds_each_element_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(32, 80) * torch.logspace(-3, 3, 32).unsqueeze(1)  # rows of very different magnitudes
    x[3] = 0.0
    x[5, 7] = 1e4  # an outlier costs only its own row precision
    values, scales = fp8.quantize_rows(x)
    assert values.dtype == fp8.E4M3 and scales.shape == (32, 1) and scales.dtype == torch.float32
    back = values.float() * scales
    # e4m3: 3 mantissa bits -> half a step is 1/16 of the value; below 2^-6 (subnormal) steps are 2^-9 of the scale
    bound = x.abs() / 16 + scales / 1024
    assert bool(((back - x).abs() <= bound * 1.0001).all())
    assert torch.equal(back[3], torch.zeros(80)) and bool(torch.isfinite(scales).all())
    amax_pos = x.abs().argmax(dim=1)
    peaks = values.float().gather(1, amax_pos.unsqueeze(1)).abs().squeeze(1)
    assert torch.equal(peaks[torch.arange(32) != 3], torch.full((31,), fp8.E4M3_MAX))  # each row's max -> 448
    assert rel_err(back[6], x[6]) < 0.04  # a row without an outlier keeps its precision
    with pytest.raises(ValueError, match="matrix"):
        fp8.quantize_rows(x.view(4, 8, 80))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matmuls_are_close_to_the_exact_ones(dtype):
    torch.manual_seed(1)
    x, weight, grad_y = torch.randn(64, 96), torch.randn(48, 96) / 10, torch.randn(64, 48)
    w = weight.to(dtype)
    y = fp8.linear(*fp8.quantize_rows(x.to(dtype)), *fp8.quantize_rows(w), dtype)
    grad_x = fp8.input_grad(grad_y.to(dtype), *fp8.quantize_rows(w.t().contiguous()))
    assert y.dtype == grad_x.dtype == dtype and y.shape == (64, 48) and grad_x.shape == (64, 96)
    # random normal operands: ~3.7 % relative error (two e4m3 roundings per product); bf16 alone is ~0.3 %
    assert rel_err(y, x @ weight.t()) < 0.05
    assert rel_err(grad_x, grad_y @ weight) < 0.05


def lora_model(base, fp8_matmul, grouped):
    """test_fused_lora's model (seeded, LoRA B given values), rank 8, bf16 where the hardware has it."""
    return fused_lora_model(base, fused_lora=True, grouped=grouped, rank=8, bf16=True, fp8_matmul=fp8_matmul).train()


def loss_and_grads(model, ids):
    loss, grads = fused_loss_and_grads(model, ids, autocast=True)
    return loss.float(), {name: grad.float() for name, grad in grads.items()}


@pytest.mark.parametrize("grouped", [False, True], ids=["per-projection", "grouped"])
def test_fused_lora_in_fp8_is_close_to_bf16(tiny_base, grouped, monkeypatch):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = lora_model(tiny_base, "off", grouped)
    loss_ref, grads_ref = loss_and_grads(reference, ids)
    model = lora_model(tiny_base, "on", grouped)
    assert not any(getattr(m, "_expqa_fp8", False) for m in reference.modules())
    assert sum(getattr(m, "_expqa_fp8", False) for m in model.modules()) == 14  # 2 layers x 7 projections
    calls = []
    matmul_rows = fp8.matmul_rows
    monkeypatch.setattr(fp8, "matmul_rows", lambda *a: calls.append(a[0].shape) or matmul_rows(*a))
    loss, grads = loss_and_grads(model, ids)
    # every base matmul ran in FP8: 14 forward, 14 input gradients less layer 0's q/k/v (their input, the frozen
    # embeddings, needs no gradient); grouped, the narrow k/v input gradients accumulate in bf16 (fused_lora)
    assert len(calls) == (14 + 2 * 5 - 1 if grouped else 14 + 14 - 3)
    assert abs(float(loss - loss_ref)) < 0.01 * float(loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) == 28
    for name, want in grads_ref.items():  # the adapter gradients point the same way
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), want.flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


def test_fp8_on_a_layer_whose_size_does_not_allow_it_stays_in_bf16(tiny_base):
    model = lora_model(tiny_base, "on", grouped=True)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert fp8.eligible(64, 128) and not fp8.eligible(64, 120) and not fp8.eligible(72, 128)
    q_proj._expqa_fp8 = False  # as patch_lora_layers marks a layer of odd size: its whole group runs in bf16
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.slow
def test_embedded_model_loss_on_real_conversations_barely_moves(embedded_base, embedded_tokenizer):
    """Real weights and real data: the eval-style loss of SmolLM2 on training conversations with FP8 base matmuls
    is within 1 % of bf16's (measured 2026-11-29: 3.8480 bf16, 3.8647 FP8: +0.43 %; fp32 3.8485)."""
    from helpers import REPO

    rows = [json.loads(line) for line in (REPO / "data" / "raw" / "cross_validated.jsonl").open()][:4]
    texts = [embedded_tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    batch = embedded_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = {}
    for mode in ("off", "on"):
        quant, lora = QuantizationConfig(load_in_4bit=False), LoRAConfig(r=8, alpha_ratio=2.0, dropout=0.0)
        plan = plan_for(embedded_base, quant, lora, bf16=True, gradient_checkpointing="off", fp8_matmul=mode)
        model, _ = load_for_training(embedded_base, quant, lora, plan)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses[mode] = float(model(**batch, labels=labels).loss)
    assert 0.5 < losses["off"] < 5.0
    assert abs(losses["on"] - losses["off"]) < 0.01 * losses["off"], losses


def test_train_fp8_matmul_values(tmp_path):
    assert TrainingConfig(fp8_matmul=True).fp8_matmul == "on" and TrainingConfig(fp8_matmul=False).fp8_matmul == "off"
    assert "train.fp8_matmul is 'maybe'; allowed: auto, on, off" in TrainingConfig(fp8_matmul="maybe").validate()
    errors = TrainingConfig(fp8_matmul="on", fused_lora=False).validate()
    assert any("train.fp8_matmul is on but train.fused_lora is off" in e for e in errors)
    assert TrainingConfig(fp8_matmul="auto", fused_lora="off").validate() == []  # auto just stays off there

    write_params(tmp_path / "params.yaml", replace=[("fp8_matmul: auto", "fp8_matmul: off")])
    assert load_params(tmp_path / "params.yaml").train.fp8_matmul == "off"  # YAML's off (a boolean) works


def test_patch_lora_layers_marks_only_eligible_layers(tiny_base):
    model = lora_model(tiny_base, "off", grouped=False)
    assert not any(getattr(m, "_expqa_fp8", False) for m in model.modules())
    assert fused.patch_lora_layers(model, grouped=False, fp8=True) == 0  # already patched: decided once, at load


def test_cached_fp8_weights_give_the_same_results(tiny_base):
    """The trainer's weight cache (quantised once) is the per-use quantisation stored: outputs and gradients equal,
    bit for bit on any CPU, since both run the same function on the same values. It is filled in the dtype the forward
    computes in (bf16 autocast here, over float32 weights where the CPU has no avx512_bf16): filled ahead in the
    weights' dtype, it gave other losses on an avx512_bf16 CPU (tests/training/test_trainer.py)."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    model = lora_model(tiny_base, "on", grouped=True)
    loss, grads = loss_and_grads(model, ids)
    expected = sum(
        2 * b.in_features * b.out_features + 4 * (b.in_features + b.out_features) for b in fused.fp8_layers(model)
    )
    assert fused.fp8_cache_bytes(model) == expected and len(fused.fp8_layers(model)) == 14
    assert fused.cache_fp8_weights(model) == expected
    loss_cached, grads_cached = loss_and_grads(model, ids)
    assert {layer._expqa_fp8_cache["dtype"] for layer in fused.fp8_layers(model)} == {torch.bfloat16}
    # exact on any CPU: the same e4m3 values and scales (elementwise quantisation, no reduction order) into the same
    # float32 matmul on same-shaped contiguous operands; the cache is filled in the dtype per use computes in
    assert torch.equal(loss, loss_cached)
    for name in grads:
        assert torch.equal(grads[name], grads_cached[name]), name
