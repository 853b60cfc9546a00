"""dvc.yaml's `export` stage: expqa.pipeline.export (also `expqa export`; --help lists its arguments)."""

from expqa.pipeline.export import main

if __name__ == "__main__":  # spawned worker processes (evaluate's) import this file again
    raise SystemExit(main())
