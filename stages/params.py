"""dvc.yaml's `params` stage; the stage itself is expqa.pipeline.params (also `expqa params`, with --help)."""

import sys

from expqa.pipeline.params import main

if __name__ == "__main__":
    sys.exit(main())
