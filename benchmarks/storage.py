"""Checkpoint writes and metric logging throughput (not a test).

    python -m benchmarks.storage [--quick] [--depth 64] [--width 256] [--repeats 5] [--points 20000]
                                 [--no-server] [--threads N] [--out benchmarks/results]

Issue #14, goal (d):

- **Checkpoint write**: :meth:`optlab.engine.Checkpointer.save` (``torch.save`` to a temporary
  file, ``fsync``, atomic rename, older checkpoints pruned) of the state the engine checkpoints
  for a deep MLP (784 -> depth x width -> 10): the model's ``state_dict`` and the method's
  (its optimizer's ``state_dict``), plus the RNG state, after one training step so the optimizer
  state exists. For ``sgd_sn`` (no optimizer state beyond the model) and ``adam`` (two moments per
  parameter). The engine's checkpoint also carries the run's curves so far, which grow with the
  run and are left out here. Written into a temporary directory beside ``--out`` (the repository's
  disk, not a RAM disk). Median of ``--repeats`` writes; MB/s from the file size.
- **Metric logging**: :class:`optlab.tracking.MlflowSink` (the engine's MLflow sink: buffered
  ``log_batch`` calls of up to 1000 points) logging ``--points`` points (10 keys per step) to a
  fresh SQLite store in a temporary directory, from the first ``log_metrics`` call to the end of
  ``finish`` (the last flush included); the run's creation (``start``: schema creation, experiment,
  params) is timed apart. ``--no-server`` skips the same measurement against ``mlflow server`` on
  loopback (SQLite backend, 1 worker, started and stopped here); when the server does not answer
  its ``/health`` within ``--server-timeout`` seconds that row says "not measured".

No targets are stated for these in the issue; the numbers are reported as measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.timing import machine
from optlab import models, optim
from optlab.config import RunConfig
from optlab.engine import CHECKPOINT_FORMAT, Checkpointer

ISSUE = "#14"


def checkpoint_state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """The parts of the engine's checkpoint (``_Loop.state``) that scale with the model."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "epoch": 0, "batch_in_epoch": step,
            "torch_rng": torch.get_rng_state(), "model": model.state_dict(),
            "method": {"optimizers": [opt.state_dict()], "modules": []}}


def bench_checkpoint(depth: int, width: int, optimizer: str, repeats: int, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = models.build("mlp", input_dim=784, n_classes=10, depth=depth, width=width)
    opt = optim.build(optimizer, model, lr=0.01)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the optimizer state exists from here on
    cfg = RunConfig(arch="mlp", depth=depth, width=width, optimizer=optimizer, run_id=f"bench-{optimizer}-{depth}")
    ck = Checkpointer(root, cfg)
    times, size = [], 0
    try:
        for i in range(repeats + 1):  # the first write (directory creation, cold page cache) untimed
            state = checkpoint_state(model, opt, i)
            t = time.perf_counter()
            path = ck.save(state, i)
            dt = time.perf_counter() - t
            size = path.stat().st_size
            if i:
                times.append(dt)
    finally:
        ck.clear()
    med = statistics.median(times)
    return {"case": f"deep MLP 784-({depth}x{width})-10, {optimizer}", "depth": depth, "width": width,
            "optimizer": optimizer, "repeats": repeats, "ms": 1e3 * med, "ms_all": [1e3 * t for t in times],
            "mb": size / 1e6, "mb_per_s": size / 1e6 / med}


def bench_logging(uri: str, points: int, keys: int, spool_dir: Path, label: str) -> dict[str, Any]:
    from optlab.tracking import MlflowSink

    sink = MlflowSink(tracking_uri=uri, experiment="optlab-bench", run_name=f"logging-{label}", spool_dir=spool_dir)
    t0 = time.perf_counter()
    sink.start({"benchmark": "storage", "points": points}, {"phase": "debug", "study": "benchmark"})
    t1 = time.perf_counter()
    steps = max(1, points // keys)
    for s in range(steps):
        sink.log_metrics([(f"metric_{k}", float(s + k), s) for k in range(keys)])
    sink.finish("completed", {})
    t2 = time.perf_counter()
    n = steps * keys
    return {"store": label, "uri": uri.split("://", 1)[0] + "://...", "points": n, "keys": keys,
            "start_s": t1 - t0, "log_s": t2 - t1, "points_per_s": n / (t2 - t1), "spooled": bool(sink.spooling)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(root: Path, timeout: float) -> Any:
    """``mlflow server`` on loopback with a SQLite backend in ``root``; yields its URI or None if it
    did not become healthy in ``timeout`` seconds. Stopped (its own process group) on exit."""
    cli = Path(sys.executable).with_name("mlflow")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(root / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([str(cli), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{(root / 'server.db').as_posix()}",
                             "--artifacts-destination", str(root / "server-art"), "--workers", "1"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    healthy = False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
                    if r.status == 200:
                        healthy = True
                        break
            except OSError:
                time.sleep(0.25)
        yield uri if healthy else None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group this function started (start_new_session)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log.close()


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".storage-bench-", dir=out))
    try:
        ckpts = [bench_checkpoint(args.depth, args.width, o, args.repeats, tmp / "ckpt") for o in args.optimizers]
        for c in ckpts:
            print(json.dumps(c), flush=True)
        logs = [bench_logging(f"sqlite:///{(tmp / 'mlflow.db').as_posix()}", args.points, 10, tmp / "spool", "sqlite")]
        print(json.dumps(logs[-1]), flush=True)
        server: dict[str, Any] | None = None
        if not args.no_server:
            t = time.perf_counter()
            with mlflow_server(tmp, args.server_timeout) as uri:
                up = time.perf_counter() - t
                if uri is None:
                    server = {"store": "mlflow server", "measured": False,
                              "reason": f"no healthy /health within {args.server_timeout:.0f} s"}
                else:
                    server = bench_logging(uri, args.points, 10, tmp / "spool", "mlflow server") | {
                        "measured": True, "server_start_s": up}
            print(json.dumps(server), flush=True)
        else:
            server = {"store": "mlflow server", "measured": False, "reason": "skipped (--no-server)"}
        if server.get("measured"):
            logs.append(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"checkpoint": ckpts, "logging": logs, "server": server}


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for c in res["checkpoint"]:
        out.append({"goal": f"(d) checkpoint write, {c['case']} ({c['mb']:.1f} MB), ms", "issue": ISSUE,
                    "measured": c["ms"], "measured_text": f"{c['ms']:.1f} ms ({c['mb_per_s']:.0f} MB/s)",
                    "target": "reported", "met": None})
    for lg in res["logging"]:
        out.append({"goal": f"(d) metric logging through MlflowSink to {lg['store']}, points/s", "issue": ISSUE,
                    "measured": lg["points_per_s"], "measured_text": f"{lg['points_per_s']:,.0f} points/s"
                    + (" (spooled!)" if lg.get("spooled") else ""), "target": "reported", "met": None})
    s = res["server"]
    if s is not None and not s.get("measured"):
        out.append({"goal": "(d) metric logging through MlflowSink to mlflow server, points/s", "issue": ISSUE,
                    "measured": None, "measured_text": f"not measured: {s['reason']}", "target": "reported", "met": None})
    return out


def write(res: dict[str, Any], args: argparse.Namespace, out: Path, wall_s: float) -> Path:
    name = machine(torch.device("cpu"))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cmd = (f"python -m benchmarks.storage --depth {args.depth} --width {args.width} --repeats {args.repeats} "
           f"--points {args.points}{' --no-server' if args.no_server else ''}"
           f"{f' --threads {args.threads}' if args.threads else ''}")
    lines = [f"# Checkpoint writes and metric logging on {name}", "",
             f"torch {torch.__version__}; `{cmd}`; {wall_s:.0f} s"
             + (f"; load average at the end {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}" if load else "") + ".", "",
             "Checkpoint: `optlab.engine.Checkpointer.save` (torch.save, fsync, atomic rename) of the model and optimizer",
             "state after one step; median of the timed writes. Logging: `optlab.tracking.MlflowSink`, 10 metrics per step,",
             "from the first log_metrics call through finish (the last flush included); `start` (run creation) apart.", "",
             "| checkpoint | size (MB) | write (ms) | MB/s |", "| --- | --- | --- | --- |"]
    for c in res["checkpoint"]:
        lines.append(f"| {c['case']} | {c['mb']:.1f} | {c['ms']:.1f} | {c['mb_per_s']:.0f} |")
    lines += ["", "| logging to | points | start (s) | logging (s) | points/s |", "| --- | --- | --- | --- | --- |"]
    for lg in res["logging"]:
        lines.append(f"| {lg['store']}{' (spooled: the store failed)' if lg['spooled'] else ''} | {lg['points']:,} | "
                     f"{lg['start_s']:.2f} | {lg['log_s']:.2f} | {lg['points_per_s']:,.0f} |")
    s = res["server"]
    if s is not None and not s.get("measured"):
        lines.append(f"| mlflow server | not measured: {s['reason']} | | | |")
    elif s is not None:
        lines += ["", f"The server took {s['server_start_s']:.1f} s to answer /health (not in the numbers above)."]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "storage_cpu.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "storage_cpu.json").write_text(json.dumps(
        {"benchmark": "storage", "device": name, "torch": torch.__version__, "args": vars(args), "wall_s": wall_s,
         "load_avg": list(load) if load else None, **res, "goals": goals(res)}, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few points, no server")
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--optimizers", nargs="+", default=["sgd_sn", "adam"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--server-timeout", type=float, default=90.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.repeats, args.points, args.no_server = 2, 16, 2, 200, True
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    res = run(args, out)
    print(write(res, args, out, time.perf_counter() - t0).read_text())


if __name__ == "__main__":
    main()
