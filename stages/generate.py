"""dvc.yaml's `generate` stage: expqa.pipeline.generate (also `expqa generate`; --help lists its arguments)."""

from expqa.pipeline.generate import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
