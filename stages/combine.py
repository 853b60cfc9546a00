"""dvc.yaml's `combine` stage: expqa.pipeline.combine (also `expqa combine`; --help lists its arguments)."""

from expqa.pipeline.combine import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
