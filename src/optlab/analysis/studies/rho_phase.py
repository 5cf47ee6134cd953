"""The one-step phase transition (issue #11 item 5): from each trained model, one step of normalized
size r along the gradient and along random unit directions (probe ``one_step``,
:mod:`optlab.probes.one_step`).

Study ``rho_phase``: three architectures (grid axis ``model``) trained to a checkpoint, each run
ending with the probe. Tables: ``rho_phase`` (per architecture: seeds; median [IQR] over seeds of
the smallest r at which the loss rose by more than 10% along the gradient, and of the smallest such
r over the random directions; how many (run, direction) pairs rose at some r < 1; the loss ratio at
r = 1) and ``rho_phase_curves`` (per architecture, direction kind and r: median, 25th and 75th
percentile of loss after / loss before, over seeds and directions). Figure ``rho_phase.png``: the
curves, with r = 1 and the 10% line. The claim under test: no collapse below r = 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from ... import stats
from ..aggregate import Table, format_value, markdown_table, read_csv, sweep_runs
from . import AnalysisData, BaseAnalysis

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..plots import FigureData
    from ..report import ReportData

RISE = 0.1
RATIO = re.compile(r"^one_step_ratio@r=(.+)$")
SUMMARY_MD = ["model", "seeds", "r_rise gradient median [IQR]", "r_rise random (min over directions) median [IQR]",
              "pairs rising below r = 1", "loss ratio at r = 1: gradient", "loss ratio at r = 1: random median"]
CURVE_COLS = ["point", "kind", "r", "n", "median", "q25", "q75"]


def _long(frame: pd.DataFrame) -> pd.DataFrame:
    """One-step rows of a layers.csv frame: (kind, direction, metric, r, value)."""
    f = frame[frame["metric"].astype(str).str.startswith("one_step_")].copy()
    if f.empty:
        return pd.DataFrame(columns=["kind", "direction", "metric", "r", "value"])
    m = f["metric"].astype(str).str.extract(RATIO)[0]
    f["r"] = pd.to_numeric(m, errors="coerce")
    f["metric"] = np.where(m.notna(), "ratio", f["metric"].astype(str))
    f = f.rename(columns={"role": "kind", "layer": "direction"})
    f["value"] = pd.to_numeric(f["value"], errors="coerce")
    return f[["kind", "direction", "metric", "r", "value"]]


def probe_rows(runs: pd.DataFrame, base: Path | None) -> pd.DataFrame:
    """Every run's one-step rows with its point and seed (empty without a runs root)."""
    sw = sweep_runs(runs) if len(runs) else runs
    frames = []
    if base is None or not len(sw):
        return pd.DataFrame(columns=["point", "seed", "run_dir", "kind", "direction", "metric", "r", "value"])
    for _, r in sw.iterrows():
        frame = read_csv(base / str(r["run_dir"]) / "layers.csv")
        if frame is None or frame.empty or "metric" not in frame:
            continue
        f = _long(frame)
        f.insert(0, "run_dir", r["run_dir"])
        f.insert(0, "seed", r.get("seed"))
        f.insert(0, "point", r.get("point"))
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=["point", "seed", "run_dir", "kind", "direction", "metric", "r", "value"])
    return pd.concat(frames, ignore_index=True)


def _cell(v: np.ndarray) -> str:
    v = np.asarray(v, dtype=float)
    if not len(v):
        return "n/a"
    finite = v[np.isfinite(v)]
    if len(finite) < len(v):  # inf: the loss never rose by 10% on the grid
        med = float(np.median(v)) if np.isfinite(np.median(v)) else math.inf
        return f"{format_value(med)} ({len(v) - len(finite)} of {len(v)}: never)"
    s = stats.spread(finite)
    return f"{format_value(s.median)} [{format_value(s.q25)}–{format_value(s.q75)}]"


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for point, g in rows.groupby("point", sort=True):
        rise = g[g["metric"] == "one_step_r_rise"]
        grad = rise[rise["kind"] == "grad"].groupby("run_dir")["value"].min().to_numpy()
        rand = rise[rise["kind"] == "random"].groupby("run_dir")["value"].min().to_numpy()
        below = int((rise["value"] < 1).sum())
        at1 = g[(g["metric"] == "ratio") & np.isclose(g["r"].astype(float), 1.0)]
        a_grad = at1[at1["kind"] == "grad"]["value"].to_numpy(dtype=float)
        a_rand = at1[at1["kind"] == "random"]["value"].to_numpy(dtype=float)
        seeds = sorted({int(s) for s in pd.to_numeric(g["seed"], errors="coerce").dropna()})
        out.append({"point": point, "seeds": " ".join(map(str, seeds)), "n_runs": g["run_dir"].nunique(),
                    "n_pairs": int(len(rise)), "pairs_below_1": below,
                    "r_rise_grad_median": float(np.median(grad)) if len(grad) else math.nan,
                    "r_rise_random_min_median": float(np.median(rand)) if len(rand) else math.nan,
                    "ratio_r1_grad_median": float(np.median(a_grad)) if len(a_grad) else math.nan,
                    "ratio_r1_random_median": float(np.median(a_rand)) if len(a_rand) else math.nan,
                    "model": str(point), "r_rise gradient median [IQR]": _cell(grad),
                    "r_rise random (min over directions) median [IQR]": _cell(rand),
                    "pairs rising below r = 1": f"{below} of {len(rise)}",
                    "loss ratio at r = 1: gradient": _cell(a_grad), "loss ratio at r = 1: random median": _cell(a_rand)})
    return pd.DataFrame(out, columns=["point", "seeds", "n_runs", "n_pairs", "pairs_below_1", "r_rise_grad_median",
                                      "r_rise_random_min_median", "ratio_r1_grad_median", "ratio_r1_random_median",
                                      *SUMMARY_MD])


def curves_table(rows: pd.DataFrame) -> pd.DataFrame:
    rat = rows[rows["metric"] == "ratio"]
    out = []
    for (point, kind, r), g in rat.groupby(["point", "kind", "r"], sort=True):
        v = g["value"].to_numpy(dtype=float)
        v = np.where(np.isnan(v), np.inf, v)
        out.append({"point": point, "kind": kind, "r": float(r), "n": len(v), "median": float(np.median(v)),
                    "q25": float(np.percentile(v, 25)), "q75": float(np.percentile(v, 75))})
    return pd.DataFrame(out, columns=CURVE_COLS)


@dataclass(frozen=True)
class RhoPhaseAnalysis(BaseAnalysis):
    def tables(self, data: AnalysisData) -> dict[str, Table]:
        from .rho.tables import runs_base

        rows = probe_rows(data.runs, runs_base(data))
        return {"rho_phase": (summary_table(rows), SUMMARY_MD), "rho_phase_curves": (curves_table(rows), None)}

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        return {"rho_phase.png": lambda: _figure(data)}

    def section(self, report: "ReportData") -> str:
        return section(report)


def _figure(fd: "FigureData") -> "Figure":
    from .. import plots as P

    base = fd.root.resolve().parent if fd.root is not None else None
    cur = curves_table(probe_rows(fd.runs, base))
    if cur.empty:
        raise P.NoData("no one-step rows")
    points = list(dict.fromkeys(cur["point"]))
    fig, axes = P.figure(1, len(points), w=3.8, h=3.2)
    axes = np.atleast_1d(axes).ravel()
    for ax, point in zip(axes, points):
        for kind, color, marker in (("grad", "C3", "o"), ("random", "C0", "s")):
            g = cur[(cur["point"] == point) & (cur["kind"] == kind)].sort_values("r")
            if g.empty:
                continue
            med = np.clip(g["median"].to_numpy(dtype=float), 1e-3, 1e6)
            ax.plot(g["r"], med, marker=marker, ms=3, color=color,
                    label="gradient" if kind == "grad" else "random directions (median, IQR)")
            ax.fill_between(g["r"], np.clip(g["q25"], 1e-3, 1e6), np.clip(g["q75"], 1e-3, 1e6), color=color, alpha=0.2)
        ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
        ax.axhline(1 + RISE, color="0.5", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(str(point), fontsize=9)
        ax.set_xlabel("normalized step size r")
    axes[0].set_ylabel("loss after / loss before")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("rho_phase: one step of size r from the trained model (dashed: r = 1; dotted: +10%)", fontsize=10)
    return fig


def section(rd: "ReportData") -> str:
    lines = [f"## {rd.title}", "", rd.comment(), ""]
    if "rho_phase" not in rd.table_names:
        return "\n".join(lines + ["No runs yet.", ""])
    t = rd.table("rho_phase")
    lines += [
        "Issue #11 item 5. From each trained model (the end of each run, eval mode, on the task's fixed probe batch) "
        "a single step θ + r·rho(d)·d along the unit negative gradient and along 20 random unit directions, r on a "
        "log grid from 0.01 to 100 (4 points a decade), rho(d) = π / Δa along d. Recorded: loss after / loss "
        "before, and the smallest r at which the loss rose by more than 10%. **The claim under test: no collapse "
        "below r = 1.**", ""]
    if len(t):
        total = int(t["n_pairs"].sum())
        below = int(t["pairs_below_1"].sum())
        if total == 0:
            lines.append("No one-step rows were recorded.")
        elif below == 0:
            lines.append(f"**Agrees**: none of the {total} (run, direction) pairs over {len(t)} architectures rose by "
                         "more than 10% at any grid r below 1.")
        else:
            parts = [f"{r['model']}: {int(r['pairs_below_1'])} of {int(r['n_pairs'])}" for _, r in t.iterrows()
                     if int(r["pairs_below_1"])]
            lines.append(f"**Does not agree everywhere**: {below} of {total} (run, direction) pairs rose by more than "
                         f"10% at some r < 1 ({'; '.join(parts)}).")
        lines += ["", markdown_table(t[SUMMARY_MD]), ""]
    lines += rd.figure_lines([("rho_phase.png", "rho_phase: loss ratio after one step of size r")])
    lines += [f"Tables: {rd.table_links(['rho_phase.csv', 'rho_phase_curves.csv'])}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


ANALYSIS = RhoPhaseAnalysis(name="rho_phase", title="One step of size r: the phase transition at the radius", order=12)
