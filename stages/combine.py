"""dvc.yaml's `combine` stage; the stage itself is expqa.pipeline.combine (also `expqa combine`, with --help)."""

import sys

from expqa.pipeline.combine import main

if __name__ == "__main__":
    sys.exit(main())
