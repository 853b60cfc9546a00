"""dvc.yaml's `stats` stage: expqa.pipeline.stats (also `expqa stats`; --help lists its arguments)."""

from expqa.pipeline.stats import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
