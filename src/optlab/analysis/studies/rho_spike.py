"""Learning-rate spike robustness (issue #11 item 4).

Study ``rho_spike``: Adam's LR multiplied by ``lr_spike_factor`` (1,000 and 10,000) from step
``lr_spike_step`` (50) of 200; plain Adam, Adam with gradient clipping (max norm 1) and the rho
controller around Adam (capped, r_target 1), on three models (grid axis ``model``: an MLP with layer
norm, a small transformer, a CNN with batch norm), base LRs 1e-4, 1e-3, 1e-2, several seeds.

The runs continue through a spike unless the loss turns non-finite (the study sets a very large
``diverge_loss``), as in the published comparison; a run that ended non-finite scores chance
accuracy (1 / classes) in the medians below, and the tables count such runs.

Tables: ``rho_spike`` (per model, spike factor, method and base LR: runs by outcome, median final
test accuracy [IQR] over seeds) and ``rho_spike_pooled`` (per model, factor and method, over every
base LR and seed, with the published reference beside the x10,000 rows). Figure ``rho_spike.png``:
median final test accuracy per base LR, one panel per (model, factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from ... import stats
from ..aggregate import Table, format_value, markdown_table, parse_point, sweep_runs
from . import AnalysisData, BaseAnalysis

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..plots import FigureData
    from ..report import ReportData

METHODS = ("adam", "adam_clip", "rho_capped_adam")
WORDS = {"adam": "plain Adam", "adam_clip": "clipping (max norm 1)", "rho_capped_adam": "rho (capped, r_target 1)"}
PUBLISHED = {  # x10,000 spike, median final test accuracy (%), plain Adam / clipping / rho (issue #11 item 4)
    "transformer": (31.8, 38.7, 95.3),
    "mlp+ln": (44.6, 51.5, 93.9),
    "cnn+bn": (13.4, 10.3, 71.6),
}
DETAIL_MD = ["model", "spike", "method", "lr", "runs", "final test accuracy median [IQR]"]
POOLED_MD = ["model", "spike", "method", "runs", "final test accuracy median [IQR]", "published (x10,000, median)"]


def model_name(point: Any) -> str:
    """``transformer``, ``mlp+ln``, ``cnn+bn`` (the published names) from a grid point label."""
    p = parse_point(point)
    arch = str(p.get("arch", ""))
    if arch == "vit":
        return "transformer"
    if arch == "mlp":
        return "mlp+ln" if p.get("norm") == "layer" else "mlp"
    if arch == "cnn":
        return "cnn" if p.get("batch_norm") is False else "cnn+bn"
    return arch or str(point)


def spike_factor(point: Any) -> float:
    v = parse_point(point).get("lr_spike_factor")
    return float(v) if v is not None else math.nan


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    sw = sweep_runs(runs) if len(runs) else runs
    cols = ["model", "factor", "method", "lr", "seed", "status", "test_acc", "score", "run_dir"]
    if not len(sw):
        return pd.DataFrame(columns=cols)
    df = sw[sw["lr"].notna()].copy()
    df["model"] = [model_name(p) for p in df["point"]]
    df["factor"] = [spike_factor(p) for p in df["point"]]
    df["test_acc"] = pd.to_numeric(df.get("test_acc"), errors="coerce")
    chance = 0.1  # 10 classes (digits, MNIST)
    df["score"] = np.where(df["status"] == "completed", df["test_acc"], chance)
    return df[cols].reset_index(drop=True)


def _runs_text(g: pd.DataFrame) -> str:
    n, done = len(g), int((g["status"] == "completed").sum())
    s = f"{done} of {n} completed"
    return s + (f", {n - done} non-finite (scored as chance)" if n - done else "")


def _acc(v: np.ndarray) -> str:
    if not len(v):
        return "n/a"
    s = stats.spread(np.asarray(v, dtype=float))
    return f"{format_value(s.median, 'acc')} [{format_value(s.q25, 'acc')}–{format_value(s.q75, 'acc')}]"


def _rank(method: Any) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def detail_table(rt: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (model, factor, method, lr), g in rt.groupby(["model", "factor", "method", "lr"], sort=False):
        sc = g["score"].to_numpy(dtype=float)
        rows.append({"model_key": model, "factor": factor, "method_key": method, "lr_value": float(lr), "n": len(g),
                     "n_completed": int((g["status"] == "completed").sum()), "score_median": float(np.median(sc)),
                     "model": model, "spike": f"x{format_value(factor)}", "method": WORDS.get(method, method),
                     "lr": format_value(lr), "runs": _runs_text(g), "final test accuracy median [IQR]": _acc(sc)})
    if not rows:
        return pd.DataFrame(columns=DETAIL_MD)
    rows.sort(key=lambda r: (str(r["model_key"]), float(r["factor"]), _rank(r["method_key"]), str(r["method_key"]),
                             r["lr_value"]))
    return pd.DataFrame(rows)


def pooled_table(rt: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (model, factor, method), g in rt.groupby(["model", "factor", "method"], sort=False):
        sc = g["score"].to_numpy(dtype=float)
        pub = PUBLISHED.get(model)
        ref = f"{pub[METHODS.index(method)]:.1f}%" if pub is not None and factor == 10000 and method in METHODS else ""
        rows.append({"model_key": model, "factor": factor, "method_key": method, "n": len(g),
                     "score_median": float(np.median(sc)), "published_median_pct": ref,
                     "model": model, "spike": f"x{format_value(factor)}", "method": WORDS.get(method, method),
                     "runs": _runs_text(g), "final test accuracy median [IQR]": _acc(sc),
                     "published (x10,000, median)": ref or "—"})
    if not rows:
        return pd.DataFrame(columns=POOLED_MD)
    rows.sort(key=lambda r: (str(r["model_key"]), float(r["factor"]), _rank(r["method_key"]), str(r["method_key"])))
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class RhoSpikeAnalysis(BaseAnalysis):
    def tables(self, data: AnalysisData) -> dict[str, Table]:
        rt = run_table(data.runs)
        return {"rho_spike": (detail_table(rt), DETAIL_MD), "rho_spike_pooled": (pooled_table(rt), POOLED_MD)}

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        return {"rho_spike.png": lambda: _figure(data)}

    def section(self, report: "ReportData") -> str:
        return section(report)


def _figure(fd: "FigureData") -> "Figure":
    from .. import plots as P

    rt = run_table(fd.runs)
    if rt.empty:
        raise P.NoData("no spike runs")
    panels = sorted({(m, f) for m, f in zip(rt["model"], rt["factor"])})
    fig, axes = P.figure(1, len(panels), w=3.0, h=2.8)
    axes = np.atleast_1d(axes).ravel()
    for ax, (model, factor) in zip(axes, panels):
        g = rt[(rt["model"] == model) & (rt["factor"] == factor)]
        for k, method in enumerate(METHODS):
            h = g[g["method"] == method]
            if h.empty:
                continue
            stat = h.groupby("lr")["score"].agg(["median", lambda s: s.quantile(0.25), lambda s: s.quantile(0.75)])
            stat.columns = ["median", "q25", "q75"]
            x = stat.index.to_numpy(dtype=float) * (1.0 + 0.08 * (k - 1))  # offset so the markers stay visible
            ax.errorbar(x, stat["median"], yerr=[stat["median"] - stat["q25"], stat["q75"] - stat["median"]],
                        marker="os^"[k], ms=4, capsize=2, color=f"C{k}", label=WORDS[method])
        ax.axhline(0.1, color="0.5", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model}, x{format_value(factor)}", fontsize=9)
        ax.set_xlabel("base LR")
    axes[0].set_ylabel("final test accuracy (median, IQR)")
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("rho_spike: Adam's LR spiked from step 50 of 200 (dotted: chance)", fontsize=10)
    return fig


def section(rd: "ReportData") -> str:
    lines = [f"## {rd.title}", "", rd.comment(), ""]
    if "rho_spike_pooled" not in rd.table_names:
        return "\n".join(lines + ["No runs yet.", ""])
    pooled, detail = rd.table("rho_spike_pooled"), rd.table("rho_spike")
    lines += [
        "Issue #11 item 4. Adam's learning rate is multiplied by 1,000 or 10,000 from step 50 of 200; plain Adam, "
        "Adam with gradient clipping (max norm 1) and the rho controller around Adam (capped, r_target 1) on an MLP "
        "with layer norm, a small transformer and a CNN with batch norm, base LRs 1e-4, 1e-3, 1e-2. Runs continue "
        "through the spike unless the loss turns non-finite; such a run scores chance (10%) in the medians.", ""]
    if len(pooled):
        lines.append("**Where our runs and the published reference agree** (x10,000, median over base LRs and seeds):")
        for model in dict.fromkeys(pooled["model_key"]):
            g = pooled[(pooled["model_key"] == model) & (pooled["factor"].astype(float) == 10000)]
            if g.empty:
                continue
            med = {m: float(v) for m, v in zip(g["method_key"], g["score_median"])}
            if not all(m in med for m in METHODS):
                continue
            ours_best = max(METHODS, key=lambda m: med[m])
            s = (f"- {model}: ours plain {format_value(med['adam'], 'acc')}, clipping {format_value(med['adam_clip'], 'acc')}, "
                 f"rho {format_value(med['rho_capped_adam'], 'acc')}")
            pub = PUBLISHED.get(str(model))
            if pub is not None:
                pub_best = METHODS[int(np.argmax(pub))]
                s += f"; published {pub[0]:.1f}% / {pub[1]:.1f}% / {pub[2]:.1f}%"
                s += ("; **agrees** on the ranking's top (rho best)" if ours_best == pub_best == "rho_capped_adam" else
                      f"; **differs**: our best is {WORDS[ours_best]}, the published best is {WORDS[pub_best]}")
            lines.append(s + ".")
        lines += ["", "#### Pooled over base LRs and seeds", "", markdown_table(pooled[POOLED_MD]), ""]
    lines += ["#### Per base LR", "", markdown_table(detail[DETAIL_MD]) if len(detail) else "_(none)_", ""]
    lines += rd.figure_lines([("rho_spike.png", "rho_spike: final test accuracy per base LR")])
    lines += ["The published reference is printed as given (its own models and data); our models and digits "
              "differ, so only the direction of the comparison is comparable, not the numbers.", "",
              f"Tables: {rd.table_links(['rho_spike.csv', 'rho_spike_pooled.csv'])}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


ANALYSIS = RhoSpikeAnalysis(name="rho_spike", title="Learning-rate spikes: Adam, clipping and the rho cap", order=13)
