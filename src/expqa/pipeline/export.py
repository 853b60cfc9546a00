"""Stage `export`: the merged model -> <name>-<type>.gguf files (llama.cpp, Ollama, LM Studio) + an Ollama
Modelfile, each file verified against the merged model.

Writes --report: size, max |logit diff| and agreement of greedy continuations, token ids, chat template and
architecture per type (write and verify times go to --timings). A mismatch fails the stage and leaves --out as it was.

Reads --model (the merged model); writes --out (GGUF files + Modelfile), --report (JSON, DVC-tracked) and
--timings (write/verify seconds, JSON, not compared).
"""

import sys

from expqa.pipeline import require, stage_main
from expqa.serving.export import ExportError, export_gguf, export_summary, write_export_report

PATHS = "--model --out --report --timings"  # required path options: dvc.yaml gives them


def run(args, params):
    require(args.model, "merge")
    try:
        report = export_gguf(args.model, args.out, params.export, params.generation)
    except ExportError as exc:
        if exc.report is not None:
            write_export_report(exc.report, args.report, args.timings)
        print(f"error: {exc} (details: {args.report})", file=sys.stderr)
        return 1
    write_export_report(report, args.report, args.timings)
    print("\n".join(export_summary(report, args.out)))


main = stage_main(
    "export",
    __doc__,
    run,
    paths=PATHS,
    output_files="--report --timings",
    output_folders="--out",
    errors=(OSError,),
)

if __name__ == "__main__":  # `python -m expqa.pipeline.export ...` runs the stage, as `expqa export` does
    sys.exit(main())
