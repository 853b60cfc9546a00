"""dvc.yaml's `evaluate` stage: expqa.pipeline.evaluate (also `expqa evaluate`; --help lists its arguments)."""

from expqa.pipeline.evaluate import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
