"""`expqa params`: every key with its resolved value for a profile, cpu overrides marked, the profile named."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from expqa import config
from expqa.config.show import SECTIONS, main
from helpers import REPO, write_params

PARAMS = str(REPO / "params.yaml")


def listing(capsys, *args: str) -> str:
    assert main(["--params", PARAMS, *args]) == 0
    return capsys.readouterr().out


def test_every_section_and_key_is_listed():
    assert [name for name, _ in SECTIONS] == [
        name for name in typing.get_type_hints(config.Params) if name not in ("profile", "cpu")
    ]
    assert all(cls is typing.get_type_hints(config.Params)[name] for name, cls in SECTIONS)


def test_cpu_profile_shows_resolved_values_and_marks_the_overrides(capsys, shipped_params):
    out = listing(capsys, "--profile", "cpu")
    assert out.startswith(f"# {PARAMS}, profile cpu (--profile cpu): keys marked * come from its cpu: section")
    lines = out.splitlines()
    assert "* optim: adamw_torch    [cpu: override; train: has adamw_torch_fused]" in lines
    assert not [line for line in lines if "same value]" in line]  # the shipped cpu profile overrides nothing as it is
    assert "  learning_rate: 0.0002" in lines and "  r: 16" in lines
    assert "  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]" in lines
    assert "        Peak learning rate." in lines  # the help under its key
    marked = {line[2:].split(":")[0] for line in lines if line.startswith("* ")}
    overridden = {key for section in shipped_params.cpu.values() for key in section}
    assert marked == overridden
    resolved = shipped_params.resolve(cuda=False)
    for section, cls in SECTIONS:
        start = lines.index(f"{section}:")
        for f in dataclasses.fields(cls):
            assert any(line[2:].startswith(f"{f.name}: ") for line in lines[start:]), (section, f.name)
    assert f"* max_seq_length: {resolved.train.max_seq_length}    [cpu: override; train: has 2048]" in lines


def test_gpu_profile_shows_the_sections_as_written(capsys):
    out = listing(capsys, "--profile", "gpu")
    assert out.startswith(f"# {PARAMS}, profile gpu (--profile gpu): the sections as written")
    assert "  optim: adamw_torch_fused" in out.splitlines()
    assert not [line for line in out.splitlines() if line.startswith("*")]


@pytest.mark.parametrize("cuda, profile", [(True, "gpu"), (False, "cpu")])
def test_auto_follows_this_machine(capsys, monkeypatch, cuda, profile):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    out = listing(capsys)
    assert out.startswith(
        f"# {PARAMS}, profile {profile} (auto: {'a CUDA GPU' if cuda else 'no CUDA GPU'} on this machine)"
    )


def test_values_come_from_the_file_and_bad_files_are_one_line_errors(tmp_path, capsys):
    shipped = (REPO / "params.yaml").read_text()
    params = write_params(
        tmp_path / "params.yaml",
        replace=[("  r: 16", "  r: 32"), ("cpu:  ", "cpu:\n  lora:\n    alpha_ratio: 0.5\n  #")],
    )
    assert main(["--params", str(params), "--profile", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  r: 32" in lines and "* alpha_ratio: 0.5    [cpu: override; lora: has 2.0]" in lines
    write_params(params, replace=[("  r: 16", "  r: 0")])
    line = next(i for i, text in enumerate(shipped.splitlines(), 1) if text.startswith("  r: 16"))
    assert main(["--params", str(params)]) == 2
    assert capsys.readouterr().err == (
        f"error: {params}:{line}: lora.r is 0; must be a positive integer (typical: 8, 16, 32, 64)\n"
    )


def test_resolved_prints_what_each_stage_ran_with(tmp_path, capsys, shipped_params):
    folder = tmp_path / "metrics" / "params"
    folder.mkdir(parents=True)
    write_params(tmp_path / "params.yaml")
    assert main(["--params", str(tmp_path / "params.yaml"), "--resolved"]) == 2
    assert "run `dvc repro params`" in capsys.readouterr().err
    cpu = shipped_params.resolve(cuda=False)
    for stage in config.STAGE_SECTIONS:
        (folder / f"{stage}.json").write_text(json.dumps(cpu.stage_sections(stage)))
    assert main(["--params", str(tmp_path / "params.yaml"), "--resolved"]) == 0
    out = capsys.readouterr().out
    assert f"# {folder / 'train.json'}: stage train, profile cpu" in out
    assert "  micro_batch: 2 conversations" in out
    assert f"# {folder / 'collect.json'}: stage collect (no section of it differs between profiles)" in out
