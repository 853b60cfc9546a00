"""The fused LoRA function is PEFT's LoRA maths: same outputs and gradients (fp32, 4-bit, bf16 autocast, dropout),
the same dropout mask when gradient checkpointing recomputes a layer, and PEFT's path for everything it does not
handle."""

import pytest
import torch

import expqa.model.fused_lora as fused
from helpers import lora_model, loss_and_grads


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))


class CountCalls:
    """Counts how often each fused function ran (per projection vs per group)."""

    def __init__(self, monkeypatch):
        self.single = self.group = 0
        for cls, attr in ((fused.LoRALinearFunction, "single"), (fused.LoRAGroupFunction, "group")):
            original = cls.apply

            def apply(*args, original=original, attr=attr):
                setattr(self, attr, getattr(self, attr) + 1)
                return original(*args)

            monkeypatch.setattr(cls, "apply", apply)


@pytest.mark.parametrize("grouped", [False, True], ids=["per-projection", "grouped"])
@pytest.mark.parametrize(
    "quantized,autocast",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["fp32", "4bit", "bf16-autocast", "4bit-bf16-autocast"],
)
def test_fused_lora_matches_peft(tiny_base, ids, quantized, autocast, grouped, monkeypatch):
    peft_model = lora_model(tiny_base, quantized=quantized).train()
    fused_model = lora_model(tiny_base, quantized=quantized, fused_lora=True, grouped=grouped).train()
    assert (
        fused.patch_lora_layers(fused_model, grouped=grouped, fp8=False) == 0
    )  # already patched: 2 layers x 7 projections, once
    assert sum(hasattr(m, "_peft_forward") for m in fused_model.modules()) == 14
    assert sum(hasattr(m, "_expqa_group") for m in fused_model.modules()) == (10 if grouped else 0)
    loss_p, grads_p = loss_and_grads(peft_model, ids, autocast)
    calls = CountCalls(monkeypatch)
    loss_f, grads_f = loss_and_grads(fused_model, ids, autocast)
    # per layer: q/k/v and gate/up as one call each, o and down alone; or all 7 alone
    assert (calls.group, calls.single) == ((4, 4) if grouped else (0, 14))
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


def test_group_members_called_apart_or_out_of_order_compute_alone(tiny_base, ids):
    """A group hands a sibling its output only for the very input tensor it computed on; any other call order or
    input gives each projection its own result (the grouped outputs equal the separate ones)."""
    model = lora_model(tiny_base, fused_lora=True, grouped=True).train()
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features, requires_grad=True)
    other = torch.randn_like(x)
    with torch.no_grad():
        alone = [layer._peft_forward(x) for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
        in_order = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        shuffled = [attn.v_proj(x), attn.k_proj(other), attn.k_proj(x), attn.q_proj(x), attn.q_proj(x)]
    for got, want in zip(in_order, alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for got, want in zip(shuffled, [alone[2], attn.k_proj._peft_forward(other), alone[1], alone[0], alone[0]]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert attn.q_proj._expqa_group.pending_input is None or attn.q_proj._expqa_group.pending  # nothing stale


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_with_dropout_falls_back_and_keeps_checkpoint_masks(tiny_base, ids, checkpointing, monkeypatch):
    """Dropout > 0 draws one mask per projection (as PEFT does), so groups fall back to one function each; with
    checkpointing the recomputed masks are the forward's."""
    reference = lora_model(tiny_base, dropout=0.3, fused_lora=True).train()
    torch.manual_seed(5)
    loss_ref, grads_ref = loss_and_grads(reference, ids)
    model = lora_model(
        tiny_base, dropout=0.3, fused_lora=True, grouped=True, gradient_checkpointing=checkpointing
    ).train()
    calls = CountCalls(monkeypatch)
    torch.manual_seed(5)
    loss, grads = loss_and_grads(model, ids)
    assert calls.group == 0 and calls.single >= 14
    torch.testing.assert_close(loss, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name)
