"""dvc.yaml's `export` stage: expqa.pipeline.export (also `expqa export`; --help lists its arguments)."""

from expqa.pipeline.export import main

raise SystemExit(main())
