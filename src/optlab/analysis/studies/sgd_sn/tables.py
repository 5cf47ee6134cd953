"""The SGD + spectral-norm study's tables: the verdict with its advantages, the projection
against plain SGD (``sn_vs_sgd``), depth tolerance, the ablation and the context-length cost
study (depth-to-failure is the core's)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from ...aggregate import (
    TRAINABLE_MARGIN,
    SliceSummary,
    Table,
    VerdictSpec,
    ablation_runs,
    best_lr_table,
    best_runs,
    chance_level,
    cost_studies,
    depth_to_failure_table,
    failure_text,
    isna,
    match,
    maybe_int,
    median_mad,
    paired_verdict_table,
    read_ablation_order,
    sweep_runs,
    verdict_specs,
)

DEFAULT_SPEC = VerdictSpec("sgd_sn", "adam", "test_acc", 0.95, "up")
"""The study's question, for slices whose summary.json predates the ``verdict`` spec."""

ADVANTAGES = ("wall_time", "seconds_per_epoch", "memory", "depth_tolerance", "epochs_to_90")
"""Advantage metrics of the verdict, in the order they are listed."""

QUESTION_ADVANTAGES = ("wall_time", "memory", "depth_tolerance")
"""The advantages the study's question names: reach the bar while winning on one of these."""

MEM_BASES = (("peak", "peak_mem_mb"), ("step", "step_mem_mb"))
"""Memory measures in order of preference (``mem_basis``); ``state`` (``state_mem_mb``) is the fallback."""

BASELINE = "sgd"
"""The plain-SGD method of the verdict studies: what the projection is compared with in
``sn_vs_sgd``, and the stateless optimizer that tells a memory advantage of the projected
method apart from one any optimizer without state has."""

PROJECTED = "sgd_sn"
"""The optimizer whose methods ``sn_vs_sgd`` compares with :data:`BASELINE`."""


def tables(data: Any) -> dict[str, Table]:
    """verdict, sn_vs_sgd (only where some verdict task has the projected method and plain sgd),
    depth_to_failure, ablation, depth_tolerance and context (see each function)."""
    runs, best = data.runs, data.best
    dtf = depth_to_failure_table(runs, data.summaries, best)
    specs = data.specs(DEFAULT_SPEC)
    from ..rho.tables import runs_base

    verdict = verdict_table(runs, best, specs, failure_depths=dtf, slices=data.slices, base=runs_base(data))
    out: dict[str, Table] = {"verdict": (verdict, verdict_md_columns(verdict))}
    sn = sn_vs_sgd_table(runs, best, verdict)
    if len(sn):
        out["sn_vs_sgd"] = (sn, SN_VS_SGD_MD)
    out.update({
        "depth_to_failure": (dtf, None),
        "ablation": (ablation_table(runs, read_ablation_order(data.params)), None),
        "depth_tolerance": (depth_tolerance_table(runs, best), None),
        "context": (context_table(runs), None),
    })
    return out


# ---------------------------------------------------------------- the verdict


def verdict_table(
    runs: pd.DataFrame,
    best: pd.DataFrame | None = None,
    specs: Mapping[str, VerdictSpec] | VerdictSpec | None = None,
    *,
    failure_depths: pd.DataFrame | None = None,
    slices: Iterable[SliceSummary] = (),
    n_resamples: int | None = None,
    base: Path | None = None,
) -> pd.DataFrame:
    """Per task (study, dataset, grid point): the core's paired verdict
    (:func:`..aggregate.paired_verdict_table`: ratio, its paired bootstrap interval, medians and
    IQRs, ``reaches_bar`` yes / no / inconclusive) plus the study's advantages.

    ``specs``: study -> spec, one spec for every study, or None (the summaries' specs, else
    :data:`DEFAULT_SPEC`); a spec that compares a method with itself (a one-method study's
    default spec) has no verdict and is left out with a warning. Studies with different specs
    each get their spec's columns (``<method>_lr``, ``<reference>_lr``, ...), NaN in the other
    studies' rows. Advantage metrics hold for the method when strictly better:
    ``wall_time`` and ``seconds_per_epoch`` (lower beyond the spread over completed seeds: the
    bands median ± MAD, the median absolute deviation, do not overlap; the medians are
    reported with ``_mad`` beside them, overlapping bands are a ``tie``; the MAD rather than
    the IQR, so that one seed slowed by a shared machine widens neither side's band), ``memory``
    (lower mean peak CUDA memory when both have it, else lower profiled-step peak, else lower
    training-state size; ``memory_stateless`` is true where plain sgd, which keeps no optimizer
    state, is below the reference on the same basis too, i.e. the advantage is one any
    stateless optimizer has, not the projection's), ``depth_tolerance`` (a deeper deepest-trainable depth in the
    study/dataset, from :func:`depth_to_failure_table`, with the reference failing at or before
    it) and ``epochs_to_90`` (every completed seed reached 90% validation accuracy, in fewer
    epochs on average or where the reference did not). ``answer``: ``no`` when the bar is not
    reached or no question advantage (wall time, memory, depth tolerance) holds, else the
    bar's answer (``yes``, or ``inconclusive`` when the interval straddles the bar).
    Studies marked ``verdict: false`` (cost studies) are left out.
    """
    slices = list(slices)
    best = best_lr_table(runs, slices) if best is None else best
    if failure_depths is None:
        failure_depths = depth_to_failure_table(runs, best=best)
    cost = cost_studies(runs, slices)
    studies = sorted(s for s in best["study"].dropna().unique() if s not in cost) if len(best) else []
    if specs is None:
        given = verdict_specs(slices)
        specs = {s: given.get(s, DEFAULT_SPEC) for s in studies}
    elif isinstance(specs, VerdictSpec):
        specs = {s: specs for s in studies}
    groups: dict[VerdictSpec, list[str]] = {}
    for study in studies:
        if study not in specs:
            continue
        if specs[study].method == specs[study].reference:
            # "method reaches x% of itself" asks nothing, and its columns would be named twice
            warnings.warn(f"study {study}: the verdict compares {specs[study].method} with itself; "
                          "left out of the verdict", stacklevel=2)
            continue
        groups.setdefault(specs[study], []).append(study)
    kw = {} if n_resamples is None else {"n_resamples": n_resamples}
    frames = []
    for spec, group in groups.items():
        extra = _advantage_columns(spec, failure_depths, best, base)
        f = paired_verdict_table(runs, best, spec, studies=group, extra=extra, **kw)
        frames.append(_answers(f, spec))
    frames = [f for f in frames if len(f)] or frames[:1]
    if not frames:
        return _answers(paired_verdict_table(runs, best.iloc[0:0], DEFAULT_SPEC), DEFAULT_SPEC)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    for c in ("depth", *(c for c in df.columns if c.endswith("_deepest"))):
        df[c] = maybe_int(df[c])
    return df


def verdict_md_columns(v: pd.DataFrame) -> list[str]:
    """The columns of verdict.md (per spec's method and reference names)."""
    cols = ["study", "dataset", "point"]
    specs = v[["method", "reference", "metric"]].drop_duplicates().itertuples(index=False) if len(v) else [
        (DEFAULT_SPEC.method, DEFAULT_SPEC.reference, DEFAULT_SPEC.metric)]
    for m, r, x in specs:
        cols += [f"{m}_lr", f"{r}_lr", f"{m}_{x}", f"{r}_{x}"]
    cols += ["ratio_of_means", "ratio_lo", "ratio_hi", "ratio_median", "ratio_q25", "ratio_q75", "n_pairs", "bar",
             "reaches_bar", "seeds_needed"]
    for m, r, _ in (v[["method", "reference", "metric"]].drop_duplicates().itertuples(index=False) if len(v) else
                    [(DEFAULT_SPEC.method, DEFAULT_SPEC.reference, DEFAULT_SPEC.metric)]):
        cols += [f"{m}_wall_time_s", f"{r}_wall_time_s", f"{m}_seconds_per_epoch", f"{r}_seconds_per_epoch", "mem_basis",
                 f"{m}_mem_mb", f"{r}_mem_mb", f"{m}_deepest", f"{r}_deepest", f"{m}_epochs_to_90",
                 f"{r}_epochs_to_90", f"{m}_test_bpb", f"{r}_test_bpb", f"{m}_sn_violations", f"{m}_val_last_change",
                 f"{r}_val_last_change"]
    return list(dict.fromkeys([*cols, "plain_sgd_mem_mb", "memory_stateless", "advantages", "answer"]))


def _advantage_columns(spec: VerdictSpec, dtf: pd.DataFrame, best: pd.DataFrame | None = None,
                       base: Path | None = None):
    m, r = spec.method, spec.reference

    def extra(task: dict[str, Any], a: pd.Series, b: pd.Series, ra: pd.DataFrame, rb: pd.DataFrame) -> dict[str, Any]:
        basis, mem_a, mem_b = mem_pair(a, b)
        deep_a, deep_b, deeper = _deeper(dtf, task["study"], task["dataset"], m, r)
        ta, tb = a.get("wall_time_s_median", math.nan), b.get("wall_time_s_median", math.nan)
        ea, eb = a.get("seconds_per_epoch_median", math.nan), b.get("seconds_per_epoch_median", math.nan)
        times = {}
        for col in ("wall_time_s", "seconds_per_epoch"):
            sa, sb = time_spread(ra, col), time_spread(rb, col)
            times[col] = _lower_outside_spread(sa, sb, m, r)
            times.update({f"{m}_{col}_mad": sa[2], f"{r}_{col}_mad": sb[2]})
        mem_lower = _lower(mem_a, mem_b, m, r)
        plain = _plain_sgd_memory(best, task, basis, m, r)
        return {
            # times: medians over completed seeds; an advantage only where the median ± MAD bands do not
            # overlap (one seed slowed by a shared machine, or a difference inside the run-to-run spread, does not decide)
            f"{m}_wall_time_s": ta, f"{r}_wall_time_s": tb, "time_lower": times.pop("wall_time_s"),
            f"{m}_seconds_per_epoch": ea, f"{r}_seconds_per_epoch": eb, "epoch_time_lower": times.pop("seconds_per_epoch"),
            **times,
            # CUDA allocator peak where both measured it, else the profiled step peak (CPU), else the state size
            "mem_basis": basis, f"{m}_mem_mb": mem_a, f"{r}_mem_mb": mem_b,
            f"{m}_peak_mem_mb": a.get("peak_mem_mb_mean", math.nan), f"{r}_peak_mem_mb": b.get("peak_mem_mb_mean", math.nan),
            f"{m}_state_mem_mb": a.get("state_mem_mb_mean", math.nan),
            f"{r}_state_mem_mb": b.get("state_mem_mb_mean", math.nan),
            "mem_lower": mem_lower,
            # plain sgd (no optimizer state) on the same basis: is the memory advantage the projection's?
            "plain_sgd_mem_mb": plain,
            "memory_stateless": bool(mem_lower == m and pd.notna(plain) and pd.notna(mem_b) and plain < mem_b),
            f"{m}_deepest": deep_a, f"{r}_deepest": deep_b, "depth_deeper": deeper,
            # median over the seeds that reached 90% (n_reached_90 of n_completed)
            f"{m}_epochs_to_90": a.get("epochs_to_90_median", math.nan),
            f"{r}_epochs_to_90": b.get("epochs_to_90_median", math.nan),
            f"{m}_n_reached_90": a.get("n_reached_90", math.nan), f"{r}_n_reached_90": b.get("n_reached_90", math.nan),
            "e90_fewer": _fewer_epochs(a, b, m, r),
            f"{m}_test_bpb": a.get("test_bpb_mean", math.nan), f"{r}_test_bpb": b.get("test_bpb_mean", math.nan),
            # fraction of steps at which the projection changed a weight (0: the method was plain SGD)
            f"{m}_sn_active_frac": a.get("sn_active_frac_mean", math.nan),
            **_strictness(ra, m),
            **_sigma_growth(ra, m, base),
            # has each side's validation curve flattened? mean last-epoch change of the selection metric
            f"{m}_val_last_change": _completed_mean(ra, "val_last_change"),
            f"{r}_val_last_change": _completed_mean(rb, "val_last_change"),
            **_lm_reference(ra, rb, m, r),
        }

    return extra


def _completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"].astype(str) == "completed"] if "status" in runs else runs


def _completed_mean(runs: pd.DataFrame, col: str) -> float:
    x = pd.to_numeric(_completed(runs)[col], errors="coerce") if col in runs else pd.Series(dtype=float)
    return float(x.mean()) if x.notna().any() else math.nan


def _strictness(runs: pd.DataFrame, m: str) -> dict[str, Any]:
    """The projection's record in the method's selected runs: layer-checks above 1 + tol summed
    over runs (``sn_violations``), the largest σ_max any check saw, and whether the projection
    is strict by construction (nan where the method does not project)."""
    viol = pd.to_numeric(runs["sn_violations"], errors="coerce") if "sn_violations" in runs else pd.Series(dtype=float)
    smax = pd.to_numeric(runs["sigma_max_max"], errors="coerce") if "sigma_max_max" in runs else pd.Series(dtype=float)
    strict = runs["sn_strict"].dropna() if "sn_strict" in runs else pd.Series(dtype=object)
    return {
        f"{m}_sn_violations": int(viol.sum()) if viol.notna().any() else math.nan,
        f"{m}_sigma_max_max": float(smax.max()) if smax.notna().any() else math.nan,
        f"{m}_sn_strict": (bool(strict.map(_truthy).all()) if len(strict) else math.nan),
    }


def _sigma_growth(runs: pd.DataFrame, m: str, base: Path | None) -> dict[str, Any]:
    """How σ_max of the projected layers moved in the method's completed selected runs (from their
    layers.csv ``sigma_max`` rows of the roles in ``sn_roles``): the mean over runs of the largest
    σ_max at the first and at the last check, those checks' steps, and the growth per 100 steps
    (nan without layer files, e.g. where the runs root is not found)."""
    keys = (f"{m}_sigma_first", f"{m}_sigma_last_check", f"{m}_sigma_first_step", f"{m}_sigma_last_step",
            f"{m}_sigma_growth_per_100")
    out = dict.fromkeys(keys, math.nan)
    if base is None or "run_dir" not in runs:
        return out
    firsts, lasts, s0, s1 = [], [], [], []
    for _, run in _completed(runs).iterrows():
        path = Path(base) / str(run["run_dir"]) / "layers.csv"
        if not path.is_file():
            continue
        f = pd.read_csv(path)
        if not {"metric", "step", "value"} <= set(f.columns):  # a legacy wide layers.csv: no check history
            continue
        f = f[f["metric"] == "sigma_max"]
        roles = [r.strip() for r in str(run.get("sn_roles", "")).strip("[]").replace("'", "").replace('"', "").split(",") if r.strip()]
        if roles and "role" in f:
            f = f[f["role"].isin(roles)]
        if f.empty:
            continue
        top = f.groupby("step")["value"].max().sort_index()
        firsts.append(float(top.iloc[0]))
        lasts.append(float(top.iloc[-1]))
        s0.append(int(top.index[0]))
        s1.append(int(top.index[-1]))
    if not firsts:
        return out
    a, b, t0, t1 = float(np.mean(firsts)), float(np.mean(lasts)), int(np.median(s0)), int(np.median(s1))
    rate = 100.0 * (b - a) / (t1 - t0) if t1 > t0 else math.nan
    return dict(zip(keys, (a, b, t0, t1, rate)))


def _truthy(x: Any) -> bool:
    return str(x).strip().lower() in ("true", "1", "1.0", "yes")


def _lm_reference(ra: pd.DataFrame, rb: pd.DataFrame, m: str, r: str) -> dict[str, Any]:
    """Language models: the data's entropy floor, the order-k count model's test accuracy and
    bits per token (from the runs' records), and each side's mean test loss in bits per token."""
    both = pd.concat([ra, rb])
    if "ngram_test_acc" not in both and "entropy_floor_bits" not in both:
        return {}

    def first(col: str) -> float:
        x = pd.to_numeric(both[col], errors="coerce").dropna() if col in both else pd.Series(dtype=float)
        return float(x.iloc[0]) if len(x) else math.nan

    out = {"entropy_floor_bits": first("entropy_floor_bits"), "ngram_order": first("ngram_order"),
           "ngram_test_acc": first("ngram_test_acc"), "ngram_test_bits": first("ngram_test_bits")}
    for o, runs in ((m, ra), (r, rb)):
        out[f"{o}_test_bits"] = _completed_mean(runs, "test_loss") / math.log(2)
    return out


def _answers(df: pd.DataFrame, spec: VerdictSpec) -> pd.DataFrame:
    m = spec.method
    df = df.copy()
    adv, ans = [], []
    for _, row in df.iterrows():
        held = {
            "wall_time": row.get("time_lower") == m, "seconds_per_epoch": row.get("epoch_time_lower") == m,
            "memory": row.get("mem_lower") == m, "depth_tolerance": row.get("depth_deeper") == m,
            "epochs_to_90": row.get("e90_fewer") == m,
        }
        adv.append(" ".join(k for k in ADVANTAGES if held[k]) or "none")
        bar = str(row.get("reaches_bar"))
        ans.append("no" if bar == "no" or not any(held[k] for k in QUESTION_ADVANTAGES) else bar)
    df["advantages"], df["answer"] = adv, ans
    return df


def mem_pair(a: pd.Series | Mapping, b: pd.Series | Mapping) -> tuple[str, float, float]:
    """(basis, memory of a, memory of b): ``peak`` (CUDA allocator peak) where both recorded it,
    else ``step`` (peak of one profiled training step, CPU), else ``state`` (training-state size)."""
    for basis, col in MEM_BASES:
        pa, pb = a.get(f"{col}_mean", math.nan), b.get(f"{col}_mean", math.nan)
        if pd.notna(pa) and pd.notna(pb):
            return basis, float(pa), float(pb)
    sa, sb = a.get("state_mem_mb_mean", math.nan), b.get("state_mem_mb_mean", math.nan)
    return "state", float(sa) if pd.notna(sa) else math.nan, float(sb) if pd.notna(sb) else math.nan


def time_spread(chosen: pd.DataFrame, col: str) -> tuple[int, float, float]:
    """(n, median, MAD) of ``col`` over the completed runs of a configuration (its seeds); the
    MAD is the median absolute deviation from the median (NaN without values)."""
    done = _completed(chosen)
    return median_mad(pd.to_numeric(done[col], errors="coerce").to_numpy(dtype=float) if col in done else [])


def _lower_outside_spread(sa: tuple[int, float, float], sb: tuple[int, float, float], na: str, nb: str) -> str:
    """Which side is lower beyond the spread over seeds: its band median ± MAD lies wholly below
    the other's (``tie`` when the bands overlap, ``n/a`` without values on both sides)."""
    (n_a, med_a, mad_a), (n_b, med_b, mad_b) = sa, sb
    if n_a == 0 or n_b == 0:
        return "n/a"
    return na if med_a + mad_a < med_b - mad_b else nb if med_b + mad_b < med_a - mad_a else "tie"


def _plain_sgd_memory(best: pd.DataFrame | None, task: Mapping[str, Any], basis: str, m: str, r: str) -> float:
    """Plain sgd's memory in the task on ``basis`` (NaN when it is one of the two sides, absent,
    or lacks that measure)."""
    if best is None or BASELINE in (m, r) or not len(best):
        return math.nan
    row = match(best, **task, method=BASELINE)
    if row.empty:
        return math.nan
    col = dict(MEM_BASES).get(basis, "state_mem_mb")
    v = row.iloc[0].get(f"{col}_mean", math.nan)
    return float(v) if pd.notna(v) else math.nan


def _deeper(dtf: pd.DataFrame, study: Any, dataset: Any, m: str, r: str) -> tuple[Any, Any, str]:
    """Deepest trainable depths of m and r in a study/dataset and which is deeper (or tie / n/a).

    m is deeper only where r demonstrably failed at or before m's deepest depth (a slice that was
    not run as deep proves nothing), and symmetrically.
    """
    if dtf is None or dtf.empty:
        return pd.NA, pd.NA, "n/a"
    d = match(dtf, study=study, dataset=dataset)
    d = d[d["axis"] == "depth"]
    rows = {o: d[d["method"] == o] for o in (m, r)}
    if any(v.empty for v in rows.values()):
        return pd.NA, pd.NA, "n/a"
    da, db = (rows[o].iloc[0]["deepest_trained"] for o in (m, r))
    fa, fb = (rows[o].iloc[0]["first_failing"] for o in (m, r))
    na, nb = isna(da), isna(db)
    if na and nb:
        return pd.NA, pd.NA, "n/a"
    if not na and (nb or float(da) > float(db)):
        return da, db, m if pd.notna(fb) and float(fb) <= float(da) else "n/a"
    if not nb and (na or float(db) > float(da)):
        return da, db, r if pd.notna(fa) and float(fa) <= float(db) else "n/a"
    return da, db, "tie"


def _fewer_epochs(a: pd.Series, b: pd.Series, m: str, r: str) -> str:
    """Who reaches 90% validation accuracy sooner: a side whose every completed seed reached it
    against one where some seed did not, else (both every seed) the lower median epoch."""
    def every(x: pd.Series) -> bool | None:
        n, k = x.get("n_completed", math.nan), x.get("n_reached_90", math.nan)
        if isna(n) or isna(k) or int(n) == 0:
            return None  # not recorded
        return int(k) == int(n)

    fa, fb = every(a), every(b)
    if fa is None or fb is None or not (fa or fb):
        return "n/a"  # not recorded, or neither reached 90% on every completed seed
    if fa != fb:
        return m if fa else r
    return _lower(a.get("epochs_to_90_median", math.nan), b.get("epochs_to_90_median", math.nan), m, r)


def _lower(a: float, b: float, na: str, nb: str) -> str:
    if pd.isna(a) or pd.isna(b):
        return "n/a"
    return na if a < b else nb if b < a else "tie"


# ---------------------------------------------------------------- the projection against plain SGD

SN_VS_SGD_COLS = [
    "study", "dataset", "depth", "point", "task", "method", "metric", "direction", "method_lr", "sgd_lr",
    "method_lr_edge", "sgd_lr_edge", "same_lr", "method_mean", "sgd_mean", "method_median", "method_q25", "method_q75",
    "sgd_median", "sgd_q25", "sgd_q75", "diff", "diff_lo", "diff_hi", "diff_median", "diff_q25", "diff_q75", "n_pairs",
    "identical", "verdict", "seeds_needed", "reason", "method_wall_time_s", "sgd_wall_time_s", "mem_basis",
    "method_mem_mb", "sgd_mem_mb", "method_sn_active_frac", "method_n_completed", "sgd_n_completed", "method_failures",
    "sgd_failures",
]
"""Columns of :func:`sn_vs_sgd_table` (``method``: the verdict's projected method; ``sgd``: plain SGD)."""

SN_VS_SGD_MD = ["study", "dataset", "point", "method", "metric", "method_lr", "sgd_lr", "method_mean", "sgd_mean",
                "diff", "diff_lo", "diff_hi", "n_pairs", "verdict", "seeds_needed", "method_sn_active_frac"]


def paired_difference_interval(
    method: Any,
    reference: Any,
    *,
    n_resamples: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """``mean(method - reference)`` over the seeds both sides have (matched by seed, as
    :func:`optlab.stats.paired`) with its paired bootstrap 95% interval on the same standard as
    :func:`optlab.stats.paired_ratio_interval`: resampled seeds, a seeded generator, the expanded
    percentile interval (:func:`optlab.stats.critical_value`). Keys: ``diff``, ``lo``, ``hi``,
    ``se`` (bootstrap standard error), ``n``, ``median``/``q25``/``q75`` of the per-seed
    differences, ``method``/``reference`` (:class:`optlab.stats.Spread` of each side over the
    pairs) and ``method_mean``/``reference_mean``, ``identical`` (every pair has the same value on
    both sides), ``reason`` (why there is no interval; empty when there is one).
    """
    from scipy.stats import norm

    from .... import stats

    n_resamples = stats.N_RESAMPLES if n_resamples is None else n_resamples
    seed = stats.SEED if seed is None else seed
    a, b, _ = stats.paired(method, reference)
    d = a - b
    n = len(d)
    q = stats.spread(d)
    out = {"diff": float(d.mean()) if n else math.nan, "lo": math.nan, "hi": math.nan, "se": math.nan, "n": n,
           "median": q.median, "q25": q.q25, "q75": q.q75, "method": stats.spread(a), "reference": stats.spread(b),
           "method_mean": float(a.mean()) if n else math.nan, "reference_mean": float(b.mean()) if n else math.nan,
           "identical": bool(n and np.all(d == 0.0)), "reason": ""}
    if n == 0:
        return {**out, "reason": "no seed completed under both"}
    if n < 2:
        return {**out, "reason": "fewer than 2 paired seeds"}
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    tail = float(norm.sf(stats.critical_value(n, stats.LEVEL, "expanded")))
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    return {**out, "lo": float(lo), "hi": float(hi), "se": float(np.std(boot, ddof=1))}


def difference_verdict(lo: float, hi: float, direction: str = "up") -> str:
    """``better`` when the whole interval is on the better side of 0 (above for a higher-is-better
    metric, below for a lower-is-better one), ``worse`` when it is on the other side, else
    ``inconclusive`` (the interval contains 0, or there is none)."""
    if pd.isna(lo) or pd.isna(hi) or lo <= 0.0 <= hi:
        return "inconclusive"
    above = lo > 0.0
    return "better" if above == (direction != "down") else "worse"


def sn_vs_sgd_table(
    runs: pd.DataFrame,
    best: pd.DataFrame,
    verdict: pd.DataFrame,
    *,
    n_resamples: int | None = None,
) -> pd.DataFrame:
    """Per verdict task whose method is the projected optimizer (``sgd_sn``) and that has plain
    ``sgd`` runs: does the projection add anything over plain SGD, each at its own
    validation-selected LR?

    On the verdict's metric (the study's primary), over the seeds both completed (matched by
    seed): ``diff`` = mean(method) - mean(sgd) in the metric's units with its paired bootstrap
    95% interval ``diff_lo``-``diff_hi`` (:func:`paired_difference_interval`), the per-seed
    differences' median and IQR, and ``verdict``: ``better`` / ``worse`` (the whole interval on
    one side of 0; lower is better for a ``down`` metric) or ``inconclusive`` (it contains 0,
    or fewer than 2 pairs; ``seeds_needed`` then estimates the pairs that would move it off 0,
    :func:`optlab.stats.seeds_needed`). ``identical``: every paired seed gave the same value
    (e.g. the projection never acted at the same LR, so the method ran as plain SGD). Costs
    beside it: median wall time and memory on a common basis (:func:`mem_pair`), and the
    fraction of steps at which the projection changed a weight.
    """
    from .... import stats

    if verdict is None or verdict.empty or best is None or best.empty:
        return pd.DataFrame(columns=SN_VS_SGD_COLS)
    chosen = best_runs(runs, best)
    keys = ("study", "dataset", "depth", "point")
    out = []
    for _, v in verdict.iterrows():
        m, x = str(v["method"]), str(v["metric"])
        direction = str(v.get("direction") or "up")
        task = {k: v.get(k) for k in keys}
        a = match(best, **task, method=m)
        if m == BASELINE or a.empty:
            continue
        a = a.iloc[0]
        if PROJECTED not in str(a.get("optimizer", m)).split() and m != PROJECTED:
            continue  # the verdict's method does not project: there is no projection to compare
        b = match(best, **task, method=BASELINE)
        if b.empty:
            continue  # no plain sgd in this task: nothing to compare with
        row: dict[str, Any] = {**task, "task": v.get("task"), "method": m, "metric": x, "direction": direction,
                               "method_lr": a["lr"], "method_lr_edge": a.get("lr_edge"),
                               "method_sn_active_frac": a.get("sn_active_frac_mean", math.nan),
                               "method_n_completed": a.get("n_completed"),
                               "method_wall_time_s": a.get("wall_time_s_median", math.nan)}
        ra = match(chosen, **task, method=m)
        row["method_failures"] = failure_text(ra)
        b = b.iloc[0]
        rb = match(chosen, **task, method=BASELINE)
        d = paired_difference_interval(_seed_values(ra, x), _seed_values(rb, x), n_resamples=n_resamples)
        basis, mem_a, mem_b = mem_pair(a, b)
        word = difference_verdict(d["lo"], d["hi"], direction)
        need = None
        if word == "inconclusive" and d["n"] >= 2:
            need = stats.seeds_needed(d["n"], d["diff"], d["se"], 0.0)
        reason = d["reason"] or ("the interval contains 0" if word == "inconclusive" else
                                 f"the whole interval is {'above' if d['lo'] > 0 else 'below'} 0")
        row.update({
            "sgd_lr": b["lr"], "sgd_lr_edge": b.get("lr_edge"),
            "same_lr": bool(np.isclose(float(a["lr"]), float(b["lr"]), rtol=1e-9, atol=0.0)),
            "method_mean": d["method_mean"], "sgd_mean": d["reference_mean"],
            "method_median": d["method"].median, "method_q25": d["method"].q25, "method_q75": d["method"].q75,
            "sgd_median": d["reference"].median, "sgd_q25": d["reference"].q25, "sgd_q75": d["reference"].q75,
            "diff": d["diff"], "diff_lo": d["lo"], "diff_hi": d["hi"], "diff_median": d["median"],
            "diff_q25": d["q25"], "diff_q75": d["q75"], "n_pairs": d["n"], "identical": d["identical"],
            "verdict": word,
            "seeds_needed": "" if need is None else (f">{stats.SEEDS_CAP}" if need > stats.SEEDS_CAP else str(need)),
            "reason": reason, "sgd_wall_time_s": b.get("wall_time_s_median", math.nan), "mem_basis": basis,
            "method_mem_mb": mem_a, "sgd_mem_mb": mem_b, "sgd_n_completed": b.get("n_completed"),
            "sgd_failures": failure_text(rb),
        })
        out.append(row)
    df = pd.DataFrame(out, columns=SN_VS_SGD_COLS)
    df["depth"] = maybe_int(df["depth"])
    return df


def _seed_values(chosen: pd.DataFrame, metric: str) -> pd.Series:
    """seed -> the metric of the completed runs (mean over duplicates), finite values only."""
    done = chosen[(chosen["status"] == "completed") & chosen["seed"].notna()]
    if metric not in done or done.empty:
        return pd.Series(dtype=float)
    vals = pd.to_numeric(done[metric], errors="coerce").astype(float)
    s = vals.groupby(done["seed"].astype(int)).mean()
    return s[np.isfinite(s)]


# ---------------------------------------------------------------- ablation, depth tolerance, context

ABLATION_CONFIG = ("arch", "dataset", "depth", "width", "optimizer", "reparam", "sn_mode", "sn_sigma", "sn_power_iters",
                   "sn_refresh", "sn_conv", "batch_norm", "residual", "lr")


def ablation_table(runs: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """One row per ablation variant: its configuration and statistics over its seeds.

    Variants come in ``order`` (studies.yaml order), others after it by name. Configuration cells
    that do not apply are NaN (n/a): the projection settings ``sn_*`` exist only for ``sgd_sn``
    (``sn_power_iters`` only with ``sn_sigma: power``, ``sn_refresh`` only with ``bound``), ``sn_conv``, ``batch_norm`` and
    ``residual`` only for the ResNet. Means are over completed seeds, with the median and IQR of
    test accuracy; ``sn_violations_total`` is summed over every seed.
    """
    from .... import stats

    cols = ["variant", *ABLATION_CONFIG, "n_seeds", "n_completed", "n_diverged", "n_failed", "test_acc_mean",
            "test_acc_std", "test_acc_median", "test_acc_q25", "test_acc_q75", "val_acc_mean", "wall_time_s_mean",
            "sigma_max_max_mean", "sn_active_frac_mean", "sn_violations_total", "frozen", "seeds"]
    ab = ablation_runs(runs)
    ab = ab[ab["variant"].notna()]
    if ab.empty:
        return pd.DataFrame(columns=cols)
    names = list(dict.fromkeys(ab.sort_values("run_dir")["variant"]))
    order = [v for v in (order or []) if v in names]
    names = order + sorted(v for v in names if v not in order)
    out = []
    for name in names:
        g = ab[ab["variant"] == name]
        done = g[g["status"] == "completed"]
        row: dict[str, Any] = {"variant": name}
        for c in ABLATION_CONFIG:
            vals = g[c].dropna().unique().tolist() if c in g else []
            row[c] = vals[0] if len(vals) == 1 else (" ".join(map(str, vals)) if vals else math.nan)
        arch, opt = str(row["arch"]), str(row["optimizer"])
        if opt != "sgd_sn":
            row.update(sn_mode=math.nan, sn_sigma=math.nan, sn_power_iters=math.nan, sn_refresh=math.nan)
        else:
            if row["sn_sigma"] != "power":
                row["sn_power_iters"] = math.nan
            if row["sn_sigma"] != "bound":
                row["sn_refresh"] = math.nan
        if not arch.startswith("resnet"):
            row.update(batch_norm=math.nan, residual=math.nan, sn_conv=math.nan)
        elif opt != "sgd_sn":
            row["sn_conv"] = math.nan

        def mean(col: str) -> float:
            return float(done[col].mean()) if col in done and done[col].notna().any() else math.nan

        test = done["test_acc"].dropna() if "test_acc" in done else pd.Series(dtype=float)
        q = stats.spread(test.to_numpy(dtype=float))
        viol = pd.to_numeric(g["sn_violations"], errors="coerce") if "sn_violations" in g else pd.Series(dtype=float)
        row.update({
            "n_seeds": len(g), "n_completed": len(done), "n_diverged": int((g["status"] == "diverged").sum()),
            "n_failed": int((g["status"] == "failed").sum()),
            "test_acc_mean": float(test.mean()) if len(test) else math.nan,
            "test_acc_std": float(test.std(ddof=1)) if len(test) > 1 else math.nan,
            "test_acc_median": q.median, "test_acc_q25": q.q25, "test_acc_q75": q.q75,
            "val_acc_mean": mean("val_acc"), "wall_time_s_mean": mean("wall_time_s"),
            "sigma_max_max_mean": mean("sigma_max_max"), "sn_active_frac_mean": mean("sn_active_frac"),
            "sn_violations_total": int(viol.sum()) if viol.notna().any() else math.nan,
            "frozen": bool(g["frozen"].all()),
            "seeds": " ".join(str(int(s)) for s in sorted(g["seed"].dropna())),
        })
        out.append(row)
    df = pd.DataFrame(out, columns=cols)
    for c in ("depth", "width", "sn_power_iters", "sn_refresh", "sn_violations_total"):
        df[c] = maybe_int(df[c])
    return df


def depth_tolerance_table(runs: pd.DataFrame, best: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (study, dataset, method): the deepest depth whose best-LR config trained.

    Trained = every seed completed and mean test accuracy >= chance + 0.02, with chance =
    1/n_classes (from config, else 1/10). Status counts are over all of the method's runs.
    (The accuracy criterion of runs that predate the engine's ``failure``; see
    :func:`depth_to_failure_table` for the study's depth-to-failure search.)
    """
    cols = [
        "study", "dataset", "method", "deepest_trainable", "test_acc_at_deepest", "depths_trained",
        "depths_tried", "chance", "n_runs", "n_completed", "n_diverged", "n_failed",
    ]
    best = best_lr_table(runs) if best is None else best
    sw = sweep_runs(runs)
    sw = sw[sw["method"].notna()]  # a run without a config (unreadable metrics) is only in divergence
    out = []
    for key, g in sw.groupby(["study", "dataset", "method"], dropna=False, sort=True):
        chance = chance_level(g)
        b = match(best, **dict(zip(("study", "dataset", "method"), key)))
        ok = b[(b["n_completed"] == b["n_seeds"]) & (b["test_acc_mean"] >= chance + TRAINABLE_MARGIN - 1e-12)]
        ok = ok[ok["depth"].notna()]
        deepest = ok.loc[ok["depth"].astype(float).idxmax()] if len(ok) else None
        out.append({
            **dict(zip(("study", "dataset", "method"), key)),
            "deepest_trainable": deepest["depth"] if deepest is not None else pd.NA,
            "test_acc_at_deepest": deepest["test_acc_mean"] if deepest is not None else math.nan,
            "depths_trained": " ".join(str(int(d)) for d in sorted(ok["depth"].dropna().unique())),
            "depths_tried": " ".join(str(int(d)) for d in sorted(g["depth"].dropna().unique())),
            "chance": chance,
            "n_runs": len(g),
            "n_completed": int((g["status"] == "completed").sum()),
            "n_diverged": int((g["status"] == "diverged").sum()),
            "n_failed": int((g["status"] == "failed").sum()),
        })
    df = pd.DataFrame(out, columns=cols)
    df["deepest_trainable"] = maybe_int(df["deepest_trainable"])
    return df


CONTEXT_COLS = ["study", "dataset", "method", "block_size", "lr", "n_seeds", "n_completed", "mem_basis", "mem_mb",
                "peak_mem_mb", "step_mem_mb", "state_mem_mb", "tokens_per_s", "tokens_per_s_mad", "steady_epochs",
                "seconds_per_epoch", "val_bpb", "failures"]


def context_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Memory and throughput along a context-length (``block_size``) grid, per method.

    One row per (study, dataset, method, block_size, lr), means over seeds. ``tokens_per_s`` is
    the steady throughput (epochs after the first; ``tokens_per_s_mad`` its spread over those
    epochs, ``steady_epochs`` how many), NaN where the runs had one epoch. ``mem_mb`` is on
    ``mem_basis``: ``peak`` (CUDA allocator peak) where every run of the row recorded it, else
    ``step`` (profiled training-step peak, CPU), else ``state`` (training-state size).
    """
    sw = sweep_runs(runs)
    if sw.empty or "block_size" not in sw:
        return pd.DataFrame(columns=CONTEXT_COLS)
    sw = sw[(sw["axis"] == "block_size") & sw["block_size"].notna()]
    out = []
    for key, g in sw.groupby(["study", "dataset", "method", "block_size", "lr"], dropna=False, sort=True):
        done = g[g["status"] == "completed"]
        mean = lambda c: float(pd.to_numeric(done[c], errors="coerce").mean()) if c in done and len(done) else math.nan  # noqa: E731
        med = lambda c: float(pd.to_numeric(done[c], errors="coerce").median()) if c in done and len(done) else math.nan  # noqa: E731
        basis, mem = "state", mean("state_mem_mb")
        for b, col in MEM_BASES:
            if col in done and len(done) and pd.to_numeric(done[col], errors="coerce").notna().all():
                basis, mem = b, mean(col)
                break
        out.append({
            **dict(zip(["study", "dataset", "method", "block_size", "lr"], key)),
            "n_seeds": int(g["seed"].nunique()), "n_completed": len(done), "mem_basis": basis, "mem_mb": mem,
            "peak_mem_mb": mean("peak_mem_mb"), "step_mem_mb": mean("step_mem_mb"), "state_mem_mb": mean("state_mem_mb"),
            # throughput after the warm-up epoch only (median over the runs' steady epochs; NaN with one epoch)
            "tokens_per_s": med("throughput_steady"), "tokens_per_s_mad": med("throughput_steady_mad"),
            "steady_epochs": int(pd.to_numeric(done["steady_epochs"], errors="coerce").fillna(0).sum())
            if "steady_epochs" in done else 0,
            "seconds_per_epoch": mean("seconds_per_epoch"),
            "val_bpb": mean("val_bpb"), "failures": failure_text(g),
        })
    df = pd.DataFrame(out, columns=CONTEXT_COLS)
    df["block_size"] = maybe_int(df["block_size"])
    return df

