"""Modular manifolds (issue #12 items 5, 6 and 8): Muon, sphere and Stiefel constraints, per-role optimizers.

Studies (``analysis: modular``): ``modular_ns`` (AdamW vs Muon with 3 and 5 Newton-Schulz steps on
the MLP), ``modular_presets`` (the five presets on the MLP), ``modular_gpt`` (the five presets on
``gpt_modern``); each reads its runs' metrics.json, curves.csv and layers.csv (probes
``grad_rank``, ``ns_diag``, ``weight_spectrum``, ``constraint``). Missing studies, probes or
curves leave their tables empty.

Tables (every median [IQR] is over seeds, :func:`optlab.stats.spread`):

- ``modular_results``: per study and method, train/test loss and accuracy (LM: validation loss,
  perplexity), throughput (tokens/s or examples/s, over the epochs after the first: the first
  holds the warm-up), mean gradient effective rank over training.
- ``modular_verdict``: relative difference of the final test loss of each method against the
  study's reference (its verdict's reference: ``baseline_adamw``, ``adamw`` for ``modular_ns``),
  ``mean(method) / mean(reference) - 1`` over paired seeds, with the paired bootstrap interval of
  :func:`optlab.stats.paired_ratio_interval` (expanded percentile, 95%). Verdict word for "lower
  loss than the reference": ``yes`` when the whole interval is below 0, ``no`` when it is above 0,
  otherwise (or with fewer than 2 pairs) ``inconclusive``; never ``yes`` inside the noise.
- ``modular_steps_to_target``: steps until the validation accuracy first reaches
  :data:`TARGET_ACC` (classification studies; validation is measured at epoch ends, so this is a
  step count at epoch resolution), median [IQR] over the seeds that reached it.
- ``modular_lm``: the LM study at step :data:`EARLY_STEP` and at the end: the loss at step 20
  (the validation loss when the run evaluated there, else the training loss curve's point at step
  20, the mean of the steps since the previous log point: the column ``loss@20 metric`` says
  which), final validation loss, perplexity, tokens/s; the relative loss difference against the
  reference at step 20 for seed 0 alone (the published protocol: one seed, 20 steps), at step 20
  over all seeds and at the end over all seeds, each with its interval; ``misleads``: ``yes`` when
  the single-seed 20-step difference lies outside the all-seed end-of-training interval.
- ``modular_throughput``: the throughput cost of each constraint, ``1 - mean(with) / mean(without)``
  of tokens/s (LM) or examples/s over paired seeds, with its interval, for the pairs of
  :data:`PAIRS` present. Only ``modular_stiefel`` vs ``baseline_muon`` (and ``full_modular`` vs
  ``muon`` when run) differ by the constraint alone; the other pairs also change an optimizer and
  say so in ``also differs``.
- ``modular_role_rank``: per study, method and role (input, hidden, output), the gradient effective
  rank (``grad_erank``) and that of ``NS(G)`` (``ns_grad_erank``, Muon layers), each run's mean over
  its layers of that role and its measurements, then median [IQR] over seeds.
- ``modular_layer_rank``: the same per layer number (``grad_erank`` only; CSV, not in the README).
- ``modular_ns_diag`` / ``modular_ns_recommend``: NS diagnostics per role and step count (angle
  between G and NS(G), ``||G - NS(G)||_F / ||G||_F``, orthogonality error), each run's mean, then
  the median over runs; the recommended step count per role is **our own rule**: the smallest
  ``k`` whose median orthogonality error has made at least 90% of the reduction from ``k = 1`` to
  the best ``k`` measured (the quintic does not converge to 0, so "at the plateau", not "at 0").
- ``modular_published``: the study's labeled published claims (``published`` in summary.json)
  beside our corresponding number.

Figures: ``modular_loss_<study>.png`` (training loss per method, median and IQR over seeds) and
``modular_grad_erank_<study>.png`` (gradient effective rank over training, one panel per role).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import pandas as pd

from ... import stats
from ..aggregate import Table, format_value, markdown_table, read_csv, slug, sweep_runs
from . import AnalysisData, BaseAnalysis
from . import modular_more as M

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..plots import FigureData
    from ..report import ReportData

STUDIES = ("modular_ns", "modular_presets", "modular_gpt", "modular_bf16", "modular_roles", "modular_lr")
METHODS = ("adamw", "muon_ns3", "muon_ns5", "muon", "baseline_adamw", "baseline_muon", "modular_sphere",
           "modular_stiefel", "full_modular", "role_muon_input", "role_muon_hidden", "role_muon_output", "role_muon_all",
           "muon_lr_global", "muon_lr_depth", "muon_lr_grad_norm", "muon_lr_adaptive")
ROLES = ("input", "hidden", "output")
DEFAULT_REFERENCE = {"modular_ns": "adamw"}
FALLBACK_REFERENCE = "baseline_adamw"
TARGET_ACC = 0.9
EARLY_STEP = 20
NS_KS = (1, 2, 3, 5, 10)
RECOMMEND_FRACTION = 0.9
PAIRS = (  # (constraint, with, without, what else differs)
    ("Stiefel (hidden)", "modular_stiefel", "baseline_muon", ""),
    ("sphere + Stiefel", "full_modular", "muon", ""),
    ("sphere (input)", "full_modular", "modular_stiefel", "input optimizer AdamW instead of Muon"),
    ("sphere (input)", "modular_sphere", "baseline_muon", "input AdamW instead of Muon; output Muon instead of AdamW"),
    ("sphere + Stiefel", "full_modular", "baseline_muon", "input optimizer AdamW instead of Muon"),
)
RUN_COLS = ["study", "dataset", "method", "seed", "depth", "status", "run_dir", "lm", "train_loss", "test_loss", "train_acc",
            "test_acc", "val_loss", "val_ppl", "test_ppl", "throughput", "throughput_unit", "grad_erank_mean",
            "wall_time_s"]
RESULT_METRICS = {"train_loss": "train loss", "test_loss": "test loss", "train_acc": "train acc", "test_acc": "test acc",
                  "val_loss": "val loss", "val_ppl": "val perplexity", "throughput": "throughput",
                  "grad_erank_mean": "grad eff. rank (mean)"}
RESULTS_MD = ["study", "method", "runs", *RESULT_METRICS.values()]
VERDICT_MD = ["study", "method", "reference", "metric", "pairs", "rel. loss diff [95% CI]", "lower loss?"]
TARGET_MD = ["study", "method", "target", "reached", "steps to target median [IQR]"]
LM_MD = ["method", "runs", "loss@20 metric", "loss@20 median [IQR]", "val loss (end) median [IQR]",
         "val perplexity (end)", "tokens/s", "diff@20 seed 0", "diff@20 all seeds [CI]", "diff end [CI]", "misleads"]
THROUGHPUT_MD = ["study", "constraint", "with", "without", "also differs", "unit", "pairs", "cost [95% CI]",
                 "published"]
LAYER_MD = ["study", "method", "layer", "role", "runs", "grad eff. rank median [IQR]"]
ROLE_MD = ["study", "method", "role", "runs", "grad eff. rank median [IQR]", "NS(G) eff. rank median [IQR]"]
NS_MD = ["study", "role", "k", "runs", "angle (rad)", "rel. diff", "orth. error"]
RECOMMEND_MD = ["study", "role", "recommended NS steps", "orth. error at k", "orth. error at k=5", "angle at k",
                "NS(G)/G eff. rank"]
PUBLISHED_MD = ["study", "claim", "published (reference)", "ours"]


# ---------------------------------------------------------------- small helpers


# shared with modular_more (the cells, the per-seed series and the "lower loss?" word)
_spread_cell, _pct, _interval_cell, _by_seed = M.spread_cell, M.pct, M.interval_cell, M.by_seed


def _rank(m: Any) -> int:
    return METHODS.index(m) if m in METHODS else len(METHODS)


def _method_key(m: Any) -> tuple:
    return (_rank(m), str(m))


def _study_rank(s: Any) -> tuple:
    return (STUDIES.index(s) if s in STUDIES else len(STUDIES), str(s))


rel_diff = M.lower_loss


def references(data: AnalysisData | None, studies: Iterable[str]) -> dict[str, str]:
    """study -> reference method: the verdict spec's reference, else the defaults above."""
    given = {}
    if data is not None:
        for s in data.slices:
            if s.verdict is not None:
                given.setdefault(s.study, s.verdict.reference)
    return {st: given.get(st, DEFAULT_REFERENCE.get(st, FALLBACK_REFERENCE)) for st in studies}


# ---------------------------------------------------------------- the runs


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per sweep run of the modular studies, with the numbers the tables use."""
    sw = sweep_runs(runs) if len(runs) else runs
    if not len(sw):
        return pd.DataFrame(columns=RUN_COLS)
    df = sw.copy()

    def num(col: str) -> pd.Series:
        return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, index=df.index)

    out = pd.DataFrame({c: df[c] if c in df else np.nan for c in ("study", "dataset", "method", "seed", "status", "run_dir")})
    for c in ("train_loss", "test_loss", "train_acc", "test_acc", "val_loss", "val_ppl", "test_ppl", "grad_erank_mean",
              "wall_time_s"):
        out[c] = num(c)
    tok = num("tokens_per_s")
    out["lm"] = tok.notna() | out["val_ppl"].notna()
    # after the warm-up epoch only (aggregate.steady_throughput): NaN for a run of one epoch
    out["throughput"] = num("throughput_steady")
    out["throughput_unit"] = np.where(out["lm"], "tokens/s", "examples/s")
    out["seed"] = pd.to_numeric(out["seed"], errors="coerce")
    out["depth"] = num("depth")
    return out[RUN_COLS].reset_index(drop=True)


def results_table(rt: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (study, method), g in rt.groupby(["study", "method"], sort=False):
        done = g[g["status"] == "completed"]
        row: dict[str, Any] = {"study": study, "method": method, "n": len(g), "n_completed": len(done),
                               "runs": f"{len(done)} of {len(g)} completed"}
        for col, words in RESULT_METRICS.items():
            s = stats.spread(done[col].to_numpy(dtype=float))
            row |= {f"{col}_median": s.median, f"{col}_q25": s.q25, f"{col}_q75": s.q75}
            cell = _spread_cell(done[col], col)
            if col == "throughput" and cell != "n/a":
                cell += f" {g['throughput_unit'].iloc[0]}"
            row[words] = cell
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=RESULTS_MD)
    rows.sort(key=lambda r: (_study_rank(r["study"]), _rank(r["method"]), str(r["method"])))
    return pd.DataFrame(rows)


def verdict_table(rt: pd.DataFrame, refs: dict[str, str], metric: str = "test_loss") -> pd.DataFrame:
    rows = []
    for study, g in rt.groupby("study", sort=False):
        ref = refs.get(study, FALLBACK_REFERENCE)
        r = g[g["method"] == ref]
        if r.empty:
            continue
        for method in sorted(set(g["method"]) - {ref}, key=lambda m: (_rank(m), str(m))):
            d = rel_diff(_by_seed(g[g["method"] == method], metric), _by_seed(r, metric))
            rows.append({"study": study, "method": method, "reference": ref, "metric": metric, "pairs": d["pairs"],
                         "rel_diff": d["estimate"], "rel_diff_low": d["low"], "rel_diff_high": d["high"],
                         "verdict": d["verdict"], "rel. loss diff [95% CI]": _interval_cell(d["estimate"], d["low"], d["high"]),
                         "lower loss?": d["verdict"]})
    if not rows:
        return pd.DataFrame(columns=VERDICT_MD)
    rows.sort(key=lambda r: (_study_rank(r["study"]), _rank(r["method"])))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- curves


def read_series(rt: pd.DataFrame, base: Path | None, name: str) -> pd.DataFrame:
    """Every run's ``curves.csv`` or ``layers.csv`` (``name``) with its run_dir (empty without a base)."""
    frames = []
    if base is not None:
        for run_dir in rt["run_dir"].dropna().unique():
            f = read_csv(base / str(run_dir) / name)
            if f is not None and len(f):
                f.insert(0, "run_dir", run_dir)
                frames.append(f)
    cols = ["run_dir", "step", "epoch", "metric", "value"] if name == "curves.csv" else \
        ["run_dir", "step", "epoch", "layer", "role", "metric", "value"]
    if not frames:
        return pd.DataFrame(columns=cols)
    out = pd.concat(frames, ignore_index=True)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    out["step"] = pd.to_numeric(out["step"], errors="coerce")
    return out


def curve_at(curves: pd.DataFrame, metric: str, step: int) -> pd.Series:
    """run_dir -> the value of ``metric`` at ``step`` (runs without such a row are absent)."""
    c = curves[(curves["metric"] == metric) & (curves["step"] == step)]
    return c.groupby("run_dir")["value"].last()


def steps_to_target(rt: pd.DataFrame, curves: pd.DataFrame, target: float = TARGET_ACC) -> pd.DataFrame:
    rows = []
    acc = curves[curves["metric"] == "val_acc"]
    first = acc[acc["value"] >= target].groupby("run_dir")["step"].min()
    for (study, method), g in rt[~rt["lm"].astype(bool)].groupby(["study", "method"], sort=False):
        have = g[g["run_dir"].isin(acc["run_dir"])]
        if have.empty:
            continue
        reached = first.reindex(have["run_dir"]).dropna().to_numpy(dtype=float)
        s = stats.spread(reached)
        rows.append({"study": study, "method": method, "target": target, "n": len(have), "n_reached": len(reached),
                     "steps_median": s.median, "steps_q25": s.q25, "steps_q75": s.q75,
                     "reached": f"{len(reached)} of {len(have)}", "steps to target median [IQR]": _spread_cell(reached)})
    if not rows:
        return pd.DataFrame(columns=TARGET_MD)
    rows.sort(key=lambda r: (_study_rank(r["study"]), _rank(r["method"])))
    return pd.DataFrame(rows)


def lm_table(rt: pd.DataFrame, curves: pd.DataFrame, refs: dict[str, str], step: int = EARLY_STEP) -> pd.DataFrame:
    """The LM study at ``step`` and at the end (see the module docstring)."""
    lm = rt[rt["lm"].astype(bool)]
    rows = []
    for study, g in lm.groupby("study", sort=False):
        val20, tr20 = curve_at(curves, "val_loss", step), curve_at(curves, "train_loss", step)
        use_val = len(val20.reindex(g["run_dir"]).dropna()) == len(g)
        early_metric = "val_loss" if use_val else "train_loss"
        early = val20 if use_val else tr20  # a run that diverged after step 20 keeps its step-20 value
        g = g.assign(early=early.reindex(g["run_dir"]).to_numpy(dtype=float))
        ref = refs.get(study, FALLBACK_REFERENCE)
        r = g[g["method"] == ref]
        r_end, r_early = _by_seed(r, "val_loss"), pd.Series(r["early"].to_numpy(), index=r["seed"].to_numpy())
        for method, h in sorted(g.groupby("method", sort=False), key=lambda kv: (_rank(kv[0]), str(kv[0]))):
            done = h[h["status"] == "completed"]
            m_early = pd.Series(h["early"].to_numpy(), index=h["seed"].to_numpy())
            row: dict[str, Any] = {"study": study, "method": method, "reference": ref, "early_metric": early_metric,
                                   "step": step, "n": len(h), "runs": f"{len(done)} of {len(h)} completed",
                                   "loss@20 metric": f"{early_metric} at step {step}",
                                   "loss@20 median [IQR]": _spread_cell(h["early"]),
                                   "val loss (end) median [IQR]": _spread_cell(done["val_loss"]),
                                   "val perplexity (end)": _spread_cell(done["val_ppl"]),
                                   "tokens/s": _spread_cell(done["throughput"])}
            s = stats.spread(h["early"].to_numpy(dtype=float))
            row |= {"early_median": s.median, "end_median": stats.spread(done["val_loss"].to_numpy(dtype=float)).median}
            if method == ref:
                row |= {"diff@20 seed 0": "reference", "diff@20 all seeds [CI]": "reference", "diff end [CI]": "reference",
                        "misleads": "—"}
            else:
                single = math.nan
                if 0 in m_early.index and 0 in r_early.index and r_early[0] > 0:
                    single = float(m_early[0] / r_early[0] - 1.0)
                e20, end = rel_diff(m_early, r_early), rel_diff(_by_seed(h, "val_loss"), r_end)
                mis = ("n/a" if not (math.isfinite(single) and math.isfinite(end["low"]))
                       else "yes" if not end["low"] <= single <= end["high"] else "no")
                row |= {"single_seed_diff20": single, "diff20": e20["estimate"], "diff20_low": e20["low"],
                        "diff20_high": e20["high"], "diff20_verdict": e20["verdict"], "diff_end": end["estimate"],
                        "diff_end_low": end["low"], "diff_end_high": end["high"], "diff_end_verdict": end["verdict"],
                        "diff@20 seed 0": _pct(single),
                        "diff@20 all seeds [CI]": f"{_interval_cell(e20['estimate'], e20['low'], e20['high'])} {e20['verdict']}",
                        "diff end [CI]": f"{_interval_cell(end['estimate'], end['low'], end['high'])} {end['verdict']}",
                        "misleads": mis}
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=LM_MD)
    return pd.DataFrame(rows)


def throughput_table(rt: pd.DataFrame, published: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    rows = []
    for study, g in rt.groupby("study", sort=False):
        present = set(g["method"])
        pub = _claim(published.get(study, {}) if published else {}, "stiefel")
        for constraint, with_, without, also in PAIRS:
            if with_ not in present or without not in present:
                continue
            a, b = _by_seed(g[g["method"] == with_], "throughput"), _by_seed(g[g["method"] == without], "throughput")
            ri = stats.paired_ratio_interval(a, b, direction="up")
            cost, lo, hi = 1.0 - ri.estimate, 1.0 - ri.high, 1.0 - ri.low
            rows.append({"study": study, "constraint": constraint, "with": with_, "without": without,
                         "also differs": also or "nothing (the constraint alone)", "exact": not also,
                         "unit": g["throughput_unit"].iloc[0], "pairs": ri.n_pairs, "cost": cost, "cost_low": lo,
                         "cost_high": hi, "cost [95% CI]": _cost_cell(cost, lo, hi),
                         "published": pub if constraint == "Stiefel (hidden)" and pub else "—"})
    if not rows:
        return pd.DataFrame(columns=THROUGHPUT_MD)
    rows.sort(key=lambda r: _study_rank(r["study"]))
    return pd.DataFrame(rows)


def _cost_cell(cost: float, lo: float, hi: float) -> str:
    return M.interval_cell(cost, lo, hi, signed=False)


# ---------------------------------------------------------------- layer rows


def _run_role_means(layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    f = layers[layers["metric"] == metric]
    return f.groupby(["run_dir", "role"], sort=False)["value"].mean().reset_index()


def role_rank_table(rt: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    g_r, n_r = _run_role_means(layers, "grad_erank"), _run_role_means(layers, "ns_grad_erank")
    if g_r.empty:
        return pd.DataFrame(columns=ROLE_MD)
    info = rt[["run_dir", "study", "method", "seed"]]
    g_r, n_r = g_r.merge(info, on="run_dir"), n_r.merge(info, on="run_dir")
    rows = []
    for (study, method, role), h in g_r.groupby(["study", "method", "role"], sort=False):
        ns = n_r[(n_r["study"] == study) & (n_r["method"] == method) & (n_r["role"] == role)]["value"]
        s, sn = stats.spread(h["value"].to_numpy(dtype=float)), stats.spread(ns.to_numpy(dtype=float))
        rows.append({"study": study, "method": method, "role": role, "n": len(h), "erank_median": s.median,
                     "erank_q25": s.q25, "erank_q75": s.q75, "ns_erank_median": sn.median, "runs": len(h),
                     "grad eff. rank median [IQR]": _spread_cell(h["value"]),
                     "NS(G) eff. rank median [IQR]": _spread_cell(ns) if len(ns) else "— (not Muon)"})
    rows.sort(key=lambda r: (_study_rank(r["study"]), _rank(r["method"]), ROLES.index(r["role"]) if r["role"] in ROLES else 9))
    return pd.DataFrame(rows)


def layer_rank_table(rt: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """Per study, method and layer number: each run's mean ``grad_erank`` over its measurements,
    then median [IQR] over seeds."""
    f = layers[layers["metric"] == "grad_erank"]
    if f.empty:
        return pd.DataFrame(columns=LAYER_MD)
    per_run = f.groupby(["run_dir", "layer", "role"], sort=False)["value"].mean().reset_index()
    per_run = per_run.merge(rt[["run_dir", "study", "method"]], on="run_dir")
    rows = []
    for (study, method, layer, role), h in per_run.groupby(["study", "method", "layer", "role"], sort=False):
        s = stats.spread(h["value"].to_numpy(dtype=float))
        rows.append({"study": study, "method": method, "layer": int(layer), "role": role, "runs": len(h),
                     "erank_median": s.median, "erank_q25": s.q25, "erank_q75": s.q75,
                     "grad eff. rank median [IQR]": _spread_cell(h["value"])})
    rows.sort(key=lambda r: (_study_rank(r["study"]), _rank(r["method"]), r["layer"]))
    return pd.DataFrame(rows)


def ns_tables(rt: pd.DataFrame, layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    f = layers[layers["metric"].astype(str).str.match(r"^ns_(angle|rel_diff|orth_err)@k=\d+$")]
    if f.empty:
        return pd.DataFrame(columns=NS_MD), pd.DataFrame(columns=RECOMMEND_MD)
    parts = f["metric"].astype(str).str.extract(r"^ns_(angle|rel_diff|orth_err)@k=(\d+)$")
    f = f.assign(quantity=parts[0].to_numpy(), k=parts[1].astype(int).to_numpy())
    per_run = f.groupby(["run_dir", "role", "quantity", "k"], sort=False)["value"].mean().reset_index()
    per_run = per_run.merge(rt[["run_dir", "study"]], on="run_dir")
    med = per_run.groupby(["study", "role", "quantity", "k"])["value"].median().unstack("quantity").reset_index()
    n = per_run.groupby(["study", "role", "k"])["run_dir"].nunique().rename("runs").reset_index()
    diag = med.merge(n, on=["study", "role", "k"])
    for q in ("angle", "rel_diff", "orth_err"):
        if q not in diag:
            diag[q] = np.nan
    diag = diag.sort_values(["study", "role", "k"], key=lambda s: s.map(_sort_key)).reset_index(drop=True)
    diag["angle (rad)"], diag["rel. diff"], diag["orth. error"] = diag["angle"], diag["rel_diff"], diag["orth_err"]
    g_r, n_r = _run_role_means(layers, "grad_erank"), _run_role_means(layers, "ns_grad_erank")
    gain = g_r.merge(n_r, on=["run_dir", "role"], suffixes=("_g", "_n")).merge(rt[["run_dir", "study"]], on="run_dir")
    gain["ratio"] = gain["value_n"] / gain["value_g"]
    rec = []
    for (study, role), h in diag.groupby(["study", "role"], sort=False):
        k = recommend(h["k"].to_numpy(dtype=int), h["orth_err"].to_numpy(dtype=float))
        at = h.set_index("k")
        gr = gain[(gain["study"] == study) & (gain["role"] == role)]["ratio"].to_numpy(dtype=float)
        rec.append({"study": study, "role": role, "recommended_k": k, "recommended NS steps": k,
                    "orth. error at k": at["orth_err"].get(k, np.nan) if k is not None else np.nan,
                    "orth. error at k=5": at["orth_err"].get(5, np.nan), "angle at k": at["angle"].get(k, np.nan) if k else np.nan,
                    "NS(G)/G eff. rank": _spread_cell(gr) if len(gr) else "n/a"})
    return diag, (pd.DataFrame(rec) if rec else pd.DataFrame(columns=RECOMMEND_MD))


def _sort_key(v: Any) -> Any:
    if v in STUDIES:
        return STUDIES.index(v)
    if v in ROLES:
        return ROLES.index(v)
    return v


def recommend(ks: np.ndarray, err: np.ndarray, fraction: float = RECOMMEND_FRACTION) -> int | None:
    """The smallest ``k`` whose orthogonality error has made ``fraction`` of the reduction from the
    smallest ``k`` to the best ``k`` (our rule, see the module docstring); None without data."""
    ok = np.isfinite(err)
    if not ok.any():
        return None
    ks, err = ks[ok], err[ok]
    order = np.argsort(ks)
    ks, err = ks[order], err[order]
    best, start = err.min(), err[0]
    bar = start - fraction * (start - best)
    return int(ks[np.nonzero(err <= bar + 1e-12)[0][0]])


# ---------------------------------------------------------------- published claims


def published_claims(slices: Iterable[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in slices:
        for k, v in getattr(s, "published", ()) or ():
            out.setdefault(s.study, {}).setdefault(str(k), v)
    return out


def _claim(claims: dict[str, Any], word: str) -> str:
    for k, v in claims.items():
        if word in k.lower():
            return f"{k}: {v}"
    return ""


def published_table(claims: dict[str, dict[str, Any]], verdict: pd.DataFrame, lm: pd.DataFrame,
                    throughput: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for study in sorted(claims, key=_study_rank):
        for label, value in claims[study].items():
            rows.append({"study": study, "claim": label, "published (reference)": str(value),
                         "ours": _ours(study, label.lower(), verdict, lm, throughput)})
    return pd.DataFrame(rows, columns=PUBLISHED_MD)


def _row(df: pd.DataFrame, **kv: Any) -> pd.Series | None:
    if df.empty:
        return None
    m = np.ones(len(df), dtype=bool)
    for k, v in kv.items():
        if k not in df:
            return None
        m &= (df[k] == v).to_numpy()
    return df[m].iloc[0] if m.any() else None


def _ours(study: str, label: str, verdict: pd.DataFrame, lm: pd.DataFrame, thr: pd.DataFrame) -> str:
    if "sphere" in label:
        parts = []
        r = _row(lm, study=study, method="modular_sphere")
        if r is not None and "diff20" in r:
            parts.append(f"step 20: seed 0 {_pct(r['single_seed_diff20'])}, all seeds "
                         f"{_interval_cell(r['diff20'], r['diff20_low'], r['diff20_high'])} ({r['diff20_verdict']}); "
                         f"end: {_interval_cell(r['diff_end'], r['diff_end_low'], r['diff_end_high'])} ({r['diff_end_verdict']})")
        v = _row(verdict, study=study, method="modular_sphere")
        if v is not None:
            parts.append(f"final test loss vs {v['reference']}: {v['rel. loss diff [95% CI]']} ({v['verdict']})")
        return "; ".join(parts) or "n/a (no modular_sphere runs)"
    if "stiefel" in label:
        r = _row(thr, study=study, constraint="Stiefel (hidden)", exact=True)
        if r is None:
            return "n/a (no modular_stiefel / baseline_muon pair)"
        return f"throughput cost {r['cost [95% CI]']} ({r['unit']}, {r['with']} vs {r['without']})"
    if "combin" in label or "stack" in label:
        full = _row(verdict, study=study, method="full_modular")
        singles = [_row(verdict, study=study, method=m) for m in ("modular_sphere", "modular_stiefel")]
        singles = [s for s in singles if s is not None]
        if full is None or not singles:
            return "n/a (needs full_modular and a single-constraint preset)"
        best = min(singles, key=lambda s: s["rel_diff"] if math.isfinite(s["rel_diff"]) else math.inf)
        stacks = ("stacks (full_modular's interval lies below the better single constraint's estimate)"
                  if math.isfinite(full["rel_diff_high"]) and full["rel_diff_high"] < best["rel_diff"]
                  else "does not stack beyond the better single constraint")
        return (f"full_modular {full['rel. loss diff [95% CI]']} vs {best['method']} {best['rel. loss diff [95% CI]']} "
                f"(test loss vs {full['reference']}): {stacks}")
    return "—"


# ---------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class ModularAnalysis(BaseAnalysis):
    def tables(self, data: AnalysisData) -> dict[str, Table]:
        from .rho.tables import runs_base

        rt = run_table(data.runs)
        base = runs_base(data)
        curves, layers = read_series(rt, base, "curves.csv"), read_series(rt, base, "layers.csv")
        return build_tables(rt, curves, layers, references(data, rt["study"].dropna().unique()),
                            published_claims(data.slices), data.slices)

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        rt = run_table(data.runs)
        out: dict[str, Callable[[], "Figure"]] = {}
        grid = M.grid_studies(rt)
        for study in sorted(rt["study"].dropna().unique(), key=_study_rank):
            if study in grid:  # 6g: one LR carried across depth
                out[f"modular_lr_{slug(study)}.png"] = lambda s=study: M.lr_figure(data, rt, s, _method_key)
                continue
            out[f"modular_loss_{slug(study)}.png"] = lambda s=study: _loss_figure(data, s)
            out[f"modular_grad_erank_{slug(study)}.png"] = lambda s=study: _erank_figure(data, s)
            out[f"modular_spectra_{slug(study)}.png"] = lambda s=study: _layers_figure(data, s, "spectra")
            out[f"modular_sv_{slug(study)}.png"] = lambda s=study: _layers_figure(data, s, "sv")
            out[f"modular_ns_steps_{slug(study)}.png"] = lambda s=study: _layers_figure(data, s, "ns")
        return out

    def section(self, report: "ReportData") -> str:
        return section(report)


def build_tables(rt: pd.DataFrame, curves: pd.DataFrame, layers: pd.DataFrame, refs: dict[str, str],
                 claims: dict[str, dict[str, Any]], slices: Iterable[Any] = ()) -> dict[str, Table]:
    """Every table of the analysis from frames (runs, curves and layers with ``run_dir``). Studies
    with a depth grid (``modular_lr``) are reported per depth (``modular_lr_scaling``) and left out
    of the flat tables, which pair runs by seed alone."""
    grid = M.grid_studies(rt)
    lr_scaling = M.lr_scaling_table(rt, refs, _method_key)
    rt = rt[~rt["study"].isin(grid)]
    verdict = verdict_table(rt, refs)
    lm = lm_table(rt, curves, refs)
    thr = throughput_table(rt, claims)
    diag, rec = ns_tables(rt, layers)
    ns_dyn, ns_gain = M.ns_dynamics_tables(rt, layers)
    benefit, role_rec = M.role_benefit_tables(rt, refs, rec)
    more = {"modular_spectra": (M.spectra_table(rt, layers), M.SPECTRA_MD),
            "modular_ns_dynamics": (ns_dyn, M.NS_DYN_MD), "modular_ns_gain": (ns_gain, M.NS_GAIN_MD),
            "modular_role_benefit": (benefit, M.BENEFIT_MD), "modular_role_recommend": (role_rec, M.RECOMMEND_MD),
            "modular_lr_scaling": (lr_scaling, M.LR_MD), "modular_bf16": (M.bf16_table(rt), M.BF16_MD),
            "modular_skipped": (M.skipped_table(slices), M.SKIPPED_MD)}
    return more | {"modular_results": (results_table(rt), RESULTS_MD), "modular_verdict": (verdict, VERDICT_MD),
            "modular_steps_to_target": (steps_to_target(rt, curves), TARGET_MD),
            "modular_lm": (lm, ["study", *LM_MD]), "modular_throughput": (thr, THROUGHPUT_MD),
            "modular_role_rank": (role_rank_table(rt, layers), ROLE_MD),
            "modular_layer_rank": (layer_rank_table(rt, layers), LAYER_MD), "modular_ns_diag": (diag, NS_MD),
            "modular_ns_recommend": (rec, RECOMMEND_MD),
            "modular_published": (published_table(claims, verdict, lm, thr), PUBLISHED_MD)}


# ---------------------------------------------------------------- figures


def _fig_series(fd: "FigureData", study: str, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rt = run_table(fd.runs)
    rt = rt[rt["study"] == study]
    base = fd.root.resolve().parent if fd.root is not None else None
    if base is not None:
        return rt, read_series(rt, base, name)
    src = fd.curves if name == "curves.csv" else fd.layer_rows
    if src is None or not len(src):
        return rt, pd.DataFrame(columns=["run_dir", "step", "metric", "value", "role"])
    return rt, src[src["run_dir"].isin(rt["run_dir"])]


def _band(ax: Any, frame: pd.DataFrame, color: Any, label: str) -> None:
    st = frame.groupby("step")["value"].agg([("median", "median"), ("q25", lambda s: s.quantile(0.25)),
                                             ("q75", lambda s: s.quantile(0.75))]).reset_index()
    ax.plot(st["step"], st["median"], color=color, lw=1.2, label=label)
    ax.fill_between(st["step"], st["q25"], st["q75"], color=color, alpha=0.2, lw=0)


def _loss_figure(fd: "FigureData", study: str) -> "Figure":
    from .. import plots as P

    rt, curves = _fig_series(fd, study, "curves.csv")
    tr = curves[curves["metric"] == "train_loss"].merge(rt[["run_dir", "method"]], on="run_dir")
    if tr.empty:
        raise P.NoData(f"no loss curves for {study}")
    fig, axes = P.figure(1, 1, w=5.0, h=3.4)
    ax = np.atleast_1d(axes).ravel()[0]
    for method in sorted(tr["method"].unique(), key=lambda m: (_rank(m), str(m))):
        _band(ax, tr[tr["method"] == method], fd.palette.get(method), method)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (median, IQR over seeds)")
    ax.legend(fontsize=7)
    fig.suptitle(f"{study}: training loss per preset", fontsize=10)
    return fig


def _erank_figure(fd: "FigureData", study: str) -> "Figure":
    rt, layers = _fig_series(fd, study, "layers.csv")
    return M.role_bands_figure(fd, rt, layers, "grad_erank", "gradient effective rank",
                               f"{study}: gradient effective rank over training, per role (median, IQR)", _band, _method_key)


def _layers_figure(fd: "FigureData", study: str, kind: str) -> "Figure":
    """6d/6e figures of one study from its layers.csv rows: ``spectra`` (top-1 energy over
    training per role), ``sv`` (hidden-layer spectra at the last step), ``ns`` (NS diagnostics
    against the step count)."""
    rt, layers = _fig_series(fd, study, "layers.csv")
    if kind == "spectra":
        return M.spectra_figure(fd, rt, layers, study, _band, _method_key)
    if kind == "sv":
        return M.sv_figure(fd, rt, layers, study, _method_key)
    diag, _ = ns_tables(rt, layers)
    return M.ns_steps_figure(fd, diag, study)


# ---------------------------------------------------------------- the README section


def _has(rd: "ReportData", name: str) -> bool:
    return name in rd.table_names


def section(rd: "ReportData") -> str:
    lines = [f"## {rd.title}", "", rd.comment(), ""]
    if not _has(rd, "modular_results"):
        return "\n".join(lines + ["No runs yet.", ""])
    res = rd.table("modular_results")
    if res.empty:
        return "\n".join(lines + ["No runs yet.", ""])
    lines += [
        "Issue #12. Per-role optimizers and constraints: AdamW vs Muon (3 and 5 Newton-Schulz steps) on the MLP "
        "(`modular_ns`); the five presets (baseline_adamw, baseline_muon, modular_sphere, modular_stiefel, "
        "full_modular) on the MLP (`modular_presets`) and on the GPT variant with RMSNorm, SwiGLU and a tied "
        "embedding (`modular_gpt`), and under bf16 autocast (`modular_bf16`, GPU only); Muon on one role at a "
        "time against AdamW everywhere (`modular_roles`); one global Muon LR against depth-scaled, "
        "gradient-norm-aware and per-layer adaptive scaling, carried across depth (`modular_lr`). Fixed LRs, "
        "medians [IQR] over seeds; relative differences use a paired bootstrap 95% interval, and *lower loss?* "
        "is yes only when the whole interval is below 0.", ""]
    verdict = rd.table("modular_verdict") if _has(rd, "modular_verdict") else pd.DataFrame()
    if len(verdict):
        lines.append("**Findings** (final test loss against each study's reference):")
        for _, r in verdict.iterrows():
            word = {"yes": "lower than", "no": "higher than", "inconclusive": "not distinguishable from"}[str(r["verdict"])]
            lines.append(f"- {r['study']}: {r['method']} — {word} {r['reference']}: "
                         f"{r['rel. loss diff [95% CI]']} over {int(r['pairs'])} paired seeds.")
        lines.append("")
    pub = rd.table("modular_published") if _has(rd, "modular_published") else pd.DataFrame()
    if len(pub):
        lines += ["#### The published claims beside ours", "",
                  "The claims are quoted as labeled references (their 42M GPT, their data); ours are from this "
                  "pipeline's runs at the current profile.", "", markdown_table(pub[PUBLISHED_MD], max_chars=400), ""]
    lines += ["#### Loss, accuracy and throughput", "", markdown_table(res[RESULTS_MD]), ""]
    if len(verdict):
        lines += ["#### Relative loss difference against the reference", "", markdown_table(verdict[VERDICT_MD]), ""]
    for name, title, cols in (
            ("modular_lm", f"The GPT at step {EARLY_STEP} and at the end", ["study", *LM_MD]),
            ("modular_steps_to_target", f"Steps to {100 * TARGET_ACC:.0f}% validation accuracy", TARGET_MD),
            ("modular_throughput", "Throughput cost of each constraint", THROUGHPUT_MD),
            ("modular_role_rank", "Gradient effective rank per role", ROLE_MD),
            ("modular_ns_recommend", "Newton-Schulz steps per role (recommendation)", RECOMMEND_MD)):
        t = rd.table(name) if _has(rd, name) else pd.DataFrame()
        if t.empty:
            continue
        lines += [f"#### {title}", ""]
        if name == "modular_lm":
            mis = t[t["misleads"] == "yes"]["method"].tolist() if "misleads" in t else []
            lines += [("The single-seed 20-step difference lies outside the all-seed end-of-training interval for: "
                       + ", ".join(mis) + " (**the published protocol misleads there**).") if mis else
                      "The single-seed 20-step differences lie inside the all-seed end-of-training intervals "
                      "(where defined).", ""]
        if name == "modular_throughput":
            lines += ["Cost = 1 - throughput with / without the constraint, paired by seed; rows whose *also "
                      "differs* is not empty change an optimizer too. Timings come from a shared CPU and are noisy.", ""]
        if name == "modular_ns_recommend":
            lines += [f"Our rule: the smallest k whose median orthogonality error made {100 * RECOMMEND_FRACTION:.0f}% "
                      "of the reduction from k = 1 to the best k measured (the quintic plateaus, it does not reach 0). "
                      "NS(G)/G: how much the orthogonalization raises the gradient's effective rank.", ""]
        lines += [markdown_table(t[[c for c in cols if c in t.columns]], max_chars=200), ""]
    lines += more_sections(rd)
    figs = []
    for study in rd.studies:
        figs += [(f"modular_loss_{slug(study)}.png", f"{study}: training loss per preset"),
                 (f"modular_grad_erank_{slug(study)}.png", f"{study}: gradient effective rank per role"),
                 (f"modular_spectra_{slug(study)}.png", f"{study}: top-1 singular-value energy of the weights over training"),
                 (f"modular_sv_{slug(study)}.png", f"{study}: hidden-layer singular values at the last step"),
                 (f"modular_ns_steps_{slug(study)}.png", f"{study}: Newton-Schulz diagnostics against the step count"),
                 (f"modular_lr_{slug(study)}.png", f"{study}: test loss against depth per LR scaling")]
    lines += rd.figure_lines(figs)
    names = [n for n in ("modular_results", "modular_verdict", "modular_lm", "modular_steps_to_target",
                         "modular_throughput", "modular_role_rank", "modular_layer_rank", "modular_ns_diag", "modular_ns_recommend",
                         "modular_spectra", "modular_ns_dynamics", "modular_ns_gain", "modular_role_benefit",
                         "modular_role_recommend", "modular_lr_scaling", "modular_bf16", "modular_skipped",
                         "modular_published") if _has(rd, n)]
    lines += [f"Tables: {rd.table_links([f'{n}.csv' for n in names])}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _table(rd: "ReportData", name: str) -> pd.DataFrame:
    return rd.table(name) if _has(rd, name) else pd.DataFrame()


def more_sections(rd: "ReportData") -> list[str]:
    """The README parts for items 6d-6h (see :mod:`optlab.analysis.studies.modular_more`)."""
    lines: list[str] = []
    spectra = _table(rd, "modular_spectra")
    if len(spectra):
        lines += ["#### Spectral dynamics of the weights", "",
                  "From the `weight_spectrum` probe: each run's mean over the layers of a role at its first and at its "
                  "last check, then the median over seeds. Top-1 energy is σ₁² / Σσᵢ² (1: rank one; 1/n: a flat "
                  "spectrum). The projections pin their roles' spectra (Stiefel: every σ = 1, condition number 1).", "",
                  markdown_table(spectra[M.SPECTRA_MD], max_chars=200), ""]
    dyn, gain = _table(rd, "modular_ns_dynamics"), _table(rd, "modular_ns_gain")
    if len(dyn) or len(gain):
        lines += ["#### What Newton-Schulz does to the gradients, over training", ""]
        if len(dyn):
            lines += ["From the `ns_diag` probe on the real gradients at the first and at the last check (medians over "
                      "runs): the angle between G and NS_k(G), ‖G − NS_k(G)‖_F / ‖G‖_F and the orthogonality error of "
                      "NS_k(G), per step count k. NS_k(G) has a Frobenius norm near √min(m, n) whatever the scale of "
                      "G, so the relative difference grows as the gradients shrink during training; the angle and "
                      "the orthogonality error are scale-free.", "", markdown_table(dyn[M.NS_DYN_MD], max_chars=200), ""]
        if len(gain):
            lines += ["How far orthogonalization raises the gradient's effective rank (NS(G) / G, Muon layers), at the "
                      "first and the last check (median [IQR] over seeds):", "",
                      markdown_table(gain[M.NS_GAIN_MD], max_chars=200), ""]
    benefit, rec = _table(rd, "modular_role_benefit"), _table(rd, "modular_role_recommend")
    if len(benefit):
        lines += ["#### Muon per role, and the recommendation", "",
                  "Muon on one role at a time (AdamW on the others) against AdamW everywhere: the relative final test "
                  "loss, paired by seed. The LRs are fixed (Muon 0.02, AdamW 0.003, from a short check of the whole "
                  "network), not tuned per role, so a role's row says how Muon does there at that LR.", "", markdown_table(benefit[M.BENEFIT_MD], max_chars=200), ""]
        if len(rec):
            lines += ["Recommendation per role (**our rule**: Muon where its interval lies below 0, AdamW where above, "
                      "otherwise either; NS steps from the table above, where that study measured them):", "",
                      markdown_table(rec[M.RECOMMEND_MD], max_chars=200), ""]
    lr = _table(rd, "modular_lr_scaling")
    if len(lr):
        words = []
        for (study, method), g in lr[lr["lower loss?"].isin(["yes", "no", "inconclusive"])].groupby(["study", "method"], sort=False):
            counts = g["lower loss?"].value_counts()
            words.append(f"{method}: lower at {counts.get('yes', 0)}, higher at {counts.get('no', 0)}, "
                         f"inconclusive at {counts.get('inconclusive', 0)} of {len(g)} depths")
        lines += ["#### LR scaling across depth", "",
                  "One LR per method, set at depth 4 and carried unchanged to the other depths. `depth`: each of the L "
                  "Muon matrices steps at lr / L (lr 0.08 = 0.02 x 4, so it equals the global LR at depth 4); "
                  "`grad_norm`: each matrix's step scaled by its gradient norm over the mean; `adaptive`: each matrix "
                  "moves by lr x its Frobenius norm (a trust ratio). Relative final test loss against the global LR "
                  "at the same depth, paired by seed.", ""]
        if words:
            lines += ["Summary: " + "; ".join(words) + ".", ""]
        lines += [markdown_table(lr[M.LR_MD], max_chars=200), ""]
    bf16, skipped = _table(rd, "modular_bf16"), _table(rd, "modular_skipped")
    if len(bf16):
        lines += ["#### Low precision (bf16 autocast)", "",
                  f"Each preset of `{M.BF16_STUDY}` against the same preset of `{M.FP32_STUDY}` (fp32), paired by seed.",
                  "", markdown_table(bf16[M.BF16_MD], max_chars=200), ""]
    if len(skipped):
        per = skipped.groupby("study", sort=False)["reason"].first()
        lines += ["Not run here: " + "; ".join(f"`{st}` ({why})" for st, why in per.items()) + ".", ""]
    return lines


ANALYSIS = ModularAnalysis(name="modular", title="Modular manifolds: Muon, sphere and Stiefel constraints, per-role optimizers",
                           order=20, method_order=METHODS)
