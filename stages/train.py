"""DVC stage `train`: thin entry point; the work is optlab.pipeline.train."""

import os
import sys

from optlab.zygote import delegate

delegate(__file__)  # under `make repro`: run in the warm process (optlab.zygote)

from optlab.pipeline import stage_main  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OPTLAB_DVC_STAGE", "train")
    stage_main(["train", *sys.argv[1:]])
