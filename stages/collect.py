"""dvc.yaml's `collect` stage; the stage itself is expqa.pipeline.collect (also `expqa collect`, with --help)."""

import sys

from expqa.pipeline.collect import main

if __name__ == "__main__":
    sys.exit(main())
