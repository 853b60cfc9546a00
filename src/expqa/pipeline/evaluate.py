"""Stage `evaluate`: base vs fine-tuned (and the SFT model between them) on the test split and critical questions.

Params: eval, generation (how answers pick their tokens), base.seed (bootstrap), train.max_seq_length and
align.enabled: on, --sft (the SFT adapter) on --base is evaluated too, as the middle of three models (base, SFT,
SFT + preference tuning = --tuned), each compared with a paired test.
--train: the split that trained the model, for the taught / not taught split of the critical questions.

Reads --base and --tuned (model folders), --test and --train (splits); writes --out (the report, JSON),
--headline (its key numbers, rounded: what `dvc exp show` lists), --examples (both models' answers, JSONL) and
--plot (ROUGE-L per test question, CSV).
"""

import sys

from expqa.evaluation.evaluate import eval_summary, evaluate_base_vs_tuned, headline, write_eval_outputs
from expqa.files import write_json
from expqa.pipeline import check_profile, require, stage_main

# required path options: dvc.yaml gives them
PATHS = "--base --sft --tuned --test --train --out --headline --examples --plot"


def run(args, params):
    require(args.base, "base")
    require(args.tuned, "merge")
    if params.align.enabled:
        require(args.sft, "train")
    check_profile(params, "evaluate")
    report, examples = evaluate_base_vs_tuned(
        args.base,
        args.tuned,
        args.test,
        args.train,
        params.eval,
        params.generation,
        seed=params.base.seed,
        max_length=params.train.max_seq_length,
        sft_adapter=args.sft if params.align.enabled else None,
    )
    if params.profile is not None:  # `dvc metrics diff` / `exp show` tell a cpu run from a gpu run
        report = {**report, "profile": params.profile}
    write_eval_outputs(report, examples, out=args.out, examples_path=args.examples, plot=args.plot)
    write_json(args.headline, headline(report))
    print(eval_summary(report))


main = stage_main(
    "evaluate",
    __doc__,
    run,
    paths=PATHS,
    output_files="--out --headline --examples --plot",
    errors=(ValueError, OSError),
)

if __name__ == "__main__":  # `python -m expqa.pipeline.evaluate ...` runs the stage, as `expqa evaluate` does
    sys.exit(main())
