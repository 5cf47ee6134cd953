"""DVC stage `track`: thin entry point; the work is optlab.pipeline.track (upload the spooled MLflow runs)."""

import os
import sys

from optlab.zygote import delegate

delegate(__file__)  # under `make repro`: run in the warm process (optlab.zygote)

from optlab.pipeline import stage_main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "track")
    stage_main(["track", *sys.argv[1:]])
