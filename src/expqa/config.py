"""Typed configuration: one dataclass per params.yaml section, one loader, errors that name the key.

params.yaml is the one place a default lives: loading it requires every key (a missing one is a located error
naming the line to add), so a dataclass default never fills a gap silently. The defaults below exist for the
Python API (`QLoRATrainer(TrainingConfig(), ...)`) and equal params.yaml's values (tests/test_config.py checks).
Unknown keys, wrong types and invalid values are collected and reported together, each with its dotted key,
file:line, the bad value and what is allowed.

The hardware profile (`profile: auto | gpu | cpu`) is resolved by the `params` stage (on every run), which writes each
stage's sections as they will run to metrics/params/<stage>.json; the stages read those files (STAGE_SECTIONS).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ATTENTION_KERNELS = ("sdpa", "eager", "expqa_varlen")
CHECKPOINTING_MODES = ("auto", "off", "selective", "full", "offload")  # expqa.checkpointing.MODES
FP8_MODES = ("auto", "on", "off")  # train.fp8_matmul, resolved by expqa.fp8.resolve
GGUF_EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")
LM_HEAD_LOSSES = ("trl", "expqa")
MAX_WEIGHT = 1000.0  # train copies are stored in 16 bits, and more is surely a typo
# params files nest a few levels; deeper is not a params file, and the parsers would recurse past Python's limit
MAX_CONFIG_NESTING = 64
SOURCE_FORMATS = ("chatml", "sharegpt", "alpaca", "openai", "hf_disk")  # expqa.sources.FORMATS
SEED_END = 2**32  # numpy's seeds (set by transformers' set_seed) are 32-bit
PROFILES = ("auto", "gpu", "cpu")
MICRO_BATCH_UNITS = ("tokens", "conversations")
# the params sections each stage reads (the params stage writes them, resolved, to metrics/params/<stage>.json)
STAGE_SECTIONS = {
    "base": ("model",),
    "collect": ("collect",),
    "generate": ("generate",),
    "combine": ("base", "data"),
    "stats": ("train",),
    "train": ("base", "quantization", "lora", "train"),
    "evaluate": ("base", "eval", "train"),
    "export": ("export",),
}


class ConfigError(ValueError):
    """One or more invalid configuration values; the message lists them all (one line when there is one)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} configuration problems:\n  " + "\n  ".join(self.problems))


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": text})
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class BaseConfig:
    seed: int = _help("Seed for data splitting, LoRA init, shuffling and sampling.", 42)

    def validate(self) -> list[str]:
        if 0 <= self.seed < SEED_END:
            return []
        return [f"base.seed is {self.seed}; use 0 to {SEED_END - 1} (numpy's seeds are 32-bit)"]


@dataclass
class ModelConfig:
    name: str = _help(
        "Base model: the embedded default, a hub id (e.g. meta-llama/Llama-3.2-3B-Instruct) or a "
        "local directory in Hugging Face layout.",
        EMBEDDED_MODEL,
    )
    revision: str = _help("Hub revision (branch, tag or commit) for hub ids; ignored otherwise.", "main")

    def validate(self) -> list[str]:
        return [] if self.name.strip() else ["model.name is empty; give a hub id or a local directory"]


@dataclass
class CollectConfig:
    posts: str = _help(
        "The dump collect imports: a Posts.xml or a site's .7z / .zip archive. Read by dvc.yaml only "
        "(`${collect.posts}` in the stage's cmd and deps, so dvc.lock pins its hash); "
        "`make collect-cv-full ARCHIVE=...` sets it.",
        "data/raw/stackexchange_sample/Posts.xml",
    )
    tags: list[str] = _help(
        "Keep Stack Exchange questions with any of these tags; [] keeps all.",
        [
            "ab-test",
            "hypothesis-testing",
            "statistical-power",
            "sample-size",
            "sequential-analysis",
            "multiple-comparisons",
            "p-value",
            "confidence-interval",
            "t-test",
            "experiment-design",
            "causality",
            "causal-inference",
            "variance-reduction",
            "bootstrap",
            "bayesian",
        ],
    )
    min_question_score: int = _help("Minimum question score.", 1)
    min_answer_score: int = _help("Minimum score of a non-accepted answer.", 2)
    min_answer_chars: int = _help("Skip answers shorter than this (Markdown characters).", 80)
    max_answer_chars: int = _help("Skip answers longer than this (Markdown characters).", 6000)
    site_url: str = _help("Site the dump comes from; used for attribution URLs.", "https://stats.stackexchange.com")

    def validate(self) -> list[str]:
        errors = []
        if not self.posts.strip():
            errors.append("collect.posts is empty; give the path of a Posts.xml or of a site's .7z archive")
        if self.min_answer_chars < 0:
            errors.append(f"collect.min_answer_chars is {self.min_answer_chars}; use 0 or a positive count")
        if self.min_answer_chars > self.max_answer_chars:
            errors.append(
                f"collect.min_answer_chars ({self.min_answer_chars}) > collect.max_answer_chars "
                f"({self.max_answer_chars})"
            )
        url = urlparse(self.site_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            errors.append(
                f"collect.site_url is {self.site_url!r}; give the site's address with its scheme, "
                "e.g. https://stats.stackexchange.com"
            )
        return errors


@dataclass
class SourceConfig:
    """One entry of data.sources: a dataset of yours in the sources folder (dvc.yaml's --sources)."""

    file: str = _help("File (or hf_disk folder) name inside the sources folder, data/raw/sources.")
    format: str = _help(f'Record shape: {" | ".join(SOURCE_FORMATS)} (README "Your own data").')
    weight: float = _help("Copies of each of its conversations in the train split, like data.weights.")
    name: str = _help("Source name written into each row's 'source' and counted under it in the manifest.")

    def validate(self, key: str) -> list[str]:
        errors = []
        if not self.file.strip() or Path(self.file).is_absolute() or ".." in Path(self.file).parts:
            errors.append(f"{key}.file is {self.file!r}; give a name inside the sources folder (data/raw/sources)")
        if self.format not in SOURCE_FORMATS:
            errors.append(f"{key}.format is {self.format!r}; allowed: {', '.join(SOURCE_FORMATS)}")
        if not 0 <= self.weight <= MAX_WEIGHT:
            errors.append(
                f"{key}.weight is {self.weight:g}; use 0 (drops the source) to {MAX_WEIGHT:g} (copies in train)"
            )
        if not self.name.strip() or self.name != self.name.strip():
            errors.append(f"{key}.name is {self.name!r}; give a non-empty name without edge spaces, e.g. my_faq")
        return errors


@dataclass
class GenerateConfig:
    enabled: bool = _help(
        "Run the teacher (true) or write an empty output (false, the default: `make generate-qa` turns it on).", False
    )
    model: str = _help("Teacher: 'base' (the base stage's model), a local model folder or a hub id.", "base")
    categories: list[str] = _help(
        "Keep papers in any of these arXiv categories; [] keeps all.", ["stat.ME", "stat.AP", "econ.EM"]
    )
    keywords: list[str] = _help(
        "...and whose title or abstract mentions any of these (case-insensitive); [] keeps all.",
        ["A/B", "experiment", "causal"],
    )
    max_papers: int = _help("At most this many selected papers, in file order (0: all).", 0)
    pairs_per_paper: int = _help("Question/answer pairs asked of the teacher per paper.", 3)
    max_new_tokens: int = _help("Longest teacher output per paper (tokens).", 384)
    batch_size: int = _help("Papers per generation batch.", 8)
    min_answer_words: int = _help("Drop answers with fewer words (answer_too_short).", 20)
    min_distinct_share: float = _help(
        "Drop answers whose distinct content words are a smaller share of their content words (repetitive), 0 to 1.",
        0.5,
    )
    max_copied_words: int = _help(
        "Drop answers that repeat this many consecutive words of the abstract (copies_abstract).", 12
    )
    min_grounding: float = _help(
        "Drop answers with a smaller share of content words found in the title or abstract (ungrounded), 0 to 1.", 0.6
    )

    def validate(self) -> list[str]:
        errors = []
        if not self.model.strip():
            errors.append("generate.model is empty; use base, a local model folder or a hub id")
        for key in ("pairs_per_paper", "max_new_tokens", "batch_size", "max_copied_words"):
            if getattr(self, key) < 1:
                errors.append(f"generate.{key} is {getattr(self, key)}; use 1 or more")
        if self.max_papers < 0 or self.min_answer_words < 0:
            errors.append(
                f"generate.max_papers ({self.max_papers}) and generate.min_answer_words "
                f"({self.min_answer_words}) must be 0 or more"
            )
        for key in ("min_distinct_share", "min_grounding"):
            if not 0 <= getattr(self, key) <= 1:
                errors.append(f"generate.{key} is {getattr(self, key)}; use a share from 0 to 1")
        return errors


@dataclass
class DataConfig:
    weights: dict[str, float] = _help(
        "Sampling weight of each source in the train split (seed: --cv-weight 2.0 "
        "--arxiv-weight 1.0); 2.5 = 2 copies + a 50 % chance of a third.",
        {"cross_validated": 2.0, "arxiv_synthetic": 1.0},
    )
    test_fraction: float = _help("Holdout share for the final evaluation (seed: 10 %).", 0.10)
    val_fraction: float = _help("Share used for eval loss during training.", 0.05)
    on_invalid: str = _help(
        "What to do with an invalid row: error (stop, name file:line) or skip (quarantine).", "error"
    )
    sources: list[SourceConfig] = _help(
        "Your own datasets in data/raw/sources, each {file, format, weight, name}, "
        "converted to ChatML rows and checked like the built-in sources.",
        [],
    )

    def validate(self) -> list[str]:
        errors = [
            f"data.weights.{k} is {v:g}; use 0 (drops the source) to {MAX_WEIGHT:g} (copies in train)"
            for k, v in self.weights.items()
            if not 0 <= v <= MAX_WEIGHT
        ]
        if not self.weights:
            errors.append("data.weights is empty; give every source a weight, e.g. cross_validated: 1.0")
        if (
            not 0 <= self.test_fraction < 1
            or not 0 <= self.val_fraction < 1
            or self.test_fraction + self.val_fraction >= 1
        ):
            errors.append(
                f"data.test_fraction ({self.test_fraction}) and data.val_fraction ({self.val_fraction}) "
                "must be in [0, 1) and sum to less than 1"
            )
        if self.on_invalid not in ("error", "skip"):
            errors.append(f"data.on_invalid is {self.on_invalid!r}; allowed: error, skip")
        names: dict[str, int] = {}  # name -> index of the first entry with it
        for index, source in enumerate(self.sources):
            if source is None:  # could not be built; params_from_dict reported why
                continue
            key = f"data.sources[{index}]"
            errors.extend(source.validate(key))
            if source.name in self.weights:
                errors.append(f"{key}.name is {source.name!r}, a built-in source (data.weights); choose another name")
            elif source.name in names:
                errors.append(
                    f"{key}.name is {source.name!r}, already the name of data.sources[{names[source.name]}]"
                    "; give each source its own name"
                )
            names.setdefault(source.name, index)
        return errors

    def check_source_files(self, sources_dir: Path) -> list[str]:
        """Problems with data.sources files in ``sources_dir`` (the folder dvc.yaml passes): missing, or a folder
        where the format reads a file (or a file where hf_disk reads a folder), which would fail only when read."""
        problems = []
        for index, source in enumerate(self.sources):
            if source is None:
                continue
            path, key = sources_dir / source.file, f"data.sources[{index}].file"
            if not path.exists():
                problems.append(f"{key} {source.file!r} not found in {sources_dir}/; put it there or fix the name")
            elif path.is_dir() and source.format in SOURCE_FORMATS and source.format != "hf_disk":
                problems.append(
                    f"{key} {source.file!r} is a folder in {sources_dir}/, but format {source.format} reads one "
                    "file; give the file (JSONL, or a JSON list for sharegpt/alpaca), or set format: hf_disk for "
                    "a folder written by datasets' save_to_disk"
                )
            elif not path.is_dir() and source.format == "hf_disk":
                problems.append(
                    f"{key} {source.file!r} is a file in {sources_dir}/, but format hf_disk reads a folder written "
                    "by datasets' save_to_disk; give that folder, or set the format of the file's records"
                )
        return problems


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = _help(
        "QLoRA: load the frozen base in 4-bit (bitsandbytes). false = plain LoRA on "
        "full-precision weights (faster on CPU).",
        True,
    )
    bnb_4bit_quant_type: str = _help("4-bit data type: nf4 or fp4.", "nf4")
    bnb_4bit_use_double_quant: bool = _help("Quantise the quantisation constants too (~0.4 bit/param saved).", True)
    bnb_4bit_compute_dtype: str = _help("Dtype of the de-quantised matmuls: bfloat16, float16 or float32.", "bfloat16")

    def validate(self) -> list[str]:
        errors = []
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            errors.append(f"quantization.bnb_4bit_quant_type is {self.bnb_4bit_quant_type!r}; allowed: nf4, fp4")
        if self.bnb_4bit_compute_dtype not in ("bfloat16", "float16", "float32"):
            errors.append(
                f"quantization.bnb_4bit_compute_dtype is {self.bnb_4bit_compute_dtype!r}; "
                "allowed: bfloat16, float16, float32"
            )
        return errors


@dataclass
class LoRAConfig:
    r: int = _help("LoRA rank.", 16)
    alpha: int = _help("LoRA scaling numerator (scale = alpha / r); usually 2 * r.", 32)
    dropout: float = _help("Dropout on the LoRA input, in [0, 1).", 0.0)
    target_modules: list[str] = _help("Linear layers that get adapters (all 7 Llama projections).", LLAMA_PROJECTIONS)

    def validate(self) -> list[str]:
        errors = []
        if self.r <= 0:
            errors.append(f"lora.r is {self.r}; must be a positive integer (typical: 8, 16, 32, 64)")
        if self.alpha <= 0:
            errors.append(f"lora.alpha is {self.alpha}; must be positive (usually 2 * lora.r)")
        if not 0 <= self.dropout < 1:
            errors.append(f"lora.dropout is {self.dropout}; must be in [0, 1)")
        if not self.target_modules:
            errors.append("lora.target_modules is empty; list at least one linear layer, e.g. q_proj")
        return errors


@dataclass
class TrainingConfig:
    micro_batch: str = _help(
        "Size of one process's micro-batch, with its unit: '<N> tokens' (conversations packed best-fit, without "
        "padding, into rows of at most N tokens; needs padding_free) or '<N> conversations' (N conversations, packed "
        "into one row when padding_free, else padded). Tokens per optimizer step = this x "
        "gradient_accumulation_steps x processes.",
        "16384 tokens",
    )
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step (effective batch = product).", 1)
    learning_rate: float = _help("Peak learning rate.", 2e-4)
    lr_scheduler_type: str = _help("Schedule after warmup: cosine, linear or constant.", "cosine")
    warmup_ratio: float = _help("Share of optimizer steps spent warming up, in [0, 1).", 0.03)
    num_train_epochs: float = _help("Passes over the train split (ignored when max_steps > 0).", 3.0)
    max_steps: int = _help("Stop after this many optimizer steps; -1 = use num_train_epochs.", -1)
    optim: str = _help("Optimizer: paged_adamw_8bit, adamw_8bit, adamw_torch, adamw_torch_fused.", "adamw_torch_fused")
    weight_decay: float = _help("AdamW weight decay on LoRA weights.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm.", 0.3)
    max_seq_length: int = _help("Tokens per conversation; longer ones are truncated (counted in data stats).", 2048)
    gradient_checkpointing: str | bool = _help(
        "Recompute activations in backward (less memory, up to ~50 % more compute for a frozen base): auto (from the "
        "free device memory and the longest micro-batch: off if it fits, else the fewest checkpointed layers that "
        "fit, else full, else offload), off, selective (the first half of the layers), full, or offload (full, with "
        "each layer's input kept in host memory: the least GPU memory; one process only). YAML reads off/false as "
        "false: it means off; true means full.",
        "auto",
    )
    bf16: bool = _help("bf16 mixed precision where the hardware supports it (fp32 otherwise).", True)
    logging_steps: int = _help("Log loss, lr and grad norm every N optimizer steps.", 10)
    eval_steps: int = _help("Evaluate on the val split every N optimizer steps.", 100)
    save_steps: int = _help("Write a resumable checkpoint every N optimizer steps.", 500)
    save_total_limit: int = _help("Checkpoints kept (older ones are deleted).", 3)
    num_threads: int = _help("CPU threads for torch; 0 = torch's default. Fixed for reproducible CPU runs.", 0)
    padding_free: bool = _help(
        "Pack each micro-batch's conversations into one row without padding (position ids "
        "restart per conversation). Needs a document-masked attn_implementation.",
        True,
    )
    attn_implementation: str = _help(
        "Attention kernel: sdpa, eager, or expqa_varlen (document-masked varlen "
        "attention for padding_free; Flash-Attention varlen on CUDA).",
        "expqa_varlen",
    )
    use_liger_kernel: bool = _help(
        "Liger's fused Triton kernels (fused linear cross-entropy, RMSNorm, SwiGLU, "
        "RoPE); CUDA only, needs the liger-kernel package.",
        True,
    )
    fused_lora: bool = _help(
        "LoRA layers as one autograd function (no extra passes over the output, no "
        "dropout mask when lora.dropout is 0); false = PEFT's own forward.",
        True,
    )
    grouped_lora: bool = _help(
        "With fused_lora: projections that read the same input (q/k/v, gate/up) run as one "
        "function (one read of the input for all their adapters, one buffer for its "
        "gradient) when lora.dropout is 0.",
        True,
    )
    fp8_matmul: str | bool = _help(
        "With fused_lora: the frozen base weights' matmuls (forward and input gradient) in FP8 e4m3 with per-row "
        "scales (src/expqa/fp8.py); the LoRA path, attention, norms and loss stay bf16. auto = on where FP8 tensor "
        "cores run them at twice the bf16 rate (CUDA compute capability >= 9.0, bf16) unless gradient checkpointing is "
        "offload (memory first), off elsewhere; on | off. With no checkpointing and room measured for it, the base "
        "weights are quantised once (~2 bytes per weight) instead of per step. "
        "YAML reads on/off as true/false: both work.",
        "auto",
    )
    num_processes: int = _help(
        "Training processes (DDP): 1 = single process, 0 = one per visible GPU. The "
        "effective batch is micro-batch x accumulation x processes.",
        0,
    )
    distributed: str = _help(
        "How the train.num_processes processes (per machine) share the work: ddp (every GPU "
        "holds the whole model, gradients are averaged) or fsdp (FSDP2 shards the base "
        "weights, 4-bit included, and the LoRA weights, gradients and optimizer state across "
        "the processes, for a model that does not fit one GPU; runs under torchrun even for "
        "one process).",
        "ddp",
    )

    lm_head_loss: str = _help(
        "Who computes the LM head and loss: trl (TRL's chunked head; Triton on CUDA, every "
        "position off CUDA) or expqa (label positions only, softmax kept for backward: "
        "src/expqa/lm_head.py; the CPU profile).",
        "trl",
    )

    def __post_init__(self):
        if isinstance(self.gradient_checkpointing, bool):  # YAML's off/false, and true (the old boolean key)
            self.gradient_checkpointing = "full" if self.gradient_checkpointing else "off"
        if isinstance(self.fp8_matmul, bool):  # YAML's on/off
            self.fp8_matmul = "on" if self.fp8_matmul else "off"

    def micro_batch_size(self) -> tuple[int, str] | None:
        """micro_batch as (count, unit), or None when it is not '<positive int> tokens|conversations'."""
        count, _, unit = self.micro_batch.strip().partition(" ")
        if not count.isdigit() or int(count) <= 0 or unit.strip() not in MICRO_BATCH_UNITS:
            return None
        return int(count), unit.strip()

    @property
    def tokens_per_micro_batch(self) -> int:
        """The token budget of a micro-batch; 0 when micro_batch counts conversations."""
        size = self.micro_batch_size()
        return size[0] if size and size[1] == "tokens" else 0

    @property
    def per_device_train_batch_size(self) -> int:
        """Conversations per micro-batch when micro_batch counts them; 1 under a token budget (the sampler then
        yields whole packed micro-batches, one per step of the data loader)."""
        size = self.micro_batch_size()
        return size[0] if size and size[1] == "conversations" else 1

    def validate(self) -> list[str]:
        errors = []
        if self.gradient_checkpointing not in CHECKPOINTING_MODES:
            errors.append(
                f"train.gradient_checkpointing is {self.gradient_checkpointing!r}; allowed: "
                f"{', '.join(CHECKPOINTING_MODES)} (YAML's false means off, true means full)"
            )
        if self.fp8_matmul not in FP8_MODES:
            errors.append(f"train.fp8_matmul is {self.fp8_matmul!r}; allowed: {', '.join(FP8_MODES)}")
        elif self.fp8_matmul == "on" and not self.fused_lora:
            errors.append(
                "train.fp8_matmul is on but train.fused_lora is false: the FP8 matmuls live in the fused LoRA "
                "function; set fused_lora: true or fp8_matmul: off"
            )
        for key in (
            "gradient_accumulation_steps",
            "max_seq_length",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
        ):
            if getattr(self, key) <= 0:
                errors.append(f"train.{key} is {getattr(self, key)}; must be a positive integer")
        if self.logging_steps > 0 and self.save_steps > 0 and self.save_steps % self.logging_steps:
            errors.append(
                f"train.save_steps is {self.save_steps}, not a multiple of train.logging_steps "
                f"{self.logging_steps}: a run resumed from a checkpoint between two logged steps would log "
                "other loss values than one that never stopped; use e.g. save_steps: "
                f"{-(-self.save_steps // self.logging_steps) * self.logging_steps}"
            )
        if not 0 < self.learning_rate < 1:
            errors.append(f"train.learning_rate is {self.learning_rate}; must be in (0, 1) (seed: 2e-4)")
        for key in ("weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                errors.append(f"train.{key} is {getattr(self, key)}; must be >= 0 (0 turns it off)")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant", "constant_with_warmup"):
            errors.append(
                f"train.lr_scheduler_type is {self.lr_scheduler_type!r}; "
                "allowed: cosine, linear, constant, constant_with_warmup"
            )
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"train.warmup_ratio is {self.warmup_ratio}; must be in [0, 1)")
        if self.max_steps <= 0 and self.max_steps != -1:
            errors.append(f"train.max_steps is {self.max_steps}; use a positive count or -1 (epochs decide)")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            errors.append(f"train.num_train_epochs is {self.num_train_epochs}; must be > 0")
        allowed_optim = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused")
        if self.optim not in allowed_optim:
            errors.append(f"train.optim is {self.optim!r}; allowed: {', '.join(allowed_optim)}")
        if self.num_processes < 0:
            errors.append(f"train.num_processes is {self.num_processes}; use 1, 0 (one per GPU) or a count")
        if self.distributed not in ("ddp", "fsdp"):
            errors.append(f"train.distributed is {self.distributed!r}; allowed: ddp, fsdp")
        if self.num_threads < 0:
            errors.append(f"train.num_threads is {self.num_threads}; use 0 (default) or a positive count")
        size = self.micro_batch_size()
        if size is None:
            errors.append(
                f"train.micro_batch is {self.micro_batch!r}; give a positive count and its unit, e.g. "
                "'16384 tokens' (packed token budget) or '2 conversations'"
            )
        elif size[1] == "tokens":
            if not self.padding_free:
                errors.append(
                    f"train.micro_batch is {self.micro_batch!r}, a token budget, which packs conversations "
                    "into one row: it needs train.padding_free: true (or give '<N> conversations')"
                )
            if size[0] < self.max_seq_length:
                errors.append(
                    f"train.micro_batch is {self.micro_batch!r}, below train.max_seq_length "
                    f"{self.max_seq_length}: the longest conversation would not fit; raise it or lower "
                    "max_seq_length"
                )
        if self.lm_head_loss not in LM_HEAD_LOSSES:
            errors.append(f"train.lm_head_loss is {self.lm_head_loss!r}; allowed: {', '.join(LM_HEAD_LOSSES)}")
        if self.attn_implementation not in ATTENTION_KERNELS:
            errors.append(
                f"train.attn_implementation is {self.attn_implementation!r}; allowed: {', '.join(ATTENTION_KERNELS)}"
            )
        elif self.padding_free and self.attn_implementation != "expqa_varlen":
            errors.append(
                f"train.padding_free is true with train.attn_implementation {self.attn_implementation!r}; "
                "packed rows need expqa_varlen (or set padding_free: false)"
            )
        return errors


@dataclass
class EvalConfig:
    max_new_tokens: int = _help("Longest generated answer for ROUGE and stop-rate.", 256)
    batch_size: int = _help("Prompts per generation / scoring batch.", 32)
    max_examples: int = _help("Evaluate at most this many test conversations; 0 = all.", 0)
    critical_questions: str = _help(
        "Multiple-choice question set (JSONL) scored by log-likelihood.", "data/eval/critical_questions.jsonl"
    )
    bootstrap_samples: int = _help(
        "Bootstrap resamples for the 95 % intervals in metrics/eval.json (seeded with "
        "base.seed: the same report every run).",
        10000,
    )
    num_processes: int = _help(
        "Evaluate base and tuned side by side in this many processes (1 = one after the other in the stage's process).",
        1,
    )
    num_threads: int = _help("torch threads per evaluation process; 0 = torch's default.", 0)

    def validate(self) -> list[str]:
        errors = [
            f"eval.{k} is {getattr(self, k)}; must be a positive integer"
            for k in ("max_new_tokens", "batch_size", "bootstrap_samples", "num_processes")
            if getattr(self, k) <= 0
        ]
        if self.max_examples < 0:
            errors.append(f"eval.max_examples is {self.max_examples}; use 0 (all) or a positive count")
        if self.num_threads < 0:
            errors.append(f"eval.num_threads is {self.num_threads}; use 0 (torch's default) or a positive count")
        return errors


@dataclass
class ExportConfig:
    types: list[str] = _help(
        "GGUF files to write, models/gguf/<name>-<type>.gguf: f16 (half of fp32, near "
        "lossless), q8_0 (a quarter of fp32), bf16, f32.",
        ["f16", "q8_0"],
    )
    name: str = _help("File stem of the GGUF files and their general.name.", "expqa")
    ollama_type: str = _help("The type the Ollama Modelfile's FROM points at (one of types).", "q8_0")

    def validate(self) -> list[str]:
        errors = [
            f"export.types has {t!r}; allowed: {', '.join(GGUF_EXPORT_TYPES)}"
            for t in self.types
            if t not in GGUF_EXPORT_TYPES
        ]
        if not self.types or len(set(self.types)) != len(self.types):
            errors.append(f"export.types is {self.types}; list each GGUF type once, at least one")
        if self.ollama_type not in self.types:
            errors.append(f"export.ollama_type is {self.ollama_type!r}; must be one of export.types {self.types}")
        if not self.name or any(c in self.name for c in "/\\ "):
            errors.append(f"export.name is {self.name!r}; use a plain file stem such as expqa")
        return errors


@dataclass
class Params:
    profile: str = _help(
        "Hardware profile: gpu (the sections as written: the Llama 3.2 3B recipe), cpu (the cpu: "
        "overrides merged in, for a laptop; runs on the CPU) or auto (cpu when there is no CUDA GPU). "
        "Resolved by the params stage on every `dvc repro`; the result is in metrics/params/*.json.",
        "auto",
    )
    base: BaseConfig = field(default_factory=BaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # Partial overrides for the cpu profile, same shape as the sections above: the seed's GPU values stay the
    # sections' own, while `make repro` on a 2-core laptop finishes in minutes.
    cpu: dict = field(default_factory=dict, metadata={"help": "Overrides applied by the cpu profile."})

    def resolve(self, cuda: bool | None = None) -> Params:
        """The params that run: profile auto decided (``cuda``: whether a CUDA GPU is here; None = look), the
        cpu overrides merged in under the cpu profile. The result has profile gpu or cpu."""
        profile = self.profile
        if profile == "auto":
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            profile = "gpu" if cuda else "cpu"
        raw = _as_raw(self)
        if profile == "cpu":  # the overrides stay in `cpu` (merging them again changes nothing)
            raw = _deep_merge(raw, raw["cpu"])
        raw["profile"] = profile
        return params_from_dict(raw, source=f"params ({profile} profile)")

    def stage_sections(self, stage: str) -> dict:
        """What the params stage writes for ``stage`` (metrics/params/<stage>.json) from resolved params: the
        stage's sections, plus the profile when the cpu overrides touch one of them (so a stage that reads no
        overridden section is not re-run when only the machine changes)."""
        raw = _as_raw(self)
        record = {"stage": stage}
        if any(section in self.cpu for section in STAGE_SECTIONS[stage]):
            record["profile"] = self.profile
        record.update({section: raw[section] for section in STAGE_SECTIONS[stage]})
        return record


def _as_raw(params: Params) -> dict:
    """Params as the plain mapping params.yaml holds (data.sources items as mappings)."""
    return json.loads(json.dumps(dataclasses.asdict(params)))


# ---------------------------------------------------------------------------------------------------------------
# loading and checking


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _key_lines(text: str, path: str) -> dict[str, str]:
    """Map dotted keys to "file:line", so errors can point into the YAML file."""
    lines: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, dotted + ".")
        elif isinstance(node, yaml.SequenceNode):  # items as key[0], key[1]... (data.sources[0].file)
            for index, item in enumerate(node.value):
                dotted = f"{prefix.removesuffix('.')}[{index}]"
                lines[dotted] = f"{path}:{item.start_mark.line + 1}"
                walk(item, dotted + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or annotation is dict:
        args = typing.get_args(annotation)
        return isinstance(value, dict) and (
            not args or all(_type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
        )
    return True


def _non_finite(value: Any, dotted: str) -> list[tuple[str, float]]:
    """(dotted key, value) of each nan or infinite float in a value (YAML's .nan, .inf); a dict's items by key."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(dotted, value)]
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _non_finite(item, f"{dotted}.{key}")]
    return []


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else str(annotation)


def params_from_dict(
    raw: dict,
    source: str = "params.yaml",
    key_lines: dict[str, str] | None = None,
    sources_dir: str | Path | None = None,
    sections: typing.Sequence[str] | None = None,
) -> Params:
    """Build and validate Params (and the `cpu` overrides merged in); raise one ConfigError listing every problem.

    Every key of every section is required. ``sections``: only these sections are expected (a stage's file,
    metrics/params/<stage>.json); the others are None. With ``sources_dir`` (the folder of data.sources files)
    every data.sources file must exist in it.
    """
    key_lines = key_lines or {}
    errors: list[str] = []

    def where(key: str) -> str:
        return key_lines.get(key, source)

    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (base, model, data, ...), got {type(raw).__name__}"
        )
    hints = typing.get_type_hints(Params)
    expected = list(hints) if sections is None else ["profile", *sections]
    built: dict[str, Any] = {name: None for name in hints if name not in expected}
    for name, value in raw.items():
        if name not in hints or name not in expected:
            known = ", ".join(expected)
            errors.append(f"{where(name)}: unknown section '{name}'; known: {known}")
            continue
        cls = hints[name]
        if cls is dict:
            built[name] = _checked_overrides(value, where, errors)
        elif cls is str:
            if value not in PROFILES:
                errors.append(f"{where(name)}: {name} is {value!r}; allowed: {', '.join(PROFILES)}")
            built[name] = value
        elif not isinstance(value, dict):
            errors.append(f"{where(name)}: section '{name}' must be a mapping")
        else:
            built[name] = cls(**_checked_fields(cls, value, name, where, errors))
    if sections is not None:
        built.setdefault("profile", None)  # a stage file holds it only when the cpu profile touches its sections
    for name in expected:
        if name not in raw and not (sections is not None and name in ("cpu", "profile")):
            fix = "add `profile: auto`" if name == "profile" else "add it (`expqa params` lists its keys)"
            errors.append(f"{source}: no '{name}' section; {fix}; every section is required")
    # a section that could not be built stays None: its problems are listed, and the others are still checked
    params = Params(**{name: built.get(name) for name in hints})
    for name in hints:
        section = getattr(params, name)
        if hasattr(section, "validate"):
            for message in section.validate():
                key = message.split(" ", 1)[0]
                errors.append(f"{where(key)}: {message}")
    if sources_dir is not None and params.data is not None:
        errors.extend(
            f"{where(message.split(' ', 1)[0])}: {message}"
            for message in params.data.check_source_files(Path(sources_dir))
        )
    if not errors and params.cpu:
        # check the cpu profile now, not only on the first CPU machine that runs it
        merged = _deep_merge(raw, params.cpu)
        cpu_lines = {k[len("cpu.") :]: v for k, v in key_lines.items() if k.startswith("cpu.")}
        try:
            params_from_dict({**merged, "cpu": {}}, f"{source} (cpu overrides)", {**key_lines, **cpu_lines})
        except ConfigError as exc:
            errors.extend(exc.problems)
    if errors:
        raise ConfigError(errors)
    return params


def _checked_overrides(value: Any, where: typing.Callable[[str], str], errors: list[str]) -> dict:
    """The cpu: section: partial sections only (their keys are checked when the profile is merged in)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{where('cpu')}: section 'cpu' must be a mapping of partial sections, e.g. train: {{...}}")
        return {}
    overridable = [name for name, cls in typing.get_type_hints(Params).items() if dataclasses.is_dataclass(cls)]
    for name, section in value.items():
        if name not in overridable:
            errors.append(
                f"{where('cpu.' + name)}: cpu.{name} cannot be overridden by a profile; the cpu profile "
                f"overrides keys of: {', '.join(overridable)}"
            )
        elif not isinstance(section, dict):
            errors.append(f"{where('cpu.' + name)}: cpu.{name} must be a mapping of keys of section {name}")
    return value


def _checked_fields(
    cls: type, value: dict, prefix: str, where: typing.Callable[[str], str], errors: list[str]
) -> dict[str, Any]:
    """The keyword arguments for the dataclass ``cls`` from a mapping (a section, or an item of a list of
    dataclasses); appends every problem to ``errors`` and leaves bad keys out (their defaults apply)."""
    field_types = typing.get_type_hints(cls)
    kwargs = {}
    for key, item in value.items():
        dotted = f"{prefix}.{key}"
        item_cls = _dataclass_items(field_types.get(key))
        if key not in field_types:
            errors.append(f"{where(dotted)}: unknown key '{dotted}'; known keys in {prefix}: {', '.join(field_types)}")
        elif item_cls is not None and isinstance(item, list):
            # An item that cannot be built stays as None so the others keep their index in messages; it never
            # reaches a caller, since its problem is in errors.
            kwargs[key] = [
                _build_item(item_cls, entry, f"{dotted}[{index}]", where, errors) for index, entry in enumerate(item)
            ]
        elif not _type_ok(item, field_types[key]):
            errors.append(
                f"{where(dotted)}: {dotted} is {item!r} ({type(item).__name__}); "
                f"expected {_type_name(field_types[key])}"
            )
        elif non_finite := _non_finite(item, dotted):
            # Reported here, not left to validate(): every range check is False for nan.
            errors.extend(f"{where(bad)}: {bad} is {value}; expected a finite number" for bad, value in non_finite)
        else:
            kwargs[key] = float(item) if field_types[key] is float else item
    missing = [key for key in field_types if key not in value]
    if missing and "[" not in prefix:  # list items (data.sources[0]) say what they lack in _build_item
        line = where(prefix)
        errors.extend(
            f"{line}: {prefix}.{key} is missing; add `{key}: {_yaml_scalar(_default_of(cls, key))}` under "
            f"{prefix}: (every key is required: params.yaml is the one place a default lives)"
            for key in missing
        )
    return kwargs


def _default_of(cls: type, key: str) -> Any:
    """The dataclass default of a field (= params.yaml's shipped value), to show in a 'missing key' error."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == key)
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default


def _yaml_scalar(value: Any) -> str:
    """One-line YAML of a value: 42, true, nf4, [q_proj, k_proj], {cross_validated: 2.0}."""
    if isinstance(value, list):
        value = [dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item for item in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text.removesuffix("...").strip()  # safe_dump ends a bare scalar with a document-end marker


def _dataclass_items(annotation: Any) -> type | None:
    """The item class of a list[SomeDataclass] annotation (data.sources), else None."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return item if dataclasses.is_dataclass(item) else None
    return None


def _build_item(cls: type, value: Any, key: str, where: typing.Callable[[str], str], errors: list[str]) -> Any:
    """One item of a list of dataclasses, or None after appending why it cannot be built."""
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    if not isinstance(value, dict):
        errors.append(
            f"{where(key)}: {key} is {value!r} ({type(value).__name__}); expected a mapping with {', '.join(required)}"
        )
        return None
    problems = len(errors)
    missing = [name for name in required if name not in value]
    if missing:
        errors.append(f"{where(key)}: {key} has no {', '.join(missing)}; each entry needs {', '.join(required)}")
    kwargs = _checked_fields(cls, value, key, where, errors)
    return None if len(errors) > problems else cls(**kwargs)


def read_config_file(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Read a YAML or JSON config file; return its mapping and where each dotted key is ("file:line")."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML or JSON file")
    text = _read_utf8(path)
    is_json = path.suffix == ".json"
    try:
        raw = json.loads(text) if is_json else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: cannot parse JSON: {exc.msg} at column {exc.colno}; "
            "check the quotes, commas and brackets there"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    except RecursionError:  # the parsers recurse once per level: report it like a file that did parse
        raise ConfigError(_too_deep(path, text)) from None
    if _depth_exceeds(raw, MAX_CONFIG_NESTING):  # checked before anything recursive walks it (merge, checks)
        raise ConfigError(_too_deep(path, text))
    lines = _key_lines(text, str(path))
    if is_json:  # a key the YAML reading of the JSON text missed is still reported against this file
        lines = {**dict.fromkeys(_dotted_keys(raw, ""), str(path)), **lines}
    return raw or {}, lines


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: file:line, the problem and its column, what it was inside."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{path}: cannot parse YAML: {' '.join(str(exc).split())}"
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    inside = ""
    if context and start:  # e.g. "while parsing a flow sequence": where the unclosed thing began
        inside = f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    return (
        f"{path}:{mark.line + 1}: cannot parse YAML: {problem} at column {mark.column + 1}{inside}; "
        "check the indentation, quotes and brackets there"
    )


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` in ``value``; iterative, and stops at the limit, so a YAML
    alias that refers to itself (an endless nesting) is caught too."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            stack.extend((item, depth + 1) for item in (node.values() if isinstance(node, dict) else node))
    return False


def _too_deep(path: Path, text: str) -> str:
    """The message for a file nested deeper than MAX_CONFIG_NESTING, at the line where it gets too deep."""
    where, depth = f"{path}: nested deeper than {MAX_CONFIG_NESTING} levels", 0
    try:
        for event in yaml.parse(text):  # events come one at a time: no recursion however deep (JSON is YAML here)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_CONFIG_NESTING:
                    mark = event.start_mark
                    where = f"{path}:{mark.line + 1}: nested deeper than {MAX_CONFIG_NESTING} levels (at column "
                    where += f"{mark.column + 1})"
                    break
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        pass  # JSON that YAML does not read (e.g. tabs): the file is still named
    return (
        f"{where}; a params file nests a few levels (section: key: value, cpu: section: key: value): "
        "check that this is the file you meant"
    )


def _dotted_keys(value: Any, prefix: str) -> list[str]:
    """Every dotted key of a parsed file as params_from_dict names it (data.sources[0].file)."""
    keys = []
    if isinstance(value, dict):
        for key, item in value.items():
            dotted = f"{prefix}{key}"
            keys += [dotted, *_dotted_keys(item, dotted + ".")]
    elif isinstance(value, list):
        for index, item in enumerate(value):
            dotted = f"{prefix.removesuffix('.')}[{index}]"
            keys += [dotted, *_dotted_keys(item, dotted + ".")]
    return keys


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def load_params(
    path: str | Path = "params.yaml", override: str | Path | None = None, sources_dir: str | Path | None = None
) -> Params:
    """Load params.yaml, optionally merge a partial override file (`--config my.yaml`), validate; with
    ``sources_dir``, also that every data.sources file is in that folder."""
    raw, lines = read_config_file(path)
    source = str(path)
    if override is not None:
        extra, extra_lines = read_config_file(override)
        if not isinstance(extra, dict):
            raise ConfigError(f"{override}: expected a mapping like {{lora: {{r: 32}}}}")
        # keys set by the override file are reported against it
        return params_from_dict(
            _deep_merge(raw, extra), f"{source} + {override}", {**lines, **extra_lines}, sources_dir
        )
    return params_from_dict(raw, source, lines, sources_dir)


def load_stage_params(
    path: str | Path, stage: str, override: str | Path | None = None, sources_dir: str | Path | None = None
) -> Params:
    """The params ``stage`` runs with: its file from the params stage (metrics/params/<stage>.json, already
    resolved), or a whole params file (params.yaml, with an optional partial ``override`` file merged in: checked
    and resolved here, for running a stage by hand). Sections the stage does not read are None. With
    ``sources_dir`` the data.sources files are checked too (see load_params), each problem at its entry's line."""
    raw, lines = read_config_file(path)
    if not (isinstance(raw, dict) and "stage" in raw):
        return load_params(path, override, sources_dir).resolve()
    if override is not None:
        raise ConfigError(
            f"{override}: --config applies to a whole params file; {path} is the params stage's "
            "output for one stage (give --params params.yaml to override values by hand)"
        )
    if raw["stage"] != stage:
        raise ConfigError(
            f"{path}: holds the params of stage {raw['stage']!r}, not {stage!r}; give "
            f"metrics/params/{stage}.json (written by the params stage) or params.yaml"
        )
    body = {key: value for key, value in raw.items() if key != "stage"}
    return params_from_dict(body, str(path), lines, sources_dir, sections=STAGE_SECTIONS[stage])


def section_help(cls: type) -> dict[str, str]:
    """Help text of each field, for `expqa params` and for tests that check params.yaml comments."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
