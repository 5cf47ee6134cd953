"""`python -m optlab.tracking sync|status`: upload or list runs spooled during a tracking outage."""

from __future__ import annotations

import argparse
import sys

from optlab.tracking.spool import pending, resolve_dir, sync


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m optlab.tracking",
        description="Runs that could not reach the tracking store wait in a spool "
        "(default <repo root>/.optlab/spool, or OPTLAB_SPOOL_DIR).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sync", help="upload every spooled run, then delete its spool file")
    sp.add_argument("--tracking-uri", default=None,
                    help="upload here instead of the store each run was meant for")
    sp.add_argument("--spool-dir", default=None)
    st = sub.add_parser("status", help="list the spooled runs waiting for upload")
    st.add_argument("--spool-dir", default=None)
    args = ap.parse_args(argv)

    if args.cmd == "status":
        runs = pending(args.spool_dir)
        directory = resolve_dir(args.spool_dir)
        if not runs:
            print(f"no spooled runs in {directory}")
            return 0
        print(f"{len(runs)} spooled run(s) in {directory}:")
        for run in runs:
            print(f"  {run.line()}")
        return 0

    summary = sync(args.tracking_uri, args.spool_dir)
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
