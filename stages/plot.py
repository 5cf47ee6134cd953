"""DVC stage `plot`: thin entry point; the work is optlab.pipeline.plot."""

import os
import sys

from optlab.pipeline import main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "plot")
    sys.exit(main(["plot", *sys.argv[1:]]))
