"""Read run directories into pandas tables and write the study's summary tables.

Every run found is kept: diverged and failed runs are results and appear in ``runs.csv`` and
``divergence.csv``. Learning rates are selected on validation accuracy only, never on test.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

CONFIG_KEYS = ("study", "dataset", "optimizer", "depth", "lr", "seed")
"""Config columns that every runs frame has (NaN where a run's config lacks them)."""

GROUP_KEYS = ("study", "dataset", "optimizer", "depth", "point")
"""One best-LR row per value of these keys."""

RUN_TAGS = ("run_dir", "run_id", "study", "dataset", "optimizer", "depth", "lr", "seed")
"""Run columns copied onto every curves/layers row."""

TOP_KEYS = ("run_id", "run_dir", "kind", "status", "diverged_step", "diverge_reason", "error", "failure", "role",
            "point", "select")

FINAL_NUMERIC = (
    "train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "test_loss", "test_acc",
    "wall_time_s", "peak_mem_mb", "state_mem_mb", "steps", "epochs_completed", "sigma_max_max", "sn_violations",
)

HEADLINE_DIR = "train"
DEFAULT_N_CLASSES = 10
TRAINABLE_MARGIN = 0.02  # accuracy (fraction) above chance that counts as "trained"

TABLE_FILES = (
    "runs.csv", "best_lr.csv", "best_lr.md", "verdict.csv", "verdict.md",
    "depth_tolerance.csv", "depth_tolerance.md", "divergence.csv", "divergence.md",
)


# ---------------------------------------------------------------- loading


def load_runs(root: Path | str, *, series: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Find every ``metrics.json`` under ``root``; return the (runs, curves, layers) frames.

    ``run_dir`` is the run's directory relative to ``root``'s parent (``runs/sweep/adam/x``).
    ``kind`` is ``headline`` for a directory named ``train``, else ``sweep``. A metrics file
    that cannot be parsed becomes a ``failed`` row with the parse error. Missing or empty
    ``curves.csv``/``layers.csv`` are tolerated. ``series=False`` skips reading them (the
    curves and layers frames are then empty).
    """
    root = Path(root)
    base = root.resolve().parent
    rows: list[dict[str, Any]] = []
    curves: list[pd.DataFrame] = []
    layers: list[pd.DataFrame] = []
    for mpath in sorted(root.rglob("metrics.json")):
        run_dir = mpath.parent
        rel = run_dir.resolve().relative_to(base).as_posix()
        row = _run_row(mpath, rel)
        rows.append(row)
        tags = {k: row.get(k, np.nan) for k in RUN_TAGS}
        for name, sink in (("curves.csv", curves), ("layers.csv", layers)) if series else ():
            frame = _read_csv(run_dir / name)
            if frame is not None and len(frame):
                for k, v in reversed(tags.items()):
                    frame.insert(0, k, v)
                sink.append(frame)
    runs = _runs_frame(rows)
    curve_cols = [*RUN_TAGS, "step", "epoch", "metric", "value"]
    layer_cols = [*RUN_TAGS, "step", "epoch", "layer", "role", "grad_norm", "sigma_max"]
    return runs, _concat(curves, curve_cols, ("value",)), _concat(layers, layer_cols, ("grad_norm", "sigma_max"))


def _run_row(mpath: Path, rel: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": Path(rel).name,
        "run_dir": rel,
        "kind": "headline" if Path(rel).name == HEADLINE_DIR else ("ablation" if "ablate" in Path(rel).parts else "sweep"),
        "status": "failed",
        "diverged_step": None,
        "diverge_reason": None,
        "error": None,
    }
    try:
        m = json.loads(mpath.read_text())
        if not isinstance(m, dict):
            raise ValueError("top level is not an object")
    except (OSError, ValueError) as exc:
        row["error"] = f"unreadable metrics.json: {exc}"
        warnings.warn(f"{mpath}: {row['error']}", stacklevel=3)
        row["frozen"] = False
        return row
    for k in ("run_id", "status", "diverged_step", "diverge_reason", "error", "failure"):
        if m.get(k) is not None:
            row[k] = m[k]
    sw = m.get("sweep") or {}
    row["role"] = sw.get("role")
    row["select"] = sw.get("select")
    point = sw.get("point") or {}
    row["point"] = " ".join(f"{k}={v}" for k, v in point.items()) if sw else None
    for k, v in _flatten(m.get("config") or {}).items():
        if k not in row:
            row[k] = v
        elif k not in ("run_id",) and row[k] != v:
            row[f"config_{k}"] = v
    for k, v in _flatten(m.get("final") or {}).items():
        row[k if k not in row else f"final_{k}"] = v
    prov = m.get("provenance") or {}
    row["frozen"] = bool(prov.get("frozen", False))
    row["git_commit"] = prov.get("git_commit")
    row["git_dirty"] = prov.get("git_dirty")
    return row


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}_"))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in (*TOP_KEYS, *CONFIG_KEYS, "frozen"):
        if col not in df.columns:
            df[col] = np.nan
    for col in (*FINAL_NUMERIC, "lr"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("depth", "seed", "width", "diverged_step", "n_classes", "epochs", "batch_size"):
        if col in df.columns:
            df[col] = _maybe_int(df[col])
    df["frozen"] = df["frozen"].fillna(False).astype(bool)
    first = [*TOP_KEYS, *CONFIG_KEYS]
    rest = [c for c in df.columns if c not in first]
    return df[first + rest]


def _maybe_int(s: pd.Series) -> pd.Series:
    """Integer-valued numeric column -> nullable Int64; anything else unchanged."""
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() != s.notna().sum():
        return s
    vals = num.dropna().to_numpy(dtype=float)
    if len(vals) and not np.all(np.isfinite(vals) & (vals == np.round(vals))):
        return num
    return num.astype("Int64")


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        warnings.warn(f"{path}: unreadable ({exc}); skipped", stacklevel=3)
        return None


def _concat(frames: list[pd.DataFrame], cols: list[str], numeric: Iterable[str]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in numeric else object) for c in cols})
    df = pd.concat(frames, ignore_index=True)
    for c in cols:
        if c not in df.columns:
            df[c] = np.nan
    for c in numeric:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df[cols + [c for c in df.columns if c not in cols]]


# ---------------------------------------------------------------- tables


def sweep_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that belong to studies (the headline run and ablations are excluded)."""
    return runs[runs["kind"] == "sweep"]


def chance_level(runs: pd.DataFrame) -> float:
    """1/n_classes from the runs' config (the largest n_classes), else 1/10."""
    if "n_classes" in runs.columns:
        n = pd.to_numeric(runs["n_classes"], errors="coerce").dropna()
        if len(n):
            return 1.0 / float(n.max())
    return 1.0 / DEFAULT_N_CLASSES


def best_lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, dataset, optimizer, depth): the LR with the highest mean val_acc.

    Selection score ``val_score`` = mean over seeds of final val_acc with diverged/failed
    (NaN) runs counted as 0. Ties go to fewer non-completed runs, then the smaller LR.
    Statistics for the chosen LR are over its completed seeds (``n_completed``); test
    accuracy never enters the selection.
    """
    cols = [
        *GROUP_KEYS, "lr", "n_seeds", "n_completed", "n_diverged", "n_failed", "val_score",
        "val_acc_mean", "test_acc_mean", "test_acc_std", "test_acc_min", "test_acc_max",
        "wall_time_s_mean", "peak_mem_mb_mean", "state_mem_mb_mean", "frozen", "seeds",
    ]
    sw = sweep_runs(runs)
    sw = sw[sw["lr"].notna()]
    if sw.empty:
        return pd.DataFrame(columns=cols)
    per_lr = []
    for key, g in sw.groupby([*GROUP_KEYS, "lr"], dropna=False, sort=True):
        per_lr.append({**dict(zip([*GROUP_KEYS, "lr"], key)), **_lr_stats(g)})
    stats = pd.DataFrame(per_lr)
    stats["_bad"] = stats["n_seeds"] - stats["n_completed"]
    stats = stats.sort_values(["val_score", "_bad", "lr"], ascending=[False, True, True], kind="mergesort")
    best = stats.groupby(list(GROUP_KEYS), dropna=False, sort=True).head(1)
    best = best.sort_values(list(GROUP_KEYS), kind="mergesort").reset_index(drop=True)
    best = best.drop(columns="_bad")
    for c in ("depth",):
        best[c] = _maybe_int(best[c])
    return best[cols]


def _lr_stats(g: pd.DataFrame) -> dict[str, Any]:
    done = g[g["status"] == "completed"]
    # selection uses the LR-search runs only (the selected LR also has confirmation seeds)
    search = g[g["role"] == "search"] if "role" in g and (g["role"] == "search").any() else g
    select = search["select"].dropna().iloc[0] if "select" in search and search["select"].notna().any() else "val_acc"
    test = done["test_acc"] if "test_acc" in done else pd.Series(dtype=float)

    def mean(col: str) -> float:
        return float(done[col].mean()) if col in done and done[col].notna().any() else math.nan

    if select == "val_loss":
        vl = search["val_loss"] if "val_loss" in search else pd.Series(np.nan, index=search.index)
        score = float(-vl.astype(float).fillna(np.inf).mean())
    else:
        val = search["val_acc"] if "val_acc" in search else pd.Series(np.nan, index=search.index)
        score = float(val.astype(float).fillna(0.0).mean())
    seeds = sorted(int(s) for s in g["seed"].dropna())
    return {
        "n_seeds": len(g),
        "n_completed": len(done),
        "n_diverged": int((g["status"] == "diverged").sum()),
        "n_failed": int((g["status"] == "failed").sum()),
        "val_score": score,
        "val_acc_mean": mean("val_acc"),
        "test_acc_mean": float(test.mean()) if test.notna().any() else math.nan,
        "test_acc_std": float(test.std(ddof=1)) if test.notna().sum() > 1 else math.nan,
        "test_acc_min": float(test.min()) if test.notna().any() else math.nan,
        "test_acc_max": float(test.max()) if test.notna().any() else math.nan,
        "wall_time_s_mean": mean("wall_time_s"),
        "peak_mem_mb_mean": mean("peak_mem_mb"),
        "state_mem_mb_mean": mean("state_mem_mb"),
        "frozen": bool(g["frozen"].all()),
        "seeds": " ".join(str(s) for s in seeds),
    }


def best_runs(runs: pd.DataFrame, best: pd.DataFrame | None = None) -> pd.DataFrame:
    """The runs (all seeds, any status) of each group's selected LR."""
    best = best_lr_table(runs) if best is None else best
    sw = sweep_runs(runs)
    keys = [*GROUP_KEYS, "lr"]
    sel = best[keys].copy()
    left = sw.copy()
    for k in keys:  # merge on comparable types (nullable ints vs floats, NaN keys)
        left[f"_{k}"] = _merge_key(left[k])
        sel[f"_{k}"] = _merge_key(sel[k])
    out = left.merge(sel[[f"_{k}" for k in keys]], on=[f"_{k}" for k in keys], how="inner")
    return out.drop(columns=[f"_{k}" for k in keys])


def _merge_key(s: pd.Series) -> pd.Series:
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() == s.notna().sum() and s.notna().any():
        return num.astype(float).round(12).fillna(-math.inf)
    return s.astype(object).where(s.notna(), "<NA>").astype(str)


def verdict_table(runs: pd.DataFrame, best: pd.DataFrame | None = None,
                  method: str = "sgd_sn", reference: str = "adam") -> pd.DataFrame:
    """Per (study, dataset, depth) with both optimizers: ``method`` against ``reference``.

    ``ratio_of_means`` = method's mean test accuracy / reference's (at each one's best LR).
    The per-seed ratio pairs runs by seed (both completed); median and quartiles over seeds.
    ``time_lower``/``mem_lower`` name the optimizer with the lower mean, ``tie`` if equal.
    """
    m, r = method, reference
    cols = [
        "study", "dataset", "depth", f"{m}_lr", f"{r}_lr", f"{m}_test_acc", f"{r}_test_acc",
        "ratio_of_means", "ratio_median", "ratio_q25", "ratio_q75", "n_pairs",
        f"{m}_n_diverged", f"{r}_n_diverged", f"{m}_wall_time_s", f"{r}_wall_time_s", "time_lower",
        f"{m}_peak_mem_mb", f"{r}_peak_mem_mb", f"{m}_state_mem_mb", f"{r}_state_mem_mb", "mem_lower",
    ]
    best = best_lr_table(runs) if best is None else best
    chosen = best_runs(runs, best)
    out = []
    for key, g in best.groupby(["study", "dataset", "depth"], dropna=False, sort=True):
        a, b = g[g["optimizer"] == m], g[g["optimizer"] == r]
        if a.empty or b.empty:
            continue
        a, b = a.iloc[0], b.iloc[0]
        ra = _runs_of(chosen, key, m)
        rb = _runs_of(chosen, key, r)
        pa = ra[ra["status"] == "completed"].groupby("seed")["test_acc"].mean()
        pb = rb[rb["status"] == "completed"].groupby("seed")["test_acc"].mean()
        ratios = (pa / pb).dropna()
        ratios = ratios[np.isfinite(ratios)]
        row = dict(zip(["study", "dataset", "depth"], key))
        row.update({
            f"{m}_lr": a["lr"], f"{r}_lr": b["lr"],
            f"{m}_test_acc": a["test_acc_mean"], f"{r}_test_acc": b["test_acc_mean"],
            "ratio_of_means": _div(a["test_acc_mean"], b["test_acc_mean"]),
            "ratio_median": float(ratios.median()) if len(ratios) else math.nan,
            "ratio_q25": float(ratios.quantile(0.25)) if len(ratios) else math.nan,
            "ratio_q75": float(ratios.quantile(0.75)) if len(ratios) else math.nan,
            "n_pairs": len(ratios),
            f"{m}_n_diverged": a["n_diverged"], f"{r}_n_diverged": b["n_diverged"],
            f"{m}_wall_time_s": a["wall_time_s_mean"], f"{r}_wall_time_s": b["wall_time_s_mean"],
            "time_lower": _lower(a["wall_time_s_mean"], b["wall_time_s_mean"], m, r),
            f"{m}_peak_mem_mb": a["peak_mem_mb_mean"], f"{r}_peak_mem_mb": b["peak_mem_mb_mean"],
            f"{m}_state_mem_mb": a.get("state_mem_mb_mean", math.nan), f"{r}_state_mem_mb": b.get("state_mem_mb_mean", math.nan),
            # peak allocated memory where measured (CUDA), else the exact training-state size
            "mem_lower": _lower(*_mem_pair(a, b), m, r),
        })
        out.append(row)
    df = pd.DataFrame(out, columns=cols)
    df["depth"] = _maybe_int(df["depth"])
    return df


def _mem_pair(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    pa, pb = a.get("peak_mem_mb_mean", math.nan), b.get("peak_mem_mb_mean", math.nan)
    if pd.notna(pa) and pd.notna(pb):
        return float(pa), float(pb)
    return float(a.get("state_mem_mb_mean", math.nan)), float(b.get("state_mem_mb_mean", math.nan))


def _runs_of(chosen: pd.DataFrame, key: tuple, optimizer: str) -> pd.DataFrame:
    study, dataset, depth = key
    mask = chosen["optimizer"] == optimizer
    for col, v in (("study", study), ("dataset", dataset), ("depth", depth)):
        mask &= chosen[col].isna() if pd.isna(v) else (chosen[col] == v)
    return chosen[mask.fillna(False).astype(bool)]


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if pd.notna(a) and pd.notna(b) and float(b) != 0.0 else math.nan


def _lower(a: float, b: float, na: str, nb: str) -> str:
    if pd.isna(a) or pd.isna(b):
        return "n/a"
    return na if a < b else nb if b < a else "tie"


def depth_tolerance_table(runs: pd.DataFrame, best: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (study, dataset, optimizer): the deepest depth whose best-LR config trained.

    Trained = every seed completed and mean test accuracy >= chance + 0.02, with chance =
    1/n_classes (from config, else 1/10). Status counts are over all of the optimizer's runs.
    """
    cols = [
        "study", "dataset", "optimizer", "deepest_trainable", "test_acc_at_deepest", "depths_trained",
        "depths_tried", "chance", "n_runs", "n_completed", "n_diverged", "n_failed",
    ]
    best = best_lr_table(runs) if best is None else best
    sw = sweep_runs(runs)
    sw = sw[sw["optimizer"].notna()]  # a run without a config (unreadable metrics) is only in divergence
    out = []
    for key, g in sw.groupby(["study", "dataset", "optimizer"], dropna=False, sort=True):
        chance = chance_level(g)
        b = best
        for col, v in zip(("study", "dataset", "optimizer"), key):
            b = b[b[col].isna()] if pd.isna(v) else b[b[col] == v]
        ok = b[(b["n_completed"] == b["n_seeds"]) & (b["test_acc_mean"] >= chance + TRAINABLE_MARGIN - 1e-12)]
        deepest = ok.loc[ok["depth"].idxmax()] if len(ok) else None
        out.append({
            **dict(zip(("study", "dataset", "optimizer"), key)),
            "deepest_trainable": deepest["depth"] if deepest is not None else pd.NA,
            "test_acc_at_deepest": deepest["test_acc_mean"] if deepest is not None else math.nan,
            "depths_trained": " ".join(str(int(d)) for d in sorted(ok["depth"].dropna())),
            "depths_tried": " ".join(str(int(d)) for d in sorted(g["depth"].dropna().unique())),
            "chance": chance,
            "n_runs": len(g),
            "n_completed": int((g["status"] == "completed").sum()),
            "n_diverged": int((g["status"] == "diverged").sum()),
            "n_failed": int((g["status"] == "failed").sum()),
        })
    df = pd.DataFrame(out, columns=cols)
    df["deepest_trainable"] = _maybe_int(df["deepest_trainable"])
    return df


def divergence_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run that did not complete (headline included), with its step and reason."""
    cols = ["run_id", "run_dir", "study", "dataset", "optimizer", "depth", "lr", "seed",
            "status", "diverged_step", "diverge_reason", "error"]
    bad = runs[runs["status"] != "completed"]
    bad = bad.sort_values(["optimizer", "depth", "lr", "seed", "run_dir"], kind="mergesort", na_position="last")
    return bad[cols].reset_index(drop=True)


# ---------------------------------------------------------------- output


def aggregate(runs_root: Path | str, out_dir: Path | str) -> dict[str, Path]:
    """Write runs/best_lr/verdict/depth_tolerance/divergence tables (CSV + Markdown).

    Returns a mapping from file name (e.g. ``"best_lr.md"``) to the written path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, _, _ = load_runs(runs_root, series=False)
    best = best_lr_table(runs)
    tables = {
        "best_lr": best,
        "verdict": verdict_table(runs, best),
        "depth_tolerance": depth_tolerance_table(runs, best),
        "divergence": divergence_table(runs),
    }
    written: dict[str, Path] = {}
    path = out_dir / "runs.csv"
    runs.to_csv(path, index=False)
    written[path.name] = path
    for name, df in tables.items():
        csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
        df.to_csv(csv_path, index=False)
        md_path.write_text(markdown_table(df) + "\n")
        written[csv_path.name] = csv_path
        written[md_path.name] = md_path
    return written


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a table written by :func:`aggregate` (empty frame for a header-only file)."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def is_pct_column(name: str) -> bool:
    """Accuracy and ratio columns are shown as percentages."""
    return "acc" in name or name.startswith("ratio") or name == "chance"


def format_value(v: Any, col: str = "") -> str:
    """One cell: percent with 1 decimal for accuracy/ratio columns, else 4 significant digits."""
    if v is None or v is pd.NA or v is pd.NaT:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "n/a"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        if is_pct_column(col):
            return f"{100.0 * f:.1f}%"
        if f == int(f) and abs(f) < 1e6:
            return str(int(f))
        return f"{f:.4g}"
    s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, max_chars: int = 80) -> str:
    """A GitHub Markdown table (no tabulate dependency); an empty frame gives ``_(none)_``."""
    if df.empty:
        return "_(none)_"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in df.itertuples(index=False, name=None):
        cells = []
        for c, v in zip(cols, row):
            s = format_value(v, c)
            cells.append(s if len(s) <= max_chars else s[: max_chars - 1] + "…")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
