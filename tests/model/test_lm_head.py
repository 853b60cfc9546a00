"""expqa's LM head (label positions only, softmax kept for backward) is TRL's fused head's maths: same loss,
per-token log-probabilities, entropy, top-1 hits and LoRA gradients."""

import dataclasses

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from expqa.config import LoRAConfig, QuantizationConfig
from expqa.model.lm_head import add_label_lm_head, label_log_probs
from expqa.model.loading import load_for_training
from helpers import plan_for, tiny_training_config


def test_label_log_probs_match_log_softmax_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    log_probs, entropy, top1, mask = label_log_probs(hidden, weight, labels, chunk=3)  # 3 chunks of label rows
    (log_probs.sum() * 0.7).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    reference = torch.log_softmax(logits, -1)
    expected = reference.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    (expected.sum() * 0.7).backward()
    torch.testing.assert_close(log_probs, expected.detach())
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1).detach() * mask)
    # an argmax over logits from other matmul shapes (3 row chunks vs all rows): equal on any CPU because every label's
    # logit is >= 4.4 away from the best other one here (measured), ~1e6 times the fp32 rounding of a 16-term dot
    assert torch.equal(top1, (logits.argmax(-1) == labels) & mask)


def lora_model(base):
    torch.manual_seed(0)
    quant, lora = QuantizationConfig(load_in_4bit=False), LoRAConfig(r=4, alpha_ratio=2.0, dropout=0.0)
    plan = plan_for(base, quant, lora, gradient_checkpointing="off", fused_lora="per_projection")
    model, _ = load_for_training(base, quant, lora, plan)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    return model


def outputs_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=torch.tensor(30))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_expqa_head_equals_trls_fused_head_on_a_lora_model(tiny_base):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :9] = -100  # a prompt: no loss there
    trl_model, expqa_model = lora_model(tiny_base), lora_model(tiny_base)
    assert add_label_lm_head(expqa_model.get_base_model())
    trl_out, trl_grads = outputs_and_grads(trl_model, ids, labels)
    expqa_out, expqa_grads = outputs_and_grads(expqa_model, ids, labels)
    torch.testing.assert_close(expqa_out.loss, trl_out.loss, atol=1e-5, rtol=1e-5)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(expqa_out, field), getattr(trl_out, field), atol=1e-4, rtol=1e-4)
    # argmaxes of two heads' logits (label rows only vs every row): equal on any CPU because each label's logit is
    # >= 0.45 from the best other one on this model (measured), far above the ~1e-6 the two computations differ by
    assert torch.equal(expqa_out.is_top1.bool(), trl_out.is_top1.bool())
    assert torch.equal(expqa_out.label_mask, trl_out.label_mask)
    assert expqa_grads.keys() == trl_grads.keys() and len(expqa_grads) == 28
    for name, grad in trl_grads.items():
        torch.testing.assert_close(expqa_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():  # generation and plain forwards still get logits
        assert expqa_model(input_ids=ids).logits.shape == (2, 24, expqa_model.config.vocab_size)


@pytest.mark.parametrize("head", ["trl", "expqa"])
def test_trainer_installs_the_configured_head(tiny_base, processed_dir, tmp_path, head):
    from expqa.training.trainer import QLoRATrainer

    params, train = tiny_training_config(lm_head_loss=head)
    trainer = QLoRATrainer(
        train,
        lora=dataclasses.replace(params.lora, r=4, alpha_ratio=2.0),
        quantization=QuantizationConfig(load_in_4bit=False),
        seed=params.base.seed,
        base_model=tiny_base,
        data_dir=processed_dir,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_dir=None,
        log_dir=None,
    )
    forward = trainer.setup().model.get_base_model().forward
    assert getattr(forward, "expqa_label_head", False) == (head == "expqa")
