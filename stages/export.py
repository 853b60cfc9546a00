"""dvc.yaml's `export` stage; the stage itself is expqa.pipeline.export (also `expqa export`, with --help)."""

import sys

from expqa.pipeline.export import main

if __name__ == "__main__":
    sys.exit(main())
