"""dvc.yaml's `generate` stage: expqa.pipeline.generate (also `expqa generate`; --help lists its arguments)."""

from expqa.pipeline.generate import main

raise SystemExit(main())
