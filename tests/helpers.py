"""What the tests share that is not a fixture (the fixtures are tests/conftest.py's): the repository's root, builders
of small inputs (a params file, a tiny random Llama, conversations and a processed-data folder, Stack Exchange dumps,
rows for the stats), the shrunk training config, the LoRA model of the fused-LoRA and FP8 tests, and the exact Llama
configs (benchmarks/common.py's, the one definition the benchmarks use too). Tests import these from here
(`from helpers import REPO, make_tiny_llama`), never from another test file or from conftest; heavy libraries are
imported inside the builders, so collecting a test stays quick.
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

import yaml

from expqa.config import CollectConfig
from expqa.data.dataset import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"  # the shipped params


# ---------------------------------------------------------------------------------------------------------------
# params


def write_params(
    dest: Path,
    updates: dict[str, dict] | None = None,
    *,
    replace: list[tuple[str, str]] | tuple = (),
    source: Path = PARAMS,
    sort_keys: bool = True,
) -> Path:
    """A params file at ``dest`` made from ``source`` (the shipped params.yaml): a copy of its text, with each
    (old, new) of ``replace`` replaced once (comments and line numbers kept); or, with ``updates``, its values with
    those keys set, written as YAML: ``{"lora": {"r": 4}, "cpu.train": {"max_steps": 8}}`` (a dotted name is a
    section inside a section)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if updates is None:
        text = source.read_text()
        for old, new in replace:
            text = text.replace(old, new, 1)
        dest.write_text(text)
        return dest
    params = yaml.safe_load(source.read_text())
    for dotted, values in updates.items():
        section = params
        for key in dotted.split("."):
            section = section[key]
        section.update(values)
    dest.write_text(yaml.safe_dump(params, sort_keys=sort_keys))
    return dest


def tiny_training_config(**overrides):
    """The shipped CPU profile, shrunk: the tests exercise the real settings, only smaller."""
    import dataclasses

    from expqa.config import load_params

    params = load_params(REPO / "params.yaml").resolve(cuda=False)
    values = dict(
        max_steps=4,
        micro_batch="2 conversations",
        gradient_accumulation_steps=1,
        max_seq_length=128,
        logging_steps=1,
        eval_steps=2,
        save_steps=2,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        num_threads=1,
    )
    values.update(overrides)
    return params, dataclasses.replace(params.train, **values)


# ---------------------------------------------------------------------------------------------------------------
# models


def llama_config(arch: str, **values):
    """The exact architecture ``arch`` ("llama-3.2-3b", "llama-3.1-8b") as a LlamaConfig, ``values`` overriding:
    benchmarks/common.py's definition, the one the benchmarks build their random checkpoints from."""
    benchmarks = str(REPO / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)  # benchmark scripts import common.py by name, as the benchmark tests do
    from common import llama_config as exact_architecture

    return exact_architecture(arch, **values)


def make_tiny_llama(out: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A random 2-layer Llama with the embedded tokenizer and chat template, saved in HF layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            **dict(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            **overrides,
        }
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "base_info.json").write_text(
        json.dumps({"name": "tiny-random-llama", "source": "test", "weights_sha256": {"model.safetensors": "test"}})
    )
    return out


def lora_model(
    base,
    quantized=False,
    dropout=0.0,
    fused_lora=False,
    gradient_checkpointing=False,
    grouped=False,
    rank=4,
    bf16=False,
    fp8_matmul="off",
):
    """A LoRA model of ``base`` for the fused-LoRA and FP8 tests: seeded, LoRA B given values so its path shows."""
    import torch

    from expqa.config import LoRAConfig, QuantizationConfig
    from expqa.model.loading import load_for_training

    torch.manual_seed(0)
    quant, lora = QuantizationConfig(load_in_4bit=quantized), LoRAConfig(r=rank, alpha_ratio=2.0, dropout=dropout)
    fused = ("grouped" if grouped else "per_projection") if fused_lora else "off"
    checkpointing = "full" if gradient_checkpointing else "off"
    plan = plan_for(
        base, quant, lora, fused_lora=fused, gradient_checkpointing=checkpointing, bf16=bf16, fp8_matmul=fp8_matmul
    )
    model, _ = load_for_training(base, quant, lora, plan)
    with torch.no_grad():  # LoRA B starts at zero; give it values so its path shows in outputs and gradients
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    return model


def plan_for(base, quant, lora, **train):
    """This machine's run plan (expqa.training.plan) for `base` with these train keys changed; the rest: params.yaml's
    GPU values, except conversations micro-batches, padded rows (SDPA, as a plain model load), no Liger, no bf16."""
    import dataclasses

    from transformers import AutoConfig

    from expqa.config import TrainingConfig
    from expqa.training.plan import machine_facts, plan_run

    keys = {"micro_batch": "2 conversations", "padding_free": False, "use_liger_kernel": False, "bf16": False}
    config = dataclasses.replace(TrainingConfig(), **{**keys, **train})
    return plan_run(config, lora, quant, AutoConfig.from_pretrained(base), machine_facts())


def loss_and_grads(model, ids, autocast=False):
    import torch

    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------------
# data


def conversation(i: int, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": "You are a careful statistician."}] if i % 3 == 0 else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i}.{t}: what sample size for a lift of {i}%?"},
            {"role": "assistant", "content": f"Answer {i}.{t}: use a power analysis with alpha 0.05."},
        ]
    return {"id": f"t-{i}", "source": "cross_validated", "messages": messages}


def write_processed(out: Path) -> Path:
    """data/processed-like splits of small synthetic conversations, in `out`."""
    out.mkdir(parents=True)
    for split, ids in (("train", range(0, 24)), ("val", range(100, 104)), ("test", range(200, 206))):
        with open(out / f"{split}.jsonl", "w") as handle:
            for i in ids:
                handle.write(json.dumps(conversation(i, turns=1 + i % 2)) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stack Exchange dumps (collect)

SAMPLE_POSTS = REPO / "data" / "raw" / "stackexchange_sample" / "Posts.xml"
SITE = "https://stats.stackexchange.com"
COLLECT_CONFIG = CollectConfig(
    posts=str(SAMPLE_POSTS),  # read by dvc.yaml only; the tests pass the dump's path themselves
    tags=[
        "ab-testing",
        "hypothesis-testing",
        "statistical-power",
        "sample-size",
        "p-value",
        "confidence-interval",
        "experiment-design",
        "bayesian",
        "causality",
        "multiple-comparisons",
        "bootstrap",
        "variance-reduction",
        "t-test",
    ],
    min_question_score=1,
    min_answer_score=2,
    min_answer_chars=80,
    max_answer_chars=6000,
    site_url=SITE,
)
LONG = "<p>" + "An answer that is long enough to pass the length filter. " * 3 + "</p>"


def question(
    qid: int,
    *,
    tags: str = "<ab-testing>",
    score: int = 5,
    accepted: int | None = None,
    body: str = "<p>Question body?</p>",
    **extra: object,
) -> dict:
    row = {
        "Id": qid,
        "PostTypeId": 1,
        "Score": score,
        "Title": f"Question {qid}",
        "Body": body,
        "Tags": tags,
        "CreationDate": "2020-01-01T00:00:00.000",
        **extra,
    }
    if accepted is not None:
        row["AcceptedAnswerId"] = accepted
    return row


def answer(aid: int, parent: int, *, score: int = 5, body: str = LONG, **extra: object) -> dict:
    return {
        "Id": aid,
        "PostTypeId": 2,
        "ParentId": parent,
        "Score": score,
        "Body": body,
        "CreationDate": "2020-01-02T00:00:00.000",
        **extra,
    }


def write_posts(path: Path, rows: list[dict]) -> Path:
    """A Posts.xml in the dump's layout: one row per line, newlines in values as &#xA;."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    for row in rows:
        attrs = " ".join(f'{name}="{escape(str(value)).replace(chr(10), "&#xA;")}"' for name, value in row.items())
        lines.append(f"  <row {attrs} />")
    lines.append("</posts>")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_site_7z(path: Path, members: dict[str, Path | bytes]) -> Path:
    """A solid .7z like the dump's: other tables before Posts.xml, so the reader must skip past them."""
    import py7zr

    with py7zr.SevenZipFile(path, "w") as archive:
        for name, content in members.items():
            if isinstance(content, Path):
                archive.write(content, name)
            else:
                archive.writestr(content, name)
    return path


# ---------------------------------------------------------------------------------------------------------------
# rows for the stats (one token per word)


def row(question: str, words: int, source: str = "cross_validated", id: str = "") -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(["w"] * words)}]
    return {"messages": messages, "source": source, "id": id or question}


def fake_tokenize(tokenizer, messages, max_length=None):
    """One token per word; the assistant's words are the labels."""
    user, answer = (len(message["content"].split()) for message in messages)
    return {"length": user + answer, "labels": [IGNORE_INDEX] * user + [1] * answer}
