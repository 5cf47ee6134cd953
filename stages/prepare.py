"""DVC stage `prepare`: thin entry point; the work is optlab.pipeline.prepare."""

import os
import sys

from optlab.pipeline import main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "prepare")
    sys.exit(main(["prepare", *sys.argv[1:]]))
