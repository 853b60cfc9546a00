"""dvc.yaml's `evaluate` stage: expqa.pipeline.evaluate (also `expqa evaluate`; --help lists its arguments)."""

from expqa.pipeline.evaluate import main

raise SystemExit(main())
