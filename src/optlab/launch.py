"""Study slices on a SLURM cluster with submitit: one array task per slice, outputs where DVC expects them.

::

    python -m optlab.launch --study mlp_depth                       # every slice of the study
    python -m optlab.launch --study gpt --method sgd --method adam  # some slices
        [--executor slurm|local] [--partition P] [--gpus-per-task 1] [--cpus-per-task 8]
        [--mem-gb 32] [--timeout-min 240] [--parallel N] [--folder runs/launch/%j]
        [--no-wait] [--dvc-commit]

Each slice ``<study>@<method>`` is one task of one SLURM job array (``map_array``: one call to
the scheduler, at most ``--parallel`` tasks at once). A task runs exactly what DVC's stage runs,
``optlab.pipeline.sweep(study, method)``, in this checkout's directory (which the compute nodes
must see: a shared filesystem, as submitit requires for its ``--folder`` too), so its outputs land
in ``runs/sweep/<study>/<method>/``, the stage's out. The params are the checkout's
``params.yaml``; ``validate`` runs here first (as ``dvc repro`` would: a bad params file stops
before anything is submitted) and writes the slices' ``runs/config`` files.

After the jobs finish (the default waits; ``--no-wait`` prints the job ids and returns), the
outputs are on disk but DVC has not recorded them. ``--dvc-commit`` runs ``dvc commit -f`` on the
validate stage and on each finished slice's stage, so ``dvc.lock`` records them and a later
``dvc repro`` reruns only what changed (the analysis stages). Without it, run that command
yourself; the summary line prints it.

``--executor local`` (or submitit's detection on a machine without ``srun``) runs the tasks as
subprocesses of this machine: the same code path, which the tests use. Tracking works as in any
stage: with ``tracking.upload: deferred`` the runs are spooled and ``dvc repro``'s ``track`` stage
uploads them; for many concurrent workers point them at an MLflow server (README: a shared MLflow
server). Inside a task, ``SLURM_*`` variables and a GPU that SLURM assigned
(``CUDA_VISIBLE_DEVICES``) are used as they are.

Needs ``submitit`` (``pip install optlab[cluster]``; pinned in requirements.lock). A launcher, not
training code: editing it reruns no training stage (:mod:`optlab.codeset`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_slice(study: str, method: str, params_path: str, out_root: str, cwd: str) -> dict[str, Any]:
    """One array task: the slice, as stage ``<study>@<method>`` runs it (module-level, so submitit
    pickles it by reference)."""
    os.chdir(cwd)
    from . import pipeline

    results = pipeline.sweep(study, method, params_path, out_root=out_root)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {"study": study, "method": method, "runs": len(results), "statuses": statuses,
            "summary": str(Path(out_root) / study / method / "summary.json")}


def slices(params_path: str, study: str, methods: list[str] | None) -> list[tuple[str, str]]:
    """The (study, method) slices to run: the study's methods, or the named ones (checked)."""
    from .config import ConfigError, resolve_study
    from .pipeline import load_params

    spec = resolve_study(load_params(params_path), study)
    if not methods:
        return [(study, m) for m in spec.methods]
    bad = [m for m in methods if m not in spec.methods]
    if bad:
        raise ConfigError(f"--method: {bad[0]!r} is not a method of studies.{study}; allowed: {', '.join(spec.methods)}")
    return [(study, m) for m in methods]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m optlab.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, help="the study (a section of studies.yaml)")
    ap.add_argument("--method", action="append", default=[], help="a slice's method (repeatable; default: all)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out-root", default="runs/sweep", help="the slices' output root (default: runs/sweep, DVC's)")
    ap.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                    help="auto: SLURM where srun exists, else local subprocesses")
    ap.add_argument("--folder", default="runs/launch/%j", help="submitit's job folder (logs, pickles); %%j: job id")
    ap.add_argument("--partition", default=None, help="SLURM partition")
    ap.add_argument("--gpus-per-task", type=int, default=0)
    ap.add_argument("--cpus-per-task", type=int, default=2)
    ap.add_argument("--mem-gb", type=float, default=16)
    ap.add_argument("--timeout-min", type=int, default=240)
    ap.add_argument("--parallel", type=int, default=16, help="at most this many tasks at once (array parallelism)")
    ap.add_argument("--no-wait", action="store_true", help="submit, print the job ids and return")
    ap.add_argument("--dvc-commit", action="store_true", help="after the jobs: dvc commit -f the finished slices' stages")
    return ap


def submit(args: argparse.Namespace) -> list[Any]:
    """Validate, then submit the slices as one job array; returns submitit's jobs."""
    import submitit

    from . import pipeline

    todo = slices(args.params, args.study, args.method)
    pipeline.validate(args.params)  # as dvc repro does first: writes runs/validated.txt and runs/config
    cluster = None if args.executor == "auto" else args.executor
    ex = submitit.AutoExecutor(folder=args.folder, cluster=cluster)
    params: dict[str, Any] = dict(name=f"optlab-{args.study}", timeout_min=args.timeout_min, mem_gb=args.mem_gb,
                                  cpus_per_task=args.cpus_per_task, tasks_per_node=1, nodes=1,
                                  slurm_array_parallelism=args.parallel)
    if args.gpus_per_task:
        params["gpus_per_node"] = args.gpus_per_task
    if args.partition:
        params["slurm_partition"] = args.partition
    ex.update_parameters(**params)
    cwd = str(Path.cwd())
    n = len(todo)
    return ex.map_array(run_slice, [s for s, _ in todo], [m for _, m in todo], [args.params] * n,
                        [args.out_root] * n, [cwd] * n)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        jobs = submit(args)
    except ValueError as exc:  # ConfigError: one line naming the key
        print(f"optlab: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"optlab: error: {exc.name} is not installed (pip install 'optlab[cluster]')", file=sys.stderr)
        return 2
    print(f"optlab: submitted {len(jobs)} slice(s) of {args.study}: {', '.join(j.job_id for j in jobs)}")
    if args.no_wait:
        return 0
    done, failed = [], []
    for job, (study, method) in zip(jobs, slices(args.params, args.study, args.method)):
        try:
            info = job.result()
            done.append(f"{study}@{method}")
            print(f"{study}@{method}: {info['runs']} runs {info['statuses']} -> {info['summary']}")
        except Exception as exc:  # noqa: BLE001 - a failed slice is reported, the others still count
            failed.append(f"{study}@{method}")
            print(f"{study}@{method}: failed ({type(exc).__name__}): {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}",
                  file=sys.stderr)
    stages = ["validate", *done]
    if done and args.dvc_commit:
        subprocess.run(["dvc", "commit", "-f", *stages], check=True)
        print(f"optlab: dvc commit -f {' '.join(stages)}: recorded in dvc.lock")
    elif done:
        print(f"optlab: to record the outputs in dvc.lock: dvc commit -f {' '.join(stages)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
