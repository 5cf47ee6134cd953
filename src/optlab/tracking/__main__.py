"""`python -m optlab.tracking sync|status|url`: upload or list runs spooled during a tracking
outage; print the MLflow UI link that opens an experiment on its training runs."""

from __future__ import annotations

import argparse
import sys

from optlab.tracking.spool import pending, resolve_dir, sync


WORKFLOW = "workflowType=machine_learning"
"""The MLflow UI (3.x) opens an experiment on its GenAI overview unless the URL or the browser's
stored choice (the GenAI / Model training switch) says model training; the tag
``mlflow.experimentKind`` is not consulted while that switch is shown."""


def experiment_url(base: str, experiment: str, tracking_uri: str | None = None) -> str:
    """``<base>/#/experiments/<id>?workflowType=machine_learning`` (the runs table), or the
    experiment list with the same switch when the experiment does not exist yet."""
    base = base.rstrip("/")
    try:
        from optlab.tracking.mlflow_sink import _client, _retry

        client, _ = _client(tracking_uri)
        exp = _retry(client.get_experiment_by_name, experiment)
    except Exception:  # noqa: BLE001 - a link is still useful without the store
        exp = None
    if exp is None:
        return f"{base}/#/experiments?{WORKFLOW}"
    return f"{base}/#/experiments/{exp.experiment_id}?{WORKFLOW}"


def _configured_experiment() -> str:
    try:
        from optlab.config import load_params

        return str((load_params().get("tracking") or {}).get("experiment") or "optlab")
    except Exception:  # noqa: BLE001
        return "optlab"


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
    ur = sub.add_parser("url", help="the MLflow UI link that opens the experiment on its training runs")
    ur.add_argument("--base", default="http://127.0.0.1:5000", help="where the UI listens")
    ur.add_argument("--experiment", default=None, help="default: tracking.experiment of params.yaml, else optlab")
    ur.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)

    if args.cmd == "url":
        print(experiment_url(args.base, args.experiment or _configured_experiment(), args.tracking_uri))
        return 0

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
