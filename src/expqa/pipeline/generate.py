"""Stage `generate`: synthetic, grounded Q&A from arXiv papers' metadata -> ChatML JSONL (params: generate).

Off by default (generate.enabled: false writes an empty output); `make generate-qa` runs it with the teacher
(TEACHER=<model folder, hub id or an OpenAI-compatible server's http://host:port/v1>).

Reads --papers (arXiv metadata, JSON lines) and --base (the teacher when generate.model is base); reads and appends
to --cache (the teacher's answers: only what it lacks is asked); writes --out (ChatML JSONL) and --report (counts,
JSON).
"""

import sys
import time

from expqa.data.chatml import DataError
from expqa.data.generate import generate_qa
from expqa.data.teacher_endpoint import TeacherError
from expqa.files import write_json
from expqa.pipeline import stage_main
from expqa.wording import plural

PATHS = "--papers --base --cache --out --report"  # required path options: dvc.yaml gives them


def run(args, params):
    started = time.perf_counter()
    counts = generate_qa(args.papers, args.out, params.generate, base_dir=args.base, cache=args.cache)
    this_run = counts.pop("this_run", None)  # differs from a rerun's: printed, not tracked
    write_json(args.report, counts)
    if not counts["enabled"]:
        print(
            f"generate: off (generate.enabled: false); {counts['papers_selected']} of {counts['papers_read']} "
            f"papers selected; wrote an empty {args.out}. `make generate-qa` runs the teacher."
        )
        return
    print(
        f"generate: {counts.get('pairs_kept', 0)} of {counts.get('pairs_requested', 0)} pairs kept from "
        f"{counts['papers_selected']} papers in {time.perf_counter() - started:.0f} s -> {args.out}"
    )
    print("generate: dropped " + ", ".join(f"{reason} {n}" for reason, n in counts.get("dropped", {}).items()))
    if this_run is not None:
        print(
            f"generate: {plural(this_run['answers_asked'], 'answer')} asked of {counts['teacher']} "
            f"({plural(this_run['requests'], 'HTTP request')}), {this_run['answers_cached']} taken from {args.cache}"
        )


main = stage_main(
    "generate",
    __doc__,
    run,
    paths=PATHS,
    output_files="--cache --out --report",
    errors=(DataError, OSError, TeacherError),
)

if __name__ == "__main__":  # `python -m expqa.pipeline.generate ...` runs the stage, as `expqa generate` does
    sys.exit(main())
