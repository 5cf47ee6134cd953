"""Modular manifolds, issue #12 items 6d-6h: the tables and figures beyond the presets' comparison.

Used by :mod:`optlab.analysis.studies.modular` (the ``modular`` analysis); every function takes the
frames that module builds (``run_table`` rows, curves.csv and layers.csv rows with ``run_dir``).

- **6d spectral dynamics** (``modular_spectra``): from the ``weight_spectrum`` probe, per study,
  method and role, each run's mean over its layers of that role of the condition number, the top-1
  singular-value energy ``sigma_1^2 / sum sigma_i^2`` and ``sigma_max``, at its first and at its
  last check; median over seeds of each, and the change. Figures ``modular_spectra_<study>.png``
  (top-1 energy over training per role) and ``modular_sv_<study>.png`` (the hidden layers' full
  singular-value spectra at the last step, median over seeds).
- **6e NS transformation over training** (``modular_ns_dynamics``): from the ``ns_diag`` probe, per
  study, role and step count ``k``, the angle between G and NS_k(G), ``||G - NS_k(G)||_F / ||G||_F``
  and the orthogonality error at the first and the last check (medians over runs), and how far the
  orthogonalization raises the gradient's effective rank (``ns_grad_erank / grad_erank``) at the
  first and last check. Figure ``modular_ns_steps_<study>.png``: orthogonality error against
  ``k`` per role.
- **6f per-component** (``modular_role_benefit``, ``modular_role_recommend``): in the study whose
  methods put Muon on one role at a time (``role_muon_<role>``, AdamW elsewhere), the relative
  final test loss of each against AdamW everywhere (its reference), paired by seed with the
  bootstrap interval of :func:`optlab.stats.paired_ratio_interval`; the recommendation per role is
  **our rule**: Muon where the whole interval is below 0, AdamW where it is above 0, otherwise
  "either (inconclusive)", with the NS step count of ``modular_ns_recommend`` for that study.
- **6g LR scaling** (``modular_lr_scaling``): studies with a depth grid (``modular_lr``), per depth
  and method, the final test loss and accuracy (median [IQR] over seeds) and the relative test loss
  against the study's reference (one global LR) at the same depth, with its interval and word
  (``lower loss?``). Figure ``modular_lr_<study>.png``: test loss against depth per scaling.
- **6h low precision** (``modular_bf16``): each preset of ``modular_bf16`` (bf16 autocast) against
  the same preset of ``modular_gpt`` (fp32), paired by seed: the relative validation loss and the
  tokens/s ratio. A study skipped at this scale or on this machine is listed in
  ``modular_skipped`` with its reason.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd

from ... import stats
from ..aggregate import format_value

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..plots import FigureData

ROLES = ("input", "hidden", "output")
SPECTRA_MD = ["study", "method", "role", "runs", "steps", "cond (first → last)", "top-1 energy (first → last)",
              "σ_max (first → last)"]
NS_DYN_MD = ["study", "role", "k", "runs", "angle (first → last)", "rel. diff (first → last)",
             "orth. error (first → last)"]
NS_GAIN_MD = ["study", "method", "role", "runs", "NS(G)/G eff. rank, first check", "NS(G)/G eff. rank, last check"]
BENEFIT_MD = ["study", "role", "method", "reference", "pairs", "rel. test loss [95% CI]", "lower loss?"]
RECOMMEND_MD = ["study", "role", "optimizer (our rule)", "why", "NS steps"]
LR_MD = ["study", "depth", "method", "runs", "test loss median [IQR]", "test acc median [IQR]", "reference",
         "rel. test loss [95% CI]", "lower loss?"]
BF16_MD = ["preset", "pairs", "val loss fp32 median", "val loss bf16 median", "rel. val loss bf16 vs fp32 [95% CI]",
           "tokens/s bf16 / fp32 [95% CI]"]
SKIPPED_MD = ["study", "method", "reason"]
ROLE_METHOD = re.compile(r"^role_muon_(input|hidden|output)$")
BF16_STUDY, FP32_STUDY = "modular_bf16", "modular_gpt"


def _med(v: Iterable[float]) -> float:
    a = np.asarray(list(v), dtype=float)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if len(a) else math.nan


def _arrow(a: float, b: float, col: str = "") -> str:
    return f"{format_value(a, col)} → {format_value(b, col)}"


def spread_cell(v: Iterable[float], col: str = "") -> str:
    """``median [q25–q75]`` of the finite values (:func:`optlab.stats.spread`), "n/a" without any."""
    s = stats.spread(np.asarray(list(v), dtype=float))
    if s.n == 0:
        return "n/a"
    return f"{format_value(s.median, col)} [{format_value(s.q25, col)}–{format_value(s.q75, col)}]"


def pct(v: float, signed: bool = True) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:{'+' if signed else ''}.1f}%"


def interval_cell(est: float, lo: float, hi: float, signed: bool = True) -> str:
    """``+x.x% [lo, hi]`` (``signed=False``: no plus sign, for costs)."""
    if not math.isfinite(est):
        return "n/a"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{pct(est, signed)} [no interval]"
    return f"{pct(est, signed)} [{pct(lo, signed)}, {pct(hi, signed)}]"


def by_seed(g: pd.DataFrame, col: str) -> pd.Series:
    """``col`` of the completed runs, indexed by seed (the last run of a repeated seed)."""
    g = g[g["status"] == "completed"]
    s = pd.Series(g[col].to_numpy(dtype=float), index=g["seed"].to_numpy())
    return s[~s.index.duplicated(keep="last")]


def lower_loss(method: pd.Series, reference: pd.Series) -> dict[str, Any]:
    """``mean(method) / mean(reference) - 1`` over the seeds both have (Series indexed by seed),
    its paired bootstrap interval and the word for "the method is lower": yes only when the whole
    interval is below 0, no when it is above 0, otherwise (or undefined) inconclusive."""
    ri = stats.paired_ratio_interval(method, reference, direction="up")
    est, lo, hi = ri.estimate - 1.0, ri.low - 1.0, ri.high - 1.0
    word = "inconclusive"
    if ri.defined and hi < 0:
        word = "yes"
    elif ri.defined and lo > 0:
        word = "no"
    return {"estimate": est, "low": lo, "high": hi, "pairs": ri.n_pairs, "verdict": word, "reason": ri.reason}


def grid_studies(rt: pd.DataFrame) -> set[str]:
    """Studies whose runs vary in depth (a depth grid): reported per depth, not in the flat tables."""
    if "depth" not in rt or rt.empty:
        return set()
    n = rt.groupby("study")["depth"].nunique()
    return set(n[n > 1].index)


# ---------------------------------------------------------------- 6d spectral dynamics


def _first_last(f: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per run (and ``keys``), the mean over layers at the first and at the last checked step."""
    per = f.groupby(["run_dir", *keys, "step"], sort=False)["value"].mean().reset_index()
    first = per.loc[per.groupby(["run_dir", *keys])["step"].idxmin()]
    last = per.loc[per.groupby(["run_dir", *keys])["step"].idxmax()]
    return first.merge(last, on=["run_dir", *keys], suffixes=("_first", "_last"))


def _first_last_cells(h: pd.DataFrame, key: str, names: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """For each (value of ``key``, column): the medians over runs at the first and last check, and the cell."""
    out: dict[str, Any] = {}
    for name, col in names:
        m = h[h[key] == name]
        a, b = _med(m["value_first"]), _med(m["value_last"])
        out |= {f"{name}_first": a, f"{name}_last": b, col: _arrow(a, b) if len(m) else "n/a"}
    return out


def spectra_table(rt: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    f = layers[layers["metric"].isin(["cond", "top1_energy", "sv_max"])] if len(layers) else layers
    if f is None or f.empty:
        return pd.DataFrame(columns=SPECTRA_MD)
    # the weight_spectrum probe's runs only (the constraint probe logs an sv_max of its own layers too)
    f = f[f["run_dir"].isin(f.loc[f["metric"] == "cond", "run_dir"])]
    if f.empty:
        return pd.DataFrame(columns=SPECTRA_MD)
    fl = _first_last(f, ["role", "metric"]).merge(rt[["run_dir", "study", "method"]], on="run_dir")
    rows = []
    for (study, method, role), h in fl.groupby(["study", "method", "role"], sort=False):
        row: dict[str, Any] = {"study": study, "method": method, "role": role, "runs": h["run_dir"].nunique(),
                               "steps": f"{int(h['step_first'].min())} → {int(h['step_last'].max())}"}
        row |= _first_last_cells(h, "metric", (("cond", "cond (first → last)"), ("top1_energy", "top-1 energy (first → last)"),
                                                ("sv_max", "σ_max (first → last)")))
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=SPECTRA_MD)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- 6e NS transformation over training


def ns_dynamics_tables(rt: pd.DataFrame, layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    empty = pd.DataFrame(columns=NS_DYN_MD), pd.DataFrame(columns=NS_GAIN_MD)
    if layers is None or layers.empty:
        return empty
    f = layers[layers["metric"].astype(str).str.match(r"^ns_(angle|rel_diff|orth_err)@k=\d+$")]
    rows = []
    if len(f):
        parts = f["metric"].astype(str).str.extract(r"^ns_(angle|rel_diff|orth_err)@k=(\d+)$")
        f = f.assign(quantity=parts[0].to_numpy(), k=parts[1].astype(int).to_numpy())
        fl = _first_last(f, ["role", "quantity", "k"]).merge(rt[["run_dir", "study"]], on="run_dir")
        for (study, role, k), h in fl.groupby(["study", "role", "k"], sort=True):
            row: dict[str, Any] = {"study": study, "role": role, "k": int(k), "runs": h["run_dir"].nunique()}
            row |= _first_last_cells(h, "quantity", (("angle", "angle (first → last)"), ("rel_diff", "rel. diff (first → last)"),
                                                     ("orth_err", "orth. error (first → last)")))
            rows.append(row)
    g = layers[layers["metric"].isin(["grad_erank", "ns_grad_erank"])]
    gain_rows = []
    if len(g):
        per = g.groupby(["run_dir", "role", "step", "metric"])["value"].mean().unstack("metric").reset_index()
        if {"grad_erank", "ns_grad_erank"} <= set(per.columns):
            per = per.dropna(subset=["grad_erank", "ns_grad_erank"])
            per = per.assign(value=per["ns_grad_erank"] / per["grad_erank"])[["run_dir", "role", "step", "value"]]
            fl = _first_last(per, ["role"]).merge(rt[["run_dir", "study", "method"]], on="run_dir")
            for (study, method, role), h in fl.groupby(["study", "method", "role"], sort=False):
                gain_rows.append({"study": study, "method": method, "role": role, "runs": len(h),
                                  "gain_first": _med(h["value_first"]), "gain_last": _med(h["value_last"]),
                                  "NS(G)/G eff. rank, first check": spread_cell(h["value_first"]),
                                  "NS(G)/G eff. rank, last check": spread_cell(h["value_last"])})
    return (pd.DataFrame(rows) if rows else empty[0]), (pd.DataFrame(gain_rows) if gain_rows else empty[1])


# ---------------------------------------------------------------- 6f per-component


def role_benefit_tables(rt: pd.DataFrame, refs: dict[str, str], ns_recommend: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, rec = [], []
    for study, g in rt.groupby("study", sort=False):
        roles = {m: ROLE_METHOD.match(str(m)).group(1) for m in g["method"].unique() if ROLE_METHOD.match(str(m))}
        if not roles:
            continue
        ref = refs.get(study, "baseline_adamw")
        r = by_seed(g[g["method"] == ref], "test_loss")
        if r.empty:
            continue
        for method, role in sorted(roles.items(), key=lambda kv: ROLES.index(kv[1])):
            d = lower_loss(by_seed(g[g["method"] == method], "test_loss"), r)
            rows.append({"study": study, "role": role, "method": method, "reference": ref, "pairs": d["pairs"],
                         "rel_diff": d["estimate"], "rel_diff_low": d["low"], "rel_diff_high": d["high"],
                         "verdict": d["verdict"], "rel. test loss [95% CI]": interval_cell(d["estimate"], d["low"], d["high"]),
                         "lower loss?": d["verdict"]})
            ns = ns_recommend[(ns_recommend["study"] == study) & (ns_recommend["role"] == role)] \
                if len(ns_recommend) and "role" in ns_recommend else pd.DataFrame()
            k = ns["recommended_k"].iloc[0] if len(ns) and "recommended_k" in ns else None
            opt, why = {"yes": ("Muon", "Muon on this role alone lowered the test loss (whole interval below 0)"),
                        "no": ("AdamW", "Muon on this role alone raised the test loss (whole interval above 0)")}.get(
                d["verdict"], ("either (inconclusive)", "the interval straddles 0"))
            rec.append({"study": study, "role": role, "optimizer (our rule)": opt, "why": why,
                        "NS steps": "n/a" if k is None or (isinstance(k, float) and not math.isfinite(k)) else str(int(k))})
    return (pd.DataFrame(rows) if rows else pd.DataFrame(columns=BENEFIT_MD),
            pd.DataFrame(rec) if rec else pd.DataFrame(columns=RECOMMEND_MD))


# ---------------------------------------------------------------- 6g LR scaling across depth


def lr_scaling_table(rt: pd.DataFrame, refs: dict[str, str], rank: Any = str) -> pd.DataFrame:
    rows = []
    for study in sorted(grid_studies(rt)):
        g = rt[rt["study"] == study]
        ref = refs.get(study)
        for depth, h in sorted(g.groupby("depth"), key=lambda kv: float(kv[0])):
            r = by_seed(h[h["method"] == ref], "test_loss") if ref is not None else pd.Series(dtype=float)
            for method, m in sorted(h.groupby("method", sort=False), key=lambda kv: rank(kv[0])):
                done = m[m["status"] == "completed"]
                row: dict[str, Any] = {"study": study, "depth": int(depth), "method": method,
                                       "runs": f"{len(done)} of {len(m)} completed", "reference": ref or "—",
                                       "test_loss_median": _med(done["test_loss"]), "test_acc_median": _med(done["test_acc"]),
                                       "test loss median [IQR]": spread_cell(done["test_loss"]),
                                       "test acc median [IQR]": spread_cell(done["test_acc"])}
                if method == ref or r.empty:
                    row |= {"rel. test loss [95% CI]": "reference" if method == ref else "n/a", "lower loss?": "—"}
                else:
                    d = lower_loss(by_seed(m, "test_loss"), r)
                    row |= {"rel_diff": d["estimate"], "rel_diff_low": d["low"], "rel_diff_high": d["high"],
                            "verdict": d["verdict"], "pairs": d["pairs"],
                            "rel. test loss [95% CI]": interval_cell(d["estimate"], d["low"], d["high"]),
                            "lower loss?": d["verdict"]}
                rows.append(row)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=LR_MD)


# ---------------------------------------------------------------- 6h low precision


def bf16_table(rt: pd.DataFrame) -> pd.DataFrame:
    lo, hi = rt[rt["study"] == BF16_STUDY], rt[rt["study"] == FP32_STUDY]
    rows = []
    for preset, b in lo.groupby("method", sort=False):
        f = hi[hi["method"] == preset]
        if f.empty:
            continue
        loss = lower_loss(by_seed(b, "val_loss"), by_seed(f, "val_loss"))
        thr = stats.paired_ratio_interval(by_seed(b, "throughput"), by_seed(f, "throughput"), direction="up")
        rows.append({"preset": preset, "pairs": loss["pairs"], "val loss fp32 median": format_value(_med(f["val_loss"])),
                     "val loss bf16 median": format_value(_med(b["val_loss"])), "rel_diff": loss["estimate"],
                     "rel. val loss bf16 vs fp32 [95% CI]": f"{interval_cell(loss['estimate'], loss['low'], loss['high'])} "
                                                            f"({'lower' if loss['verdict'] == 'yes' else 'higher' if loss['verdict'] == 'no' else 'inconclusive'})",
                     "speedup": thr.estimate,
                     "tokens/s bf16 / fp32 [95% CI]": "n/a" if not math.isfinite(thr.estimate) else
                     f"{thr.estimate:.2f}x [{thr.low:.2f}x, {thr.high:.2f}x]"})
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=BF16_MD)


def skipped_table(slices: Iterable[Any]) -> pd.DataFrame:
    rows = [{"study": s.study, "method": getattr(s, "method", ""), "reason": s.skipped}
            for s in slices if getattr(s, "skipped", None)]
    return pd.DataFrame(rows, columns=SKIPPED_MD)


# ---------------------------------------------------------------- figures


def role_bands_figure(fd: "FigureData", rt: pd.DataFrame, layers: pd.DataFrame, metric: str, ylabel: str, title: str,
                      band: Any, rank: Any) -> "Figure":
    """One panel per role: ``metric`` of layers.csv over training (each run's layer mean), a median
    and IQR band per method."""
    from .. import plots as P

    f = layers[layers["metric"] == metric] if len(layers) else layers
    if f is None or f.empty:
        raise P.NoData(f"no {metric} rows ({title})")
    f = f.groupby(["run_dir", "step", "role"])["value"].mean().reset_index().merge(rt[["run_dir", "method"]], on="run_dir")
    roles = [r for r in ROLES if r in set(f["role"])] or sorted(f["role"].unique())
    fig, axes = P.figure(1, len(roles), w=3.4, h=3.0)
    axes = np.atleast_1d(axes).ravel()
    for ax, role in zip(axes, roles):
        g = f[f["role"] == role]
        for method in sorted(g["method"].unique(), key=rank):
            band(ax, g[g["method"] == method], fd.palette.get(method), method)
        ax.set_title(role, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return fig


def spectra_figure(fd: "FigureData", rt: pd.DataFrame, layers: pd.DataFrame, study: str, band: Any, rank: Any) -> "Figure":
    return role_bands_figure(fd, rt, layers, "top1_energy", "top-1 energy σ₁² / Σσᵢ² (layer mean)",
                             f"{study}: spectral concentration of the weights over training (median, IQR over seeds)",
                             band, rank)


def sv_figure(fd: "FigureData", rt: pd.DataFrame, layers: pd.DataFrame, study: str, rank: Any) -> "Figure":
    from .. import plots as P

    f = layers[layers["metric"].astype(str).str.startswith("sv@") & (layers["role"] == "hidden")] if len(layers) else layers
    if f is None or f.empty:
        raise P.NoData(f"no final spectra for {study}")
    f = f.assign(i=f["metric"].astype(str).str[3:].astype(int))
    per = f.groupby(["run_dir", "i"])["value"].mean().reset_index().merge(rt[["run_dir", "method"]], on="run_dir")
    fig, axes = P.figure(1, 1, w=5.0, h=3.4)
    ax = np.atleast_1d(axes).ravel()[0]
    for method in sorted(per["method"].unique(), key=rank):
        m = per[per["method"] == method].groupby("i")["value"].median()
        ax.plot(m.index + 1, m.to_numpy(), color=fd.palette.get(method), lw=1.2, label=method)
    ax.set_xlabel("singular value index i (1 = largest)")
    ax.set_ylabel("σᵢ of the hidden layers (mean over layers, median over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.suptitle(f"{study}: hidden-layer singular values at the last step", fontsize=10)
    return fig


def ns_steps_figure(fd: "FigureData", ns_diag: pd.DataFrame, study: str) -> "Figure":
    from .. import plots as P

    d = ns_diag[ns_diag["study"] == study] if len(ns_diag) else ns_diag
    if d is None or d.empty:
        raise P.NoData(f"no ns_diag rows for {study}")
    fig, axes = P.figure(1, 2, w=3.6, h=3.0)
    axes = np.atleast_1d(axes).ravel()
    for role in [r for r in ROLES if r in set(d["role"])]:
        g = d[d["role"] == role].sort_values("k")
        axes[0].plot(g["k"], g["orth_err"], marker="o", lw=1.2, label=role)
        axes[1].plot(g["k"], g["angle"], marker="o", lw=1.2, label=role)
    axes[0].set_ylabel("orthogonality error ‖OᵀO − I‖_F")
    axes[1].set_ylabel("angle between G and NS_k(G) (rad)")
    for ax in axes:
        ax.set_xlabel("Newton-Schulz steps k")
        ax.set_xticks(sorted(d["k"].unique()))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{study}: what Newton-Schulz does to real gradients, per role (median over runs)", fontsize=10)
    return fig


def lr_figure(fd: "FigureData", rt: pd.DataFrame, study: str, rank: Any) -> "Figure":
    from .. import plots as P

    g = rt[(rt["study"] == study) & (rt["status"] == "completed")]
    if g.empty:
        raise P.NoData(f"no completed runs for {study}")
    fig, axes = P.figure(1, 1, w=5.0, h=3.4)
    ax = np.atleast_1d(axes).ravel()[0]
    for method in sorted(g["method"].unique(), key=rank):
        m = g[g["method"] == method].groupby("depth")["test_loss"]
        med, q25, q75 = m.median(), m.quantile(0.25), m.quantile(0.75)
        color = fd.palette.get(method)
        ax.plot(med.index, med.to_numpy(), marker="o", color=color, lw=1.2, label=method)
        ax.fill_between(med.index, q25.to_numpy(), q75.to_numpy(), color=color, alpha=0.2, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("final test loss (median, IQR over seeds)")
    ax.legend(fontsize=7)
    fig.suptitle(f"{study}: one LR carried across depth, per LR scaling", fontsize=10)
    return fig
