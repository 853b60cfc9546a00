"""Stage `evaluate`: base vs fine-tuned on the test split and the critical questions.

Params: eval, base.seed (bootstrap) and train.max_seq_length. --train: the split that trained the model, for the
taught / not taught split of the critical questions.
"""

from pathlib import Path

from expqa.evaluate import eval_summary, evaluate_base_vs_tuned, write_eval_outputs
from expqa.pipeline import require, stage_main


def arguments(parser):
    parser.add_argument("--base", type=Path, required=True, help="base model folder")
    parser.add_argument("--tuned", type=Path, required=True, help="fine-tuned (merged) model folder")
    parser.add_argument("--test", type=Path, required=True, help="test split (ChatML JSONL)")
    parser.add_argument("--train", type=Path, required=True, help="train split (ChatML JSONL)")
    parser.add_argument("--out", type=Path, required=True, help="the report (JSON)")
    parser.add_argument("--examples", type=Path, required=True, help="per-question answers of both models (JSONL)")
    parser.add_argument("--plot", type=Path, required=True, help="ROUGE-L per test question (CSV)")


def run(args, params):
    require(args.tuned, "merge")
    report, examples = evaluate_base_vs_tuned(
        args.base,
        args.tuned,
        args.test,
        args.train,
        params.eval,
        seed=params.base.seed,
        max_length=params.train.max_seq_length,
    )
    write_eval_outputs(report, examples, out=args.out, examples_path=args.examples, plot=args.plot)
    print(eval_summary(report))


main = stage_main("evaluate", __doc__, arguments, run, errors=(ValueError, OSError))
