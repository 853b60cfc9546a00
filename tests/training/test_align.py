"""The align stage on a tiny random Llama: DPO moves the SFT adapter and saves it alone, resumes from a checkpoint,
passes the adapter through when disabled, and refuses an adapter of another shape."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from expqa.config import LoRAConfig
from expqa.training.align import AlignError, AlignTrainer, check_adapter, pass_through, preference_data
from helpers import tiny_training_config

LORA = LoRAConfig(r=4, alpha_ratio=2.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def tiny_params(**align):
    params, train = tiny_training_config(max_steps=-1)
    values = dict(pairs_per_step=2, num_train_epochs=2, logging_steps=1, max_length=96, learning_rate=5e-3)
    return dataclasses.replace(
        params, train=train, lora=LORA, align=dataclasses.replace(params.align, **{**values, **align})
    )


def sft_adapter(base, out):
    """A LoRA adapter of LORA's shape with non-zero B (so that it differs from the base), saved as train saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, target_modules=LORA.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def pairs(n=10):
    return [
        {
            "prompt": f"Pair {i}: may I stop the test as soon as p < 0.05?",
            "chosen": f"No ({i}): stopping at the first crossing inflates the false positive rate.",
            "rejected": f"Yes ({i}): the p-value is valid whenever you look at it.",
            "topic": "peeking",
            "source_id": f"t-{i % 24}",
        }
        for i in range(n)
    ]


@pytest.fixture
def inputs(tiny_base, processed_dir, tmp_path):
    prefs = tmp_path / "preferences.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in pairs()))
    questions = tmp_path / "questions.jsonl"
    question = {"id": "q", "question": "Can I peek?", "options": ["Yes.", "No."], "answer": 1, "taught_by": ["t-1"]}
    questions.write_text(json.dumps(question) + "\n")
    return dict(
        base_model=tiny_base,
        adapter=sft_adapter(tiny_base, tmp_path / "sft"),
        preferences=prefs,
        questions=questions,
        data_dir=processed_dir,
    )


def run(params, inputs, tmp_path, out="aligned"):
    trainer = AlignTrainer(
        params,
        **inputs,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_dir=tmp_path / "metrics",
        log_dir=tmp_path / "logs",
    )
    data = preference_data(inputs["preferences"], inputs["questions"], inputs["data_dir"], params)
    metrics = trainer.train(data)
    trainer.save_model(tmp_path / out, data)
    return metrics, data


@pytest.mark.slow
def test_dpo_moves_the_sft_adapter_and_saves_it_alone(inputs, tmp_path, capsys):
    params = tiny_params()
    metrics, data = run(params, inputs, tmp_path)
    assert data["counts"]["train_pairs"] + data["counts"]["held_out_pairs"] == 10
    out = tmp_path / "aligned"
    sft, aligned = (
        load_file(inputs["adapter"] / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert sft.keys() == aligned.keys()  # the trained adapter in the SFT adapter's layout, no "ref" copy
    assert not (out / "ref").exists()
    moved = [k for k in sft if not torch.equal(sft[k], aligned[k])]
    assert moved, "DPO did not change the adapter"
    record = json.loads((out / "training_config.json").read_text())
    assert record["counts"] == data["counts"] and record["config"]["align"]["method"] == "dpo"
    assert metrics["global_step"] > 0 and metrics["train_loss"] is not None
    # the curves dvclive writes for dvc.yaml's plots
    assert (tmp_path / "metrics" / "plots" / "metrics" / "rewards" / "accuracies.tsv").is_file()
    # merge takes it as it takes the SFT adapter
    from expqa.model.merge import merge_adapter

    report = merge_adapter(inputs["base_model"], out, tmp_path / "merged")
    assert report["passed"]


@pytest.mark.slow
def test_align_resumes_from_its_last_checkpoint_to_the_same_adapter(inputs, tmp_path, capsys):
    params = tiny_params(num_train_epochs=3)  # 9 train pairs / 2 per step = 5 steps an epoch: 15, saved every 5
    run(params, inputs, tmp_path, out="whole")
    checkpoints = sorted((tmp_path / "ckpt").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2
    shutil.rmtree(checkpoints[-1])  # as if stopped after the first checkpoint
    capsys.readouterr()
    run(params, inputs, tmp_path, out="resumed")
    assert f"align: resuming from {checkpoints[0]}" in capsys.readouterr().out
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-6)


def test_disabled_align_passes_the_sft_adapter_through_byte_for_byte(tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    for name, data in (("adapter_model.safetensors", b"\x00weights"), ("adapter_config.json", b"{}")):
        (sft / name).write_bytes(data)
    pass_through(sft, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {
        p.name: p.read_bytes() for p in sft.iterdir()
    }


def test_an_sft_adapter_of_another_shape_is_refused_naming_the_keys(tmp_path):
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj", "down_proj"]})
    )
    with pytest.raises(AlignError, match=r"r 8 \(params.yaml: 4\), lora_alpha 16 \(params.yaml: 8\)"):
        check_adapter(tmp_path, LORA)
    check_adapter(tmp_path, dataclasses.replace(LORA, r=8))  # target order does not matter


def test_pairs_whose_source_is_not_in_the_train_split_are_left_out(inputs, tmp_path):
    records = pairs(4)
    records[0]["source_id"] = "t-200"  # a test conversation
    inputs["preferences"].write_text("".join(json.dumps(r) + "\n" for r in records))
    data = preference_data(inputs["preferences"], inputs["questions"], inputs["data_dir"], tiny_params())
    assert data["counts"]["source_not_in_train_split"] == 1
    assert data["counts"]["train_pairs"] + data["counts"]["held_out_pairs"] == 3
