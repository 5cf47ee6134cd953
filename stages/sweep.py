"""DVC stage `sweep@<study>-<optimizer>`: thin entry point; the work is optlab.pipeline.sweep."""

import os
import sys

from optlab.pipeline import main

if __name__ == "__main__":
    args = sys.argv[1:]
    opt = args[args.index("--optimizer") + 1] if "--optimizer" in args else "?"
    study = args[args.index("--study") + 1] if "--study" in args else "?"
    os.environ.setdefault("OPTLAB_DVC_STAGE", f"sweep@{study}-{opt}")
    sys.exit(main(["sweep", *args]))
