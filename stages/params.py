"""dvc.yaml's `params` stage: expqa.pipeline.params (`expqa params --resolved` shows what it wrote)."""

from expqa.pipeline.params import main

raise SystemExit(main())
