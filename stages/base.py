"""dvc.yaml's `base` stage; the stage itself is expqa.pipeline.base (also `expqa base`, with --help)."""

import sys

from expqa.pipeline.base import main

if __name__ == "__main__":
    sys.exit(main())
