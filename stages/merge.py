"""dvc.yaml's `merge` stage: expqa.pipeline.merge (also `expqa merge`; --help lists its arguments)."""

from expqa.pipeline.merge import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
