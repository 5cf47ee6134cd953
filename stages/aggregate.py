"""DVC stage `aggregate`: thin entry point; the work is optlab.pipeline.aggregate."""

import os
import sys

from optlab.pipeline import main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "aggregate")
    sys.exit(main(["aggregate", *sys.argv[1:]]))
