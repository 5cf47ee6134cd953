"""DVC stage `plot`: thin entry point; the work is optlab.pipeline.plot."""

import os
import sys

from optlab.pipeline import stage_main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "plot")
    stage_main(["plot", *sys.argv[1:]])
