"""DVC stage `report`: thin entry point; the work is optlab.pipeline.report."""

import os
import sys

from optlab.pipeline import main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "report")
    sys.exit(main(["report", *sys.argv[1:]]))
