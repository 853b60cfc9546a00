"""The export stage: models/merged -> GGUF files for llama.cpp, Ollama and LM Studio, each verified by loading it back.

The `gguf` package (llama.cpp's own gguf-py, on PyPI) does the writing: GGUFWriter, the HF -> GGUF tensor names
(TensorNameMap), SpecialVocab (merges, special token ids, add-BOS/EOS flags, chat template) and the Q8_0 quantizer.
llama.cpp's HF converter (convert_hf_to_gguf.py) is not on PyPI; the four things of it that a Llama export needs are
redone here, each small: the q/k row permutation into llama.cpp's rope layout, the token types, the pre-tokenizer
name and Llama 3's rope_freqs tensor.

Verification reloads every file with transformers' GGUF loader and compares it with the merged model on fixed
prompts, teacher-forced over the merged model's own greedy continuation (expqa.model.equivalence.compare): max
|logit diff| within a per-type tolerance, greedy tokens equal except at near-ties, the same architecture numbers.
The tokenizer (token ids of probe texts, chat template rendering) is read back from the first file only: every file
gets the same tokenizer metadata from the same code, and rebuilding a 49k-token BPE tokenizer from GGUF takes seconds
per file.
transformers un-permutes q/k with the exact inverse of llama.cpp's permutation, so the round trip proves the
permutation is that one, not that llama.cpp computes the same
logits: tests/serving/test_export.py checks that with a llama.cpp runtime wheel (xllamacpp).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from expqa.config import ExportConfig, GenerationConfig
from expqa.data.dataset import end_of_turn_ids, render
from expqa.files import atomic_dir, split_wall_clock, write_json
from expqa.model.equivalence import (
    VERIFY_NEW_TOKENS,
    VERIFY_PROMPTS,
    compare,
    encode_prompts,
    reference_continuations,
    sequence_logits,
)
from expqa.model.gguf_tokenizer import LLAMA3_SPLIT, tokenizer_from_gguf
from expqa.progress import progress
from expqa.serving.ollama import adds_bos, modelfile
from expqa.wording import plural

Q = gguf.GGMLQuantizationType
# export.types -> (file type in the header, tensor type of the 2-D weights); norms and rope_freqs stay F32
GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
# max |logit diff| against the merged fp32 model on VERIFY_PROMPTS (measured on SmolLM2-135M: README "Run your
# model in llama.cpp"): f16 rounds every weight to 11 bits, bf16 to 8, q8_0 to 8 bits per block of 32
# (a max over every prompt and continuation position x the whole vocabulary: ~7M logits for SmolLM2)
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 0.1, "bf16": 0.5, "q8_0": 3.0}
# Greedy decoding may take another token only where the merged model itself nearly tied: its own token led the GGUF
# model's choice by at most this many logits (a probability ratio of 1.65). q8_0 flips at margins of 0.04-0.06 on
# SmolLM2-135M; a wrong tensor layout flips at margins of several logits.
NEAR_TIE = 0.5
# text whose tokens differ between pre-tokenizers (digit runs, contractions, whitespace runs, non-Latin, emoji)
TOKENIZER_PROBE = (
    "Is 12345 > 3.14? I've been 'told' it's 2x faster...\n\n\t  \n   CUPED: θ = cov(Y, X)/var(X); "
    "p=0.049 我想在apple工作 🦙🦙 naïve café ------======= "
    ""
)


class ExportError(RuntimeError):
    """A model that cannot be exported, or an export that does not match the merged model (report attached)."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------------------------------------------
# architecture and tokenizer metadata


def rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_exportable(config, tokenizer) -> None:
    if config.model_type != "llama":
        raise ExportError(
            f"model_type {config.model_type!r}: the exporter writes Llama-architecture models only "
            "(LlamaForCausalLM: SmolLM2, Llama 3.x)"
        )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ExportError(f"rope_type {rope_type!r} is not supported by the exporter (default, linear, llama3)")
    if len(tokenizer) > config.vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} rows")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for how this byte-level BPE tokenizer splits text before merging.

    llama.cpp's converter recognises a pre-tokenizer by hashing the token ids of a probe text, a table in
    convert_hf_to_gguf.py (not in the gguf package) that misses any vocabulary fine-tuning extended; the splitter
    itself is written in tokenizer.json, so it is read from there. Like llama.cpp, the decoder is not read: a gpt2
    vocabulary is decoded byte-level there by definition, and transformers versions wrap the same tokenizer in
    different decoders (5.17 writes byte fallback and a SentencePiece-style Sequence around ByteLevel). What makes
    it byte-level is a BPE model behind a ByteLevel pre-tokenizer (below) with no <0xXX> byte tokens for a fallback
    to reach; the export's check then compares token ids with the merged model's.
    """
    model = tokenizer_json.get("model") or {}
    byte_tokens = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" in (model.get("vocab") or {})]
    if model.get("type") != "BPE" or (model.get("byte_fallback") and byte_tokens):
        what = f"{model.get('type')}" + (" with byte fallback to <0xXX> tokens" if byte_tokens else "")
        raise ExportError(
            f"the exporter writes byte-level BPE tokenizers (GPT-2 / Llama 3 style) only; this one is {what}"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if (
        kinds == ["Split", "ByteLevel"]
        and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
        and steps[0].get("behavior") == "Isolated"
        and not steps[1].get("use_regex", True)
    ):
        return "llama-bpe"
    raise ExportError(
        f"pre-tokenizer {json.dumps(pre)[:200]} is not one the exporter knows (GPT-2's byte-level "
        "regex, Llama 3's split); llama.cpp would split text differently from training"
    )


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp token type.

    Special added tokens are CONTROL (so llama.cpp reads `<|im_end|>` in a prompt as one token), other added tokens
    USER_DEFINED, ids without a token UNUSED. gguf.BpeVocab would mark SmolLM2's special tokens NORMAL, because they
    are in the base vocabulary as well as added.
    """
    by_id = {i: text for text, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


def add_metadata(writer: gguf.GGUFWriter, config, tokenizer, model_dir: Path, gguf_type: str, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(GGUF_TYPES[gguf_type][0])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens, types = token_list(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(json.loads((model_dir / "tokenizer.json").read_text())))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/unk/pad ids and the chat template, read from the tokenizer files; whether BOS/EOS are added
    # as the tokenizer really does it (llama.cpp's default for an absent flag is not the tokenizer's)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config.vocab_size)
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    special.add_special_token.update(bos=adds_bos(tokenizer), eos=ids[-1:] == [tokenizer.eos_token_id])
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------------------------
# tensors


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from HF's rotate-half rope layout to llama.cpp's adjacent pairs (the permutation of
    llama.cpp's converter; transformers' GGUF loader applies its inverse)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(config) -> np.ndarray:
    """rope_freqs for Llama 3.x rope scaling: llama.cpp divides each base frequency by its factor, so the factor is
    base / scaled, with the scaled frequencies computed by transformers itself."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim, theta = head_dim(config), rope_parameters(config)["rope_theta"]
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (base / scaled.float()).numpy().astype(np.float32)


def tensor_plan(model_dir: Path, config, weight_type: gguf.GGMLQuantizationType) -> list[tuple]:
    """(gguf name, safetensors file, HF name, shape, ggml type) of every tensor, read without loading any."""
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []
    if rope_parameters(config).get("rope_type") == "llama3":
        plan.append(
            (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, None, (head_dim(config) // 2,), Q.F32)
        )
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for hf_name in handle.keys():
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp uses token_embd when there is no output.weight
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ExportError(f"{path.name}: tensor {hf_name} has no llama.cpp name")
                shape = tuple(handle.get_slice(hf_name).get_shape())
                qtype = Q.F32 if len(shape) < 2 else weight_type
                if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                    qtype = Q.F16  # rows that are not whole blocks (as llama.cpp's converter does)
                plan.append((name, path, hf_name, shape, qtype))
    return plan


def load_tensor(config, path: Path | None, hf_name: str | None) -> np.ndarray:
    from safetensors import safe_open

    if path is None:
        return llama3_rope_factors(config)
    with safe_open(path, "pt") as handle:
        data = handle.get_tensor(hf_name).float().numpy()
    if hf_name.endswith("q_proj.weight"):
        data = permute_qk(data, config.num_attention_heads)
    elif hf_name.endswith("k_proj.weight"):
        data = permute_qk(data, config.num_key_value_heads)
    return data


def write_gguf(model_dir: str | Path, out_path: str | Path, gguf_type: str, name: str, tokenizer) -> None:
    """Write one GGUF, one tensor at a time (peak memory: the largest tensor, not the model). tokenizer: model_dir's
    own (AutoTokenizer.from_pretrained(model_dir)), built once by the caller for every file."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    check_exportable(config, tokenizer)
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_metadata(writer, config, tokenizer, model_dir, gguf_type, name)
    plan = tensor_plan(model_dir, config, GGUF_TYPES[gguf_type][1])
    for gguf_name, _, _, shape, qtype in plan:
        if qtype in (Q.F32, Q.F16):
            dtype = np.float32 if qtype == Q.F32 else np.float16
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, path, hf_name, _, qtype in progress(plan, desc=f"export: write {gguf_type}", unit="tensor"):
        writer.write_tensor_data(gguf.quants.quantize(load_tensor(config, path, hf_name), qtype))
    writer.close()


# ---------------------------------------------------------------------------------------------------------------
# verification

CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
)


def probe_conversations() -> list[list[dict]]:
    user = {"role": "user", "content": "What is a p-value?"}
    return [
        [user],
        [{"role": "system", "content": "You are a careful statistician."}, user],
        [
            user,
            {"role": "assistant", "content": "The probability of data at least this extreme under H0."},
            {"role": "user", "content": "And a 95% CI?"},
        ],
    ]


def tokenizer_matches(path: Path, tokenizer) -> dict:
    """Same token ids for the probe text and the rendered prompts, same chat template rendering."""
    loaded = tokenizer_from_gguf(path)  # as llama.cpp reads it, whatever transformers' own GGUF reader does
    texts = [TOKENIZER_PROBE] + [render(tokenizer, c, add_generation_prompt=True) for c in probe_conversations()]
    ids = all(
        loaded(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in texts
    )
    template = all(
        render(loaded, c, add_generation_prompt=g) == render(tokenizer, c, add_generation_prompt=g)
        for c in probe_conversations()
        for g in (False, True)
    )
    return {"token_ids_equal": ids, "chat_template_equal": template}


def architecture_matches(loaded, config) -> bool:
    """transformers' reading of the GGUF metadata gives the merged model's numbers."""
    return bool(
        all(getattr(loaded, k) == getattr(config, k) for k in CONFIG_KEYS)
        and head_dim(loaded) == head_dim(config)
        and np.isclose(loaded.rms_norm_eps, config.rms_norm_eps, rtol=1e-6)
        and rope_parameters(loaded).get("rope_theta") == rope_parameters(config).get("rope_theta", 10000.0)
    )


@contextlib.contextmanager
def quick_gguf_loading():
    """transformers' GGUF loader (5.x) builds gguf's tensor-name map once per tensor and parses the file once for the
    config and again for the weights (and again for the tokenizer): most of the time of loading a 135M model back.
    Both are pure functions of their arguments, so they are memoised while this is active."""
    name_map, reader = gguf.get_tensor_name_map, gguf.GGUFReader
    readers: dict = {}

    def cached_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    gguf.get_tensor_name_map, gguf.GGUFReader = functools.lru_cache(maxsize=None)(name_map), cached_reader
    try:
        yield
    finally:
        gguf.get_tensor_name_map, gguf.GGUFReader = name_map, reader


def verify_gguf(
    path: Path,
    config,
    sequences: list[torch.Tensor],
    prompt_lengths: list[int],
    reference: list[torch.Tensor],
    tolerance: float,
    device: str,
) -> dict:
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    architecture_equal = architecture_matches(model.config, config)
    if rope_parameters(model.config).get("rope_type") != rope_parameters(config).get("rope_type"):
        # transformers' GGUF reader drops Llama 3 rope scaling (llama.cpp reads it from rope_freqs): same weights,
        # the merged model's rope
        weights = model.state_dict()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.load_state_dict(weights)
    model.to(device)
    logits = sequence_logits(model, sequences, desc=f"export: check {path.name}")
    result = compare(reference, logits, sequences, prompt_lengths, tolerance, NEAR_TIE)
    result.update(architecture_equal=architecture_equal, passed=result["passed"] and architecture_equal)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the stage function


def modelfile_type(config: ExportConfig, types: dict[str, dict]) -> str:
    """export.ollama_type, or under auto the type whose greedy answers follow the merged model's longest (types:
    the report's per-type checks), the smaller file on a tie: `expqa ask` is greedy, and Ollama should answer as it
    does. Measured on the tuned SmolLM2-135M (3 prompts, 72 tokens): f16's answers agree with the merged model's for
    68 tokens, q8_0's for 32, so auto picks f16 there."""
    if config.ollama_type != "auto":
        return config.ollama_type
    longest = max(r["greedy_agreed_tokens"] for r in types.values())
    return min((t for t, r in types.items() if r["greedy_agreed_tokens"] == longest), key=lambda t: types[t]["bytes"])


def export_gguf(model_dir: str | Path, out_dir: str | Path, config: ExportConfig, generation: GenerationConfig) -> dict:
    """Write models/gguf/<name>-<type>.gguf for each of export.types plus an Ollama Modelfile (FROM the
    modelfile_type file, with params.yaml's generation settings), verify every file against the merged model, and
    put the folder in place only if all pass. Returns the report (metrics/export.json and its wall-clock part:
    write_export_report)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # float32 forwards of a 3B model: minutes on a CPU
    merged.to(device)
    prompts = encode_prompts(tokenizer, VERIFY_PROMPTS)
    sequences = reference_continuations(merged, prompts, end_of_turn_ids(tokenizer), desc="export: merged, generate")
    reference = sequence_logits(merged, sequences, desc="export: merged, logits")
    model_config = merged.config
    del merged
    if device == "cuda":
        torch.cuda.empty_cache()
    with atomic_dir(out_dir) as tmp:  # a failed check raises inside: models/gguf stays as it was
        report: dict = {"device": device, "prompts": len(prompts), "new_tokens": VERIFY_NEW_TOKENS, "types": {}}
        for gguf_type in config.types:
            path = tmp / f"{config.name}-{gguf_type}.gguf"
            start = time.perf_counter()
            write_gguf(model_dir, path, gguf_type, config.name, tokenizer)
            written = time.perf_counter()
            with quick_gguf_loading():
                if "tokenizer" not in report:
                    report["tokenizer"] = tokenizer_matches(path, tokenizer)
                result = verify_gguf(
                    path,
                    model_config,
                    sequences,
                    [p.shape[1] for p in prompts],
                    reference,
                    LOGIT_TOLERANCE[gguf_type],
                    device,
                )
            report["types"][gguf_type] = {
                "file": path.name,
                "bytes": path.stat().st_size,
                "write_seconds": round(written - start, 1),
                "verify_seconds": round(time.perf_counter() - written, 1),
                **result,
            }
        report["ollama_type"] = modelfile_type(config, report["types"])
        (tmp / "Modelfile").write_text(modelfile(tokenizer, f"{config.name}-{report['ollama_type']}.gguf", generation))
        report["passed"] = all(r["passed"] for r in report["types"].values()) and all(report["tokenizer"].values())
        report["seconds"] = round(time.perf_counter() - started, 1)
        if not report["passed"]:
            failed = [t for t, r in report["types"].items() if not r["passed"]] + [
                k for k, ok in report["tokenizer"].items() if not ok
            ]
            raise ExportError(
                f"GGUF export does not match the merged model for {', '.join(failed)}; {out_dir} not written", report
            )
    return report


def write_export_report(report: dict, path: Path, timings: Path) -> None:
    """The report without its write/verify seconds to path (metrics/export.json, DVC-tracked: the same bytes for a
    reproduced run), the seconds to timings (logs/: cached by DVC, not compared)."""
    tracked, clock = split_wall_clock(report)
    write_json(path, tracked)
    write_json(timings, clock)


def export_summary(report: dict, out_dir: Path) -> list[str]:
    """One line per GGUF file (size, logit difference, greedy agreement), then the Modelfile and the total time."""
    lines = [
        f"export: {out_dir / r['file']} {r['bytes'] / 2**20:.0f} MiB, max |logit diff| "
        f"{r['max_abs_logit_diff']:.3g} (tolerance {r['tolerance']}), greedy equal: {r['greedy_equal']} "
        f"({plural(r['greedy_flips'], 'near-tie flip')} in {plural(r['greedy_steps'], 'step')}; greedy answers "
        f"agree for {plural(r['greedy_agreed_tokens'], 'token')})"
        for r in report["types"].values()
    ]
    modelfile_line = f"export: {out_dir / 'Modelfile'} (Ollama: {report['ollama_type']})"
    return lines + [f"{modelfile_line}, {report['seconds']:.0f} s"]
