"""DVC stage `report`: thin entry point; the work is optlab.pipeline.report."""

import os
import sys

from optlab.zygote import delegate

delegate(__file__)  # under `make repro`: run in the warm process (optlab.zygote)

from optlab.pipeline import stage_main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "report")
    stage_main(["report", *sys.argv[1:]])
