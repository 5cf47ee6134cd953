"""DVC stage `ablate`: thin entry point; the work is optlab.pipeline.ablate."""

import os
import sys

from optlab.zygote import delegate

delegate(__file__)  # under `make repro`: run in the warm process (optlab.zygote)

from optlab.pipeline import stage_main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "ablate")
    stage_main(["ablate", *sys.argv[1:]])
