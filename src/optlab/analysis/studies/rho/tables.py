"""The rho study family's tables: one row per (method, LR), for the seed setup's single seed and
over the other seeds (median and IQR).

Per study ``S`` of the analysis (``rho_digits``: issue #11 item 2), two tables:

- ``S`` (the single-seed table, seed :data:`SINGLE_SEED`): per (dataset, point, method, LR), the
  run's status (a diverged or failed run is a row, never dropped; a configuration without a
  seed-7 run is a row marked ``not run``), its final test accuracy and the controller's summary
  (``peak_r``, ``mean_r``, ``capped_frac`` over the run; ``final_r_mean``, ``final_eta_eff``,
  ``final_capped_frac`` over its last epoch), the configuration (mode, r_target, samples, model,
  epochs, batch size) and the run directory;
- ``S_seeds`` (the multi-seed version: every other seed, 0-4 in the study): per configuration the
  seeds, how many completed / diverged / failed, and ``<col>_median``, ``_q25``, ``_q75``, ``_n``
  of each column (:func:`optlab.stats.spread`). Test accuracy exists for completed runs only, so its
  statistics are over those (``_n`` says how many); the controller columns are over every run that
  recorded them, diverged runs included (the controller measured them up to the divergence).

A diverged run whose ``r`` overflowed has no ``peak_r`` in metrics.json (the engine writes a
non-finite final metric as null); its peak r is then the largest per-step ``r`` of its curves.csv
(``peak_r_source`` ``steps``; ``inf`` kept, and a quartile that interpolates towards inf is inf).

Both frames end with their Markdown view's cells (columns named in words: ``test accuracy``,
``peak r median [IQR]``, ...), built from the numeric columns by :func:`single_view` /
:func:`seeds_view`, which the README section calls again on the CSV: the README's tables and the
``.md`` files are the same text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .... import stats
from ...aggregate import Table, failure_text, format_value, maybe_int, read_csv, run_failure, slug, sweep_runs

SINGLE_SEED = 7
"""The seed setup's seed: the single-seed table."""

R_TARGET_DEFAULT = 1.0
"""``RhoOptions.r_target``'s default (:mod:`optlab.methods.rho`; not imported: no torch here)."""

MODE_ORDER = ("fixed", "capped", "set")
METHOD_ORDER = ("rho_fixed_sgd", "rho_capped_sgd", "rho_set_sgd")
"""The digits study's methods, drawn first with fixed colours."""

METRICS = ("test_acc", "peak_r", "final_eta_eff", "final_capped_frac")
"""The table's columns (issue #11 item 2), in order."""
CONTROLLER = ("peak_r", "mean_r", "capped_frac", "final_r_mean", "final_eta_eff", "final_capped_frac")
"""The controller's final metrics (metrics.json ``final``)."""
COMPLETED_ONLY = ("test_acc",)
"""Columns whose multi-seed statistics are over completed runs only (the others: every run that recorded them)."""

KEYS = ("study", "dataset", "point", "method", "lr")
CONFIG = ("mode", "r_target", "samples", "optimizer", "arch", "depth", "width", "activation", "init", "epochs",
          "batch_size")

WORDS = {"test_acc": "test accuracy", "peak_r": "peak r", "final_eta_eff": "final mean eta_eff",
         "final_capped_frac": "final capped fraction"}
"""The Markdown view's names of :data:`METRICS`."""

SINGLE_MD = ["method", "mode", "lr", "status", *(WORDS[m] for m in METRICS)]
SEEDS_MD = ["method", "mode", "lr", "seeds", "runs", *(f"{WORDS[m]} median [IQR]" for m in METRICS)]


def table_names(study: str) -> tuple[str, str]:
    """(single-seed, multi-seed) table names of a study: ``<study>`` and ``<study>_seeds``, prefixed
    with ``rho_`` when the study's name does not start with ``rho`` (table names are global)."""
    base = slug(study)
    base = base if base.startswith("rho") else f"rho_{base}"
    return base, f"{base}_seeds"


# ---------------------------------------------------------------- one run


def _get(row: Any, *names: str) -> Any:
    for n in names:
        v = row.get(n) if hasattr(row, "get") else None
        if v is not None and not _isna(v):
            return v
    return None


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def run_mode(row: Any) -> str:
    """The controller's mode: the method's ``method_options.mode`` (or ``optimizer_options.rho.mode``),
    else a mode named in the method's name, else ``?``."""
    mode = _get(row, "method_options_mode", "optimizer_options_rho_mode")
    if isinstance(mode, str) and mode:
        return mode
    name = str(row.get("method") or "")
    return next((m for m in MODE_ORDER if m in name.split("_")), "?")


def run_r_target(row: Any) -> float:
    """The run's r_target (the options' default when not given; NaN in fixed mode, where it is unused)."""
    if run_mode(row) == "fixed":
        return math.nan
    v = _get(row, "method_options_r_target", "optimizer_options_rho_r_target")
    return float(v) if v is not None else R_TARGET_DEFAULT


def status_text(row: Any) -> str:
    """``completed``, ``completed (chance)``, ``diverged (exploding, step 3)``, ``failed (error)``."""
    status = row.get("status")
    if _isna(status) or status is None:
        return "not run"
    if status == "diverged":
        reason = row.get("diverge_reason")
        step = row.get("diverged_step")
        parts = [str(reason) if isinstance(reason, str) and reason else "diverged"]
        if step is not None and not _isna(step):
            parts.append(f"step {int(step)}")
        return f"diverged ({', '.join(parts)})"
    kind = run_failure(row)
    if status == "completed":
        return f"completed ({kind})" if kind else "completed"
    return f"{status} ({kind})" if kind else str(status)


# ---------------------------------------------------------------- the tables


def _study_runs(runs: pd.DataFrame, study: str, base: Path | None = None) -> pd.DataFrame:
    sw = sweep_runs(runs)
    sw = sw[(sw["study"] == study) & sw["lr"].notna()].copy()
    for c in KEYS:
        if c not in sw:
            sw[c] = np.nan
    for c in CONTROLLER + ("test_acc",):
        sw[c] = pd.to_numeric(sw[c], errors="coerce").astype(float) if c in sw else np.nan
    sw["mode"] = [run_mode(r) for r in sw.to_dict("records")]
    sw["r_target"] = [run_r_target(r) for r in sw.to_dict("records")]
    sw["samples"] = [_get(r, "method_options_samples", "optimizer_options_rho_samples") or "batch"
                     for r in sw.to_dict("records")]
    sw["peak_r_source"] = np.where(sw["peak_r"].notna(), "final", None)
    if base is not None:
        for i in sw.index[sw["peak_r"].isna()]:
            peak = steps_peak_r(base / str(sw.at[i, "run_dir"]))
            if peak is not None:
                sw.at[i, "peak_r"], sw.at[i, "peak_r_source"] = peak, "steps"
    return sw


def steps_peak_r(run_dir: Path) -> float | None:
    """The largest per-step ``r`` of a run's curves.csv (inf kept, NaN skipped), None without any.

    The engine writes a non-finite final metric as null (JSON has no inf), so a run whose r
    overflowed to inf on its way to diverging has no ``peak_r`` in metrics.json; its curves still
    hold every step's r."""
    if not (run_dir / "metrics.json").is_file():
        return None
    frame = read_csv(run_dir / "curves.csv")
    if frame is None or frame.empty or "metric" not in frame:
        return None
    r = pd.to_numeric(frame.loc[frame["metric"] == "r", "value"], errors="coerce").to_numpy(dtype=float)
    r = r[~np.isnan(r)]
    return float(r.max()) if len(r) else None


def spread(values: np.ndarray) -> stats.Spread:
    """:func:`optlab.stats.spread` (NaN dropped); with +inf among the values (an overflowed r),
    the quartiles by the same linear interpolation with inf larger than any number: a quantile
    that interpolates towards an inf is inf."""
    x = np.sort(np.asarray(values, dtype=float)[~np.isnan(np.asarray(values, dtype=float))])
    if not np.isinf(x).any():
        return stats.spread(x)
    if np.isneginf(x).any():
        raise ValueError("-inf is not a value of these columns")

    def q(p: float) -> float:
        pos = p / 100 * (len(x) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        frac = pos - lo
        if np.isinf(x[lo]) or (frac > 0 and np.isinf(x[hi])):
            return math.inf
        return float(x[lo] + (x[hi] - x[lo]) * frac)

    return stats.Spread(len(x), q(50), q(25), q(75))


def _configs(sw: pd.DataFrame) -> list[dict[str, Any]]:
    """The study's configurations, one per (dataset, point, method, lr), ordered by mode, method, lr."""
    rank = {m: i for i, m in enumerate(MODE_ORDER)}
    mrank = {m: i for i, m in enumerate(METHOD_ORDER)}
    out = []
    for key, g in sw.groupby(list(KEYS), dropna=False, sort=False):
        k = dict(zip(KEYS, key))
        first = g.sort_values("run_dir").iloc[0]
        out.append({**k, **{c: first.get(c) for c in CONFIG}})
    out.sort(key=lambda c: (str(c["dataset"]), str(c["point"]), rank.get(str(c["mode"]), len(rank)),
                            mrank.get(str(c["method"]), len(mrank)), str(c["method"]), float(c["lr"])))
    return out


def _select(sw: pd.DataFrame, cfg: dict[str, Any]) -> pd.DataFrame:
    mask = pd.Series(True, index=sw.index)
    for k in KEYS:
        v = cfg[k]
        if k == "lr":
            mask &= np.isclose(sw["lr"].astype(float), float(v), rtol=1e-9, atol=0.0)
        else:
            mask &= sw[k].isna() if _isna(v) else (sw[k] == v).fillna(False).astype(bool)
    return sw[mask]


SINGLE_COLS = [*KEYS, *CONFIG, "seed", "status", "failure", "diverged_step", "diverge_reason", "epochs_completed",
               "test_acc", *CONTROLLER, "peak_r_source", "run_dir"]


def single_seed_table(runs: pd.DataFrame, study: str, seed: int = SINGLE_SEED, base: Path | None = None) -> pd.DataFrame:
    """One row per configuration of ``study`` with its seed-``seed`` run (see the module docstring).
    ``base``: the directory the runs' ``run_dir`` are relative to (for :func:`steps_peak_r`)."""
    sw = _study_runs(runs, study, base)
    rows = []
    for cfg in _configs(sw):
        g = _select(sw, cfg)
        g = g[pd.to_numeric(g["seed"], errors="coerce") == seed].sort_values("run_dir")
        row: dict[str, Any] = {**cfg, "seed": seed}
        if g.empty:
            row.update(status=None, failure=None)
        else:
            r = g.iloc[-1]  # one run per configuration and seed; a repeat (a rerun) is the last by name
            row.update({c: r.get(c) for c in SINGLE_COLS if c not in row})
            row["failure"] = run_failure(r) or None
        rows.append(row)
    df = pd.DataFrame(rows, columns=SINGLE_COLS)
    df["status"] = [status_text(r) for r in df.to_dict("records")]
    for c in ("diverged_step", "epochs_completed", "seed", "depth", "width", "epochs", "batch_size"):
        df[c] = maybe_int(pd.to_numeric(df[c], errors="coerce"))
    view = single_view(df)
    return pd.concat([df, view.drop(columns=[c for c in view.columns if c in df.columns])], axis=1)


def seeds_table(runs: pd.DataFrame, study: str, seeds: Iterable[int] | None = None,
                exclude: int | None = SINGLE_SEED, base: Path | None = None) -> pd.DataFrame:
    """One row per configuration of ``study`` over ``seeds`` (default: every seed of the study but
    ``exclude``): counts by status, and the median, quartiles and count of each column."""
    sw = _study_runs(runs, study, base)
    all_seeds = sorted({int(s) for s in pd.to_numeric(sw["seed"], errors="coerce").dropna()})
    wanted = sorted({int(s) for s in seeds}) if seeds is not None else [s for s in all_seeds if s != exclude]
    cols = [*KEYS, *CONFIG, "seeds", "missing_seeds", "n_seeds", "n_completed", "n_diverged", "n_failed", "failures",
            "peak_r_from_steps"]
    for m in (*METRICS, *(c for c in CONTROLLER if c not in METRICS)):
        cols += [f"{m}_median", f"{m}_q25", f"{m}_q75", f"{m}_n"]
    rows = []
    configs = _configs(sw)
    sw = sw[pd.to_numeric(sw["seed"], errors="coerce").isin(wanted)]
    for cfg in configs:
        g = _select(sw, cfg)
        present = sorted({int(s) for s in pd.to_numeric(g["seed"], errors="coerce").dropna()})
        done = g[g["status"] == "completed"]
        row: dict[str, Any] = {
            **cfg, "seeds": " ".join(str(s) for s in present),
            "missing_seeds": " ".join(str(s) for s in wanted if s not in present),
            "n_seeds": len(g), "n_completed": len(done), "n_diverged": int((g["status"] == "diverged").sum()),
            "n_failed": int((~g["status"].isin(["completed", "diverged"])).sum()),
            "failures": failure_text(g),
            "peak_r_from_steps": int((g["peak_r_source"] == "steps").sum()),
        }
        for m in (*METRICS, *(c for c in CONTROLLER if c not in METRICS)):
            src = done if m in COMPLETED_ONLY else g
            vals = src[m].to_numpy(dtype=float)
            s = spread(vals)
            row.update({f"{m}_median": s.median, f"{m}_q25": s.q25, f"{m}_q75": s.q75, f"{m}_n": s.n})
        rows.append(row)
    df = pd.DataFrame(rows, columns=cols)
    for c in ("depth", "width", "epochs", "batch_size"):
        df[c] = maybe_int(pd.to_numeric(df[c], errors="coerce"))
    view = seeds_view(df)
    return pd.concat([df, view.drop(columns=[c for c in view.columns if c in df.columns])], axis=1)


# ---------------------------------------------------------------- the Markdown views


def _pct(v: Any) -> str:
    return format_value(v, "acc")


def _num(v: Any) -> str:
    return format_value(float(v)) if v is not None and not _isna(v) else "n/a"


def cell(col: str, v: Any) -> str:
    """One value of a :data:`METRICS` column as text: accuracies and fractions in percent."""
    if v is None or _isna(v):
        return "n/a"
    return _pct(v) if col in ("test_acc", "final_capped_frac", "capped_frac") else _num(v)


def text(v: Any) -> str:
    """A text cell read back from CSV ('' for NaN; numbers such as a lone seed "3" as written)."""
    if v is None or _isna(v):
        return ""
    return format_value(v) if not isinstance(v, str) else v


def status_word(status: Any) -> str:
    """``completed``, ``diverged``, ``failed`` or ``not run`` (the status cell's first word)."""
    s = text(status) or "not run"
    return "not run" if s.startswith("not run") else s.split(" ")[0]


def single_view(df: pd.DataFrame) -> pd.DataFrame:
    """The single-seed table's Markdown cells (:data:`SINGLE_MD`) from its numeric columns."""
    out = pd.DataFrame(index=df.index)
    out["method"] = df["method"].astype(object)
    out["mode"] = df["mode"].astype(object)
    out["lr"] = [_num(v) for v in df["lr"]]
    out["status"] = df["status"].astype(object)
    acc = []
    for st, v in zip(df["status"], df["test_acc"]):
        word = status_word(st)
        acc.append(cell("test_acc", v) if word == "completed" else word)  # diverged / failed / not run
    out[WORDS["test_acc"]] = acc
    for m in METRICS[1:]:
        out[WORDS[m]] = [cell(m, v) if status_word(st) != "not run" else "not run" for st, v in zip(df["status"], df[m])]
    return out[SINGLE_MD]


def runs_text(r: Any) -> str:
    """``5 of 5 completed``; ``0 of 5 completed, 5 diverged (exploding 5)``; missing seeds named."""
    n = int(r["n_seeds"])
    if n == 0:
        return "not run"
    s = f"{int(r['n_completed'])} of {n} completed"
    if int(r["n_diverged"]):
        s += f", {int(r['n_diverged'])} diverged"
    if int(r["n_failed"]):
        s += f", {int(r['n_failed'])} failed"
    fail = text(r.get("failures"))
    if fail:
        s += f" ({fail})"
    miss = text(r.get("missing_seeds")).split()
    if miss:
        s += f"; seed{'s' if len(miss) > 1 else ''} {', '.join(miss)} not run"
    return s


def spread_cell(r: Any, m: str) -> str:
    """``median [q25–q75]`` of column ``m`` (with ``over k of n`` when some runs lack it)."""
    n, k = int(r["n_seeds"]), r.get(f"{m}_n")
    k = int(k) if k is not None and not _isna(k) else 0
    if n == 0:
        return "not run"
    if k == 0:
        return "diverged" if m in COMPLETED_ONLY and int(r["n_diverged"]) == n else "n/a"
    s = f"{cell(m, r[f'{m}_median'])} [{cell(m, r[f'{m}_q25'])}–{cell(m, r[f'{m}_q75'])}]"
    return s + (f" over {k} of {n}" if k < n else "")


def seeds_view(df: pd.DataFrame) -> pd.DataFrame:
    """The multi-seed table's Markdown cells (:data:`SEEDS_MD`) from its numeric columns."""
    out = pd.DataFrame(index=df.index)
    out["method"] = df["method"].astype(object)
    out["mode"] = df["mode"].astype(object)
    out["lr"] = [_num(v) for v in df["lr"]]
    out["seeds"] = [text(s) for s in df["seeds"]]
    recs = df.to_dict("records")
    out["runs"] = [runs_text(r) for r in recs]
    for m in METRICS:
        out[f"{WORDS[m]} median [IQR]"] = [spread_cell(r, m) for r in recs]
    return out[SEEDS_MD]


def runs_base(data: Any) -> Path | None:
    """The directory the runs' ``run_dir`` are relative to (the runs root's parent).

    :class:`AnalysisData` does not carry the runs root; its ``params`` path defaults to
    ``params.yaml`` beside the root, so its directory is the base when the runs are found there
    (checked per run by :func:`steps_peak_r`)."""
    params = getattr(data, "params", None)
    if params is None:
        return None
    base = Path(params).resolve().parent
    dirs = data.runs["run_dir"].dropna() if len(data.runs) else []
    return base if any((base / str(d) / "metrics.json").is_file() for d in list(dirs)[:5]) else None


def study_single_seed(runs: pd.DataFrame, study: str, single_seed: int = SINGLE_SEED) -> int:
    """The single-seed table's seed for ``study``: ``single_seed`` (the seed setup's 7) when the
    study ran it, else the study's smallest seed (a study such as ``rho_cap_mlp`` runs seeds 0-2)."""
    sw = sweep_runs(runs) if len(runs) else runs
    seeds = sorted({int(s) for s in pd.to_numeric(sw.loc[sw["study"] == study, "seed"], errors="coerce").dropna()}) \
        if len(sw) else []
    return single_seed if not seeds or single_seed in seeds else seeds[0]


def references(slices: Iterable[Any]) -> pd.DataFrame:
    """Per study: why it did not run at this scale (``skipped``) and its labeled published
    reference (``studies.<s>.published``: label -> value), one row per (study, label)."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for s in slices:
        if s.study in seen:
            continue
        seen.add(s.study)
        items = list(s.published) or [("", "")]
        for label, value in items:
            rows.append({"study": s.study, "skipped": s.skipped or "", "label": label, "value": value})
    return pd.DataFrame(rows, columns=["study", "skipped", "label", "value"])


def tables(data: Any, single_seed: int = SINGLE_SEED, seeds: Iterable[int] | None = None,
           studies: Iterable[str] | None = None) -> dict[str, Table]:
    """Both tables of every study of the analysis (:func:`table_names`; ``studies``: only these)."""
    out: dict[str, Table] = {}
    base = runs_base(data)
    for study in (data.studies if studies is None else studies):
        single, multi = table_names(study)
        seed = study_single_seed(data.runs, study, single_seed)
        out[single] = (single_seed_table(data.runs, study, seed, base), SINGLE_MD)
        out[multi] = (seeds_table(data.runs, study, seeds, exclude=seed, base=base), SEEDS_MD)
    return out
