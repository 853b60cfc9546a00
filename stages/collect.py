"""dvc.yaml's `collect` stage: expqa.pipeline.collect (also `expqa collect`; --help lists its arguments)."""

from expqa.pipeline.collect import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
