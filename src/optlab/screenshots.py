"""What a new user sees, as PNGs: ``dvc plots show`` and the MLflow UI, in headless Chromium.

``python -m optlab.screenshots`` (``make screenshots``) writes into ``reports/ui/``:

- ``dvc_plots.png``: the page ``dvc plots show`` writes (no network: the headline plot is an image);
- ``mlflow_runs.png``: the experiment as the link ``make mlflow-ui`` prints opens it (the training
  runs; without ``?workflowType=machine_learning`` MLflow 3.17 opens a fresh browser on its GenAI
  overview, whatever the experiment's tags say);
- ``mlflow_parent.png``: one study's parent run (its params, the selected LRs, the figures);
- ``mlflow_figure.png``: the parent's first logged figure (``figures/<name>.png``) in the run's
  artifact view.

The MLflow UI is started on a free loopback port against the tracking store (``mlflow.db``
beside params.yaml unless ``--store``) and stopped afterwards. Chromium is Debian's
(``apt-get install chromium``) or ``--chromium``; it runs with the background network off, so
nothing leaves the machine. Not part of the pipeline: the screenshots depend on the browser and
the fonts of the machine that takes them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


class ScreenshotError(RuntimeError):
    pass


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if shutil.which(explicit) or Path(explicit).is_file() else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def shoot(chromium: str, url: str, out: Path, size: tuple[int, int] = (1400, 900), wait_ms: int = 8000) -> Path:
    """One screenshot of ``url`` into ``out`` (PNG). ``wait_ms`` of virtual time lets a page's
    scripts render first (the MLflow UI is a single-page app)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="optlab-chromium-", ignore_cleanup_errors=True) as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={out.resolve()}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ScreenshotError(f"chromium could not screenshot {url}: {tail[0]}")
    return out


def rendered_dom(chromium: str, url: str, wait_ms: int = 8000) -> str:
    """The page's DOM after its scripts ran for ``wait_ms`` of virtual time (what a test can read)."""
    with tempfile.TemporaryDirectory(prefix="optlab-chromium-", ignore_cleanup_errors=True) as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900",
               f"--virtual-time-budget={wait_ms}", "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ScreenshotError(f"chromium could not load {url}: {proc.stderr.strip()[-200:]}")
    return proc.stdout


def blank(png: Path) -> bool:
    """True when the image is one colour (a page that rendered nothing)."""
    from PIL import Image

    with Image.open(png) as im:
        extrema = im.convert("L").getextrema()
    return extrema[0] == extrema[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_ui(store_uri: str, artifacts: str | None = None, timeout_s: float = 90.0) -> Iterator[str]:
    """``mlflow server`` on a free loopback port for ``store_uri``; yields its base URL."""
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow) if mlflow.is_file() else "mlflow", "server", "--backend-store-uri", store_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise ScreenshotError(f"mlflow server exited ({proc.returncode}): {tail[0]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ScreenshotError(f"mlflow server did not answer on {base} within {timeout_s:g} s")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        log.close()


def _pick_runs(store_uri: str, experiment: str) -> tuple[str, str | None, str | None]:
    """(experiment id, a parent run id with figures if any, that figure's artifact path)."""
    from mlflow import MlflowClient

    client = MlflowClient(store_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ScreenshotError(f"no experiment {experiment!r} in {store_uri} (run `make repro` first)")
    parents = client.search_runs([exp.experiment_id], "tags.`optlab.role` = 'parent'", max_results=200,
                                 order_by=["attributes.start_time DESC"])
    for run in parents:
        figs = client.list_artifacts(run.info.run_id, "figures")
        if figs:
            return exp.experiment_id, run.info.run_id, figs[0].path
    return exp.experiment_id, (parents[0].info.run_id if parents else None), None


def dvc_plots_page(out: Path, chromium: str, repo: Path | str | None = None) -> Path:
    """``dvc plots show`` in ``repo`` (default: the current directory), its page screenshotted
    into ``out``; the page must reference no network resource (it is opened offline)."""
    dvc = Path(sys.executable).with_name("dvc")
    with tempfile.TemporaryDirectory(prefix="optlab-plots-") as tmp:
        proc = subprocess.run([str(dvc) if dvc.is_file() else "dvc", "plots", "show", "-o", tmp],
                              capture_output=True, text=True, cwd=repo)
        if proc.returncode != 0:
            raise ScreenshotError(f"dvc plots show failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        page = Path(tmp, "index.html")
        remote = re.findall(r"""(?:src|href)=["'](https?://[^"']+)""", page.read_text())
        if remote:
            raise ScreenshotError(f"dvc plots show's page loads {remote[0]}: it would be blank offline")
        return shoot(chromium, page.resolve().as_uri(), out, size=(1800, 760), wait_ms=1000)


def take_all(out_dir: Path, store_uri: str, experiment: str = "optlab", chromium: str | None = None,
             dvc_plots: bool = True) -> list[Path]:
    """Every screenshot of the module docstring that applies; returns the PNGs written."""
    browser = find_chromium(chromium)
    if browser is None:
        raise ScreenshotError("no Chromium found (apt-get install chromium, or --chromium PATH)")
    written: list[Path] = []
    if dvc_plots:
        written.append(dvc_plots_page(out_dir / "dvc_plots.png", browser))
    exp_id, parent, figure = _pick_runs(store_uri, experiment)
    from optlab.tracking.__main__ import WORKFLOW, experiment_url

    with mlflow_ui(store_uri) as base:
        # the link `make mlflow-ui` prints: a fresh browser, so no stored GenAI / Model training choice
        written.append(shoot(browser, experiment_url(base, experiment, store_uri), out_dir / "mlflow_runs.png"))
        if parent:
            written.append(shoot(browser, f"{base}/#/experiments/{exp_id}/runs/{parent}?{WORKFLOW}",
                                 out_dir / "mlflow_parent.png"))
        if parent and figure:  # the run page's artifact view (get-artifact itself is a download)
            written.append(shoot(browser, f"{base}/#/experiments/{exp_id}/runs/{parent}/artifacts/{figure}?{WORKFLOW}",
                                 out_dir / "mlflow_figure.png"))
    for png in written:
        if blank(png):
            raise ScreenshotError(f"{png} is blank: the page rendered nothing")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optlab.screenshots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="reports/ui", help="folder for the PNGs (default: reports/ui)")
    ap.add_argument("--store", default=None, help="tracking store URI (default: optlab's, mlflow.db beside params.yaml)")
    ap.add_argument("--experiment", default="optlab")
    ap.add_argument("--chromium", default=None, help="the browser (default: chromium on PATH)")
    ap.add_argument("--no-dvc-plots", action="store_true", help="skip the `dvc plots show` page")
    args = ap.parse_args(argv)
    from optlab.tracking.store import default_tracking_uri

    try:
        paths = take_all(Path(args.out), args.store or default_tracking_uri(), args.experiment, args.chromium,
                         dvc_plots=not args.no_dvc_plots)
    except ScreenshotError as exc:
        print(f"optlab: error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"screenshots: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
