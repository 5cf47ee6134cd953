"""DVC stage `headline_plot`: thin entry point; the work is optlab.pipeline.headline_plot."""

import os
import sys

from optlab.zygote import delegate

delegate(__file__)  # under `make repro`: run in the warm process (optlab.zygote)

from optlab.pipeline import stage_main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "headline_plot")
    stage_main(["headline_plot", *sys.argv[1:]])
