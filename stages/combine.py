"""dvc.yaml's `combine` stage: expqa.pipeline.combine (also `expqa combine`; --help lists its arguments)."""

from expqa.pipeline.combine import main

raise SystemExit(main())
