"""dvc.yaml's `evaluate` stage; the stage itself is expqa.pipeline.evaluate (also `expqa evaluate`, with --help)."""

import sys

from expqa.pipeline.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
