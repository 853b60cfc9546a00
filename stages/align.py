"""dvc.yaml's `align` stage: expqa.pipeline.align (also `expqa align`; --help lists its arguments)."""

from expqa.pipeline.align import main

if __name__ == "__main__":
    raise SystemExit(main())
