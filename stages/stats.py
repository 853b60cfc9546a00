"""dvc.yaml's `stats` stage: expqa.pipeline.stats (also `expqa stats`; --help lists its arguments)."""

from expqa.pipeline.stats import main

raise SystemExit(main())
