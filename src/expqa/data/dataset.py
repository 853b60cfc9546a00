"""Turn ChatML conversations into training examples: token ids + labels that supervise assistant turns only.

Two silent failures this module exists to prevent:
- loss on system/user tokens (TRL's default for `messages` data); here every non-assistant token is -100;
- an end-of-turn token that never reaches the labels because pad == eos (SmolLM2: both `<|im_end|>`) and a
  collator masks padding by token id. The end-of-turn token of every assistant turn is part of its labelled span,
  and padding is masked by position (TRL's collator pads labels with -100), never by id.
The chat template is the tokenizer's own, the same one saved with the adapter and used by `expqa ask`.
"""

from __future__ import annotations

from pathlib import Path

IGNORE_INDEX = -100
# Llama 3 templates stamp "Today Date: <today>" into the system turn; a fixed date keeps the tokens (and so the
# trained weights) independent of the day the pipeline runs. Templates without that variable ignore it.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


class TemplateError(ValueError):
    """The chat template cannot be split into per-turn spans."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **TEMPLATE_KWARGS
    )


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return its text and the character span of every assistant turn.

    A span runs from the end of the generation prompt to the end of that turn as the template renders it, so it
    includes the end-of-turn token (`<|im_end|>`, `<|eot_id|>`) and whatever the template puts after it.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(prompt)):
            raise TemplateError(
                "the chat template does not render conversations prefix by prefix (turn "
                f"{i} changes earlier text), so assistant tokens cannot be located"
            )
        spans.append((len(prompt), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> dict:
    """input_ids and labels (-100 outside assistant turns), truncated to max_length from the right."""
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        # a token belongs to a turn when it starts inside it; zero-width tokens never do
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[index] = input_ids[index]
    full_length = len(input_ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "length": full_length}


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn for this template: eos plus e.g. Llama 3's <|eot_id|>."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id is not None:
            ids.add(token_id)
    return sorted(ids)


def build_sft_dataset(path: str | Path, tokenizer, max_length: int):
    """A datasets.Dataset of input_ids/labels for TRL's SFTTrainer (pre-tokenized: TRL uses labels as given).

    Conversations whose assistant tokens all fall beyond max_length carry no loss and are dropped.
    """
    from datasets import Dataset

    from expqa.data.chatml import load_chatml_dataset

    rows = load_chatml_dataset(path)
    examples = [tokenize_conversation(tokenizer, row["messages"], max_length) for row in rows]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not examples:
        raise ValueError(f"{path}: no conversation has assistant tokens within max_seq_length={max_length}")
    return Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}
    )
