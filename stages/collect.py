"""dvc.yaml's `collect` stage: expqa.pipeline.collect (also `expqa collect`; --help lists its arguments)."""

from expqa.pipeline.collect import main

raise SystemExit(main())
