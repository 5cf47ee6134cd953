"""The short LR scan that chooses the rho studies' three learning rates (issue #11 item 3).

Study ``rho_lr_scan``: each base optimizer (plain SGD, SGD with momentum 0.9, Adam) in the rho
controller's ``fixed`` mode (the base optimizer unchanged, rho and r measured) at every LR of a
half-decade grid, on the seed setup (digits MLP 64-128-128-10, GELU, 24 epochs, seed 7).

The rule, applied to the scan's rows of one optimizer: ``b`` is the largest LR whose run completed
with a final validation accuracy within :data:`WITHIN` of the best one of the scan; the three LRs
are ``b / 10`` (safe), ``b`` (borderline) and ``10 b`` (unstable). Tables: ``rho_lr_scan`` (one row
per optimizer and LR: status, validation and test accuracy, peak r) and ``rho_lr_scan_choice`` (per
optimizer: the best LR, ``b``, the rule's three LRs and the LRs the study of that optimizer is
configured with in studies.yaml, and whether they agree). Figure ``rho_lr_scan.png``: final
validation accuracy and peak r against the LR, the chosen LRs marked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from ..aggregate import Table, format_value, markdown_table, sweep_runs
from . import AnalysisData, BaseAnalysis

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..plots import FigureData
    from ..report import ReportData

WITHIN = 0.02
"""b: the largest completed LR within this much validation accuracy of the scan's best."""
STUDIES = {"sgd": "rho_digits", "sgd_momentum": "rho_momentum", "adam": "rho_adam"}
"""The study whose three LRs the rule chooses, per base optimizer (rho_digits keeps the seed setup's)."""
SCAN_COLS = ["study", "optimizer", "method", "lr", "seed", "status", "diverged_step", "val_acc", "test_acc", "peak_r",
             "run_dir"]
SCAN_MD = ["optimizer", "lr", "status", "val accuracy", "test accuracy", "peak r"]
CHOICE_COLS = ["study", "optimizer", "best_lr", "best_val_acc", "b", "safe", "borderline", "unstable", "configured_study",
               "configured_lrs", "agrees"]


def scan_table(runs: pd.DataFrame) -> pd.DataFrame:
    sw = sweep_runs(runs) if len(runs) else runs
    if not len(sw):
        return pd.DataFrame(columns=SCAN_COLS)
    df = sw[sw["lr"].notna()].copy()
    for c in SCAN_COLS:
        if c not in df:
            df[c] = np.nan
    for c in ("lr", "val_acc", "test_acc", "peak_r"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df[SCAN_COLS].sort_values(["study", "optimizer", "lr"], kind="mergesort").reset_index(drop=True)


def choose(rows: pd.DataFrame, within: float = WITHIN) -> dict[str, float]:
    """The rule on one optimizer's scan rows (see the module docstring); NaNs when nothing completed."""
    ok = rows[(rows["status"] == "completed") & rows["val_acc"].notna()]
    if ok.empty:
        return {"best_lr": math.nan, "best_val_acc": math.nan, "b": math.nan, "safe": math.nan, "borderline": math.nan,
                "unstable": math.nan}
    best = ok.loc[ok["val_acc"].idxmax()]
    near = ok[ok["val_acc"] >= float(best["val_acc"]) - within - 1e-12]
    b = float(near["lr"].max())
    return {"best_lr": float(best["lr"]), "best_val_acc": float(best["val_acc"]), "b": b, "safe": b / 10,
            "borderline": b, "unstable": b * 10}


def configured_lrs(params: Path | None, study: str) -> tuple[float, ...] | None:
    """The LRs ``studies.<study>`` runs at the selected scale (None when unknown)."""
    if params is None or not Path(params).is_file():
        return None
    from optlab import paramfiles

    try:
        p = paramfiles.read(params)  # params.yaml and the studies.yaml beside it
    except (OSError, paramfiles.ParamsFileError):  # files the analysis cannot read: "unknown", never a failed report
        return None
    spec = (p.get("studies") or {}).get(study)
    if not isinstance(spec, dict):
        return None
    scale = p.get("scale", "quick")
    lrs = (spec.get(scale) or {}).get("lrs", spec.get("lrs"))
    return tuple(float(x) for x in lrs) if lrs else None


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(sorted(a), sorted(b)))


def choice_table(scan: pd.DataFrame, params: Path | None) -> pd.DataFrame:
    rows = []
    for (study, opt), g in scan.groupby(["study", "optimizer"], sort=True):
        c = choose(g)
        target = STUDIES.get(str(opt))
        lrs = configured_lrs(params, target) if target else None
        rule = (c["safe"], c["borderline"], c["unstable"])
        agrees = "n/a" if lrs is None or math.isnan(c["b"]) else ("yes" if _same(lrs, rule) else "no")
        rows.append({"study": study, "optimizer": opt, **c, "configured_study": target or "",
                     "configured_lrs": " ".join(format_value(x) for x in lrs) if lrs else "", "agrees": agrees})
    return pd.DataFrame(rows, columns=CHOICE_COLS)


def _scan_view(scan: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=scan.index)
    out["optimizer"] = scan["optimizer"]
    out["lr"] = [format_value(v) for v in scan["lr"]]
    out["status"] = [f"diverged (step {int(s)})" if st == "diverged" and not pd.isna(s) else str(st)
                     for st, s in zip(scan["status"], scan["diverged_step"])]
    out["val accuracy"] = [format_value(v, "acc") if st == "completed" else "—" for v, st in zip(scan["val_acc"], scan["status"])]
    out["test accuracy"] = [format_value(v, "acc") if st == "completed" else "—" for v, st in zip(scan["test_acc"], scan["status"])]
    out["peak r"] = [format_value(v) for v in scan["peak_r"]]
    return out[SCAN_MD]


@dataclass(frozen=True)
class RhoScanAnalysis(BaseAnalysis):
    def tables(self, data: AnalysisData) -> dict[str, Table]:
        scan = scan_table(data.runs)
        view = _scan_view(scan)
        scan = pd.concat([scan, view.drop(columns=[c for c in view.columns if c in scan.columns])], axis=1)
        return {"rho_lr_scan": (scan, SCAN_MD), "rho_lr_scan_choice": (choice_table(scan_table(data.runs), data.params), None)}

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        return {"rho_lr_scan.png": lambda: _figure(data)}

    def section(self, report: "ReportData") -> str:
        return section(report)


def _figure(fd: "FigureData") -> "Figure":
    from .. import plots as P

    scan = scan_table(fd.runs)
    if scan.empty:
        raise P.NoData("no scan runs")
    opts = list(dict.fromkeys(scan["optimizer"]))
    fig, axes = P.figure(2, len(opts), w=3.6, h=2.8)
    axes = np.asarray(axes).reshape(2, len(opts))
    for j, opt in enumerate(opts):
        g = scan[scan["optimizer"] == opt]
        c = choose(g)
        ok = g[g["status"] == "completed"]
        bad = g[g["status"] != "completed"]
        ax = axes[0, j]
        ax.plot(ok["lr"], ok["val_acc"], "o-", color="C0", label="completed")
        ax.plot(bad["lr"], np.zeros(len(bad)), "x", color="C3", label="diverged")
        for lr, name in ((c["safe"], "safe"), (c["borderline"], "borderline"), (c["unstable"], "unstable")):
            if not math.isnan(lr):
                ax.axvline(lr, color="0.5", lw=0.8, ls="--")
                ax.text(lr, 0.02, name, rotation=90, fontsize=7, va="bottom", ha="right", color="0.3")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(str(opt), fontsize=9)
        ax.set_ylabel("final val accuracy" if j == 0 else "")
        if j == 0:
            ax.legend(fontsize=7, loc="center left")
        ax = axes[1, j]
        pk = g[np.isfinite(g["peak_r"])]
        ax.plot(pk["lr"], pk["peak_r"], "o-", color="C1")
        ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("peak r (fixed mode)" if j == 0 else "")
    fig.suptitle("rho_lr_scan: the short scan behind the rho studies' LRs (seed 7)", fontsize=10)
    return fig


def section(rd: "ReportData") -> str:
    lines = [f"## {rd.title}", "", rd.comment(), ""]
    if "rho_lr_scan" not in rd.table_names:
        return "\n".join(lines + ["No scan runs yet.", ""])
    scan, choice = rd.table("rho_lr_scan"), rd.table("rho_lr_scan_choice")
    lines += [
        "How the momentum and Adam studies' three learning rates were chosen (issue #11 item 3): each base optimizer "
        "in the controller's `fixed` mode (the optimizer unchanged, rho and r only measured) at every LR of a "
        "half-decade grid, on the seed setup with seed 7. The rule: b is the largest LR whose run completed with final "
        f"validation accuracy within {format_value(WITHIN * 100)} points of the scan's best; the LRs are b/10 (safe), "
        "b (borderline) and 10·b (unstable). Plain SGD's study keeps the seed setup's LRs (0.05, 0.5, 5), shown here "
        "against the rule for comparison.", ""]
    for _, r in choice.iterrows():
        if pd.isna(r["b"]):
            lines.append(f"- **{r['optimizer']}**: no completed run; the rule cannot choose.")
            continue
        s = (f"- **{r['optimizer']}**: best validation accuracy {format_value(r['best_val_acc'], 'acc')} at LR "
             f"{format_value(r['best_lr'])}; b = {format_value(r['b'])}; the rule's LRs "
             f"{format_value(r['safe'])}, {format_value(r['borderline'])}, {format_value(r['unstable'])}")
        conf = r.get("configured_lrs")
        if isinstance(conf, str) and conf:
            s += f"; `{r['configured_study']}` runs {', '.join(conf.split())}"
            s += " (the rule's)." if r["agrees"] == "yes" else " (**not** the rule's choice)."
        else:
            s += "."
        lines.append(s)
    lines += ["", markdown_table(scan[SCAN_MD]), ""]
    lines += rd.figure_lines([("rho_lr_scan.png", "rho_lr_scan: final validation accuracy and peak r against the LR")])
    lines += [f"Tables: {rd.table_links(['rho_lr_scan.csv', 'rho_lr_scan_choice.csv'])}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


ANALYSIS = RhoScanAnalysis(name="rho_scan", title="The short LR scan behind the rho studies", order=11)
