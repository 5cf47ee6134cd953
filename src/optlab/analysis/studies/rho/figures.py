"""The rho study family's figures, per study ``S`` (one column per learning rate, one colour per method):

- ``S_curves.png``: training loss per epoch (log y) and validation accuracy per epoch (the runs
  record test accuracy at the end only);
- ``S_control.png``: the mean effective step size ``eta_eff`` per epoch (log y) and the largest
  normalized step ``r`` per epoch (log y) with the ``r_target`` line.

Each line is the median over the multi-seed runs with their IQR as a band; the single seed (7) is
a dashed line of the same colour. A run that diverged is an ``x`` at the top of the panel at the
epoch it diverged in. Per-epoch controller values are the ``rho`` probe's (``epoch_eta_eff_mean``,
``epoch_r_max``); an epoch without them (a run that diverged inside it) gets them from the
per-step rows (``eta_eff``, ``r``; finite values only).

Every run of the study is drawn, not only the selected-LR ones, so the curves are read here from
each run's ``curves.csv`` under the runs root (the core's :class:`FigureData` holds the selected
runs' curves only; drawn from frames instead of a root, only those are available).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from ... import plots as P
from ...aggregate import read_csv, slug, sweep_runs
from .tables import MODE_ORDER, SINGLE_SEED, run_mode, run_r_target, study_single_seed

PER_STEP = ("eta_eff", "r", "train_loss")
PER_EPOCH = ("epoch_train_loss", "val_acc", "epoch_eta_eff_mean", "epoch_r_max")
WANTED = (*PER_STEP, *PER_EPOCH)


def figure_names(study: str) -> tuple[str, str]:
    base = slug(study)
    base = base if base.startswith("rho") else f"rho_{base}"
    return f"{base}_curves.png", f"{base}_control.png"


def figures(fd: P.FigureData, single_seed: int = SINGLE_SEED,
            seeds: tuple[int, ...] | None = None) -> dict[str, Callable[[], Figure]]:
    """``S_curves.png`` and ``S_control.png`` per study; ``seeds``: the multi-seed lines' seeds
    (None: every seed but ``single_seed``)."""
    out: dict[str, Callable[[], Figure]] = {}
    studies = sorted({str(s) for s in sweep_runs(fd.runs)["study"].dropna()})
    cache: dict[str, pd.DataFrame] = {}

    def epochs(study: str) -> pd.DataFrame:
        if study not in cache:
            runs = study_runs(fd, study, study_single_seed(fd.runs, study, single_seed), seeds)
            cache[study] = epoch_frame(runs, read_series(fd, runs))
        return cache[study]

    for study in studies:
        curves, control = figure_names(study)
        seed = study_single_seed(fd.runs, study, single_seed)
        out[curves] = lambda s=study, sd=seed: _curves(fd, s, epochs(s), sd, seeds)
        out[control] = lambda s=study, sd=seed: _control(fd, s, epochs(s), sd, seeds)
    return out


def study_runs(fd: P.FigureData, study: str, single_seed: int = SINGLE_SEED,
               seeds: tuple[int, ...] | None = None) -> pd.DataFrame:
    """The study's runs (of ``single_seed`` and ``seeds``, when given) with their mode and r_target."""
    sw = sweep_runs(fd.runs)
    sw = sw[(sw["study"] == study) & sw["lr"].notna()].copy()
    if seeds is not None:
        sw = sw[pd.to_numeric(sw["seed"], errors="coerce").isin({single_seed, *seeds})]
    sw["mode"] = [run_mode(r) for r in sw.to_dict("records")]
    sw["r_target"] = [run_r_target(r) for r in sw.to_dict("records")]
    return sw


def read_series(fd: P.FigureData, runs: pd.DataFrame) -> pd.DataFrame:
    """The runs' curve rows of :data:`WANTED` (run_dir, step, epoch, metric, value)."""
    frames = []
    for run_dir in runs["run_dir"].dropna().unique():
        if fd.root is not None:
            frame = read_csv(fd.root.resolve().parent / run_dir / "curves.csv")
            if frame is None or frame.empty:
                continue
            frame.insert(0, "run_dir", run_dir)
        else:  # drawn from frames: the core passes the selected runs' curves only
            frame = fd.curves[fd.curves["run_dir"] == run_dir]
        frame = frame[frame["metric"].isin(WANTED)]
        if len(frame):
            frames.append(frame[["run_dir", "step", "epoch", "metric", "value"]])
    if not frames:
        return pd.DataFrame(columns=["run_dir", "step", "epoch", "metric", "value"])
    df = pd.concat(frames, ignore_index=True)
    for c in ("step", "epoch", "value"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


EPOCH_COLS = ["run_dir", "epoch", "train_loss", "val_acc", "eta_eff", "r_max", "from_steps"]


def epoch_frame(runs: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, epoch): train loss, validation accuracy, mean eta_eff and max r (the probe's,
    else from the epoch's per-step rows: ``from_steps``), tagged with the run's method, mode, lr,
    seed, status and r_target; ``epoch`` counts from 1."""
    rows = []
    for run_dir, g in series.groupby("run_dir", sort=False):
        for epoch, e in g.groupby("epoch", sort=True):
            def last(metric: str) -> float:
                v = e.loc[e["metric"] == metric, "value"]
                return float(v.iloc[-1]) if len(v) else np.nan

            def steps(metric: str) -> np.ndarray:
                v = e.loc[e["metric"] == metric, "value"].to_numpy(dtype=float)
                return v[np.isfinite(v)]

            eta, r = last("epoch_eta_eff_mean"), last("epoch_r_max")
            from_steps = False
            if np.isnan(eta) and len(steps("eta_eff")):
                eta, from_steps = float(steps("eta_eff").mean()), True
            if np.isnan(r) and len(steps("r")):
                r, from_steps = float(steps("r").max()), True
            rows.append({"run_dir": run_dir, "epoch": int(epoch) + 1, "train_loss": last("epoch_train_loss"),
                         "val_acc": last("val_acc"), "eta_eff": eta, "r_max": r, "from_steps": from_steps})
    df = pd.DataFrame(rows, columns=EPOCH_COLS)
    tags = runs[["run_dir", "method", "mode", "lr", "seed", "status", "r_target", "diverged_step"]]
    return df.merge(tags, on="run_dir", how="inner")


def diverged_epochs(runs: pd.DataFrame, series: pd.DataFrame) -> pd.DataFrame:
    """(run_dir, method, lr, seed, epoch) of every diverged run: the epoch (from 1) of its diverging
    step's row, else its last recorded epoch (1 when it recorded nothing)."""
    rows = []
    for r in runs[runs["status"] == "diverged"].to_dict("records"):
        s = series[series["run_dir"] == r["run_dir"]]
        at = s[s["step"] == float(r["diverged_step"])] if pd.notna(r.get("diverged_step")) else s.iloc[0:0]
        epoch = at["epoch"].max() if len(at) else (s["epoch"].max() if len(s) else 0.0)
        rows.append({"run_dir": r["run_dir"], "method": r["method"], "lr": r["lr"], "seed": r["seed"],
                     "epoch": int(epoch) + 1})
    return pd.DataFrame(rows, columns=["run_dir", "method", "lr", "seed", "epoch"])


def _order(fd: P.FigureData, runs: pd.DataFrame) -> list[str]:
    """The analysis's methods first (its ``method_order``), then the others by mode and name."""
    rank = {m: i for i, m in enumerate(MODE_ORDER)}
    first = {m: i for i, m in enumerate(fd.order)}
    modes = runs.groupby("method")["mode"].first().to_dict()
    return sorted({str(m) for m in runs["method"].dropna()},
                  key=lambda m: (first.get(m, len(first)), rank.get(modes.get(m), len(rank)), m))


def _draw(fd: P.FigureData, ax: Any, d: pd.DataFrame, y: str, order: list[str], single_seed: int) -> bool:
    """Median over the multi-seed runs with the IQR band, the single seed dashed; True if drawn."""
    d = d[np.isfinite(d[y].astype(float))]
    seed = pd.to_numeric(d["seed"], errors="coerce")
    multi, single = d[seed != single_seed], d[seed == single_seed]
    present = [m for m in order if m in set(d["method"])]
    pal = {m: fd.palette.get(m, (0.5, 0.5, 0.5)) for m in present}
    if len(multi):
        sns.lineplot(data=multi, x="epoch", y=y, hue="method", hue_order=[m for m in present if m in set(multi["method"])],
                     palette=pal, estimator="median", errorbar=("pi", 50), ax=ax, legend=False)
    for m in present:
        s = single[single["method"] == m].sort_values("epoch")
        if len(s):
            ax.plot(s["epoch"], s[y], ls="--", lw=1.1, color=pal[m])
        part = d[(d["method"] == m) & d["from_steps"].astype(bool)]  # the epoch a run diverged in: often one point
        if len(part):
            ax.plot(part["epoch"], part[y], marker="o", ms=5, mfc="none", ls="none", color=pal[m])
    return bool(len(d))


def _legend(fd: P.FigureData, ax: Any, order: list[str], runs: pd.DataFrame, single_seed: int,
            extra: list[tuple[Any, str]] = ()) -> None:
    handles = [(Line2D([], [], color=fd.palette.get(m, (0.5, 0.5, 0.5))), m) for m in order]
    seeds = sorted({int(s) for s in pd.to_numeric(runs["seed"], errors="coerce").dropna()})
    multi = [s for s in seeds if s != single_seed]
    if multi:
        handles.append((Line2D([], [], color="0.3"), f"median, band IQR (seeds {', '.join(map(str, multi))})"))
    if single_seed in seeds:
        handles.append((Line2D([], [], color="0.3", ls="--"), f"seed {single_seed}"))
    if (runs["status"] == "diverged").any():
        handles.append((Line2D([], [], marker="x", ls="none", color="0.3", mew=2), "diverged (epoch; one per run)"))
        handles.append((Line2D([], [], marker="o", mfc="none", ls="none", color="0.3"),
                        "epoch it diverged in (its steps; finite values)"))
    handles += list(extra)
    ax.legend([h for h, _ in handles], [t for _, t in handles], fontsize="small")


def _crosses(fd: P.FigureData, ax: Any, div: pd.DataFrame) -> None:
    """An x per diverged run at the top of the panel, at its epoch (runs of one epoch side by side)."""
    if div.empty:
        return
    trans = ax.get_xaxis_transform()
    for (method, epoch), g in div.groupby(["method", "epoch"], sort=True):
        ys = 0.96 - 0.035 * np.arange(len(g))
        ax.plot([epoch] * len(g), ys, marker="x", ls="none", mew=2, ms=7, color=fd.palette.get(method, "0.5"),
                transform=trans, clip_on=False)


def _lr_columns(runs: pd.DataFrame) -> list[float]:
    return sorted({float(x) for x in runs["lr"].dropna()})


def _grid(fd: P.FigureData, study: str, epochs: pd.DataFrame, single_seed: int, seeds: tuple[int, ...] | None,
          rows: list[tuple[str, str, bool]], title: str, target: bool = False) -> Figure:
    runs = study_runs(fd, study, single_seed, seeds)
    if runs.empty:
        raise P.NoData(f"no runs of {study}")
    lrs = _lr_columns(runs)
    order = _order(fd, runs)
    series_div = diverged_epochs(runs, read_series(fd, runs[runs["status"] == "diverged"]))
    fig, axes = P.figure(len(rows), len(lrs), w=5.0, h=3.8)
    drawn = 0
    n_epochs = int(epochs["epoch"].max()) if len(epochs) else 1
    for j, lr in enumerate(lrs):
        at = np.isclose(epochs["lr"].astype(float), lr, rtol=1e-9, atol=0.0) if len(epochs) else []
        d = epochs[at] if len(epochs) else epochs
        div = series_div[np.isclose(series_div["lr"].astype(float), lr, rtol=1e-9, atol=0.0)] if len(series_div) else series_div
        for i, (y, ylab, log) in enumerate(rows):
            ax = axes[i, j]
            dd = P.positive(d, y) if log else d
            ok = _draw(fd, ax, dd, y, order, single_seed)
            if ok:
                drawn += 1
                if log:
                    P.log_y(ax)
            else:
                P.empty(ax, "no finite values")
            extra: list[tuple[Any, str]] = []
            if target and y == "r_max":
                for rt in sorted({float(x) for x in runs["r_target"].dropna()}):
                    line = ax.axhline(rt, ls=":", color="0.2", lw=1.2)
                    extra.append((line, f"r_target {rt:g}"))
            if y == "val_acc":
                ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            _crosses(fd, ax, div)
            ax.set_xlim(0.5, n_epochs + 0.5)
            P.int_x(ax)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylab)
            ax.set_title(f"lr {lr:g}: {ylab}")
            if i == 0 and j == 0:
                _legend(fd, ax, order, runs, single_seed, extra)
            elif extra:
                ax.legend([h for h, _ in extra], [t for _, t in extra], fontsize="small")
    if not drawn:
        raise P.NoData(f"no per-epoch curves for {study}")
    P.suptitle(fig, title)
    return fig


def _curves(fd: P.FigureData, study: str, epochs: pd.DataFrame, single_seed: int,
            seeds: tuple[int, ...] | None = None) -> Figure:
    rows = [("train_loss", "train loss (epoch mean)", True), ("val_acc", "validation accuracy", False)]
    return _grid(fd, study, epochs, single_seed, seeds, rows,
                 f"{study}: training loss (log scale) and validation accuracy per epoch, per method and LR")


def _control(fd: P.FigureData, study: str, epochs: pd.DataFrame, single_seed: int,
             seeds: tuple[int, ...] | None = None) -> Figure:
    rows = [("eta_eff", "mean eta_eff per epoch", True), ("r_max", "max r per epoch", True)]
    return _grid(fd, study, epochs, single_seed, seeds, rows,
                 f"{study}: effective step size and largest normalized step r = tau / rho per epoch "
                 "(r > 1: the step left the convergence radius)", target=True)
