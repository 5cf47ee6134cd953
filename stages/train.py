"""DVC stage `train`: thin entry point; the work is optlab.pipeline.train."""

import os
import sys

from optlab.pipeline import stage_main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "train")
    stage_main(["train", *sys.argv[1:]])
