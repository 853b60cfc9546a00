"""GGUF export: the round trip through transformers' GGUF loader on a tiny Llama-3-shaped model (rope scaling llama3,
Llama 3 pre-tokenizer and template), what llama.cpp itself computes from the files (xllamacpp, a llama.cpp runtime
wheel), the Ollama Modelfile, the params section and the stage's failure path."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from expqa.config import GGUF_EXPORT_TYPES, ConfigError, ExportConfig, GenerationConfig, load_params
from expqa.data.dataset import render
from expqa.model.gguf_tokenizer import LLAMA3_SPLIT
from expqa.serving import export
from expqa.serving.ollama import compose, generation_parameters, modelfile, turn_segments
from helpers import REPO, make_tiny_llama

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3.2's chat template without the tool-calling branches
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def llama3_tokenizer(embedded_tokenizer):
    """The embedded BPE vocabulary with Llama 3's pre-tokenizer, special tokens, BOS post-processor and template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    data = json.loads(embedded_tokenizer.backend_tokenizer.to_str())
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)))
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """A 2-layer Llama with llama3 rope scaling, the Llama 3 tokenizer shape and weights large enough that attention
    is sharp (so a wrong q/k layout changes the logits a lot)."""
    tokenizer = llama3_tokenizer(embedded_tokenizer)
    return make_tiny_llama(
        tmp_path_factory.mktemp("llama3") / "model",
        tokenizer,
        seed=3,
        initializer_range=0.25,
        rope_parameters=LLAMA3_ROPE,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )


@pytest.fixture(scope="module")
def llama3_export(llama3_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("llama3_gguf") / "gguf"
    return out, export.export_gguf(
        llama3_dir, out, ExportConfig(types=["f32", "q8_0"], name="tiny", ollama_type="auto"), GenerationConfig()
    )


# ---------------------------------------------------------------------------------------------------------------
# round trip through transformers' GGUF loader


@pytest.mark.slow
def test_llama3_shaped_export_round_trips(llama3_export, llama3_dir):
    out, report = llama3_export
    assert report["passed"] and sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "tiny-f32.gguf",
        "tiny-q8_0.gguf",
    ]
    f32, q8 = report["types"]["f32"], report["types"]["q8_0"]
    assert f32["architecture_equal"] and q8["architecture_equal"]
    assert report["tokenizer"] == {"token_ids_equal": True, "chat_template_equal": True}
    # f32 GGUF: the same fp32 weights (the q/k permutation is a reindexing) in the same model: the same kernels, so the
    # logits are equal on any CPU (measured diff 0.0) and greedy_equal follows
    assert f32["max_abs_logit_diff"] < 1e-4 and f32["greedy_equal"] and f32["greedy_flips"] == 0
    assert 0 < q8["max_abs_logit_diff"] <= q8["tolerance"]
    assert q8["bytes"] < 0.35 * f32["bytes"]  # 8.5 of 32 bits per weight, plus the vocabulary
    # ollama_type auto: the f32 file's greedy answers are the merged model's throughout; q8_0 is chosen only where
    # its answers agree as long (then it is the smaller file)
    assert f32["greedy_agreed_tokens"] == f32["greedy_steps"] and q8["greedy_agreed_tokens"] <= f32["greedy_steps"]
    chosen = "q8_0" if q8["greedy_agreed_tokens"] == f32["greedy_steps"] else "f32"
    assert report["ollama_type"] == chosen
    assert f"FROM ./tiny-{chosen}.gguf\n" in (out / "Modelfile").read_text()


@pytest.mark.slow
def test_gguf_metadata_is_what_llama_cpp_reads(llama3_export, llama3_dir):
    import gguf

    reader = gguf.GGUFReader(llama3_export[0] / "tiny-q8_0.gguf")
    field = {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("GGUF.")}
    assert field["general.architecture"] == "llama" and field["tokenizer.ggml.model"] == "gpt2"
    assert field["tokenizer.ggml.pre"] == "llama-bpe" and field["tokenizer.chat_template"] == LLAMA3_TEMPLATE
    tokens, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    eot = tokens.index("<|eot_id|>")
    assert field["tokenizer.ggml.eos_token_id"] == eot and types[eot] == gguf.TokenType.CONTROL
    assert field["tokenizer.ggml.bos_token_id"] == tokens.index("<|begin_of_text|>")
    assert field["tokenizer.ggml.add_bos_token"] is True and field["tokenizer.ggml.add_eos_token"] is False
    assert field["llama.rope.freq_base"] == 500000.0 and field["llama.context_length"] == 2048
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # not tied
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # llama.cpp divides each rope frequency by its factor: 1 for short wavelengths, `factor` for long ones
    factors = tensors["rope_freqs.weight"].data
    assert factors[0] == 1.0 and 1 < factors[1] < 8 and (factors[2:] == 8.0).all()


@pytest.mark.slow
def test_a_wrong_qk_layout_fails_the_round_trip(llama3_dir, tmp_path, monkeypatch):
    """transformers un-permutes q/k with the inverse of llama.cpp's permutation: skipping it must show."""
    monkeypatch.setattr(export, "permute_qk", lambda weight, n_head: weight)
    with pytest.raises(export.ExportError) as info:
        export.export_gguf(
            llama3_dir,
            tmp_path / "gguf",
            ExportConfig(types=["f32"], name="tiny", ollama_type="f32"),
            GenerationConfig(),
        )
    result = info.value.report["types"]["f32"]
    assert not result["passed"] and result["max_abs_logit_diff"] > 0.1
    assert not (tmp_path / "gguf").exists()  # nothing unverified is left behind


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_other_types_round_trip_on_the_tiny_base(tiny_base, tmp_path, gguf_type, monkeypatch):
    from transformers import AutoTokenizer

    built, from_pretrained = [], AutoTokenizer.from_pretrained

    def counting(path, *args, **kwargs):
        built.append(kwargs.get("gguf_file"))
        return from_pretrained(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)
    report = export.export_gguf(
        tiny_base,
        tmp_path / "gguf",
        ExportConfig(types=[gguf_type], name="t", ollama_type=gguf_type),
        GenerationConfig(),
    )
    assert report["passed"], report
    # building a 49k-token BPE tokenizer takes seconds: the merged model's is built once for every file (the GGUF's
    # is rebuilt from its metadata: expqa.model.gguf_tokenizer)
    assert built == [None]


def test_export_report_keeps_seconds_out_of_the_tracked_file(tmp_path):
    report = {
        "passed": True,
        "seconds": 12.3,
        "types": {"f16": {"file": "expqa-f16.gguf", "bytes": 2**21, "write_seconds": 1.0, "verify_seconds": 2.0}},
    }
    export.write_export_report(report, tmp_path / "metrics" / "export.json", tmp_path / "logs" / "run.json")
    assert (tmp_path / "metrics" / "export.json").read_text() == (
        '{\n  "passed": true,\n  "types": {\n    "f16": {\n      "bytes": 2097152,\n'
        '      "file": "expqa-f16.gguf"\n    }\n  }\n}\n'
    )
    assert json.loads((tmp_path / "logs" / "run.json").read_text()) == {
        "seconds": 12.3,
        "types": {"f16": {"write_seconds": 1.0, "verify_seconds": 2.0}},
    }


def test_export_summary_lines(llama3_export):
    out, report = llama3_export
    lines = export.export_summary(report, out)
    assert len(lines) == 3
    assert lines[-1] == f"export: {out / 'Modelfile'} (Ollama: {report['ollama_type']}), {report['seconds']:.0f} s"
    q8 = report["types"]["q8_0"]
    assert lines[1] == (
        f"export: {out / 'tiny-q8_0.gguf'} {q8['bytes'] / 2**20:.0f} MiB, max |logit diff| "
        f"{q8['max_abs_logit_diff']:.3g} (tolerance 3.0), greedy equal: {q8['greedy_equal']} "
        f"({q8['greedy_flips']} near-tie flips in {q8['greedy_steps']} steps; greedy answers agree for "
        f"{q8['greedy_agreed_tokens']} tokens)"
    )


# ---------------------------------------------------------------------------------------------------------------
# what llama.cpp computes from the files (a runtime wheel from PyPI: no C++ build)


def llama_cpp(path: Path, n_ctx: int = 512):
    xlc = pytest.importorskip("xllamacpp", reason="llama.cpp runtime wheel (pip install xllamacpp)")
    params = xlc.CommonParams()
    params.model.path = str(path)
    params.n_ctx, params.warmup, params.cpuparams.n_threads = n_ctx, False, 2
    return xlc.Server(params)


def llama_cpp_top(server, prompt: list[int], k: int = 5) -> list[tuple[int, float]]:
    """llama.cpp's k most likely next tokens after `prompt` (token ids) and their log-probabilities."""
    result = server.handle_completions(
        {"prompt": prompt, "n_predict": 1, "temperature": 0, "n_probs": k, "cache_prompt": False}
    )
    return [(t["id"], t["logprob"]) for t in result["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]


@pytest.mark.slow
def test_llama_cpp_computes_the_same_next_token_distribution(llama3_export, llama3_dir):
    """The real check of the q/k permutation, the rope_freqs factors and the tensor names: llama.cpp's own forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    model = AutoModelForCausalLM.from_pretrained(llama3_dir).eval()
    server = llama_cpp(llama3_export[0] / "tiny-f32.gguf")
    prompt = tokenizer(
        render(tokenizer, [{"role": "user", "content": "What is CUPED, in 2 sentences?"}], add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    for length in (1, 9, len(prompt)):  # the first position has no rope rotation; later ones do
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt[:length]])).logits[0, -1], -1)
        # llama.cpp keeps its KV cache in f16: 1e-3-level differences. Skipping the q/k permutation moves these
        # log-probabilities by more than 1 from position 2 on (measured), so 1e-2 separates the two
        for token, logprob in llama_cpp_top(server, prompt[:length]):
            assert logprob == pytest.approx(expected[token].item(), abs=1e-2), (length, token)
        # implied by the 1e-2 above wherever transformers' top-2 log-probabilities are > 2e-2 apart: measured >= 0.097
        # at these three lengths, so other CPUs' kernels (llama.cpp's or torch's) cannot flip it
        assert llama_cpp_top(server, prompt[:length])[0][0] == int(expected.argmax())


@pytest.mark.slow
def test_llama_cpp_answers_like_transformers_on_the_embedded_model(embedded_base, tmp_path):
    """The real SmolLM2 exported as f16: llama.cpp tokenizes the prompt like the HF tokenizer, renders the embedded
    chat template like transformers and continues greedily with the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expqa.model.equivalence import encode_prompts, reference_continuations

    path = tmp_path / "smol-f16.gguf"
    tokenizer = AutoTokenizer.from_pretrained(embedded_base)
    export.write_gguf(embedded_base, path, "f16", "smol", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(embedded_base, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is a p-value?"}]
    [prompt] = encode_prompts(tokenizer, ["What is a p-value?"])
    sequence = reference_continuations(model, [prompt], [2])[0]
    greedy = sequence[prompt.shape[1] :].tolist()
    server = llama_cpp(path)
    chat = server.handle_chat_completions({"messages": messages, "max_tokens": 24, "temperature": 0})
    prompt_ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)
    assert chat["usage"]["prompt_tokens"] == len(prompt_ids["input_ids"])
    content, expected = chat["choices"][0]["message"]["content"], tokenizer.decode(greedy, skip_special_tokens=True)
    if content != expected:
        # llama.cpp runs f16 weights and its own ISA-specific kernels: its log-probabilities are within 0.011 of
        # transformers' fp32 ones along this answer (measured on AVX2), so it may pick another token only where
        # transformers' top two are that close. Accepted below a gap of 0.1 (the smallest gap on this answer is 0.16);
        # a wrong template or tokenizer changes the answer from its first token on, where the gap is 1.9
        prefixes = [tokenizer.decode(greedy[: i + 1], skip_special_tokens=True) for i in range(len(greedy))]
        # the first answer token llama.cpp did not continue with (the last one: it went on past transformers' end)
        first = next((i for i, text in enumerate(prefixes) if not content.startswith(text)), len(greedy) - 1)
        with torch.no_grad():
            logits = model(input_ids=sequence.unsqueeze(0)).logits[0, prompt.shape[1] - 1 : -1]
        gap = float(logits[first].topk(2).values.diff().abs())
        assert gap < 0.1, (first, gap, content, expected)
    completion = server.handle_completions(
        {"prompt": export.TOKENIZER_PROBE, "n_predict": 1, "temperature": 0, "cache_prompt": False}
    )
    assert completion["timings"]["prompt_n"] == len(tokenizer(export.TOKENIZER_PROBE)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------
# pieces


def test_permutation_is_the_inverse_of_transformers_unpermute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3).numpy()
    for n_head in (8, 2):
        permuted = export.permute_qk(weight, n_head)
        assert not (permuted == weight).all()
        assert (LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_head) == weight).all()


def test_pre_tokenizer_names(embedded_tokenizer):
    data = json.loads(embedded_tokenizer.backend_tokenizer.to_str())
    assert export.pre_tokenizer_name(data) == "gpt-2"
    assert (
        export.pre_tokenizer_name(json.loads(llama3_tokenizer(embedded_tokenizer).backend_tokenizer.to_str()))
        == "llama-bpe"
    )
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, data["pre_tokenizer"]],
    }
    with pytest.raises(export.ExportError, match="pre-tokenizer .* is not one the exporter knows"):
        export.pre_tokenizer_name(data)


# the embedded tokenizer as transformers 5.17's GGUF converter writes it: byte fallback and a SentencePiece-style
# decoder around ByteLevel, an empty normalizer Sequence; it still encodes and decodes byte-level
TRANSFORMERS_5_17_FORM = {
    "normalizer": {"type": "Sequence", "normalizers": []},
    "decoder": {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        ],
    },
}


def in_5_17_form(tokenizer_json: dict) -> dict:
    data = {**tokenizer_json, **TRANSFORMERS_5_17_FORM}
    data["model"] = {**data["model"], "byte_fallback": True}
    data["pre_tokenizer"] = {**data["pre_tokenizer"], "trim_offsets": False}
    return data


def test_byte_level_is_read_from_the_vocabulary_whatever_decoder_a_version_writes(embedded_tokenizer):
    data = json.loads(embedded_tokenizer.backend_tokenizer.to_str())
    assert export.pre_tokenizer_name(in_5_17_form(data)) == "gpt-2"
    data["model"]["vocab"]["<0x41>"] = len(data["model"]["vocab"])  # a SentencePiece-style byte token
    with pytest.raises(export.ExportError, match="this one is BPE with byte fallback to <0xXX> tokens"):
        export.pre_tokenizer_name(in_5_17_form(data))
    data["model"]["type"] = "Unigram"
    with pytest.raises(export.ExportError, match="byte-level BPE tokenizers .* only; this one is Unigram"):
        export.pre_tokenizer_name(data)


@pytest.mark.slow
def test_a_tokenizer_saved_in_transformers_5_17_form_exports_and_verifies(tiny_base, tmp_path):
    """The export that stopped on a GPU host whose transformers (5.17) had built models/base: it now passes, with
    the same token ids in the GGUF as in the merged model's tokenizer."""
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    tokenizer_json = model / "tokenizer.json"
    tokenizer_json.write_text(json.dumps(in_5_17_form(json.loads(tokenizer_json.read_text()))))
    report = export.export_gguf(
        model, tmp_path / "gguf", ExportConfig(types=["f16"], name="t", ollama_type="f16"), GenerationConfig()
    )
    assert report["passed"] and report["tokenizer"]["token_ids_equal"], report


def test_special_tokens_are_control_tokens(embedded_tokenizer):
    import gguf

    tokens, types = export.token_list(embedded_tokenizer, len(embedded_tokenizer) + 2)
    assert tokens[2] == "<|im_end|>" and types[2] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert types[-1] == gguf.TokenType.UNUSED


def test_non_llama_models_are_refused(tiny_base, tmp_path, embedded_tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_base)
    config.model_type = "qwen2"
    with pytest.raises(export.ExportError, match="Llama-architecture models only"):
        export.check_exportable(config, embedded_tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# the Ollama Modelfile


@pytest.mark.slow
def test_modelfile_template_renders_the_chat_template(llama3_export, llama3_dir, embedded_tokenizer):
    from transformers import AutoTokenizer

    text = (llama3_export[0] / "Modelfile").read_text()
    assert f"FROM ./tiny-{llama3_export[1]['ollama_type']}.gguf\n" in text and 'PARAMETER stop "<|eot_id|>"' in text
    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    seg = turn_segments(tokenizer)
    # Ollama adds BOS itself (add_bos_token): the TEMPLATE starts at the system header
    assert seg["bos"] == "<|begin_of_text|>" and '"""{{ if or (not .Messages)' in text
    assert seg["default_system"].startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    smol = turn_segments(embedded_tokenizer)  # ChatML with a default system prompt, BOS not added
    assert smol["bos"] == "" and "You are a helpful AI assistant named SmolLM" in smol["default_system"]
    for tok in (tokenizer, embedded_tokenizer):
        for messages in (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        ):
            assert compose(turn_segments(tok), messages) == render(tok, messages, add_generation_prompt=True)


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	tpl, _ := os.ReadFile(os.Args[1])
	var msgs []Message
	raw, _ := os.ReadFile(os.Args[2])
	json.Unmarshal(raw, &msgs)
	template.Must(template.New("t").Parse(string(tpl))).Execute(os.Stdout, map[string]any{"Messages": msgs})
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (apt-get install golang-go)")
def test_modelfile_template_renders_in_go_like_the_chat_template(tmp_path, embedded_tokenizer):
    """Ollama executes TEMPLATE with Go's text/template over .Messages: do that, compare with transformers."""
    (tmp_path / "main.go").write_text(GO_RENDER)
    subprocess.run(["go", "mod", "init", "render"], cwd=tmp_path, capture_output=True, check=True)
    subprocess.run(["go", "build", "-o", "render", "."], cwd=tmp_path, capture_output=True, check=True)
    for tokenizer in (embedded_tokenizer, llama3_tokenizer(embedded_tokenizer)):
        text = modelfile(tokenizer, "x.gguf", GenerationConfig())
        (tmp_path / "t.tmpl").write_text(text.split('TEMPLATE """', 1)[1].split('"""', 1)[0])
        for messages in (
            [{"role": "user", "content": "What is a p-value?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Power?"}],
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello.\n\nWell?"},
                {"role": "user", "content": "CUPED?"},
            ],
        ):
            (tmp_path / "m.json").write_text(
                json.dumps([{"Role": m["role"], "Content": m["content"]} for m in messages])
            )
            go = subprocess.run(
                [tmp_path / "render", tmp_path / "t.tmpl", tmp_path / "m.json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert turn_segments(tokenizer)["bos"] + go == render(tokenizer, messages, add_generation_prompt=True)


def test_modelfile_for_chatml(embedded_tokenizer):
    text = modelfile(embedded_tokenizer, "expqa-q8_0.gguf", GenerationConfig())
    assert text.splitlines()[1:3] == [
        "FROM ./expqa-q8_0.gguf",
        ('TEMPLATE """{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system'),
    ]
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ else if' in text
    assert '{{ end }}{{ end }}<|im_start|>assistant\n"""\nPARAMETER stop "<|im_end|>"\n' in text


def test_modelfile_carries_the_generation_settings(embedded_tokenizer):
    settings = GenerationConfig(
        max_new_tokens=300, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.15, no_repeat_ngram_size=0
    )
    lines = modelfile(embedded_tokenizer, "expqa-f16.gguf", settings).splitlines()
    assert (
        lines[-6:]
        == generation_parameters(settings)
        == [
            "PARAMETER temperature 0.7",
            "PARAMETER top_p 0.9",
            "PARAMETER top_k 40",
            "PARAMETER repeat_penalty 1.15",
            "PARAMETER repeat_last_n -1",  # transformers penalises the whole sequence; Ollama's default looks back 64
            "PARAMETER num_predict 300",
        ]
    )
    shipped = load_params(REPO / "params.yaml").generation  # what models/gguf/Modelfile gets
    greedy = modelfile(embedded_tokenizer, "expqa-f16.gguf", shipped)
    assert (
        "PARAMETER temperature 0\n" in greedy and f"PARAMETER repeat_penalty {shipped.repetition_penalty:g}\n" in greedy
    )
    # no Ollama PARAMETER for the n-gram ban: the Modelfile says it is left out
    banned = modelfile(embedded_tokenizer, "x.gguf", dataclasses.replace(settings, no_repeat_ngram_size=4))
    assert "# no_repeat_ngram_size 4 (params.yaml generation) has no Ollama PARAMETER\n" in banned
    assert "no_repeat_ngram_size" not in "\n".join(lines)


@pytest.mark.parametrize(
    "agreed, setting, chosen",
    [
        ({"f16": 72, "q8_0": 6}, "auto", "f16"),  # q8_0's answers part from the merged model's early: f16
        ({"f16": 72, "q8_0": 72}, "auto", "q8_0"),  # agree as long: the smaller file
        ({"f16": 40, "q8_0": 41}, "auto", "q8_0"),
        ({"f16": 72, "q8_0": 6}, "q8_0", "q8_0"),  # a type named in params is kept
    ],
)
def test_modelfile_type_follows_the_greedy_agreement(agreed, setting, chosen):
    types = {t: {"greedy_agreed_tokens": n, "bytes": {"f16": 270, "q8_0": 145}[t]} for t, n in agreed.items()}
    config = ExportConfig(types=list(agreed), ollama_type=setting)
    assert export.modelfile_type(config, types) == chosen


# ---------------------------------------------------------------------------------------------------------------
# params and the stage


def test_params_export_section_is_complete_and_equals_the_dataclass(shipped_params):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw["export"]) == {f.name for f in dataclasses.fields(ExportConfig)}
    assert dataclasses.asdict(shipped_params.export) == dataclasses.asdict(ExportConfig())
    assert shipped_params.export.types == ["f16", "q8_0"]
    assert set(GGUF_EXPORT_TYPES) == set(export.GGUF_TYPES) == set(export.LOGIT_TOLERANCE)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("export: {types: [q4_k]}", "export.types has 'q4_k'; allowed: f32, f16, bf16, q8_0"),
        (
            "export: {types: [f16], ollama_type: q8_0}",
            "export.ollama_type is 'q8_0'; must be auto or one of export.types",
        ),
        ("export: {name: 'my model'}", "export.name is 'my model'; use a plain file stem"),
    ],
)
def test_bad_export_params_name_the_key(tmp_path, override, expected):
    (tmp_path / "o.yaml").write_text(override)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_params(REPO / "params.yaml", tmp_path / "o.yaml")


@pytest.mark.slow
def test_stage_writes_the_report_and_fails_on_a_mismatch(tiny_base, tmp_path):
    (tmp_path / "one.yaml").write_text("export: {types: [f16], ollama_type: f16}\n")
    stage = [
        sys.executable,
        str(REPO / "stages/export.py"),
        "--model",
        str(tiny_base),
        "--out",
        str(tmp_path / "gguf"),
        "--report",
        str(tmp_path / "export.json"),
        "--params",
        str(REPO / "params.yaml"),
        "--config",
        str(tmp_path / "one.yaml"),
        "--timings",
        str(tmp_path / "logs" / "export_run.json"),
    ]
    done = subprocess.run(stage, capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["passed"] and report["types"]["f16"]["file"] == "expqa-f16.gguf"
    # wall-clock figures are not DVC-tracked metrics: a reproduced run writes the same metrics/export.json
    assert "seconds" not in json.dumps(report)
    timings = json.loads((tmp_path / "logs" / "export_run.json").read_text())
    assert timings["seconds"] > 0 and set(timings["types"]["f16"]) == {"write_seconds", "verify_seconds"}
    assert "expqa-f16.gguf" in done.stdout and (tmp_path / "gguf" / "Modelfile").exists()

    (tmp_path / "one.yaml").write_text("export: {types: [q8_0], ollama_type: q8_0, name: other}\n")
    broken = (
        "import runpy, expqa.serving.export as e; e.LOGIT_TOLERANCE['q8_0'] = 0.0; "
        f"runpy.run_path({stage[1]!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", broken, *stage[2:]], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 1 and "does not match the merged model for q8_0" in done.stderr
    assert not json.loads((tmp_path / "export.json").read_text())["passed"]
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["Modelfile", "expqa-f16.gguf"]  # untouched
