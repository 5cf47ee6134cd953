"""DVC stage `plot`: thin entry point; the work is optlab.pipeline.plot."""

import os
import sys

from optlab.zygote import delegate

delegate(__file__)  # under `make repro`: run in the warm process (optlab.zygote)

from optlab.pipeline import stage_main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "plot")
    stage_main(["plot", *sys.argv[1:]])
