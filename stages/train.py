"""dvc.yaml's `train` stage: expqa.pipeline.train (also `expqa train`; --help lists its arguments)."""

from expqa.pipeline.train import main

raise SystemExit(main())
