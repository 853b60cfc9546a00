"""`expqa llama-serve`: llama.cpp's OpenAI-compatible server on a GGUF file, from the xllamacpp wheel (no C++ build).

    expqa llama-serve models/gguf/expqa-q8_0.gguf --port 8080 --threads 2
    expqa llama-serve embedded --port 8080            # SmolLM2-135M-Instruct, the GGUF inside the embedded wheel

Made to be the generate stage's teacher (`make generate-qa TEACHER=http://127.0.0.1:8080/v1`): llama.cpp turns a
request's `response_format` JSON schema into a grammar, so every answer is JSON of the asked form, and answers
--parallel requests at once (one on a CPU, where the stage asks one at a time: generate.concurrency). The
model id it reports is the file's name and the first 12 hex digits of its SHA-256 (`expqa-q8_0.gguf@0123456789ab`):
the stage's answer cache is keyed by that id, so a re-exported file is asked again instead of answered from the old
file's cache.

Listens on 127.0.0.1 only. With EXPQA_API_KEY set (as for `expqa serve`), requests need `Authorization: Bearer <key>`
(the stage sends the variable generate.api_key_env names). llama.cpp's own log is off unless --verbose.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from expqa.files import sha256_file
from expqa.wording import plural

API_KEY_ENV = "EXPQA_API_KEY"  # the variable `expqa serve` reads too


def model_id(gguf: Path) -> str:
    return f"{gguf.name}@{sha256_file(gguf)[:12]}"


def check_port(port: int) -> str | None:
    """Why 127.0.0.1:port cannot be listened on, or None (llama.cpp itself would only say "failed to init")."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on 127.0.0.1 is in use; pick another with --port"
            return f"cannot listen on port {port} ({exc.strerror}); pick one above 1023 with --port"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="expqa llama-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "gguf",
        type=Path,
        help="the GGUF file to serve, e.g. models/gguf/expqa-q8_0.gguf, or `embedded`: the embedded model's own file "
        "(SmolLM2-135M-Instruct Q4_1, from the wheel the base stage reads)",
    )
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: every core)")
    # one slot on a CPU: on 2 cores the generate stage (2 requests in flight) ran 7.9 papers/min with two slots, 14.1
    # with one (benchmarks/results/teacher_endpoint_2026-12-07); a GPU serves many at once
    parser.add_argument(
        "--parallel", type=int, default=1, help="requests answered at once; more on a GPU (default: %(default)s)"
    )
    parser.add_argument(
        "--ctx-size", type=int, default=4096, help="context tokens, shared by the parallel slots (default: %(default)s)"
    )
    parser.add_argument("--verbose", action="store_true", help="llama.cpp's own log on stderr")
    args = parser.parse_args(argv)
    for option in ("threads", "parallel", "ctx_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be 1 or more, got {getattr(args, option)}")
    if args.gguf == Path("embedded"):
        from expqa.model.base import BaseModelError, embedded_gguf

        try:
            args.gguf = embedded_gguf()
        except BaseModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not args.gguf.is_file():
        print(f"error: {args.gguf} is not a file; export one with `dvc repro export` (models/gguf)", file=sys.stderr)
        return 2
    if problem := check_port(args.port):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        import xllamacpp
    except ImportError:
        print(
            "error: llama.cpp's Python wheel is missing; `pip install xllamacpp` (make install does)", file=sys.stderr
        )
        return 2

    params = xllamacpp.CommonParams()
    params.model.path = str(args.gguf)
    params.model_alias = {model_id(args.gguf)}
    params.hostnames, params.port = ["127.0.0.1"], args.port
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = args.threads
    params.n_parallel, params.n_ctx = args.parallel, args.ctx_size
    params.verbosity = 3 if args.verbose else -1  # -1: silent; 3: llama.cpp's default
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        params.api_keys = [key]
    try:
        server = xllamacpp.Server(params)
    except RuntimeError as exc:
        print(f"error: llama.cpp did not start on {args.gguf} ({exc}); --verbose shows its log", file=sys.stderr)
        return 2
    print(
        f"serving {args.gguf} as {next(iter(params.model_alias))!r} on {server.listening_address}/v1 "
        f"({plural(args.threads, 'thread')}, {plural(args.parallel, 'request')} at a time; Ctrl-C stops)",
        flush=True,
    )
    auth = f"on (requests need the key in {API_KEY_ENV})" if key else f"off (set {API_KEY_ENV} to require a key)"
    print(f"auth: {auth}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1):  # a timed wait: Ctrl-C interrupts it
            pass
    except KeyboardInterrupt:
        pass
    del server  # its destructor stops llama.cpp's threads
    return 0


if __name__ == "__main__":
    sys.exit(main())
