"""DVC stage `ablate`: thin entry point; the work is optlab.pipeline.ablate."""

import os
import sys

from optlab.pipeline import stage_main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "ablate")
    stage_main(["ablate", *sys.argv[1:]])
