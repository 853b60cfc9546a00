"""`expqa pull` (`make pull`): `dvc pull` that says why an output cannot be pulled and what to run instead.

    expqa pull                  # dvc pull from the default remote
    expqa pull -r storage       # any `dvc pull` argument is passed through

dvc.lock names every output by hash; a clone gets them only from a DVC remote that the machine which ran `dvc repro`
pushed to. When some are on no remote, plain `dvc pull` ends with "Checkout failed for following targets: ...";
this says which outputs the remote lacks (`dvc data status --not-in-remote`, asked only after a failed pull), why,
and what to run: `dvc push` where they were made, or `dvc repro` here. Any other failure shows DVC's own output.
DVC draws no progress bars here (its output is read to explain a failure); `dvc pull` itself does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

# What rebuilding costs, measured (README "Setup": `make repro` on 2 CPU cores, 30 min 49 s; docs/benchmarks.md "The
# whole pipeline on one GPU (measured)": `dvc repro` on one H200, 4 min 15 s)
REBUILD_TIME = "the whole pipeline: 31 min on 2 CPU cores with the CPU profile, 3 min on one H100"


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """DVC of this interpreter's environment (the one expqa is installed in), output captured."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def remote_argument(argv: list[str]) -> str | None:
    """The remote named by `-r NAME`, `-rNAME`, `--remote NAME` or `--remote=NAME` among dvc pull's arguments."""
    for i, arg in enumerate(argv):
        if arg in ("-r", "--remote"):
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--remote="):
            return arg.partition("=")[2]
        if arg.startswith("-r") and not arg.startswith("--"):
            return arg[2:]
    return None


def stages_of(path: Path) -> dict:
    """The `stages` mapping of dvc.yaml or dvc.lock ({} when the file is absent)."""
    return ((yaml.safe_load(path.read_text()) or {}).get("stages") or {}) if path.is_file() else {}


def producing_stages(root: Path, outputs: list[str]) -> list[str]:
    """The dvc.lock stages that write these outputs, in dvc.yaml's order (the pipeline's)."""
    order = list(stages_of(root / "dvc.yaml"))
    wanted = set(outputs)
    found = [
        stage
        for stage, entry in stages_of(root / "dvc.lock").items()
        if any(out["path"].rstrip("/") in wanted for out in entry.get("outs") or [])
    ]
    return sorted(found, key=lambda stage: order.index(stage) if stage in order else len(order))


def unavailable(root: Path, remote: str | None) -> list[str] | None:
    """Outputs in neither the local cache nor the remote (None when DVC cannot tell, e.g. an unreachable remote)."""
    status = dvc(root, "data", "status", "--not-in-remote", "--json", *(["-r", remote] if remote else []))
    if status.returncode != 0:
        return None
    found = json.loads(status.stdout or "{}")
    absent = {path.rstrip("/") for path in found.get("not_in_cache") or []}
    return [path.rstrip("/") for path in found.get("not_in_remote") or [] if path.rstrip("/") in absent]


def default_remote(root: Path) -> str | None:
    """The remote a plain `dvc pull` uses, or None when none is set as default."""
    named = dvc(root, "remote", "default")
    return (named.stdout.strip() or None) if named.returncode == 0 else None


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def explain(root: Path, argv: list[str]) -> list[str] | None:
    """What is missing, why, and what to run instead: three lines; None when the failure is something else."""
    remote = remote_argument(argv) or default_remote(root)
    missing = unavailable(root, remote)
    if not missing:
        return None
    stages = producing_stages(root, missing)
    made_by = f"; {'stages' if len(stages) > 1 else 'stage'} {', '.join(stages)}" if stages else ""
    outputs = f"{plural(len(missing), 'output')} of dvc.lock ({', '.join(missing)}{made_by})"
    rebuild = f"`dvc repro` (or `make repro`) to rebuild them here ({REBUILD_TIME})"
    if remote is None:
        return [
            f"error: no default DVC remote is set (.dvc/config) and the local cache lacks {outputs}",
            "why: dvc.lock was written by `dvc repro` on another machine, and its outputs reach a clone only through "
            'a DVC remote that machine pushed to (README "Share models and data")',
            "instead: add the team's remote (`dvc remote add -d <name> <url>`, credentials with `dvc remote modify "
            f"--local`) and `make pull` again, or run {rebuild}",
        ]
    return [
        f"error: DVC remote '{remote}' and the local cache lack {outputs}",
        "why: dvc.lock was written by `dvc repro` on a machine that did not `dvc push` these outputs afterwards",
        f"instead: run `dvc push` on the machine that made them, then `make pull` again; or run {rebuild}",
    ]


def pull(root: Path, argv: list[str]) -> int:
    """`dvc pull ARGV`; on failure, the explanation instead of DVC's error when there is one. The exit status."""
    result = dvc(root, "pull", *argv)
    lines = explain(root, argv) if result.returncode != 0 else None
    if lines is None:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode
    print("\n".join(lines), file=sys.stderr)
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    from expqa.workspace.project import find_project

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return pull(find_project(), argv)


if __name__ == "__main__":
    sys.exit(main())
