"""dvc.yaml's `train` stage; the stage itself is expqa.pipeline.train (also `expqa train`, with --help)."""

import sys

from expqa.pipeline.train import main

if __name__ == "__main__":
    sys.exit(main())
