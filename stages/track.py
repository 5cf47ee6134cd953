"""DVC stage `track`: thin entry point; the work is optlab.pipeline.track (upload the spooled MLflow runs)."""

import os
import sys

from optlab.pipeline import stage_main

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "track")
    stage_main(["track", *sys.argv[1:]])
