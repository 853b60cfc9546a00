"""Padding-free packing is the same model: packed rows give the same logits and loss as separate rows, and no
token attends across a sequence boundary (CPU path of the same attention function the GPU uses)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from expqa.data.dataset import tokenize_conversation
from expqa.model.attention import NAME, cu_seqlens, register
from helpers import conversation


@pytest.fixture(scope="module")
def models(tiny_base):
    register()
    packed = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=NAME).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    return packed, plain


def examples(tokenizer, n=3):
    return [tokenize_conversation(tokenizer, conversation(i, turns=1 + i % 2)["messages"]) for i in range(n)]


def test_cu_seqlens_from_position_ids():
    bounds, longest = cu_seqlens(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert bounds.tolist() == [0, 3, 5, 9] and longest == 4 and bounds.dtype == torch.int32
    with pytest.raises(ValueError, match="must start at 0"):
        cu_seqlens(torch.tensor([[1, 2, 0]]))


def test_packed_logits_equal_separate_rows(models, embedded_tokenizer):
    packed_model, plain_model = models
    ids = [e["input_ids"] for e in examples(embedded_tokenizer)]
    flat = torch.tensor([sum(ids, [])])
    positions = torch.tensor([sum((list(range(len(s))) for s in ids), [])])
    with torch.no_grad():
        packed = packed_model(input_ids=flat, position_ids=positions).logits[0]
        start = 0
        for seq in ids:
            alone = plain_model(input_ids=torch.tensor([seq])).logits[0]
            torch.testing.assert_close(packed[start : start + len(seq)], alone, atol=1e-4, rtol=1e-4)
            start += len(seq)


def test_no_attention_across_sequence_boundaries(models, embedded_tokenizer):
    packed_model, _ = models
    a, b = [e["input_ids"] for e in examples(embedded_tokenizer, 2)]
    other_a = [(t + 7) % 1000 for t in a]  # change every token of the first sequence
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        first = packed_model(input_ids=torch.tensor([a + b]), position_ids=positions).logits[0, len(a) :]
        second = packed_model(input_ids=torch.tensor([other_a + b]), position_ids=positions).logits[0, len(a) :]
    torch.testing.assert_close(first, second, atol=1e-5, rtol=0)


def test_padding_free_batch_loss_equals_padded_batch_loss(models, embedded_tokenizer):
    packed_model, plain_model = models
    batch = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples(embedded_tokenizer, 4)]
    pad = embedded_tokenizer.pad_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(batch)
    flat = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(batch)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    with torch.no_grad():
        loss_padded = plain_model(**padded).loss
        loss_flat = packed_model(**flat).loss
    torch.testing.assert_close(loss_flat, loss_padded, atol=1e-5, rtol=1e-5)
