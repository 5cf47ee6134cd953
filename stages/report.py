"""DVC stage `report`: thin entry point; the work is optlab.pipeline.report."""

import os
import sys

from optlab.pipeline import stage_main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "report")
    stage_main(["report", *sys.argv[1:]])
