"""Gradient checkpointing modes: `auto` chooses from (here: fake) free memory and the longest micro-batch, every mode
recomputes exactly the layers it names, and every mode gives the loss and gradients of no checkpointing."""

import pytest
import torch

from expqa.config import LoRAConfig, QuantizationConfig
from expqa.model import checkpointing as ckpt
from expqa.model.loading import load_for_training
from helpers import llama_config, plan_for

GIB = 2**30
RUN = dict(lora_rank=16, lora_targets=7, liger=True, fused_lora=True, lora_dropout=0.0)  # params.yaml's GPU run
LLAMA_3B = ckpt.Shape.of(llama_config("llama-3.2-3b"), **RUN)  # layers 28, hidden 3072, q 3072, kv 1024, vocab 128256
LLAMA_8B = ckpt.Shape.of(llama_config("llama-3.1-8b"), **RUN)  # layers 32, hidden 4096, q 4096, kv 1024, vocab 128256


def test_estimates_match_the_measured_3b_peaks():
    """benchmarks/results (H100, 16k-token micro-batches, ~2.6 GiB of weights): 45 GiB peak allocated without
    checkpointing, 6.7 GiB with every layer checkpointed. The estimate may err on the safe side, not below."""
    weights = 2.6 * GIB
    off = (LLAMA_3B.peak_bytes(16384, 0) + weights) / GIB
    full = (LLAMA_3B.peak_bytes(16384, 28) + weights) / GIB
    assert 44 <= off <= 50 and 6.7 <= full <= 9
    assert LLAMA_3B.peak_bytes(16384, 14) < LLAMA_3B.peak_bytes(16384, 0) * 0.6
    # every further checkpointed layer needs less memory (up to the last one: a top layer that keeps its
    # activations frees them before any recompute, so full is 6 KB/token above 27 of 28 layers)
    peaks = [LLAMA_3B.peak_bytes(16384, k) for k in range(28)]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))


@pytest.mark.parametrize(
    "available_gib,mode,layers",
    [
        (200, "off", 0),  # an H200 after the 3B weights: everything fits
        (30, "selective", None),  # an A100 40GB: some layers
        (5, "offload", 28),  # a 16 GB card with other work on it: not even full fits (the top layer unrecomputed costs
        (1, "offload", 28),  # nothing more than a recompute, so auto's "full" is 27 of 28): inputs to host memory
    ],
)
def test_auto_picks_the_fastest_mode_that_fits(available_gib, mode, layers):
    choice = ckpt.choose("auto", LLAMA_3B, 16384, available_bytes=available_gib * GIB, static_bytes=0.3 * GIB)
    assert choice.mode == mode and choice.requested == "auto"
    if layers is not None:
        assert len(choice.checkpointed_layers) == layers
    else:
        k = len(choice.checkpointed_layers)
        assert 0 < k < 28
        # the fewest that fit: one layer fewer would not
        assert LLAMA_3B.peak_bytes(16384, k) + 0.3 * GIB <= 30 * GIB < LLAMA_3B.peak_bytes(16384, k - 1) + 0.3 * GIB
    assert choice.available_gib == available_gib and choice.estimate_gib > 0
    assert "auto" in choice.describe() and choice.metrics()["gradient_checkpointing"] == mode


def test_auto_follows_the_longest_micro_batch_and_the_model():
    available = 100 * GIB
    assert ckpt.choose("auto", LLAMA_3B, 16384, available_bytes=available).mode == "off"
    assert ckpt.choose("auto", LLAMA_3B, 65536, available_bytes=available).mode == "selective"
    assert ckpt.choose("auto", LLAMA_8B, 16384, available_bytes=60 * GIB).mode == "selective"
    # conversation-count batches: conversations x max_seq_length tokens
    assert ckpt.longest_micro_batch(0, 16, 2048) == 32768 and ckpt.longest_micro_batch(16384, 16, 2048) == 16384


def test_fixed_modes_need_no_measurement():
    assert ckpt.choose("off", LLAMA_3B, 16384).checkpointed_layers == []
    assert ckpt.choose("full", LLAMA_3B, 16384).checkpointed_layers == list(range(28))
    selective = ckpt.choose("selective", LLAMA_3B, 16384)
    assert selective.mode == "selective" and selective.checkpointed_layers == list(range(14))
    with pytest.raises(ValueError, match="allowed: auto, off, selective, full"):
        ckpt.choose("partial", LLAMA_3B, 16384)


def load(tiny_base, checkpointing: bool, grouped: bool = True, dropout: float = 0.0):
    torch.manual_seed(0)
    quant, lora = QuantizationConfig(load_in_4bit=False), LoRAConfig(r=4, alpha_ratio=2.0, dropout=dropout)
    fused = "grouped" if grouped else "per_projection"
    plan = plan_for(tiny_base, quant, lora, gradient_checkpointing="full" if checkpointing else "off", fused_lora=fused)
    model, _ = load_for_training(tiny_base, quant, lora, plan)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    return model.train()


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def forward_counts(model, ids) -> list[int]:
    """How often each decoder layer's forward ran in one step: twice where it was recomputed."""
    counts = []
    hooks = []
    for layer in ckpt.decoder_layers(model):  # a module inside the layer: transformers >= 5.2x checkpoints forward
        counts.append(0)  # and keeps the layer's own hooks outside the recompute
        index = len(counts) - 1
        hooks.append(
            layer.self_attn.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
        )
    loss_and_grads(model, ids)
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize(
    "mode,layers", [("off", []), ("selective", [0]), ("full", [0, 1]), ("top", [1]), ("offload", [0, 1])]
)
def test_every_mode_gives_the_loss_and_gradients_of_no_checkpointing(tiny_base, mode, layers):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref = loss_and_grads(load(tiny_base, checkpointing=False), ids)
    model = load(tiny_base, checkpointing=bool(layers))  # as the run plan loads: checkpointing only to recompute
    shape = ckpt.Shape.of(model.config, **{**RUN, "liger": False})
    choice = (
        ckpt.choose(mode, shape, 48) if mode != "top" else ckpt.Choice("test", "selective", layers, shape.layers, 48)
    )
    ckpt.apply(model, choice)
    assert choice.checkpointed_layers == layers
    assert forward_counts(model, ids) == [2 if i in layers else 1 for i in range(shape.layers)]
    # without any recompute the embeddings' output needs no gradient (layer 0 skips its input gradient)
    assert model.get_input_embeddings()(ids).requires_grad == bool(layers)
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=name)


def test_offload_recomputes_with_the_forward_dropout_masks(tiny_base):
    """LoRA dropout draws random masks: the recompute in backward must draw the same ones (RNG state restored), as
    torch's own checkpoint (full) does."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for mode in ("full", "offload"):
        model = load(tiny_base, checkpointing=True, dropout=0.3)
        ckpt.apply(model, ckpt.choose(mode, ckpt.Shape.of(model.config, **{**RUN, "liger": False}), 48))
        torch.manual_seed(5)
        results.append(loss_and_grads(model, ids))
    (loss_full, grads_full), (loss_offload, grads_offload) = results
    torch.testing.assert_close(loss_offload, loss_full)
    for name in grads_full:
        torch.testing.assert_close(grads_offload[name], grads_full[name], msg=name)


def test_offload_refuses_an_input_without_gradient():
    with pytest.raises(RuntimeError, match="needs the layer input to require grad"):
        ckpt.offloaded_checkpoint(lambda h: h * 2, torch.ones(2))


def test_apply_checkpoints_exactly_the_chosen_layers(tiny_base):
    """The run plan chooses (tests/training/test_plan.py), apply carries it out on a model loaded with checkpointing."""
    model = load(tiny_base, checkpointing=True)
    shape = ckpt.Shape.of(model.config, lora_rank=4, lora_targets=7, liger=False, fused_lora=True, lora_dropout=0.0)
    ckpt.apply(model, ckpt.choose("selective", shape, 64))
    assert [layer.gradient_checkpointing for layer in ckpt.decoder_layers(model)] == [True, False]
    ckpt.apply(model, ckpt.choose("offload", shape, 64))
    assert all(
        layer.gradient_checkpointing and layer._gradient_checkpointing_func is ckpt.offloaded_checkpoint
        for layer in ckpt.decoder_layers(model)
    )
