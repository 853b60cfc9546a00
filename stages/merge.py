"""dvc.yaml's `merge` stage: expqa.pipeline.merge (also `expqa merge`; --help lists its arguments)."""

from expqa.pipeline.merge import main

raise SystemExit(main())
