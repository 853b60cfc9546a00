"""Label masks, token by token: only assistant turns are supervised and each keeps its end-of-turn token."""

import pytest

from expqa.data.dataset import IGNORE_INDEX, TemplateError, build_sft_dataset, end_of_turn_ids, tokenize_conversation

# The Llama 3.x template's structure (header tokens, <|eot_id|>, a dated system block), in short.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are a statistician."},
    {"role": "user", "content": "What is power?"},
    {"role": "assistant", "content": "The probability of rejecting H0 when H1 is true."},
    {"role": "user", "content": "And alpha?"},
    {"role": "assistant", "content": "The false positive rate."},
]


def supervised_text(tokenizer, example):
    return [tokenizer.decode([t]) for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]


def test_embedded_chatml_mask_token_by_token(embedded_tokenizer):
    tok = embedded_tokenizer
    example = tokenize_conversation(tok, CONVERSATION)
    pieces = [(tok.decode([t]), label != IGNORE_INDEX) for t, label in zip(example["input_ids"], example["labels"])]
    supervised = "".join(p for p, on in pieces if on)
    assert supervised == (
        "The probability of rejecting H0 when H1 is true.<|im_end|>\nThe false positive rate.<|im_end|>\n"
    )
    unsupervised = "".join(p for p, on in pieces if not on)
    assert unsupervised == (
        "<|im_start|>system\nYou are a statistician.<|im_end|>\n<|im_start|>user\nWhat is power?"
        "<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nAnd alpha?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # pad == eos for this model, yet the end-of-turn token is a label (twice: one per assistant turn)
    assert tok.pad_token_id == tok.eos_token_id
    assert [label for label in example["labels"] if label == tok.eos_token_id] == [tok.eos_token_id] * 2
    # labels equal the input ids where supervised
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example["input_ids"], example["labels"]))


def test_default_system_prompt_injected_by_template_is_not_supervised(embedded_tokenizer):
    example = tokenize_conversation(embedded_tokenizer, CONVERSATION[1:3])
    text = embedded_tokenizer.decode(example["input_ids"])
    assert "SmolLM" in text  # the template's own default system turn
    assert supervised_text(embedded_tokenizer, example)[0] == "The"


def test_llama3_style_template_keeps_eot_and_is_date_independent(embedded_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    example = tokenize_conversation(tok, CONVERSATION)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert "".join(supervised_text(tok, example)) == (
        "The probability of rejecting H0 when H1 is true.<|eot_id|>The false positive rate.<|eot_id|>"
    )
    assert example["labels"].count(eot) == 2
    assert eot in end_of_turn_ids(tok)
    assert "Today Date: 26 Jul 2024" in tok.decode(example["input_ids"])  # fixed, not today's date


def test_truncation_keeps_labels_aligned(embedded_tokenizer):
    full = tokenize_conversation(embedded_tokenizer, CONVERSATION)
    short = tokenize_conversation(embedded_tokenizer, CONVERSATION, max_length=30)
    assert short["input_ids"] == full["input_ids"][:30] and short["labels"] == full["labels"][:30]
    assert short["length"] == full["length"] > 30


def test_template_that_rewrites_history_is_refused(embedded_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_tokenizer.name_or_path)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="prefix by prefix"):
        tokenize_conversation(tok, CONVERSATION)


def test_build_sft_dataset_drops_conversations_without_supervised_tokens(embedded_tokenizer, processed_dir):
    data = build_sft_dataset(processed_dir / "train.jsonl", embedded_tokenizer, max_length=512)
    assert len(data) == 24 and set(data.column_names) == {"input_ids", "labels"}
    with pytest.raises(ValueError, match="no conversation has assistant tokens"):
        build_sft_dataset(processed_dir / "train.jsonl", embedded_tokenizer, max_length=8)
