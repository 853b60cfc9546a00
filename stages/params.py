"""dvc.yaml's `params` stage: expqa.pipeline.params (`expqa params --resolved` shows what it wrote)."""

from expqa.pipeline.params import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
