"""Reading params files: YAML or JSON with the line of every key, the `cpu:` profile merged in, every problem of a
file reported at once (ConfigError), and Params, the whole file as the stages get it.

`load_params` reads params.yaml (plus an optional override file); `load_stage_params` reads what one stage runs with
(the params stage's metrics/params/<stage>.json, or a whole params file resolved here); `params_from_dict` builds and
checks Params from a mapping, naming file:line for each problem. The sections themselves are config/schema.py's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expqa.config.schema import (
    PROFILES,
    STAGE_SECTIONS,
    AlignConfig,
    BaseConfig,
    CollectConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    GenerationConfig,
    LoRAConfig,
    ModelConfig,
    QuantizationConfig,
    TrainingConfig,
    _help,
)

# params files nest a few levels; deeper is not a params file, and the parsers would recurse past Python's limit
MAX_CONFIG_NESTING = 64


class ConfigError(ValueError):
    """One or more invalid configuration values; the message lists them all (one line when there is one)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} configuration problems:\n  " + "\n  ".join(self.problems))


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
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
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
        if any(_overridden(self.cpu, entry) for entry in STAGE_SECTIONS[stage]):
            record["profile"] = self.profile
        for entry in STAGE_SECTIONS[stage]:
            section, _, key = entry.partition(".")
            if key:
                record.setdefault(section, {})[key] = raw[section][key]
            else:
                record[section] = raw[section]
        return record


def _overridden(cpu: dict, entry: str) -> bool:
    """Whether the cpu overrides touch a STAGE_SECTIONS entry: a section, or one key of a section."""
    section, _, key = entry.partition(".")
    return section in cpu and (not key or key in (cpu[section] or {}))


class SectionKeys(types.SimpleNamespace):
    """The keys of a section that a stage reads alone (STAGE_SECTIONS' "section.key" entries), e.g. stats'
    train.max_seq_length. Any other key of the section is an error, not a default: the stage's params file does
    not hold it, so DVC would not re-run the stage when it changes."""

    def __getattr__(self, name: str):
        raise AttributeError(f"{name}: not among the keys this stage reads (config.schema.STAGE_SECTIONS)")


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
    entries = STAGE_SECTIONS[stage]
    keyed = {}  # section -> the keys the stage reads alone
    for entry in entries:
        section, _, key = entry.partition(".")
        if key:
            keyed.setdefault(section, []).append(key)
    partial = {section: body.pop(section, None) for section in keyed}
    params = params_from_dict(body, str(path), lines, sources_dir, sections=[e for e in entries if "." not in e])
    errors = []
    hints = typing.get_type_hints(Params)
    for section, keys in keyed.items():
        value = partial[section]
        if not isinstance(value, dict) or sorted(value) != sorted(keys):
            errors.append(f"{path}: {section} must hold exactly {', '.join(keys)} (the keys stage {stage} reads)")
            continue
        checked = _checked_fields(hints[section], value, section, lambda key: lines.get(key, str(path)), [])
        bad = [key for key in keys if key not in checked]
        errors.extend(f"{path}: {section}.{key} is {value[key]!r}; wrong type" for key in bad)
        setattr(params, section, SectionKeys(**checked))
    if errors:
        raise ConfigError(errors)
    return params
