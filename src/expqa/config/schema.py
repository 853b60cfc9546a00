"""Typed configuration: one dataclass per params.yaml section, with its defaults, help text and validate().

params.yaml is the one place a default lives: loading it requires every key (a missing one is a located error
naming the line to add), so a dataclass default never fills a gap silently. The defaults below exist for the
Python API (`QLoRATrainer(TrainingConfig(), ...)`) and equal params.yaml's values (tests/config/test_config.py checks).
Unknown keys, wrong types and invalid values are collected and reported together (config/loader.py), each with its
dotted key, file:line, the bad value and what is allowed.

The hardware profile (`profile: auto | gpu | cpu`) is resolved by the `params` stage (on every run), which writes each
stage's sections as they will run to metrics/params/<stage>.json; the stages read those files (STAGE_SECTIONS).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHECKPOINTING_MODES = ("auto", "off", "selective", "full", "offload")  # expqa.model.checkpointing.MODES
FP8_MODES = ("auto", "on", "off")  # train.fp8_matmul, decided by expqa.training.plan
GGUF_EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")
LM_HEAD_LOSSES = ("trl", "expqa")
MAX_WEIGHT = 1000.0  # train copies are stored in 16 bits, and more is surely a typo
SOURCE_FORMATS = ("chatml", "sharegpt", "alpaca", "openai", "hf_disk")  # data.sources[].format; expqa.data.sources
SEED_END = 2**32  # numpy's seeds (set by transformers' set_seed) are 32-bit
PROFILES = ("auto", "gpu", "cpu")
MICRO_BATCH_UNITS = ("tokens", "conversations")
FUSED_LORA_MODES = ("grouped", "per_projection", "off")
ALIGN_METHODS = ("dpo", "ipo", "apo_zero")  # align.method: TRL DPOTrainer loss types (expqa.training.align)
# what each stage reads: whole sections, or single keys ("train.max_seq_length": stats and evaluate read only it, so
# `-S train.fp8_matmul=off` re-runs train and what follows but not them). The params stage writes them, resolved,
# to metrics/params/<stage>.json
STAGE_SECTIONS = {
    "base": ("model",),
    "collect": ("collect",),
    "generate": ("generate",),
    "combine": ("base", "data"),
    "stats": ("train.max_seq_length",),
    "train": ("base", "quantization", "lora", "train"),
    "align": ("base", "quantization", "lora", "train", "align", "data.on_invalid"),
    "evaluate": ("base", "eval", "generation", "train.max_seq_length", "align.enabled"),
    "export": ("export", "generation"),
}


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
    model: str = _help(
        "Teacher: 'base' (the base stage's model), a local model folder, a hub id, or an OpenAI-compatible server's "
        "base address http(s)://host:port/v1 (llama.cpp's server, vLLM, Ollama, `expqa serve`).",
        "base",
    )
    endpoint_model: str = _help(
        "With a server: the model name sent in each request; '' = the one model the server lists (GET /v1/models).", ""
    )
    api_key_env: str = _help(
        "With a server: the environment variable holding its API key (sent as a Bearer token; unset: no key). "
        "The key itself is never written anywhere.",
        "EXPQA_TEACHER_API_KEY",
    )
    concurrency: int = _help(
        "With a server: requests in flight at once. 1 keeps its greedy answers reproducible (with more, the order they "
        "arrive in varies, and with it what the server batches or reuses from its prompt cache); vLLM on a GPU: 32+.",
        1,
    )
    timeout_s: float = _help("With a server: seconds one request may take before it counts as timed out.", 120.0)
    retries: int = _help("With a server: tries after the first when it answers 429 or 5xx, or times out.", 3)
    retry_wait_s: float = _help("With a server: seconds before the first retry, doubled before each next one.", 2.0)
    categories: list[str] = _help(
        "Keep papers in any of these arXiv categories; [] keeps all.", ["stat.ME", "stat.AP", "econ.EM"]
    )
    keywords: list[str] = _help(
        "...and whose title or abstract mentions any of these (case-insensitive); [] keeps all.",
        ["A/B", "experiment", "causal"],
    )
    max_papers: int = _help("At most this many selected papers, in file order (0: all).", 0)
    pairs_per_paper: int = _help("Question/answer pairs asked of the teacher per paper.", 3)
    max_new_tokens: int = _help(
        "Longest teacher output (tokens): per paper for a model folder or hub id, per pair for a server.", 384
    )
    batch_size: int = _help("Papers per generation batch (a model folder or hub id; a server: concurrency).", 8)
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
            errors.append("generate.model is empty; use base, a local model folder, a hub id or a server's address")
        errors += self._endpoint_problems()
        for key in ("pairs_per_paper", "max_new_tokens", "batch_size", "max_copied_words", "concurrency"):
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

    def _endpoint_problems(self) -> list[str]:
        errors = []
        if is_endpoint(self.model):
            url = urlparse(self.model)
            if not url.hostname or url.query or url.fragment or not url.path.rstrip("/").endswith("/v1"):
                errors.append(
                    f"generate.model is {self.model!r}; give the server's OpenAI-compatible base address, "
                    "e.g. http://127.0.0.1:8080/v1 (the part before /chat/completions)"
                )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # the value is not repeated: a key pasted here by mistake must not reach a log
            errors.append(
                "generate.api_key_env is not an environment variable's name; give the name (e.g. "
                "EXPQA_TEACHER_API_KEY) of the variable that holds the key, not the key itself"
            )
        if not self.timeout_s > 0:
            errors.append(f"generate.timeout_s is {self.timeout_s}; use a number of seconds above 0")
        if self.retries < 0 or self.retry_wait_s < 0:
            errors.append(
                f"generate.retries ({self.retries}) and generate.retry_wait_s ({self.retry_wait_s}) must be 0 or more"
            )
        return errors


def is_endpoint(model: str) -> bool:
    """Whether generate.model names a server (http:// or https://) rather than model weights."""
    return model.startswith(("http://", "https://"))


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
    alpha_ratio: float = _help(
        "LoRA alpha as a multiple of r (alpha = alpha_ratio x r, so the update's scale alpha / r stays when r "
        "changes: `-S lora.r=32` keeps it at 2).",
        2.0,
    )
    dropout: float = _help("Dropout on the LoRA input, in [0, 1).", 0.0)
    target_modules: list[str] = _help("Linear layers that get adapters (all 7 Llama projections).", LLAMA_PROJECTIONS)

    def validate(self) -> list[str]:
        errors = []
        if self.r <= 0:
            errors.append(f"lora.r is {self.r}; must be a positive integer (typical: 8, 16, 32, 64)")
        if self.alpha_ratio <= 0:
            errors.append(f"lora.alpha_ratio is {self.alpha_ratio}; must be positive (usually 2: alpha = 2 x r)")
        if not 0 <= self.dropout < 1:
            errors.append(f"lora.dropout is {self.dropout}; must be in [0, 1)")
        if not self.target_modules:
            errors.append("lora.target_modules is empty; list at least one linear layer, e.g. q_proj")
        return errors

    @property
    def alpha(self) -> int | float:
        """PEFT's lora_alpha: alpha_ratio x r (an int when whole, as adapter_config.json has always written it)."""
        alpha = self.alpha_ratio * self.r
        return int(alpha) if float(alpha).is_integer() else alpha


@dataclass
class TrainingConfig:
    micro_batch: str = _help(
        "Size of one process's micro-batch, with its unit: '<N> tokens' (conversations packed best-fit, without "
        "padding, into rows of at most N tokens) or '<N> conversations' (N conversations, packed into one row when "
        "padding_free, else padded). Tokens per optimizer step = this x "
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
        "With '<N> conversations' micro-batches: pack each process's conversations into one row without padding "
        "(position ids restart per conversation; document-masked varlen attention). A token budget always packs. "
        "Padded rows use SDPA with a padding mask.",
        True,
    )
    use_liger_kernel: bool = _help(
        "Liger's fused Triton kernels (fused linear cross-entropy, RMSNorm, SwiGLU, "
        "RoPE); CUDA only, needs the liger-kernel package.",
        True,
    )
    fused_lora: str | bool = _help(
        "LoRA layers as one autograd function each (no extra passes over the output, no dropout mask when "
        "lora.dropout is 0): grouped (projections that read the same input, q/k/v and gate/up, run as one function: "
        "one read of the input, one buffer for its gradient), per_projection, or off (PEFT's own forward). YAML's "
        "false means off, true grouped.",
        "grouped",
    )
    fp8_matmul: str | bool = _help(
        "With fused LoRA layers: the frozen base weights' matmuls (forward and input gradient) in FP8 e4m3 with "
        "per-row "
        "scales (src/expqa/model/fp8.py); the LoRA path, attention, norms and loss stay bf16. auto = on where FP8 "
        "tensor cores run them at twice the bf16 rate (CUDA compute capability >= 9.0, bf16) unless gradient "
        "checkpointing is offload (memory first), off elsewhere; on | off. With no checkpointing and room measured "
        "for it, the base weights are quantised once (~2 bytes per weight) instead of per step. "
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
        "src/expqa/model/lm_head.py; the CPU profile).",
        "trl",
    )

    def __post_init__(self):
        if isinstance(self.gradient_checkpointing, bool):  # YAML's off/false, and true (the old boolean key)
            self.gradient_checkpointing = "full" if self.gradient_checkpointing else "off"
        if isinstance(self.fp8_matmul, bool):  # YAML's on/off
            self.fp8_matmul = "on" if self.fp8_matmul else "off"
        if isinstance(self.fused_lora, bool):  # YAML's off/false, and true (the old boolean key)
            self.fused_lora = "grouped" if self.fused_lora else "off"

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
        elif self.fp8_matmul == "on" and self.fused_lora == "off":
            errors.append(
                "train.fp8_matmul is on but train.fused_lora is off: the FP8 matmuls live in the fused LoRA "
                "function; set fused_lora: grouped or fp8_matmul: off"
            )
        if self.fused_lora not in FUSED_LORA_MODES:
            errors.append(
                f"train.fused_lora is {self.fused_lora!r}; allowed: {', '.join(FUSED_LORA_MODES)} (YAML's false "
                "means off, true grouped)"
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
            if size[0] < self.max_seq_length:
                errors.append(
                    f"train.micro_batch is {self.micro_batch!r}, below train.max_seq_length "
                    f"{self.max_seq_length}: the longest conversation would not fit; raise it or lower "
                    "max_seq_length"
                )
        if self.lm_head_loss not in LM_HEAD_LOSSES:
            errors.append(f"train.lm_head_loss is {self.lm_head_loss!r}; allowed: {', '.join(LM_HEAD_LOSSES)}")
        return errors


@dataclass
class AlignConfig:
    enabled: bool = _help(
        "Preference tuning after SFT (the align stage): on, it continues the SFT adapter on data/raw/"
        "preferences.jsonl; off, it passes the SFT adapter through unchanged.",
        True,
    )
    method: str = _help(
        "Loss: dpo (sigmoid, Rafailov et al. 2023) | ipo (squared, Azar et al. 2023: does not push margins to "
        "infinity on data it can separate) | apo_zero (anchored: chosen up and rejected down in absolute terms).",
        "dpo",
    )
    beta: float = _help("How far the policy may move from the SFT reference (the loss's temperature).", 0.1)
    learning_rate: float = _help("Peak learning rate of the adapter during preference tuning.", 5.0e-5)
    num_train_epochs: float = _help("Passes over the preference train split.", 2.0)
    pairs_per_step: int = _help(
        "Preference pairs per optimizer step and process (each pair is two sequences: chosen and rejected).", 8
    )
    max_length: int = _help("Longest prompt + answer in tokens (longer pairs are cut from the end).", 512)
    eval_fraction: float = _help(
        "Share of the preference records held out (by prompt) to measure reward accuracy on pairs not trained on.",
        0.1,
    )
    logging_steps: int = _help("Log losses and rewards every this many optimizer steps.", 5)

    def validate(self) -> list[str]:
        errors = []
        if self.method not in ALIGN_METHODS:
            errors.append(f"align.method is {self.method!r}; allowed: {', '.join(ALIGN_METHODS)}")
        if not self.beta > 0:
            errors.append(f"align.beta is {self.beta}; must be positive (typical 0.05 to 0.5)")
        if not self.learning_rate > 0:
            errors.append(f"align.learning_rate is {self.learning_rate}; must be positive (typical 5e-6 to 1e-4)")
        if not self.num_train_epochs > 0:
            errors.append(f"align.num_train_epochs is {self.num_train_epochs}; must be positive")
        for key in ("pairs_per_step", "max_length", "logging_steps"):
            if getattr(self, key) <= 0:
                errors.append(f"align.{key} is {getattr(self, key)}; must be a positive integer")
        if not 0 < self.eval_fraction < 0.5:
            errors.append(f"align.eval_fraction is {self.eval_fraction}; use a share in (0, 0.5), e.g. 0.1")
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
        "Evaluation processes: each takes every n-th test conversation and question of every model "
        "(1 = all in the stage's process).",
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
class GenerationConfig:
    max_new_tokens: int = _help(
        "Longest answer of ask and chat, serve's max_tokens when a request gives none, the Modelfile's num_predict "
        "(tokens). The evaluate stage's answers use eval.max_new_tokens (a cost: the cpu profile lowers it).",
        256,
    )
    temperature: float = _help(
        "0 = greedy (deterministic, do_sample off); above 0 samples at this temperature (at most 2).", 0.0
    )
    top_p: float = _help("Nucleus sampling when temperature > 0: keep the most likely tokens up to this mass.", 1.0)
    top_k: int = _help("Sample among the k most likely tokens when temperature > 0; 0 = no limit.", 0)
    repetition_penalty: float = _help(
        "Divides the logit of every token already in the prompt or answer (1.0 = off; Ollama's repeat_penalty, "
        "with repeat_last_n -1: the whole context, as transformers does). Applies to greedy decoding too.",
        1.05,
    )
    no_repeat_ngram_size: int = _help(
        "Never write a sequence of this many tokens twice (counting the prompt's); 0 = off. transformers only: "
        "llama.cpp and Ollama have no such option, so the Modelfile goes without it.",
        4,
    )

    def validate(self) -> list[str]:
        errors = []
        if self.no_repeat_ngram_size < 0:
            errors.append(f"generation.no_repeat_ngram_size is {self.no_repeat_ngram_size}; use 0 (off) or a length")
        if self.max_new_tokens < 1:
            errors.append(f"generation.max_new_tokens is {self.max_new_tokens}; must be a positive integer")
        if not 0 <= self.temperature <= 2:
            errors.append(f"generation.temperature is {self.temperature}; use 0 (greedy) to 2")
        if not 0 < self.top_p <= 1:
            errors.append(f"generation.top_p is {self.top_p}; use a share in (0, 1] (1 = off)")
        if self.top_k < 0:
            errors.append(f"generation.top_k is {self.top_k}; use 0 (no limit) or a positive count")
        if not 1 <= self.repetition_penalty <= 2:
            errors.append(f"generation.repetition_penalty is {self.repetition_penalty}; use 1.0 (off) to 2")
        return errors


@dataclass
class ExportConfig:
    types: list[str] = _help(
        "GGUF files to write, models/gguf/<name>-<type>.gguf: f16 (half of fp32, near "
        "lossless), q8_0 (a quarter of fp32), bf16, f32.",
        ["f16", "q8_0"],
    )
    name: str = _help("File stem of the GGUF files and their general.name.", "expqa")
    ollama_type: str = _help(
        "The type the Ollama Modelfile's FROM points at: one of types, or auto: the type whose greedy answers follow "
        "the merged model's longest in the stage's own check (metrics/export.json greedy_agreed_tokens), the smaller "
        "file on a tie.",
        "auto",
    )

    def validate(self) -> list[str]:
        errors = [
            f"export.types has {t!r}; allowed: {', '.join(GGUF_EXPORT_TYPES)}"
            for t in self.types
            if t not in GGUF_EXPORT_TYPES
        ]
        if not self.types or len(set(self.types)) != len(self.types):
            errors.append(f"export.types is {self.types}; list each GGUF type once, at least one")
        if self.ollama_type != "auto" and self.ollama_type not in self.types:
            errors.append(
                f"export.ollama_type is {self.ollama_type!r}; must be auto or one of export.types {self.types}"
            )
        if not self.name or any(c in self.name for c in "/\\ "):
            errors.append(f"export.name is {self.name!r}; use a plain file stem such as expqa")
        return errors


def section_help(cls: type) -> dict[str, str]:
    """Help text of each field, for `expqa params` and for tests that check params.yaml comments."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
