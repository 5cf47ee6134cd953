"""DVC stage `<study>@<method>`: thin entry point; the work is optlab.pipeline.sweep."""

import os
import sys

from optlab.zygote import delegate

delegate(__file__)  # under `make repro`: run in the warm process (optlab.zygote)

from optlab.pipeline import stage_main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    method = args[args.index("--method") + 1] if "--method" in args else "?"
    study = args[args.index("--study") + 1] if "--study" in args else "?"
    os.environ.setdefault("OPTLAB_DVC_STAGE", f"{study}@{method}")
    stage_main(["sweep", *args])
