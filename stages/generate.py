"""dvc.yaml's `generate` stage; the stage itself is expqa.pipeline.generate (also `expqa generate`, with --help)."""

import sys

from expqa.pipeline.generate import main

if __name__ == "__main__":
    sys.exit(main())
