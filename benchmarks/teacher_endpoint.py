"""The generate stage against llama.cpp's server: papers per minute, pairs kept and dropped, and a rerun (issue 31).

    PYTHONPATH=src python benchmarks/teacher_endpoint.py --gguf models/gguf/expqa-q8_0.gguf --threads 2 \\
        --out benchmarks/results/teacher_endpoint_<date>/<name>

Starts `expqa llama-serve <gguf>` (--threads, --parallel slots) on a free port, writes params.yaml's generate section
with the teacher switched on and pointed at it (generate.model: its /v1 address; everything else as shipped:
concurrency, max_new_tokens, the checks) and runs the stage script twice on the shipped papers sample, as dvc.yaml
does, with a new answer cache: the first run asks every pair, the second should ask none. Writes, under --out, each
run's printed lines (run1.txt, run2.txt), the reports, rows and answer cache, and summary.json: wall time, papers per
minute, the answers' tokens (as the server counted them) per second, the server's CPU seconds (from /proc), the load
average before and after (other work on a shared machine slows the run), the CPU model and the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAPERS = "data/raw/arxiv_papers_sample.jsonl"  # the stage runs in REPO
ASKED = re.compile(r"generate: ([\d,]+) answers? asked of .* \(([\d,]+) HTTP requests?\), ([\d,]+) taken from")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def start_server(gguf: Path, port: int, threads: int, parallel: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "expqa.cli", "llama-serve", str(gguf), "--port", str(port)]
    command += ["--threads", str(threads), "--parallel", str(parallel)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"llama-serve did not start: {server.communicate()[0]}")


def run_stage(params: Path, out: Path, name: str) -> tuple[float, str]:
    command = [sys.executable, "stages/generate.py", "--params", str(params), "--papers", PAPERS]
    command += ["--base", "models/base", "--cache", str(out / "cache.jsonl"), "--out", str(out / "rows.jsonl")]
    command += ["--report", str(out / f"report_{name}.json")]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / f"{name}.txt").write_text(f"$ {' '.join(command[1:])}\n{result.stdout}{result.stderr}")
    if result.returncode:
        raise SystemExit(f"the stage failed ({name}):\n{result.stdout}{result.stderr}")
    return wall, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1, help="the server's slots (llama-serve's default)")
    parser.add_argument("--concurrency", type=int, help="generate.concurrency (default: params.yaml's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from expqa.config import load_params

    generate = load_params(REPO / "params.yaml").generate
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    port = free_port()
    config = dataclasses.replace(generate, enabled=True, model=f"http://127.0.0.1:{port}/v1")
    if args.concurrency is not None:
        config = dataclasses.replace(config, concurrency=args.concurrency)
    params = args.out / "params.json"
    params.write_text(json.dumps({"stage": "generate", "generate": dataclasses.asdict(config)}, indent=2) + "\n")

    load_before = os.getloadavg()
    server = start_server(args.gguf, port, args.threads, args.parallel)
    try:
        runs = {}
        for name in ("run1", "run2"):
            cpu_before = cpu_seconds(server.pid)
            wall, printed = run_stage(params, args.out, name)
            report = json.loads((args.out / f"report_{name}.json").read_text())
            asked, requests, cached = (int(n.replace(",", "")) for n in ASKED.search(printed).groups())
            runs[name] = {
                "wall_s": round(wall, 1),
                "server_cpu_s": round(cpu_seconds(server.pid) - cpu_before, 1),
                "papers": report["papers_selected"],
                "papers_per_minute": round(report["papers_selected"] / wall * 60, 2),
                "answers_asked": asked,
                "http_requests": requests,
                "answers_from_cache": cached,
                "pairs_kept": report["pairs_kept"],
                "pairs_requested": report["pairs_requested"],
                "dropped": report["dropped"],
                "rows_sha256": hashlib.sha256((args.out / "rows.jsonl").read_bytes()).hexdigest(),
            }
    finally:
        server.terminate()
        server_log = server.communicate(timeout=60)[0]
    (args.out / "server.txt").write_text(server_log)
    answers = [json.loads(line) for line in (args.out / "cache.jsonl").read_text().splitlines()]
    tokens = sum(answer.get("completion_tokens") or 0 for answer in answers)
    runs["run1"] |= {"completion_tokens": tokens, "tokens_per_second": round(tokens / runs["run1"]["wall_s"], 1)}
    summary = {
        "command": " ".join(sys.argv),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores (shared with another session)",
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "gguf": str(args.gguf),
        "server": {"threads": args.threads, "parallel": args.parallel, "printed": server_log.splitlines()[:2]},
        "teacher": json.loads((args.out / "report_run1.json").read_text())["teacher"],
        "generate": {k: v for k, v in dataclasses.asdict(config).items() if k != "model"},
        **runs,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
