import warnings

import pytest
import torch

from expqa import noise
from expqa.config import LLAMA_PROJECTIONS, LoRAConfig, QuantizationConfig
from expqa.model.loading import check_target_modules, load_for_training
from helpers import llama_config, plan_for


def lora_grads(model, batch):
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bnb_cpu_guard_keeps_lora_gradients_after_eval_forward(tiny_base):
    """Regression: bitsandbytes 0.50 on avx512_bf16 CPUs silently zeroes LoRA gradients after an eval forward."""
    torch.manual_seed(0)
    quant, lora = QuantizationConfig(), LoRAConfig(r=4, alpha_ratio=2.0, dropout=0.0)
    plan = plan_for(tiny_base, quant, lora, bf16=True, gradient_checkpointing="off", fused_lora="off")
    model, _ = load_for_training(tiny_base, quant, lora, plan)
    for name, param in model.named_parameters():  # make B non-zero so every LoRA weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    ids = torch.randint(0, 1000, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    before = lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what evaluation and generate do
    after = lora_grads(model, batch)
    assert before.keys() == after.keys() and len(before) == 2 * 7 * 2
    for name in before:
        assert before[name].abs().sum() > 0, name
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4-bit-float32-through-peft", "full-precision"])
def test_checkpointing_is_enabled_without_a_deprecation_warning(tiny_base, load_in_4bit):
    """Both ways load_for_training enables checkpointing (after peft's prepare_model_for_kbit_training, or by
    itself) turn it on for every decoder layer, under the names transformers does not warn about."""
    quant, lora = QuantizationConfig(load_in_4bit=load_in_4bit), LoRAConfig(r=4, alpha_ratio=2.0, dropout=0.0)
    plan = plan_for(tiny_base, quant, lora, gradient_checkpointing="full", fused_lora="off")
    assert plan.model_checkpointing and plan.weights_dtype == "float32"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # as a stage starts, with expqa's filters of library noise on top
        noise.install()
        model, _ = load_for_training(tiny_base, quant, lora, plan)
    # checkpointing's own deprecations (transformers' renamed gradient_checkpointing*, and peft calling the old
    # names); torch's own FutureWarnings (torch 2.11's _check_is_size, from its kernels) are not ours to fix
    assert not [str(w.message) for w in shown if "checkpointing" in str(w.message)]
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)


def test_lora_targets_must_exist(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    check_target_modules(model, LLAMA_PROJECTIONS)
    with pytest.raises(ValueError, match=r"lora.target_modules: qkv_proj not found.*its linear layers are: .*q_proj"):
        check_target_modules(model, ["q_proj", "qkv_proj"])


def llama_32_3b_config(layers: int):
    """The exact Llama-3.2-3B-Instruct architecture, layers reduced for test speed."""
    return llama_config(
        "llama-3.2-3b", num_hidden_layers=layers, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]
    )


def test_llama_32_3b_architecture_resolves_targets_and_quantisation(shipped_params):
    """`-S model.name=meta-llama/Llama-3.2-3B-Instruct` must work with the shipped params."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from expqa.model.loading import quantization_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_32_3b_config(layers=2))
    check_target_modules(model, shipped_params.lora.target_modules)
    lora = shipped_params.lora
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # r16 on all 7 projections: per layer 16*(3072+3072) q,o + 16*(3072+1024)*2 k,v + 16*(3072+8192)*3 mlp
    assert trainable == 2 * 16 * (2 * 6144 + 2 * 4096 + 3 * 11264)
    q = quantization_config(shipped_params.quantization, shipped_params.quantization.bnb_4bit_compute_dtype)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
