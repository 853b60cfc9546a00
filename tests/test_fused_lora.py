"""The fused LoRA function is PEFT's LoRA maths: same outputs and gradients (fp32, 4-bit, bf16 autocast, dropout),
the same dropout mask when gradient checkpointing recomputes a layer, and PEFT's path for everything it does not
handle."""

import pytest
import torch

import expqa.fused_lora as fused
from expqa.config import LoRAConfig, QuantizationConfig
from expqa.model import load_for_training


def lora_model(base, quantized=False, dropout=0.0, fused_lora=False, gradient_checkpointing=False):
    torch.manual_seed(0)
    model, _ = load_for_training(base, QuantizationConfig(load_in_4bit=quantized),
                                 LoRAConfig(r=4, alpha=8, dropout=dropout), bf16=False,
                                 gradient_checkpointing=gradient_checkpointing, fused_lora=fused_lora)
    with torch.no_grad():  # LoRA B starts at zero; give it values so its path shows in outputs and gradients
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    return model


def loss_and_grads(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quantized,autocast", [(False, False), (True, False), (False, True)],
                         ids=["fp32", "4bit", "bf16-autocast"])
def test_fused_lora_matches_peft(tiny_base, ids, quantized, autocast):
    peft_model = lora_model(tiny_base, quantized=quantized).train()
    fused_model = lora_model(tiny_base, quantized=quantized, fused_lora=True).train()
    assert fused.patch_lora_layers(fused_model) == 0  # already patched: 2 layers x 7 projections, once
    assert sum(hasattr(m, "_peft_forward") for m in fused_model.modules()) == 14
    loss_p, grads_p = loss_and_grads(peft_model, ids, autocast)
    loss_f, grads_f = loss_and_grads(fused_model, ids, autocast)
    tol = dict(atol=2e-2, rtol=2e-2) if autocast or quantized else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_f, loss_p, **tol)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 28
    for name in grads_p:
        scale = grads_p[name].abs().max()
        torch.testing.assert_close(grads_f[name] / scale, grads_p[name] / scale, **tol, msg=name)


def test_dropout_uses_its_mask_in_forward_and_backward(tiny_base, monkeypatch):
    """With the mask fixed, the fused layer equals the textbook formula (autograd on plain tensor maths)."""
    model = lora_model(tiny_base, dropout=0.5, fused_lora=True).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    p = 0.5
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    mask = torch.rand(3 * 5, layer.in_features, generator=torch.Generator().manual_seed(2)) > p
    monkeypatch.setattr(fused, "dropout_with_mask", lambda t, prob: (t * mask / (1 - prob), mask))
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    dropped = x_ref * mask.view(3, 5, -1) / (1 - p)
    ref = x_ref @ layer.get_base_layer().weight.t() + layer.scaling["default"] * (dropped @ a_ref.t() @ b_ref.t())
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    for got, want in ((x.grad, x_ref.grad), (a.grad, a_ref.grad), (b.grad, b_ref.grad)):
        torch.testing.assert_close(got, want)


def test_checkpoint_recompute_reuses_the_dropout_mask(tiny_base, ids):
    """Gradient checkpointing reruns each layer's forward in backward: the RNG state is restored, so the recomputed
    dropout mask is the one the forward used and gradients equal those of a run without checkpointing."""
    results = []
    for checkpointing in (False, True):
        model = lora_model(tiny_base, dropout=0.3, fused_lora=True, gradient_checkpointing=checkpointing).train()
        torch.manual_seed(5)
        results.append(loss_and_grads(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_cases_it_does_not_handle_go_to_peft(tiny_base, ids):
    model = lora_model(tiny_base, fused_lora=True).eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
        reference = lora_model(tiny_base).eval()
        with reference.disable_adapter():
            torch.testing.assert_close(without, reference(input_ids=ids).logits)
        torch.testing.assert_close(with_adapter, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_adapter, without)
