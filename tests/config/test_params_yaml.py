"""params.yaml's layout survives `dvc exp run -S`: DVC's own writer changes only the line of the value it sets.

`exp run -S key=value` calls dvc.utils.hydra.apply_overrides, which loads params.yaml with ruamel (round trip),
replaces every list with a plain one and dumps it again: a flow list `[a, b]` comes back as a block list, and a
blank line or comment after a list that ends a section is dropped. params.yaml is written the way DVC writes it.
"""

import difflib

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from expqa.config import ConfigError, load_params
from helpers import PARAMS, write_params


def set_params(tmp_path, *overrides):
    """A copy of the shipped params.yaml after `dvc exp run -S <overrides>`; returns (old lines, path)."""
    path = write_params(tmp_path / "params.yaml")
    apply_overrides(str(path), list(overrides))
    return PARAMS.read_text().splitlines(), path


def changed_lines(old: list[str], new: list[str]) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(old, new, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


@pytest.mark.parametrize(
    "override, removed, added",
    [
        ("lora.r=32", "  r: 16", "  r: 32"),
        (
            "cpu.train.num_train_epochs=3",
            "    num_train_epochs: 1         # one full pass over the train split (98 steps)",
            "    num_train_epochs: 3         # one full pass over the train split (98 steps)",
        ),
        (
            "export.ollama_type=f16",
            "  ollama_type: auto             # the file models/gguf/Modelfile's FROM points at: auto = the type whose "
            "greedy",
            "  ollama_type: f16              # the file models/gguf/Modelfile's FROM points at: auto = the type whose "
            "greedy",
        ),
        (  # what `make generate-qa TEACHER=http://127.0.0.1:8080/v1` sets
            "generate.model=http://127.0.0.1:8080/v1",
            "  model: base                   # teacher: base (the base stage's model) | a local model folder | a hub "
            "id | an",
            "  model: http://127.0.0.1:8080/v1 # teacher: base (the base stage's model) | a local model folder | a "
            "hub id | an",
        ),
    ],
    ids=["lora.r", "cpu.train.num_train_epochs", "export.ollama_type", "generate.model"],
)
def test_set_param_rewrites_exactly_one_line(tmp_path, override, removed, added):
    old, path = set_params(tmp_path, override)
    assert changed_lines(old, path.read_text().splitlines()) == [f"-{removed}", f"+{added}"]


def test_set_param_keeps_every_other_value_and_the_key_order(tmp_path):
    old, path = set_params(tmp_path, "lora.r=32")
    before, after = yaml.safe_load("\n".join(old)), yaml.safe_load(path.read_text())
    assert after["lora"].pop("r") == 32 and before["lora"].pop("r") == 16
    assert list(after.items()) == list(before.items())  # dicts compare without order; items lists with it
    assert [list(section) for section in after.values()] == [list(section) for section in before.values()]


@pytest.mark.parametrize(
    "override, bad_line, message",
    [
        ("lora.r=0", "  r: 0", "lora.r is 0; must be a positive integer"),
        # after every list in the file: a list DVC expanded would have moved this line
        (
            "export.ollama_type=f32",
            "  ollama_type: f32",
            "export.ollama_type is 'f32'; must be auto or one of export.types",
        ),
    ],
    ids=["lora.r", "export.ollama_type"],
)
def test_config_error_points_at_the_line_dvc_wrote(tmp_path, override, bad_line, message):
    old, path = set_params(tmp_path, override)
    new = path.read_text().splitlines()
    line = next(i for i, text in enumerate(new, 1) if text.startswith(bad_line))
    assert old[line - 1] != new[line - 1] and len(old) == len(new)  # the same line number as in the shipped file
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}:{line}: {message}")
