"""dvc.yaml's `base` stage: expqa.pipeline.base (also `expqa base`; --help lists its arguments)."""

from expqa.pipeline.base import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
