import dataclasses
import json
import re

import pytest
import yaml

from expqa import config as cfg
from expqa.config import ConfigError, load_params
from expqa.pipeline.combine import main as combine_stage
from helpers import REPO


def write(tmp_path, text, name="params.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def shipped_text():
    return (REPO / "params.yaml").read_text()


def test_shipped_params_load_into_every_dataclass(shipped_params):
    assert isinstance(shipped_params.lora, cfg.LoRAConfig)
    assert isinstance(shipped_params.train, cfg.TrainingConfig)
    assert isinstance(shipped_params.quantization, cfg.QuantizationConfig)
    raw = yaml.safe_load(shipped_text())
    for section in ("base", "model", "collect", "data", "quantization", "lora", "train", "eval"):
        fields = {f.name for f in dataclasses.fields(type(getattr(shipped_params, section)))}
        assert set(raw[section]) == fields, f"params.yaml section {section} must set every key explicitly"
    shipped_params.resolve(cuda=False)  # the cpu overrides are valid too


def test_seed_defaults_are_the_gpu_profile(shipped_params):
    p = shipped_params
    assert (p.lora.r, p.lora.alpha) == (16, 32) and p.lora.dropout == 0.0  # seed 0.05: docs/benchmarks.md
    assert p.lora.target_modules == cfg.LLAMA_PROJECTIONS
    t = p.train
    assert t.learning_rate == 2e-4
    assert (t.lr_scheduler_type, t.warmup_ratio, t.num_train_epochs, t.optim) == (
        "cosine",
        0.03,
        3.0,
        "adamw_torch_fused",
    )
    assert (t.max_seq_length, t.gradient_checkpointing, t.bf16, t.save_steps, t.save_total_limit) == (
        2048,
        "auto",
        True,
        500,
        3,
    )
    q = p.quantization
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True,
        "nf4",
        True,
        "bfloat16",
    )
    assert (t.micro_batch, t.tokens_per_micro_batch, t.gradient_accumulation_steps, t.fused_lora) == (
        "16384 tokens",
        16384,
        1,
        "grouped",
    )
    assert (t.padding_free, t.use_liger_kernel) == (True, True)
    assert t.num_processes == 0  # every visible GPU


def test_dataclass_defaults_equal_params_yaml():
    """params.yaml is the one place a default lives; the Python API's defaults must not drift from it."""
    shipped = yaml.safe_load(shipped_text())
    defaults = json.loads(json.dumps(dataclasses.asdict(cfg.Params())))
    for section, value in shipped.items():
        if section == "cpu":  # the profile's overrides: params.yaml only (Params().cpu is empty)
            continue
        assert defaults[section] == value, section


def test_profile_auto_resolves_from_the_hardware(shipped_params):
    assert shipped_params.profile == "auto"
    gpu, cpu = shipped_params.resolve(cuda=True), shipped_params.resolve(cuda=False)
    assert (gpu.profile, cpu.profile) == ("gpu", "cpu")
    assert gpu.train == shipped_params.train and gpu.quantization == shipped_params.quantization
    assert cpu.quantization.load_in_4bit is False and cpu.train.optim == "adamw_torch"
    assert cpu.train.micro_batch == "2 conversations" and cpu.train.per_device_train_batch_size == 2
    assert cpu.lora == shipped_params.lora
    assert cpu.resolve(cuda=True) == cpu  # resolved once: a resolved profile stays what it is
    explicit = dataclasses.replace(shipped_params, profile="gpu")
    assert explicit.resolve(cuda=False).train == shipped_params.train  # gpu asked for, whatever the machine


def test_missing_key_is_a_located_error_naming_the_line_to_add(tmp_path):
    text = shipped_text()
    dropout = next(line for line in text.splitlines() if line.startswith("  dropout:"))
    path = write(tmp_path, text.replace(dropout + "\n", ""))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    lora_line = text.splitlines().index("lora:") + 1
    assert str(info.value) == (
        f"{path}:{lora_line}: lora.dropout is missing; add `dropout: 0.0` under lora: (every "
        "key is required: params.yaml is the one place a default lives)"
    )
    no_profile = write(tmp_path, text.replace("profile: auto\n", ""), "noprofile.yaml")
    with pytest.raises(ConfigError, match="no 'profile' section; add `profile: auto`; every section is required"):
        load_params(no_profile)


@pytest.mark.parametrize(
    "written,expected",
    [
        ("16 bananas", "train.micro_batch is '16 bananas'; give a positive count and its unit"),
        ("0 tokens", "train.micro_batch is '0 tokens'; give a positive count"),
        ("1024 tokens", "train.micro_batch is '1024 tokens', below train.max_seq_length 2048"),
    ],
)
def test_micro_batch_is_one_key_with_its_unit(tmp_path, written, expected):
    path = write(tmp_path, shipped_text().replace("micro_batch: 16384 tokens", f"micro_batch: {written}", 1))
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_params(path)
    # a token budget packs conversations whatever padding_free says (that key is for conversations micro-batches)
    padded = write(tmp_path, shipped_text().replace("padding_free: true ", "padding_free: false ", 1), "padded.yaml")
    assert load_params(padded).train.padding_free is False


def test_profile_value_and_cpu_overrides_are_checked(tmp_path):
    bad = write(tmp_path, shipped_text().replace("profile: auto", "profile: tpu"))
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: profile is 'tpu'; allowed: auto, gpu, cpu"):
        load_params(bad)
    nested = write(
        tmp_path,
        shipped_text().replace("  eval:\n    max_new_tokens: 96", "  profile: gpu\n  eval:\n    max_new_tokens: 96"),
        "nested.yaml",
    )
    with pytest.raises(ConfigError, match="cpu.profile cannot be overridden by a profile"):
        load_params(nested)


def test_stage_files_hold_resolved_sections_and_load_back(tmp_path, shipped_params):
    cpu = shipped_params.resolve(cuda=False)
    record = cpu.stage_sections("train")
    assert record["profile"] == "cpu" and set(record) == {"stage", "profile", "base", "quantization", "lora", "train"}
    assert "profile" not in cpu.stage_sections("collect")  # no cpu override touches it: same file on any machine
    # the commands that answer, the evaluate stage and the Modelfile read one generation section
    assert cpu.stage_sections("evaluate")["generation"] == cpu.stage_sections("export")["generation"]
    assert cfg.GenerationConfig(**cpu.stage_sections("export")["generation"]) == cpu.generation
    path = tmp_path / "train.json"
    path.write_text(json.dumps(record))
    loaded = cfg.load_stage_params(path, "train")
    assert (loaded.train, loaded.lora, loaded.profile, loaded.data) == (cpu.train, cpu.lora, "cpu", None)
    with pytest.raises(ConfigError, match="holds the params of stage 'train', not 'evaluate'"):
        cfg.load_stage_params(path, "evaluate")
    del record["train"]["learning_rate"]
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="train.learning_rate is missing"):
        cfg.load_stage_params(path, "train")
    whole = cfg.load_stage_params(REPO / "params.yaml", "train")  # a params.yaml works too, resolved here
    assert whole.profile in ("cpu", "gpu")


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("  r: 16", "  r: 0", "lora.r is 0; must be a positive integer"),
        ("learning_rate: 2.0e-4", "learning_rate: 0", "train.learning_rate is 0.0; must be in (0, 1)"),
        ("learning_rate: 2.0e-4", "learning_rate: 5", "train.learning_rate is 5.0; must be in (0, 1)"),
        ("learning_rate: 2.0e-4", "learning_rate: .nan", "train.learning_rate is nan; expected a finite number"),
        ("warmup_ratio: 0.03", "warmup_ratio: -.inf", "train.warmup_ratio is -inf; expected a finite number"),
        ("weight_decay: 0.0", "weight_decay: -0.1", "train.weight_decay is -0.1; must be >= 0"),
        ("max_grad_norm: 0.3", "max_grad_norm: -1.0", "train.max_grad_norm is -1.0; must be >= 0"),
        ("cross_validated: 2.0", "cross_validated: .nan", "data.weights.cross_validated is nan; expected a finite"),
        ("arxiv_synthetic: 1.0", "arxiv_synthetic: .inf", "data.weights.arxiv_synthetic is inf; expected a finite"),
        (
            "cross_validated: 2.0",
            "cross_validated: 5000",
            "data.weights.cross_validated is 5000; use 0 (drops the source) to 1000",
        ),
        ("seed: 42", "seed: -1", "base.seed is -1; use 0 to 4294967295"),
        ("min_answer_chars: 80", "min_answer_chars: -1", "collect.min_answer_chars is -1; use 0 or a positive count"),
        (
            "site_url: https://stats.stackexchange.com",
            "site_url: stats.stackexchange.com",
            "collect.site_url is 'stats.stackexchange.com'; give the site's address with its scheme",
        ),
        (
            "bnb_4bit_quant_type: nf4",
            "bnb_4bit_quant_type: int3",
            "quantization.bnb_4bit_quant_type is 'int3'; allowed: nf4, fp4",
        ),
        ("  r: 16", "  r: sixteen", "lora.r is 'sixteen' (str); expected int"),
        ("on_invalid: error", "on_invalid: ignore", "data.on_invalid is 'ignore'; allowed: error, skip"),
        (
            "save_steps: 500",
            "save_steps: 505",
            "train.save_steps is 505, not a multiple of train.logging_steps 10: a run resumed from a checkpoint "
            "between two logged steps would log other loss values than one that never stopped; use e.g. "
            "save_steps: 510",
        ),
        (
            "repetition_penalty: 1.05",
            "repetition_penalty: 0.9",
            "generation.repetition_penalty is 0.9; use 1.0 (off) to 2",
        ),
        ("temperature: 0.0", "temperature: 3", "generation.temperature is 3.0; use 0 (greedy) to 2"),
        ("top_p: 1.0", "top_p: 0", "generation.top_p is 0.0; use a share in (0, 1]"),
        (
            "gradient_checkpointing: auto",
            "gradient_checkpointing: some",
            "train.gradient_checkpointing is 'some'; allowed: auto, off, selective, full",
        ),
    ],
)
def test_invalid_value_gives_one_line_naming_key_value_and_line(tmp_path, old, new, expected):
    text = shipped_text()
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and expected in message
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if new in text)
    assert message.startswith(f"{path}:{line}: ")


def test_unknown_key_is_rejected_with_known_keys(tmp_path):
    path = write(tmp_path, shipped_text().replace("  alpha_ratio: 2.0 ", "  rank: 8\n  alpha_ratio: 2.0 "))
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank'; known keys in lora: r, alpha_ratio, dropout"):
        load_params(path)


def test_unknown_section_and_all_problems_reported_together(tmp_path):
    path = write(tmp_path, shipped_text().replace("  r: 16", "  r: -1") + "\noptimizer: {lr: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert "2 configuration problems" in str(info.value)
    assert "unknown section 'optimizer'" in str(info.value) and "lora.r is -1" in str(info.value)


def test_distributed_is_ddp_or_fsdp(tmp_path):
    path = write(tmp_path, shipped_text().replace("distributed: ddp", "distributed: zero3", 1))
    with pytest.raises(ConfigError, match=r"train.distributed is 'zero3'; allowed: ddp, fsdp"):
        load_params(path)


def test_bad_cpu_override_is_caught_on_any_machine(tmp_path):
    path = write(tmp_path, shipped_text().replace("    save_steps: 25", "    save_steps: 0"))
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: train.save_steps is 0; must be a positive integer"):
        load_params(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_partial_override_file_merges_nested(tmp_path, suffix):
    override = {"lora": {"r": 32}, "train": {"learning_rate": 1e-4}}
    text = json.dumps(override) if suffix == ".json" else yaml.safe_dump(override)
    path = write(tmp_path, text, "my" + suffix)
    params = load_params(REPO / "params.yaml", path)
    # alpha follows r (alpha_ratio 2): the scale alpha / r stays 2 when an experiment changes r
    assert params.lora.r == 32 and params.lora.alpha == 64 and params.train.learning_rate == 1e-4
    assert params.lora.target_modules == cfg.LLAMA_PROJECTIONS


def test_override_file_errors_point_at_the_override(tmp_path):
    path = write(tmp_path, "lora:\n  r: -2\n", "my.yaml")
    with pytest.raises(ConfigError, match=rf"^{path}:2: lora.r is -2"):
        load_params(REPO / "params.yaml", path)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_params(write(tmp_path, "lora: [r: 1\n"))


# PyYAML looks up to 1,024 characters ahead for a key at every bracket: one bracket a line keeps these tests fast
DEEP_YAML_FLOW = "lora:\n  r:\n" + "   [\n" * 100_000 + "   ]\n" * 100_000
TOO_DEEP = "; a params file nests a few levels (section: key: value, cpu: section: key: value): check that this is the "


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("my.json", "[" * 100_000 + "]" * 100_000, ":1: nested deeper than 64 levels (at column 65)"),
        ("my.yaml", DEEP_YAML_FLOW, ":65: nested deeper than 64 levels (at column 4)"),
        ("my.yaml", "".join("  " * level + f"k{level}:\n" for level in range(200)), ":65: nested deeper than 64 "),
        (
            "my.json",
            '{"lora": {"r": ' + "[" * 100 + "]" * 100 + "}}",
            ":1: nested deeper than 64 levels (at column 78)",
        ),
    ],
    ids=["json-100000", "yaml-flow-100000", "yaml-block-200", "json-100"],
)
def test_override_file_nested_too_deep_is_one_line_naming_it(tmp_path, name, text, where):
    """A RecursionError traceback before; 100 levels parsed but would reach every recursive walk of the params.
    Now one line at the file, line and column where it gets too deep."""
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as caught:
        load_params(REPO / "params.yaml", path)
    assert str(caught.value).startswith(f"{path}{where}") and str(caught.value).endswith(f"{TOO_DEEP}file you meant")


def test_stage_reports_a_config_file_nested_too_deep_in_one_line(tmp_path, capsys):
    """YAML printed a 2,999-line traceback."""
    path = write(tmp_path, DEEP_YAML_FLOW, "my.yaml")
    argv = ["in.jsonl", "--out", str(tmp_path / "out"), "--sources", str(tmp_path)]
    assert combine_stage([*argv, "--params", str(REPO / "params.yaml"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}:65: nested deeper than 64 levels (at column 4){TOO_DEEP}file you meant\n"


@pytest.mark.parametrize("written, value", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")])
def test_non_finite_number_in_a_json_override_is_reported_at_the_json_file(tmp_path, written, value):
    """JSON files had no key lines, so this pointed at params.yaml's line of the key."""
    path = write(tmp_path, f'{{"train": {{\n  "warmup_ratio": 0.1,\n  "learning_rate": {written}}}}}\n', "my.json")
    with pytest.raises(ConfigError) as caught:
        load_params(REPO / "params.yaml", path)
    assert str(caught.value) == f"{path}:3: train.learning_rate is {value}; expected a finite number"


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (
            "my.yaml",
            "lora:\n  r: [1, 2\n  alpha: 3\n",
            ":3: cannot parse YAML: expected ',' or ']', but got ':' at column 8 (while parsing a flow sequence that "
            "starts at line 2, column 6); check the indentation, quotes and brackets there",
        ),
        (
            "my.yaml",
            "lora:\n  r: 1\n alpha: 3\n",
            ":3: cannot parse YAML: expected <block end>, but found '<block mapping start>' at column 2 (while parsing "
            "a block mapping that starts at line 1, column 1); check the indentation, quotes and brackets there",
        ),
        (
            "my.json",
            '{"lora": {\n  "r": 3,\n}}',
            ":3: cannot parse JSON: Expecting property name enclosed in double quotes at column 1; check the quotes, "
            "commas and brackets there",
        ),
    ],
    ids=["yaml-flow", "yaml-indent", "json"],
)
def test_unparsable_override_file_is_one_line_with_its_line_and_column(tmp_path, name, text, expected):
    """PyYAML's message is 8 lines with '<unicode string>' for the file."""
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as caught:
        load_params(REPO / "params.yaml", path)
    assert str(caught.value) == f"{path}{expected}"


def test_every_field_has_help():
    for cls in (
        cfg.BaseConfig,
        cfg.ModelConfig,
        cfg.CollectConfig,
        cfg.DataConfig,
        cfg.QuantizationConfig,
        cfg.LoRAConfig,
        cfg.TrainingConfig,
        cfg.EvalConfig,
    ):
        assert all(cfg.section_help(cls).values()), cls


@pytest.mark.parametrize(
    "written,mode",
    [
        ("auto", "auto"),
        ("off", "off"),
        ("false", "off"),
        ("true", "full"),
        ("selective", "selective"),
        ("full", "full"),
    ],
)
def test_gradient_checkpointing_spellings(tmp_path, written, mode):
    """YAML reads `off` as false: both mean off; true (the old boolean key) means full."""
    path = write(tmp_path, shipped_text().replace("gradient_checkpointing: auto", f"gradient_checkpointing: {written}"))
    params = load_params(path)
    assert params.train.gradient_checkpointing == mode
    assert params.resolve(cuda=False).train.gradient_checkpointing == "off"  # the cpu profile


def test_override_file_that_is_not_utf8_or_a_directory(tmp_path):
    latin1 = tmp_path / "my.yaml"
    latin1.write_bytes("data:\n  on_invalid: skip  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{latin1}:2: not valid UTF-8 \(byte 0xe9 at column 26\); save the file"):
        load_params(REPO / "params.yaml", latin1)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a directory; give a YAML or JSON file"):
        load_params(REPO / "params.yaml", tmp_path)
