"""Merge equivalence: the merged model against base + adapter (float32 and bf16 bases), the greedy check's
tolerance for near-ties, and the stage's summary line."""

import json
from pathlib import Path

import pytest
import torch

from expqa.model.merge import merge_summary


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, tmp_path_factory):
    """A LoRA adapter with non-zero weights on the tiny base (as if trained), saved like the train stage does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(out)
    (out / "training_config.json").write_text(
        json.dumps(
            {"config": {"lora": {"r": 4}}, "data_sha256": {"train": "x", "val": "y"}, "metrics": {"eval_loss": 1.0}}
        )
    )
    return out


def test_merged_model_matches_base_plus_adapter(tiny_base, tiny_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from expqa.model.merge import merge_adapter

    report = merge_adapter(tiny_base, tiny_adapter, tmp_path / "merged")
    # greedy_equal compares argmaxes of merged vs base + adapter logits (other kernels: W' x vs W x + B A x). They
    # differ by <= 6e-7 here while the smallest top-2 gap on the continuations is 1.8e-3 (measured): no CPU's rounding
    # can flip a token, so zero flips is asserted; a wrong merge moves logits by far more than 1e-3
    assert report["passed"] and report["greedy_equal"] and report["max_abs_logit_diff"] <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-4, rtol=0)
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-2  # the adapter really changed it
    assert merged.generation_config.eos_token_id == [2]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "tiny-random-llama" in card and "train.jsonl" in card


def test_merge_onto_a_bf16_base_saves_bf16_and_passes_the_bf16_check(tiny_base, tiny_adapter, tmp_path):
    """Llama 3.2 ships in bf16: the merged model is saved in bf16 and checked at the bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    from expqa.model.merge import merge_adapter

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / name).write_bytes((tiny_base / name).read_bytes())
    # a folder made outside the base stage (benchmarks/random_llama.py) has no weight hashes
    (bf16 / "base_info.json").write_text(json.dumps({"name": "bf16-random", "source": "test"}))
    report = merge_adapter(bf16, tiny_adapter, tmp_path / "merged")
    assert report["saved_dtype"] == "bfloat16" and report["tolerance"] == 0.5 and report["device"] == "cpu"
    assert report["passed"] and 0 < report["max_abs_logit_diff"] <= 0.5  # rounding to bf16 is visible, small
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert "weights: not hashed" in (tmp_path / "merged" / "README.md").read_text()


def test_merge_check_tolerates_greedy_flips_only_at_near_ties():
    from expqa.model.equivalence import compare

    sequence = torch.tensor([5, 1, 2])  # prompt [5], reference continuation [1, 2]
    reference = torch.zeros(3, 4)
    reference[0, 1], reference[1, 2] = 1.0, 0.01  # position 1: token 2 beats token 3 by a hair (0.01)
    flipped = reference.clone()
    flipped[1, 3] = 0.02  # merged model prefers token 3 there: a near-tie flip, logits differ by 0.02
    report = compare([reference], [flipped], [sequence], [1], tolerance=0.5)
    assert report["greedy_flips"] == 1 and report["greedy_flips_at_near_ties"] == 1 and report["passed"]
    assert report["greedy_agreed_tokens"] == 1  # its own greedy answer is [1, 3]: one token shared, then they part
    clear = reference.clone()
    clear[0, 1], clear[0, 0], reference[0, 1] = 0.25, 0.35, 0.6  # the reference's choice wins by 0.6 > tolerance
    report = compare([reference], [clear], [sequence], [1], tolerance=0.5)
    assert report["max_abs_logit_diff"] == pytest.approx(0.35)  # within tolerance, yet a flip that is no tie
    assert report["greedy_flips"] == 1 and report["greedy_flips_at_near_ties"] == 0 and not report["passed"]
    same = compare([reference], [reference], [sequence], [1], tolerance=1e-3)
    assert same["greedy_equal"] and same["greedy_agreed_tokens"] == same["greedy_steps"] == 2
    early = reference.clone()
    early[0, 3] = 2.0  # parts at the first token: a later position that agrees no longer counts
    assert compare([reference], [early], [sequence], [1], tolerance=5.0)["greedy_agreed_tokens"] == 0


def test_merge_summary():
    assert (
        merge_summary({"max_abs_logit_diff": 0.000123, "greedy_equal": True}, Path("models/merged"))
        == "merge: models/merged (max |logit diff| 1.23e-04, greedy equal: True)"
    )
