"""`expqa params`: every params.yaml key with the value that runs on this machine and what it means.

    expqa params                  # params.yaml's profile (auto: cpu when there is no CUDA GPU here)
    expqa params --profile gpu    # the top-level sections as written
    expqa params --profile cpu    # with the `cpu:` section merged in; its keys are marked *
    expqa params --resolved       # what the stages ran with: the params stage's metrics/params/<stage>.json

Values are printed in YAML, so one can be pasted into `dvc exp run -S key=value`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import typing
from pathlib import Path

import yaml

from expqa import config

# params.yaml's sections in Params' order (the cpu: profile is shown as marks on the keys it overrides)
SECTIONS = [(name, cls) for name, cls in typing.get_type_hints(config.Params).items() if dataclasses.is_dataclass(cls)]
HELP_INDENT = " " * 8
WIDTH = 110


def yaml_value(value) -> str:
    """One-line YAML: 42, true, nf4, [q_proj, k_proj], {cross_validated: 2.0}."""
    if isinstance(value, list):  # data.sources holds dataclasses
        value = [dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item for item in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text.removesuffix("...").strip()  # safe_dump ends a bare scalar with a document-end marker


def describe(params: config.Params | None, profile: str | None) -> str:
    """The listing: with params, each key's resolved value under `profile` (cpu overrides marked *)."""
    lines = []
    overrides = params.cpu if params is not None and profile == "cpu" else {}
    resolved = dataclasses.replace(params, profile=profile).resolve() if params is not None else None
    for section, cls in SECTIONS:
        lines.append(f"{section}:")
        for key, text in config.section_help(cls).items():
            if resolved is None:
                lines.append(f"  {key}")
            else:
                value = yaml_value(getattr(getattr(resolved, section), key))
                if key in (overrides.get(section) or {}):
                    written = yaml_value(getattr(getattr(params, section), key))
                    was = "same value" if written == value else f"{section}: has {written}"
                    lines.append(f"* {key}: {value}    [cpu: override; {was}]")
                else:
                    lines.append(f"  {key}: {value}")
            lines.extend(textwrap.wrap(text, WIDTH, initial_indent=HELP_INDENT, subsequent_indent=HELP_INDENT))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def profile_line(path: Path, params: config.Params, profile: str, chosen: str, by_flag: bool) -> str:
    how = {
        "auto": f"auto: {'a CUDA GPU' if profile == 'gpu' else 'no CUDA GPU'} on this machine",
        "cpu": "--profile cpu" if by_flag else "profile: cpu",
        "gpu": "--profile gpu" if by_flag else "profile: gpu",
    }[chosen]
    if profile == "gpu":
        return f"# {path}, profile gpu ({how}): the sections as written; the cpu: section is not applied\n"
    if not params.cpu:
        return f"# {path}, profile cpu ({how}): {path} has no cpu: section, so the sections apply as written\n"
    return (
        f"# {path}, profile cpu ({how}): keys marked * come from its cpu: section,\n"
        "# which replaces the value written in their own section\n"
    )


def print_resolved(folder: Path) -> int:
    """The params stage's files as one YAML document per stage (the values that ran, profile decided)."""
    files = [folder / f"{stage}.json" for stage in config.STAGE_SECTIONS]
    absent = [str(path) for path in files if not path.exists()]
    if absent:
        print(
            f"error: {', '.join(absent)} not found; run `dvc repro params` (the params stage writes them)",
            file=sys.stderr,
        )
        return 2
    for path in files:
        record = json.loads(path.read_text())
        print(
            f"# {path}: stage {record.pop('stage')}"
            + (
                f", profile {record.pop('profile')}"
                if "profile" in record
                else " (no section of it differs between profiles)"
            )
        )
        print(yaml.safe_dump(record, sort_keys=False, width=WIDTH).rstrip() + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from expqa.workspace.project import find_project

    parser = argparse.ArgumentParser(
        prog="expqa params", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, help="params file (default: params.yaml of this checkout)")
    parser.add_argument(
        "--profile",
        choices=config.PROFILES,
        help="which values to show (default: params.yaml's profile; auto = this machine's)",
    )
    parser.add_argument(
        "--resolved",
        action="store_true",
        help="print what each stage ran with: metrics/params/<stage>.json next to the params file",
    )
    args = parser.parse_args(argv)
    path = args.params
    if path is None:
        try:
            path = Path(os.path.relpath(find_project() / "params.yaml"))
        except SystemExit:  # outside a checkout: the meanings are still worth showing
            print(
                "# no params.yaml here (not inside an expqa checkout): keys and meanings only; cd into the "
                "checkout or pass --params FILE for values\n"
            )
            print(describe(None, None), end="")
            return 0
    if args.resolved:
        return print_resolved(path.parent / "metrics" / "params")
    try:
        params = config.load_params(path)
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chosen = args.profile or params.profile
    profile = chosen
    if profile == "auto":
        import torch

        profile = "gpu" if torch.cuda.is_available() else "cpu"
    print(profile_line(path, params, profile, chosen, by_flag=args.profile is not None))
    print(describe(params, profile), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
