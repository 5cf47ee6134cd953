"""``make repro``: ``dvc repro`` with the training stages run side by side.

``dvc repro`` runs one stage at a time, and a quick-profile stage is mostly fixed cost: DVC
starting and rewriting dvc.lock, Python importing torch, a few seconds of training. DVC's own
answer is to launch ``dvc repro`` several times on independent parts of the graph (it releases
the repository lock while a stage's command runs and takes it again to write dvc.lock). This
module does that, and nothing DVC would not do itself:

1. ``dvc repro validate prepare`` (everything else depends on them);
2. ``dvc status`` names the stale training stages; they are grouped by study (``<study>@*``,
   plus ``train`` and ``ablate``), and up to ``--jobs`` groups run at once, each as
   ``dvc --wait-for-lock repro --single-item <its stages>``, longest first (by the group's last
   wall time here, kept in ``.optlab/repro-times.json``, else by its runs' times in the
   committed ``reports/tables/runs.csv``), with ``OPTLAB_WORKERS`` set so
   that the processes training at once do not exceed the cores (a run's numbers never depend
   on the worker count: each run's threads are fixed);
3. plain ``dvc repro``: everything left (tracking upload, tables, figures, report). It finds
   the training stages up to date, so the result is exactly what ``dvc repro`` alone gives.

Stage commands of steps 2 and 3 fork from one warm process (optlab.zygote) instead of each
importing torch again (``--no-warm`` turns that off).

Afterwards, dvc.lock entries of stages that dvc.yaml no longer has are removed. Each group's
output goes to ``.optlab/repro/<group>.log``; a failed group's tail is printed
and ``make repro`` stops with status 1 before the analysis stages. Not part of the training
code (it runs DVC, not runs): editing it reruns nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE = Path(".optlab")
TIMES = STATE / "repro-times.json"
LOGS = STATE / "repro"
FIRST = ("validate", "prepare")
SOLO = ("train", "ablate")
_DONE_MARKER = b"Updating lock file"  # DVC prints it once per finished stage


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def stale_stages() -> list[str]:
    """The stages ``dvc status`` reports as changed, in dvc.yaml order (the root dvc.yaml only: the
    cpu profile's pipeline, profiles/cpu/dvc.yaml, is ``make repro-cpu``'s)."""
    proc = subprocess.run(_dvc("status", "--json", "dvc.yaml"), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(proc.returncode)
    text = proc.stdout.strip()
    return list(json.loads(text[text.index("{"):])) if "{" in text else []


def all_stages() -> list[str]:
    """Every stage of the root dvc.yaml, in its order (``--force``)."""
    proc = subprocess.run(_dvc("stage", "list", "--name-only", "dvc.yaml"), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(proc.returncode)
    return proc.stdout.split()


def groups(stages: list[str]) -> dict[str, list[str]]:
    """Training stages by study: ``<study>@<method>`` under ``<study>``; ``train`` and
    ``ablate`` alone. Other stages are left to the final ``dvc repro``."""
    out: dict[str, list[str]] = {}
    for name in stages:
        if "@" in name:
            out.setdefault(name.split("@", 1)[0], []).append(name)
        elif name in SOLO:
            out.setdefault(name, []).append(name)
    return out


def _load_times() -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(TIMES.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def recorded_costs(table: str = "reports/tables/runs.csv") -> dict[str, float]:
    """Each study's summed run wall time in the committed results table (the prior for a group
    this machine never timed, e.g. on a fresh clone); {} without the table."""
    import csv

    out: dict[str, float] = {}
    try:
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    out[row["study"]] = out.get(row["study"], 0.0) + float(row.get("wall_time_s") or 0.0)
                except (KeyError, ValueError):
                    continue
    except OSError:
        return {}
    return out


def order(gs: dict[str, list[str]], times: dict[str, float], prior: dict[str, float] | None = None) -> list[str]:
    """Longest first, so the last group to finish is a short one: by the group's last wall time
    here, else its runs' recorded time (``prior``), else first (never timed)."""
    prior = prior or {}

    def cost(g: str) -> float:
        return times.get(g, prior.get(g, float("inf")))

    return sorted(gs, key=lambda g: (-cost(g), g))


class _Group:
    def __init__(self, name: str, stages: list[str], env: dict[str, str], force: bool = False) -> None:
        self.name, self.stages = name, stages
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = LOGS / f"{name}.log"
        self._fh = self.log.open("w")
        self._read, self._done, self._tail = 0, 0, b""  # log bytes scanned, stages seen done, last bytes
        self.start = time.monotonic()
        cmd = _dvc("--wait-for-lock", "repro", "--single-item", *(["--force"] if force else []), *stages)
        self.proc = subprocess.Popen(cmd, stdout=self._fh,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def done_stages(self) -> int:
        """Stages this group has finished so far: DVC's "Updating lock file" lines, counted in the
        part of the log written since the last call (a group's log grows to megabytes of
        progress-bar redraws; the poll loop reads each byte once)."""
        try:
            with self.log.open("rb") as fh:
                fh.seek(self._read)
                chunk = fh.read()
        except OSError:
            return self._done
        data = self._tail + chunk  # the tail is shorter than the marker: a split marker counts once
        self._done += data.count(_DONE_MARKER)
        self._tail = data[-(len(_DONE_MARKER) - 1):]
        self._read += len(chunk)
        return self._done

    def finish(self) -> float:
        self._fh.close()
        return time.monotonic() - self.start

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)


def _tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines[-n:] if line.strip())


def run_groups(gs: dict[str, list[str]], jobs: int, workers: int, force: bool = False) -> list[str]:
    """Run the groups, at most ``jobs`` at once. Returns the names of the groups that failed."""
    from tqdm.auto import tqdm

    times = _load_times()
    queue = order(gs, times, recorded_costs())
    env = dict(os.environ)
    env.setdefault("OPTLAB_WORKERS", str(workers))
    running: list[_Group] = []
    failed: list[str] = []
    total = sum(len(v) for v in gs.values())
    finished = 0
    bar = tqdm(total=total, desc="training stages", unit="stage", dynamic_ncols=True)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                name = queue.pop(0)
                running.append(_Group(name, gs[name], env, force))
            time.sleep(0.5)
            for g in list(running):
                if g.proc.poll() is None:
                    continue
                running.remove(g)
                took = g.finish()
                finished += len(g.stages)
                if g.proc.returncode == 0:
                    times[g.name] = round(took, 1)
                    bar.write(f"{g.name}: {len(g.stages)} stage{'s' * (len(g.stages) > 1)} in {took:.0f} s")
                else:
                    failed.append(g.name)
                    bar.write(f"{g.name}: FAILED (exit {g.proc.returncode}) after {took:.0f} s; log: {g.log}\n"
                              f"{_tail(g.log)}")
            n = finished + sum(min(g.done_stages(), len(g.stages)) for g in running)
            if n != bar.n:
                bar.n = n
                bar.refresh()
    except KeyboardInterrupt:
        for g in running:
            g.interrupt()
        for g in running:
            g.proc.wait()
            g.finish()
        raise
    finally:
        bar.close()
        STATE.mkdir(exist_ok=True)
        TIMES.write_text(json.dumps(dict(sorted(times.items())), indent=1) + "\n")
    return failed


class _Warm:
    """The optlab.zygote server for the duration of a ``with`` block (its socket in
    ``OPTLAB_ZYGOTE``); nothing when it cannot start (stages then run as usual)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.proc, self.dir, self.log = enabled, None, None, None

    def __enter__(self) -> _Warm:
        if not self.enabled or not hasattr(socket, "send_fds"):
            return self
        from .zygote import ENV

        self.dir = tempfile.mkdtemp(prefix="optlab-")
        path = os.path.join(self.dir, "z.sock")
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = (LOGS / "zygote.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "optlab.zygote", "serve", path],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while not os.path.exists(path) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(path):
            os.environ[ENV] = path
        return self

    def __exit__(self, *exc: object) -> None:
        from .zygote import ENV

        os.environ.pop(ENV, None)
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.log is not None:
            self.log.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def prune_lock(path: str = "dvc.lock") -> list[str]:
    """Remove dvc.lock entries of stages dvc.yaml no longer has (a renamed or removed study
    leaves its entries behind: DVC never drops them, and rereads and rewrites them after every
    stage). Returns the names removed."""
    proc = subprocess.run(_dvc("stage", "list", "--name-only"), capture_output=True, text=True)
    if proc.returncode != 0 or not Path(path).exists():
        return []
    names = set(proc.stdout.split())
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(path) as doc:
        dead = [k for k in (doc.get("stages") or {}) if k not in names]
        for k in dead:
            del doc["stages"][k]
    return dead


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optlab.repro", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-j", "--jobs", type=int, default=0,
                    help="groups of training stages run at once (default 0: one per core)")
    ap.add_argument("--no-warm", action="store_true",
                    help="start every stage as its own Python process (no shared warm process)")
    ap.add_argument("--force", action="store_true",
                    help="retrain every training stage, changed or not (dvc repro --force per group), e.g. to give "
                         "every run the provenance of the current commit")
    args = ap.parse_args(argv)

    def on_term(_s: int, _f: object) -> None:  # `kill`, a CI timeout: stop the groups as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    cores = os.cpu_count() or 1
    jobs = args.jobs if args.jobs > 0 else cores
    workers = max(1, cores // jobs)
    t0 = time.monotonic()
    if subprocess.run(_dvc("repro", *FIRST)).returncode != 0:  # a bad params file stops here
        return 1
    gs = groups(all_stages() if args.force else stale_stages())
    with _Warm(not args.no_warm):
        if gs:
            n = sum(len(v) for v in gs.values())
            print(f"optlab.repro: {n} training stages in {len(gs)} groups, {jobs} at a time "
                  f"({workers} worker{'s' * (workers > 1)} each); logs in {LOGS}/", flush=True)
            failed = run_groups(gs, jobs, workers, args.force)
            if failed:
                print(f"optlab.repro: failed: {', '.join(failed)}; the analysis stages did not run", file=sys.stderr)
                return 1
        rc = subprocess.run(_dvc("repro")).returncode
    if rc == 0 and (dead := prune_lock()):
        print(f"optlab.repro: removed {len(dead)} dvc.lock entries of stages dvc.yaml no longer has")
    print(f"optlab.repro: done in {time.monotonic() - t0:.0f} s" if rc == 0 else "optlab.repro: dvc repro failed")
    return rc


if __name__ == "__main__":
    sys.exit(main())
