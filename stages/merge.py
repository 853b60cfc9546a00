"""dvc.yaml's `merge` stage; the stage itself is expqa.pipeline.merge (also `expqa merge`, with --help)."""

import sys

from expqa.pipeline.merge import main

if __name__ == "__main__":
    sys.exit(main())
