"""DVC stage `validate`: thin entry point; the work is optlab.pipeline.validate (check the whole params file before any stage runs)."""

import os
import sys

from optlab.pipeline import stage_main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "validate")
    stage_main(["validate", *sys.argv[1:]])
