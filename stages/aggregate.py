"""DVC stage `aggregate`: thin entry point; the work is optlab.pipeline.aggregate."""

import os
import sys

from optlab.pipeline import stage_main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "aggregate")
    stage_main(["aggregate", *sys.argv[1:]])
