"""dvc.yaml's `train` stage: expqa.pipeline.train (also `expqa train`; --help lists its arguments)."""

from expqa.pipeline.train import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
