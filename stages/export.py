"""Stage `export`: models/merged -> models/gguf/<name>-<type>.gguf (llama.cpp, Ollama, LM Studio) + an Ollama
Modelfile, each file verified against the merged model.

Writes metrics/export.json: size, max |logit diff| and agreement of greedy continuations, token ids, chat template
and architecture per type (write and verify times go to --timings, untracked). A mismatch fails the stage and leaves
models/gguf as it was.
"""

import argparse
import sys
from pathlib import Path

from expqa.config import ConfigError, load_params
from expqa.export import ExportError, export_gguf
from expqa.files import split_wall_clock, write_json


def write_report(path: Path, timings: Path, report: dict) -> None:
    tracked, clock = split_wall_clock(report)
    write_json(path, tracked)
    write_json(timings, clock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expqa export", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="merged model directory (models/merged)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (models/gguf)")
    parser.add_argument("--report", type=Path, required=True, help="verification report (metrics/export.json)")
    parser.add_argument("--timings", type=Path, required=True, help="write/verify seconds (logs/export_run.json)")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--config", help="partial override file (YAML or JSON), e.g. export: {types: [f16]}")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"error: {args.model} does not exist; build it with `dvc repro merge`", file=sys.stderr)
        return 2
    try:
        params = load_params(args.params, args.config).export
        report = export_gguf(args.model, args.out, types=params.types, name=params.name,
                             ollama_type=params.ollama_type)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        if exc.report is not None:
            write_report(args.report, args.timings, exc.report)
        print(f"error: {exc} (details: {args.report})", file=sys.stderr)
        return 1
    write_report(args.report, args.timings, report)
    for r in report["types"].values():
        print(f"export: {args.out / r['file']} {r['bytes'] / 2**20:.0f} MiB, max |logit diff| "
              f"{r['max_abs_logit_diff']:.3g} (tolerance {r['tolerance']}), greedy equal: {r['greedy_equal']} "
              f"({r['greedy_flips']} near-tie flips in {r['greedy_steps']} steps)")
    print(f"export: {args.out / 'Modelfile'} (Ollama), {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
