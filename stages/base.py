"""dvc.yaml's `base` stage: expqa.pipeline.base (also `expqa base`; --help lists its arguments)."""

from expqa.pipeline.base import main

raise SystemExit(main())
