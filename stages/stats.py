"""dvc.yaml's `stats` stage; the stage itself is expqa.pipeline.stats (also `expqa stats`, with --help)."""

import sys

from expqa.pipeline.stats import main

if __name__ == "__main__":
    sys.exit(main())
