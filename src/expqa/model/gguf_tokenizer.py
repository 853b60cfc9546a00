"""The tokenizer a GGUF file holds, rebuilt from its metadata with `tokenizers`, as llama.cpp reads it.

Two users: the base stage turns the embedded SmolLM2 GGUF into models/base/tokenizer.json, and the export stage reads
each GGUF it wrote back to check that it tokenizes like the merged model. Both used transformers' GGUF converter
before, whose result depends on the installed version: 5.17 builds byte fallback, a SentencePiece-style decoder,
<|im_start|> as eos and no pad, and knows no Llama 3 split; 5.24 builds plain byte-level BPE. What is built here is
what 5.24 builds, under every supported version (tokenizer.json byte-identical, tests/model/test_base.py).

Only byte-level BPE (tokenizer.ggml.model gpt2) with the pre-tokenizers the exporter writes: gpt-2 (also SmolLM2's
"smollm", whose digit split changes nothing: its merges join no ASCII digits) and llama-bpe (Llama 3).
"""

from __future__ import annotations

from pathlib import Path

# the Split regex of Llama 3's tokenizer.json (tiktoken's cl100k pattern); llama.cpp calls it "llama-bpe"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_REGEX = ("gpt-2", "smollm")  # GPT-2's byte-level regex splits the text


class GGUFTokenizerError(ValueError):
    """A GGUF whose tokenizer cannot be rebuilt here; the message names the file and the field."""


def pre_tokenizer(name: str):
    """The `tokenizers` pre-tokenizer for llama.cpp's tokenizer.ggml.pre name."""
    from tokenizers import Regex, pre_tokenizers

    if name in BYTE_LEVEL_REGEX:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if name == "llama-bpe":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    raise GGUFTokenizerError(f"pre-tokenizer {name!r} (known: {', '.join([*BYTE_LEVEL_REGEX, 'llama-bpe'])})")


def tokenizer_from_gguf(path: Path):
    """A transformers fast tokenizer (chat template, bos/eos/unk/pad) from the GGUF's tokenizer.* metadata."""
    from gguf import GGUFReader, TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(path).fields

    def value(key: str, default=KeyError):
        if key not in fields:
            if default is KeyError:
                raise GGUFTokenizerError(f"{Path(path).name}: no {key} in the GGUF metadata")
            return default
        return fields[key].contents()

    if value("tokenizer.ggml.model") != "gpt2" or value("tokenizer.ggml.add_space_prefix", False):
        raise GGUFTokenizerError(f"{Path(path).name}: not a byte-level BPE tokenizer (tokenizer.ggml.model gpt2)")
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in value("tokenizer.ggml.merges")],
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,  # byte-level: every byte is a symbol of the vocabulary, there are no <0xXX> tokens
        ignore_merges=False,
    )
    tokenizer = Tokenizer(bpe)
    try:
        tokenizer.pre_tokenizer = pre_tokenizer(value("tokenizer.ggml.pre", "gpt-2"))
    except GGUFTokenizerError as exc:
        raise GGUFTokenizerError(f"{Path(path).name}: {exc}") from None
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    special = {
        f"{name}_token": tokens[value(f"tokenizer.ggml.{key}_token_id")]
        for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        if f"tokenizer.ggml.{key}_token_id" in fields
    }
    bos = special.get("bos_token")
    if value("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == TokenType.CONTROL]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == TokenType.USER_DEFINED
        ]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    wrapped.chat_template = value("tokenizer.chat_template", None)
    return wrapped
