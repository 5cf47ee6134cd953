"""DVC stage `sweep@<optimizer>`: thin entry point; the work is optlab.pipeline.sweep."""

import os
import sys

from optlab.pipeline import main

if __name__ == "__main__":
    args = sys.argv[1:]
    opt = args[args.index("--optimizer") + 1] if "--optimizer" in args else "?"
    os.environ.setdefault("OPTLAB_DVC_STAGE", f"sweep@{opt}")
    sys.exit(main(["sweep", *args]))
