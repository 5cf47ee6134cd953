"""Read run directories into pandas tables and write the study's summary tables.

Every run found is kept: diverged and failed runs are results and appear in ``runs.csv`` and
``divergence.csv``. Learning rates are selected on the validation split only, never on test.

Layout read: ``runs/sweep/<study>/<optimizer>/<run_id>/metrics.json`` (``sweep`` key: study,
role search|confirm, grid point, select metric), each slice's ``summary.json`` (selected LR,
failures, skipped points per grid point), ``runs/ablate/<variant>/<variant>-s<seed>/`` and the
headline run ``runs/train``. Older trees without the ``sweep`` key are read too (the grid point
is then the run's depth).
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

TASK_KEYS = ("study", "dataset", "depth", "point")
"""A task of the verdict: one grid point of a study on one dataset."""

RUN_TAGS = ("run_dir", "run_id", "study", "dataset", "optimizer", "depth", "lr", "seed")
"""Run columns copied onto every curves/layers row."""

TOP_KEYS = ("run_id", "run_dir", "kind", "status", "diverged_step", "diverge_reason", "error", "failure", "role",
            "point", "select", "variant", "axis", "axis_value", "task", "in_verdict")

FINAL_NUMERIC = (
    "train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "test_loss", "test_acc",
    "wall_time_s", "peak_mem_mb", "step_mem_mb", "state_mem_mb", "peak_rss_mb", "steps", "epochs_completed", "sigma_max_max",
    "sn_violations", "sn_active_frac", "epochs_to_90", "seconds_per_epoch", "examples_per_s", "tokens_per_s",
    "val_ppl", "val_bpb", "test_ppl", "test_bpb",
)

FAILURE_KINDS = ("nonfinite", "exploding", "vanishing", "chance")
"""The engine's names for a run that did not train (metrics.json ``failure``)."""

ADVANTAGES = ("wall_time", "seconds_per_epoch", "memory", "depth_tolerance", "epochs_to_90")
"""Advantage metrics of the verdict, in the order they are listed."""

QUESTION_ADVANTAGES = ("wall_time", "memory", "depth_tolerance")
"""The advantages the study's question names: >= 95% of Adam's accuracy while winning on one of these."""

TARGET_RATIO = 0.95

HEADLINE_DIR = "train"
ABLATE_DIR = "ablate"
DEFAULT_N_CLASSES = 10
TRAINABLE_MARGIN = 0.02  # accuracy (fraction) above chance that counts as "trained"

TABLE_FILES = (
    "runs.csv", "best_lr.csv", "best_lr.md", "verdict.csv", "verdict.md", "depth_to_failure.csv",
    "depth_to_failure.md", "ablation.csv", "ablation.md", "depth_tolerance.csv", "depth_tolerance.md",
    "divergence.csv", "divergence.md",
)


# ---------------------------------------------------------------- loading


def load_runs(root: Path | str, *, series: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Find every ``metrics.json`` under ``root``; return the (runs, curves, layers) frames.

    ``run_dir`` is the run's directory relative to ``root``'s parent (``runs/sweep/mlp_depth/adam/x``).
    ``kind`` is ``headline`` for a directory named ``train``, ``ablation`` under ``ablate/``, else
    ``sweep``. A metrics file that cannot be parsed becomes a ``failed`` row with the parse error.
    Missing or empty ``curves.csv``/``layers.csv`` are tolerated. ``series=False`` skips reading
    them (the curves and layers frames are then empty; see :func:`load_series`).
    """
    root = Path(root)
    base = root.resolve().parent
    rows = [_run_row(mpath, mpath.parent.resolve().relative_to(base).as_posix()) for mpath in sorted(root.rglob("metrics.json"))]
    runs = _runs_frame(rows)
    if not series:
        return runs, *load_series(root, [])
    return runs, *load_series(root, runs)


def load_series(root: Path | str, runs: pd.DataFrame | list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (curves, layers) frames of the given runs (rows of a runs frame), tagged with RUN_TAGS."""
    base = Path(root).resolve().parent
    curves: list[pd.DataFrame] = []
    layers: list[pd.DataFrame] = []
    rows = runs.to_dict("records") if isinstance(runs, pd.DataFrame) else list(runs)
    for row in rows:
        run_dir = base / row["run_dir"]
        tags = {k: row.get(k, np.nan) for k in RUN_TAGS}
        for name, sink in (("curves.csv", curves), ("layers.csv", layers)):
            frame = _read_csv(run_dir / name)
            if frame is not None and len(frame):
                sink.append(_tagged(frame, tags))
    curve_cols = [*RUN_TAGS, "step", "epoch", "metric", "value"]
    layer_cols = [*RUN_TAGS, "step", "epoch", "layer", "role", "grad_norm", "sigma_max"]
    return _concat(curves, curve_cols, ("value",)), _concat(layers, layer_cols, ("grad_norm", "sigma_max"))


def _tagged(frame: pd.DataFrame, tags: dict[str, Any]) -> pd.DataFrame:
    for k, v in reversed(tags.items()):
        if k in frame.columns:
            frame = frame.drop(columns=k)
        frame.insert(0, k, v)
    return frame


def _kind(rel: str) -> str:
    parts = Path(rel).parts
    if Path(rel).name == HEADLINE_DIR:
        return "headline"
    return "ablation" if ABLATE_DIR in parts else "sweep"


def _run_row(mpath: Path, rel: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": Path(rel).name,
        "run_dir": rel,
        "kind": _kind(rel),
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
    row["failure_recorded"] = "failure" in m  # False for runs that predate the engine's classification
    sw = m.get("sweep") or {}
    row["role"] = sw.get("role")
    row["select"] = sw.get("select")
    row["in_verdict"] = sw.get("verdict", True) is not False  # False: a cost study (see StudySpec.verdict)
    row["variant"] = sw.get("variant") or (Path(rel).parent.name if row["kind"] == "ablation" else None)
    point = sw.get("point") or {}
    row["point"] = point_label(point) or None
    if point:
        axis, value = next(iter(point.items()))
        row["axis"], row["axis_value"] = axis, _axis_number(value)
    for k, v in _flatten(m.get("config") or {}).items():
        if k not in row:
            row[k] = v
        elif k not in ("run_id",) and row[k] != v:
            row[f"config_{k}"] = v
    final = m.get("final") or {}
    for k, v in _flatten(final).items():
        row[k if k not in row else f"final_{k}"] = v
    if "epochs_to_90" in final and final["epochs_to_90"] is None:
        row["epochs_to_90"] = math.inf  # recorded as never reached (a missing key stays NaN)
    lm = "tokens_per_s" in final or "val_bpb" in final or "test_bpb" in final
    row["task"] = "lm" if lm else "classification"
    prov = m.get("provenance") or {}
    row["frozen"] = bool(prov.get("frozen", False))
    row["git_commit"] = prov.get("git_commit")
    row["git_dirty"] = prov.get("git_dirty")
    return row


def point_label(point: dict[str, Any]) -> str:
    """``{"depth": 32, "width": 64}`` -> ``"depth=32 width=64"`` (the ``point`` column)."""
    return " ".join(f"{k}={v}" for k, v in point.items())


def parse_point(label: Any) -> dict[str, Any]:
    """Inverse of :func:`point_label` (numbers parsed; ``{}`` for NaN or an empty label)."""
    if not isinstance(label, str) or not label.strip():
        return {}
    out: dict[str, Any] = {}
    for part in label.split():
        k, _, v = part.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = {"True": True, "False": False}.get(v, v)
    return out


def _axis_number(v: Any) -> float:
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


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
    for col in (*FINAL_NUMERIC, "lr", "axis_value"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("depth", "seed", "width", "diverged_step", "n_classes", "epochs", "batch_size", "block_size"):
        if col in df.columns:
            df[col] = _maybe_int(df[col])
    df["frozen"] = df["frozen"].fillna(False).astype(bool)
    df["in_verdict"] = df["in_verdict"].map(lambda v: v is not False).astype(bool)
    if len(df):
        # runs written before the sweep key: the grid point is the depth
        legacy = (df["kind"] == "sweep") & df["point"].isna() & df["role"].isna() & df["depth"].notna()
        for col in ("point", "axis"):
            df[col] = df[col].astype(object)
        df.loc[legacy, "point"] = [f"depth={int(d)}" for d in df.loc[legacy, "depth"]]
        df.loc[legacy, "axis"] = "depth"
        df.loc[legacy, "axis_value"] = df.loc[legacy, "depth"].astype(float)
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


SUMMARY_COLS = ["study", "optimizer", "dataset", "point", "axis", "axis_value", "selected_lr", "select", "score",
                "failures", "skipped", "source"]


def load_summaries(root: Path | str) -> pd.DataFrame:
    """Every sweep slice's ``summary.json`` under ``root``: one row per (slice, dataset, grid point).

    ``failures`` is the space-separated failure kinds of the selected configuration (empty when it
    trained); ``skipped`` is the reason a point was not run (beyond a failure), else None.
    """
    root = Path(root)
    base = root.resolve().parent
    rows: list[dict[str, Any]] = []
    for path in sorted(root.rglob("summary.json")):
        try:
            doc = json.loads(path.read_text())
            points = doc["points"]
            if not isinstance(points, list):
                raise ValueError("points is not a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"{path}: unreadable summary ({exc}); skipped", stacklevel=2)
            continue
        study = doc.get("study") or path.parent.parent.name
        optimizer = doc.get("optimizer") or path.parent.name
        for p in points:
            pt = p.get("point") or {}
            axis, value = next(iter(pt.items())) if pt else (None, None)
            rows.append({
                "study": study, "optimizer": optimizer, "dataset": p.get("dataset"),
                "point": point_label(pt) or None, "axis": axis, "axis_value": _axis_number(value),
                "selected_lr": p.get("selected_lr"), "select": p.get("select"), "score": p.get("score"),
                "failures": " ".join(sorted(p.get("failures") or [])),
                "skipped": p.get("skipped") or None,
                "source": path.resolve().relative_to(base).as_posix(),
            })
    df = pd.DataFrame(rows, columns=SUMMARY_COLS)
    for c in ("axis_value", "selected_lr", "score"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def read_ablation_order(params: Path | str | None) -> list[str]:
    """The ablation variants' names in params.yaml order (``profiles.<scale>.ablate.variants``).

    Empty when the file is missing or unreadable (the table is then in directory order).
    """
    if params is None or not Path(params).is_file():
        return []
    try:
        import yaml

        doc = yaml.safe_load(Path(params).read_text()) or {}
        scale = doc.get("scale") or "quick"
        variants = ((doc.get("profiles") or {}).get(scale) or {}).get("ablate", {}).get("variants") or {}
        return [str(k) for k in variants]
    except Exception as exc:  # noqa: BLE001 - ordering only: never fail the aggregate stage on it
        warnings.warn(f"{params}: ablation order not read ({exc}); directory order used", stacklevel=2)
        return []


# ---------------------------------------------------------------- tables


def sweep_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that belong to studies (the headline run and ablations are excluded)."""
    return runs[runs["kind"] == "sweep"]


def ablation_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["kind"] == "ablation"]


def chance_level(runs: pd.DataFrame) -> float:
    """1/n_classes from the runs' config (the largest n_classes), else 1/10."""
    if "n_classes" in runs.columns:
        n = pd.to_numeric(runs["n_classes"], errors="coerce").dropna()
        if len(n):
            return 1.0 / float(n.max())
    return 1.0 / DEFAULT_N_CLASSES


def run_failure(row: pd.Series | dict) -> str | None:
    """How a run failed to train: the engine's ``failure``, else the divergence reason, ``error``
    for a failed (crashed) run, else None. For a run written before the engine classified
    failures, a completed classification run within 2 points of chance counts as ``chance``
    (the engine's rule)."""
    f = row.get("failure")
    if isinstance(f, str) and f:
        return f
    status = row.get("status")
    if status == "diverged":
        r = row.get("diverge_reason")
        return r if isinstance(r, str) and r else "diverged"
    if status == "failed":
        return "error"
    recorded = row.get("failure_recorded")
    legacy = recorded is not None and not _isna(recorded) and not bool(recorded)
    if legacy and status == "completed" and row.get("task") != "lm":
        acc, n = row.get("test_acc"), row.get("n_classes")
        chance = 1.0 / float(n) if not _isna(n) and float(n) > 0 else 1.0 / DEFAULT_N_CLASSES
        if not _isna(acc) and float(acc) < chance + TRAINABLE_MARGIN:
            return "chance"
    return None


def best_lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, dataset, optimizer, depth, point): the LR selected on validation.

    The selection score ``val_score`` is over the LR-search runs (role ``search``; all runs in
    trees without roles): mean final ``val_acc`` with diverged/failed (NaN) runs counted as 0,
    or ``-val_loss`` (NaN as -inf) for studies that select on ``val_loss`` (language models).
    An LR that has confirmation runs is the one the sweep selected and wins; else ties go to
    fewer non-completed runs, then the smaller LR. Statistics for the chosen LR are over its
    completed seeds (search and confirmation); test metrics never enter the selection.
    ``epochs_to_90_mean`` is inf when a completed seed never reached 90% validation accuracy
    (``n_reached_90`` counts those that did); ``n_<kind>`` count runs by failure kind.
    """
    cols = [
        *GROUP_KEYS, "lr", "n_seeds", "n_completed", "n_diverged", "n_failed", "select", "val_score",
        "val_acc_mean", "val_loss_mean", "test_acc_mean", "test_acc_std", "test_acc_min", "test_acc_max",
        "test_bpb_mean", "test_ppl_mean", "wall_time_s_mean", "wall_time_s_median", "seconds_per_epoch_mean",
        "seconds_per_epoch_median", "epochs_to_90_mean",
        "n_reached_90", "peak_mem_mb_mean", "step_mem_mb_mean", "state_mem_mb_mean", "sn_active_frac_mean", *(f"n_{k}" for k in FAILURE_KINDS), "task",
        "frozen", "seeds",
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
    stats = stats.sort_values(["_confirmed", "val_score", "_bad", "lr"], ascending=[False, False, True, True],
                              kind="mergesort")
    best = stats.groupby(list(GROUP_KEYS), dropna=False, sort=True).head(1)
    best = best.sort_values(list(GROUP_KEYS), kind="mergesort").reset_index(drop=True)
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

    def median(col: str) -> float:
        return float(done[col].median()) if col in done and done[col].notna().any() else math.nan

    if select == "val_loss":
        vl = search["val_loss"] if "val_loss" in search else pd.Series(np.nan, index=search.index)
        score = float(-vl.astype(float).fillna(np.inf).mean())
    else:
        val = search["val_acc"] if "val_acc" in search else pd.Series(np.nan, index=search.index)
        score = float(val.astype(float).fillna(0.0).mean())
    seeds = sorted(int(s) for s in g["seed"].dropna())
    failures = [run_failure(r) for r in g.to_dict("records")]
    e90 = done["epochs_to_90"] if "epochs_to_90" in done else pd.Series(dtype=float)
    tasks = g["task"].dropna().unique() if "task" in g else []
    return {
        "n_seeds": len(g),
        "n_completed": len(done),
        "n_diverged": int((g["status"] == "diverged").sum()),
        "n_failed": int((g["status"] == "failed").sum()),
        "select": select,
        "val_score": score,
        "val_acc_mean": mean("val_acc"),
        "val_loss_mean": mean("val_loss"),
        "test_acc_mean": float(test.mean()) if test.notna().any() else math.nan,
        "test_acc_std": float(test.std(ddof=1)) if test.notna().sum() > 1 else math.nan,
        "test_acc_min": float(test.min()) if test.notna().any() else math.nan,
        "test_acc_max": float(test.max()) if test.notna().any() else math.nan,
        "test_bpb_mean": mean("test_bpb"),
        "test_ppl_mean": mean("test_ppl"),
        "wall_time_s_mean": mean("wall_time_s"),
        "wall_time_s_median": median("wall_time_s"),
        "seconds_per_epoch_mean": mean("seconds_per_epoch"),
        "seconds_per_epoch_median": median("seconds_per_epoch"),
        "epochs_to_90_mean": mean("epochs_to_90"),
        "n_reached_90": int(np.isfinite(e90.astype(float)).sum()) if e90.notna().any() else math.nan,
        "peak_mem_mb_mean": mean("peak_mem_mb"),
        "step_mem_mb_mean": mean("step_mem_mb"),
        "sn_active_frac_mean": mean("sn_active_frac"),
        "state_mem_mb_mean": mean("state_mem_mb"),
        **{f"n_{k}": sum(f == k for f in failures) for k in FAILURE_KINDS},
        "task": "lm" if "lm" in tasks else ("classification" if len(tasks) else math.nan),
        "frozen": bool(g["frozen"].all()),
        "seeds": " ".join(str(s) for s in seeds),
        "_confirmed": bool((g["role"] == "confirm").any()) if "role" in g else False,
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


def _match(df: pd.DataFrame, **kv: Any) -> pd.DataFrame:
    """Rows of ``df`` whose columns equal ``kv`` (NaN matches NaN)."""
    mask = pd.Series(True, index=df.index)
    for col, v in kv.items():
        if col not in df:
            mask &= pd.isna(v)
            continue
        mask &= df[col].isna() if _isna(v) else (df[col] == v).fillna(False).astype(bool)
    return df[mask]


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def verdict_table(runs: pd.DataFrame, best: pd.DataFrame | None = None, method: str = "sgd_sn",
                  reference: str = "adam", *, failure_depths: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per task (study, dataset, grid point) with both optimizers: ``method`` against ``reference``.

    ``ratio_of_means`` = method's mean test accuracy / reference's (each at its selected LR, over
    its completed seeds). The per-seed ratio pairs seeds that completed under both; median,
    quartiles (numpy's linear interpolation) and IQR over those seeds. Advantage metrics hold for
    ``method`` when strictly better: ``wall_time`` and ``seconds_per_epoch`` (lower medians over
    completed seeds),
    ``memory`` (lower mean peak CUDA memory when both have it, else lower training-state size),
    ``depth_tolerance`` (a deeper deepest-trainable depth in the study/dataset, from
    :func:`depth_to_failure_table`, with the reference failing at or before it) and
    ``epochs_to_90`` (every completed seed reached 90% validation accuracy, in fewer epochs on
    average or where the reference did not). ``meets_95pct``: ratio of means >= 0.95.
    ``answer``: meets the bar and holds one of the question's advantages (wall time, memory,
    depth tolerance). ``x_lower``/``depth_deeper`` name the better optimizer, ``tie`` or ``n/a``.
    Studies marked ``verdict: false`` (cost studies) are left out.
    """
    m, r = method, reference
    cols = [
        *TASK_KEYS, "task", f"{m}_lr", f"{r}_lr", f"{m}_test_acc", f"{r}_test_acc",
        "ratio_of_means", "ratio_median", "ratio_q25", "ratio_q75", "ratio_iqr", "n_pairs", "meets_95pct",
        f"{m}_n_seeds", f"{r}_n_seeds", f"{m}_n_completed", f"{r}_n_completed",
        f"{m}_n_diverged", f"{r}_n_diverged", f"{m}_failures", f"{r}_failures",
        f"{m}_wall_time_s", f"{r}_wall_time_s", "time_lower",
        f"{m}_seconds_per_epoch", f"{r}_seconds_per_epoch", "epoch_time_lower",
        "mem_basis", f"{m}_mem_mb", f"{r}_mem_mb", f"{m}_peak_mem_mb", f"{r}_peak_mem_mb",
        f"{m}_state_mem_mb", f"{r}_state_mem_mb", "mem_lower",
        f"{m}_deepest", f"{r}_deepest", "depth_deeper",
        f"{m}_epochs_to_90", f"{r}_epochs_to_90", f"{m}_n_reached_90", f"{r}_n_reached_90", "e90_fewer",
        f"{m}_test_bpb", f"{r}_test_bpb", f"{m}_sn_active_frac", "advantages", "answer", "frozen",
    ]
    best = best_lr_table(runs) if best is None else best
    if failure_depths is None:
        failure_depths = depth_to_failure_table(runs, best=best)
    chosen = best_runs(runs, best) if len(best) else runs.iloc[0:0]
    cost_studies = set(runs.loc[~runs["in_verdict"], "study"].dropna()) if len(runs) else set()
    best = best[~best["study"].isin(cost_studies)]  # cost studies: in context_table, not the verdict
    out = []
    for key, g in best.groupby(list(TASK_KEYS), dropna=False, sort=True):
        a, b = g[g["optimizer"] == m], g[g["optimizer"] == r]
        if a.empty or b.empty:
            continue
        a, b = a.iloc[0], b.iloc[0]
        task = dict(zip(TASK_KEYS, key))
        ra, rb = _match(chosen, **task, optimizer=m), _match(chosen, **task, optimizer=r)
        pa = ra[ra["status"] == "completed"].groupby("seed")["test_acc"].mean()
        pb = rb[rb["status"] == "completed"].groupby("seed")["test_acc"].mean()
        ratios = (pa / pb).dropna()
        ratios = ratios[np.isfinite(ratios)].to_numpy(dtype=float)
        q25, med, q75 = np.percentile(ratios, [25, 50, 75]) if len(ratios) else (math.nan,) * 3
        ratio = _div(a["test_acc_mean"], b["test_acc_mean"])
        basis, mem_a, mem_b = _mem_pair(a, b)
        deep_a, deep_b, deeper = _deeper(failure_depths, task["study"], task["dataset"], m, r)
        e90 = _fewer_epochs(a, b, m, r)
        row = {
            **task, "task": a.get("task"),
            f"{m}_lr": a["lr"], f"{r}_lr": b["lr"],
            f"{m}_test_acc": a["test_acc_mean"], f"{r}_test_acc": b["test_acc_mean"],
            "ratio_of_means": ratio, "ratio_median": float(med), "ratio_q25": float(q25), "ratio_q75": float(q75),
            "ratio_iqr": float(q75 - q25), "n_pairs": len(ratios),
            "meets_95pct": bool(pd.notna(ratio) and ratio >= TARGET_RATIO),
            f"{m}_n_seeds": a["n_seeds"], f"{r}_n_seeds": b["n_seeds"],
            f"{m}_n_completed": a["n_completed"], f"{r}_n_completed": b["n_completed"],
            f"{m}_n_diverged": a["n_diverged"], f"{r}_n_diverged": b["n_diverged"],
            f"{m}_failures": _failure_text(ra), f"{r}_failures": _failure_text(rb),
            # times: medians over completed seeds (one seed slowed by a shared machine does not decide)
            f"{m}_wall_time_s": a["wall_time_s_median"], f"{r}_wall_time_s": b["wall_time_s_median"],
            "time_lower": _lower(a["wall_time_s_median"], b["wall_time_s_median"], m, r),
            f"{m}_seconds_per_epoch": a.get("seconds_per_epoch_median", math.nan),
            f"{r}_seconds_per_epoch": b.get("seconds_per_epoch_median", math.nan),
            "epoch_time_lower": _lower(a.get("seconds_per_epoch_median", math.nan), b.get("seconds_per_epoch_median", math.nan), m, r),
            # CUDA allocator peak where both measured it, else the profiled step peak (CPU), else the state size
            "mem_basis": basis, f"{m}_mem_mb": mem_a, f"{r}_mem_mb": mem_b,
            f"{m}_peak_mem_mb": a["peak_mem_mb_mean"], f"{r}_peak_mem_mb": b["peak_mem_mb_mean"],
            f"{m}_state_mem_mb": a.get("state_mem_mb_mean", math.nan), f"{r}_state_mem_mb": b.get("state_mem_mb_mean", math.nan),
            "mem_lower": _lower(mem_a, mem_b, m, r),
            f"{m}_deepest": deep_a, f"{r}_deepest": deep_b, "depth_deeper": deeper,
            f"{m}_epochs_to_90": a.get("epochs_to_90_mean", math.nan), f"{r}_epochs_to_90": b.get("epochs_to_90_mean", math.nan),
            f"{m}_n_reached_90": a.get("n_reached_90", math.nan), f"{r}_n_reached_90": b.get("n_reached_90", math.nan),
            "e90_fewer": e90,
            f"{m}_test_bpb": a.get("test_bpb_mean", math.nan), f"{r}_test_bpb": b.get("test_bpb_mean", math.nan),
            # fraction of steps at which the projection changed a weight (0: sgd_sn was plain SGD)
            f"{m}_sn_active_frac": a.get("sn_active_frac_mean", math.nan),
            "frozen": bool(a["frozen"] and b["frozen"]),
        }
        held = {
            "wall_time": row["time_lower"] == m, "seconds_per_epoch": row["epoch_time_lower"] == m,
            "memory": row["mem_lower"] == m, "depth_tolerance": deeper == m, "epochs_to_90": e90 == m,
        }
        row["advantages"] = " ".join(k for k in ADVANTAGES if held[k]) or "none"
        row["answer"] = "yes" if row["meets_95pct"] and any(held[k] for k in QUESTION_ADVANTAGES) else "no"
        out.append(row)
    df = pd.DataFrame(out, columns=cols)
    for c in ("depth", f"{m}_deepest", f"{r}_deepest"):
        df[c] = _maybe_int(df[c])
    return df


def _failure_text(chosen: pd.DataFrame) -> str:
    """``"chance 1, nonfinite 2"``: failure kinds (with counts) of a configuration's runs; '' if none."""
    kinds = [f for f in (run_failure(r) for r in chosen.to_dict("records")) if f]
    return ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))


MEM_BASES = (("peak", "peak_mem_mb"), ("step", "step_mem_mb"))
"""Memory measures in order of preference (``mem_basis``); ``state`` (``state_mem_mb``) is the fallback."""


def _mem_pair(a: pd.Series, b: pd.Series) -> tuple[str, float, float]:
    """(basis, memory of a, memory of b): ``peak`` (CUDA allocator peak) where both recorded it,
    else ``step`` (peak of one profiled training step, CPU), else ``state`` (training-state size)."""
    for basis, col in MEM_BASES:
        pa, pb = a.get(f"{col}_mean", math.nan), b.get(f"{col}_mean", math.nan)
        if pd.notna(pa) and pd.notna(pb):
            return basis, float(pa), float(pb)
    sa, sb = a.get("state_mem_mb_mean", math.nan), b.get("state_mem_mb_mean", math.nan)
    return "state", float(sa) if pd.notna(sa) else math.nan, float(sb) if pd.notna(sb) else math.nan


def _deeper(dtf: pd.DataFrame, study: Any, dataset: Any, m: str, r: str) -> tuple[Any, Any, str]:
    """Deepest trainable depths of m and r in a study/dataset and which is deeper (or tie / n/a).

    m is deeper only where r demonstrably failed at or before m's deepest depth (a slice that was
    not run as deep proves nothing), and symmetrically.
    """
    if dtf is None or dtf.empty:
        return pd.NA, pd.NA, "n/a"
    d = _match(dtf, study=study, dataset=dataset)
    d = d[d["axis"] == "depth"]
    rows = {o: d[d["optimizer"] == o] for o in (m, r)}
    if any(v.empty for v in rows.values()):
        return pd.NA, pd.NA, "n/a"
    da, db = (rows[o].iloc[0]["deepest_trained"] for o in (m, r))
    fa, fb = (rows[o].iloc[0]["first_failing"] for o in (m, r))
    na, nb = _isna(da), _isna(db)
    if na and nb:
        return pd.NA, pd.NA, "n/a"
    if not na and (nb or float(da) > float(db)):
        return da, db, m if pd.notna(fb) and float(fb) <= float(da) else "n/a"
    if not nb and (na or float(db) > float(da)):
        return da, db, r if pd.notna(fa) and float(fa) <= float(db) else "n/a"
    return da, db, "tie"


def _fewer_epochs(a: pd.Series, b: pd.Series, m: str, r: str) -> str:
    ea, eb = a.get("epochs_to_90_mean", math.nan), b.get("epochs_to_90_mean", math.nan)
    if _isna(ea) or _isna(eb) or (math.isinf(ea) and math.isinf(eb)):
        return "n/a"  # not recorded, or neither reached 90% on every completed seed
    return _lower(ea, eb, m, r)


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if pd.notna(a) and pd.notna(b) and float(b) != 0.0 else math.nan


def _lower(a: float, b: float, na: str, nb: str) -> str:
    if pd.isna(a) or pd.isna(b):
        return "n/a"
    return na if a < b else nb if b < a else "tie"


def depth_to_failure_table(runs: pd.DataFrame, summaries: pd.DataFrame | None = None,
                           best: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (study, dataset, optimizer), along the first grid axis (depth for the depth studies).

    A point trained when its selected configuration had no failure: the slice's ``summary.json``
    failures together with the failure kinds of the selected LR's runs (``failure``, divergence
    reason, ``error`` for a crashed run). Where a slice has no summary (still running, or an
    older tree) the runs alone decide. ``deepest_trained``: the largest axis value at which every
    point trained; ``first_failing``: the smallest at which one failed, with its kinds;
    ``skipped``: points not run beyond a failure (the depth-to-failure search).
    """
    cols = ["study", "dataset", "optimizer", "axis", "points_tried", "deepest_trained", "first_failing",
            "failure_kinds", "failing", "skipped", "selected_lrs", "n_runs", "source"]
    best = best_lr_table(runs) if best is None else best
    chosen = best_runs(runs, best) if len(best) else runs.iloc[0:0]
    sw = sweep_runs(runs)
    summaries = summaries if summaries is not None else pd.DataFrame(columns=SUMMARY_COLS)
    recs: dict[tuple, dict[str, Any]] = {}
    for s in summaries.to_dict("records"):
        if not isinstance(s["axis"], str) or _isna(s["axis_value"]):
            continue
        k = (s["study"], s["dataset"], s["optimizer"], s["point"])
        recs[k] = {"axis": s["axis"], "value": s["axis_value"], "lr": s["selected_lr"], "skipped": bool(s["skipped"]),
                   "kinds": set(str(s["failures"]).split()) if isinstance(s["failures"], str) else set(),
                   "source": "summary"}
    for key, g in best.groupby(["study", "dataset", "optimizer", "point"], dropna=False, sort=False):
        study, dataset, opt, point = key
        pt = parse_point(point)
        if not pt:
            continue
        axis, value = next(iter(pt.items()))
        rec = recs.setdefault(key, {"axis": axis, "value": _axis_number(value), "lr": g.iloc[0]["lr"], "skipped": False,
                                    "kinds": set(), "source": "runs"})
        lr = rec["lr"] if pd.notna(rec["lr"]) else g.iloc[0]["lr"]
        sel = _match(sw, study=study, dataset=dataset, optimizer=opt, point=point)
        sel = sel[np.isclose(sel["lr"].astype(float), float(lr))] if pd.notna(lr) else _match(chosen, study=study, dataset=dataset, optimizer=opt, point=point)
        rec["kinds"] |= {f for f in (run_failure(r) for r in sel.to_dict("records")) if f}
        rec["skipped"] = rec["skipped"] and sel.empty
    out = []
    by_slice: dict[tuple, list[dict[str, Any]]] = {}
    for (study, dataset, opt, point), rec in recs.items():
        by_slice.setdefault((study, dataset, opt, rec["axis"]), []).append(rec)
    for (study, dataset, opt, axis), pts in sorted(by_slice.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        values = sorted({p["value"] for p in pts})
        state: dict[float, tuple[str, set[str]]] = {}
        for v in values:
            here = [p for p in pts if p["value"] == v]
            ran = [p for p in here if not p["skipped"]]
            kinds = set().union(*(p["kinds"] for p in ran)) if ran else set()
            state[v] = ("skipped", set()) if not ran else ("failed", kinds) if kinds else ("trained", set())
        trained = [v for v in values if state[v][0] == "trained"]
        failed = [v for v in values if state[v][0] == "failed"]
        mine = _match(sw, study=study, dataset=dataset, optimizer=opt)
        n_runs = int((mine["axis"] == axis).sum())
        out.append({
            "study": study, "dataset": dataset, "optimizer": opt, "axis": axis,
            "points_tried": " ".join(_num_text(v) for v in values if state[v][0] != "skipped"),
            "deepest_trained": max(trained) if trained else math.nan,
            "first_failing": min(failed) if failed else math.nan,
            "failure_kinds": " ".join(sorted(state[min(failed)][1])) if failed else "",
            "failing": "; ".join(f"{_num_text(v)}: {' '.join(sorted(state[v][1]))}" for v in failed),
            "skipped": " ".join(_num_text(v) for v in values if state[v][0] == "skipped"),
            "selected_lrs": " ".join(f"{_num_text(p['value'])}:{format_value(p['lr'])}" for p in
                                     sorted(pts, key=lambda p: p["value"]) if not p["skipped"] and pd.notna(p["lr"])),
            "n_runs": n_runs,
            "source": " ".join(sorted({p["source"] for p in pts})),
        })
    df = pd.DataFrame(out, columns=cols)
    for c in ("deepest_trained", "first_failing"):
        df[c] = _maybe_int(df[c])
    return df


def _num_text(v: Any) -> str:
    return str(int(v)) if isinstance(v, (int, float, np.floating)) and float(v) == int(v) else str(v)


ABLATION_CONFIG = ("arch", "dataset", "depth", "width", "optimizer", "reparam", "sn_mode", "sn_sigma", "sn_power_iters",
                   "sn_conv", "batch_norm", "residual", "lr")


def ablation_table(runs: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """One row per ablation variant: its configuration and statistics over its seeds.

    Variants come in ``order`` (params.yaml order), others after it by name. Configuration cells
    that do not apply are NaN (n/a): the projection settings ``sn_*`` exist only for ``sgd_sn``
    (``sn_power_iters`` only with ``sn_sigma: power``), ``sn_conv``, ``batch_norm`` and
    ``residual`` only for the ResNet. Means are over completed seeds; ``sn_violations_total``
    is summed over every seed.
    """
    cols = ["variant", *ABLATION_CONFIG, "n_seeds", "n_completed", "n_diverged", "n_failed", "test_acc_mean",
            "test_acc_std", "val_acc_mean", "wall_time_s_mean", "sigma_max_max_mean", "sn_active_frac_mean",
            "sn_violations_total", "frozen", "seeds"]
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
            row.update(sn_mode=math.nan, sn_sigma=math.nan, sn_power_iters=math.nan)
        elif row["sn_sigma"] != "power":
            row["sn_power_iters"] = math.nan
        if not arch.startswith("resnet"):
            row.update(batch_norm=math.nan, residual=math.nan, sn_conv=math.nan)
        elif opt != "sgd_sn":
            row["sn_conv"] = math.nan

        def mean(col: str) -> float:
            return float(done[col].mean()) if col in done and done[col].notna().any() else math.nan

        test = done["test_acc"].dropna() if "test_acc" in done else pd.Series(dtype=float)
        viol = pd.to_numeric(g["sn_violations"], errors="coerce") if "sn_violations" in g else pd.Series(dtype=float)
        row.update({
            "n_seeds": len(g), "n_completed": len(done), "n_diverged": int((g["status"] == "diverged").sum()),
            "n_failed": int((g["status"] == "failed").sum()),
            "test_acc_mean": float(test.mean()) if len(test) else math.nan,
            "test_acc_std": float(test.std(ddof=1)) if len(test) > 1 else math.nan,
            "val_acc_mean": mean("val_acc"), "wall_time_s_mean": mean("wall_time_s"),
            "sigma_max_max_mean": mean("sigma_max_max"), "sn_active_frac_mean": mean("sn_active_frac"),
            "sn_violations_total": int(viol.sum()) if viol.notna().any() else math.nan,
            "frozen": bool(g["frozen"].all()),
            "seeds": " ".join(str(int(s)) for s in sorted(g["seed"].dropna())),
        })
        out.append(row)
    df = pd.DataFrame(out, columns=cols)
    for c in ("depth", "width", "sn_power_iters", "sn_violations_total"):
        df[c] = _maybe_int(df[c])
    return df


def depth_tolerance_table(runs: pd.DataFrame, best: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (study, dataset, optimizer): the deepest depth whose best-LR config trained.

    Trained = every seed completed and mean test accuracy >= chance + 0.02, with chance =
    1/n_classes (from config, else 1/10). Status counts are over all of the optimizer's runs.
    (The accuracy criterion of runs that predate the engine's ``failure``; see
    :func:`depth_to_failure_table` for the study's depth-to-failure search.)
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
        b = _match(best, **dict(zip(("study", "dataset", "optimizer"), key)))
        ok = b[(b["n_completed"] == b["n_seeds"]) & (b["test_acc_mean"] >= chance + TRAINABLE_MARGIN - 1e-12)]
        ok = ok[ok["depth"].notna()]
        deepest = ok.loc[ok["depth"].astype(float).idxmax()] if len(ok) else None
        out.append({
            **dict(zip(("study", "dataset", "optimizer"), key)),
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
    df["deepest_trainable"] = _maybe_int(df["deepest_trainable"])
    return df


CONTEXT_COLS = ["study", "dataset", "optimizer", "block_size", "lr", "n_seeds", "n_completed", "mem_basis", "mem_mb",
                "peak_mem_mb", "step_mem_mb", "state_mem_mb", "tokens_per_s", "seconds_per_epoch", "val_bpb", "failures"]


def context_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Memory and throughput along a context-length (``block_size``) grid, per optimizer.

    One row per (study, dataset, optimizer, block_size, lr), means over seeds. ``mem_mb`` is on
    ``mem_basis``: ``peak`` (CUDA allocator peak) where every run of the row recorded it, else
    ``step`` (profiled training-step peak, CPU), else ``state`` (training-state size).
    """
    sw = sweep_runs(runs)
    if sw.empty or "block_size" not in sw:
        return pd.DataFrame(columns=CONTEXT_COLS)
    sw = sw[(sw["axis"] == "block_size") & sw["block_size"].notna()]
    out = []
    for key, g in sw.groupby(["study", "dataset", "optimizer", "block_size", "lr"], dropna=False, sort=True):
        done = g[g["status"] == "completed"]
        mean = lambda c: float(pd.to_numeric(done[c], errors="coerce").mean()) if c in done and len(done) else math.nan  # noqa: E731
        basis, mem = "state", mean("state_mem_mb")
        for b, col in MEM_BASES:
            if col in done and len(done) and pd.to_numeric(done[col], errors="coerce").notna().all():
                basis, mem = b, mean(col)
                break
        out.append({
            **dict(zip(["study", "dataset", "optimizer", "block_size", "lr"], key)),
            "n_seeds": int(g["seed"].nunique()), "n_completed": len(done), "mem_basis": basis, "mem_mb": mem,
            "peak_mem_mb": mean("peak_mem_mb"), "step_mem_mb": mean("step_mem_mb"), "state_mem_mb": mean("state_mem_mb"),
            "tokens_per_s": mean("tokens_per_s"), "seconds_per_epoch": mean("seconds_per_epoch"),
            "val_bpb": mean("val_bpb"), "failures": _failure_text(g),
        })
    df = pd.DataFrame(out, columns=CONTEXT_COLS)
    df["block_size"] = _maybe_int(df["block_size"])
    return df


def divergence_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run that did not complete (headline and ablations included), with its step and reason."""
    cols = ["run_id", "run_dir", "kind", "study", "dataset", "optimizer", "point", "depth", "lr", "seed",
            "status", "diverged_step", "diverge_reason", "error"]
    bad = runs[runs["status"] != "completed"]
    bad = bad.sort_values(["study", "optimizer", "depth", "lr", "seed", "run_dir"], kind="mergesort", na_position="last")
    return bad[cols].reset_index(drop=True)


# ---------------------------------------------------------------- output

VERDICT_MD_COLS = [
    "study", "dataset", "point", "sgd_sn_lr", "adam_lr", "sgd_sn_test_acc", "adam_test_acc", "ratio_of_means",
    "ratio_median", "ratio_q25", "ratio_q75", "n_pairs", "meets_95pct", "sgd_sn_wall_time_s", "adam_wall_time_s",
    "sgd_sn_seconds_per_epoch", "adam_seconds_per_epoch", "mem_basis", "sgd_sn_mem_mb", "adam_mem_mb",
    "sgd_sn_deepest", "adam_deepest", "sgd_sn_epochs_to_90", "adam_epochs_to_90", "sgd_sn_test_bpb",
    "adam_test_bpb", "advantages", "answer",
]


def aggregate(runs_root: Path | str, out_dir: Path | str, *, params: Path | str | None = None) -> dict[str, Path]:
    """Write the runs, best_lr, verdict, depth_to_failure, ablation, depth_tolerance, divergence
    and context tables (CSV + Markdown) into ``out_dir``.

    ``params`` (default: ``params.yaml`` beside ``runs_root``, when present) gives the order of
    the ablation variants. Returns a mapping from file name (e.g. ``"best_lr.md"``) to its path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, _, _ = load_runs(runs_root, series=False)
    summaries = load_summaries(runs_root)
    if params is None:
        params = Path(runs_root).resolve().parent / "params.yaml"
    best = best_lr_table(runs)
    dtf = depth_to_failure_table(runs, summaries, best)
    verdict = verdict_table(runs, best, failure_depths=dtf)
    tables = {
        "best_lr": (best, None),
        "verdict": (verdict, VERDICT_MD_COLS),
        "depth_to_failure": (dtf, None),
        "ablation": (ablation_table(runs, read_ablation_order(params)), None),
        "depth_tolerance": (depth_tolerance_table(runs, best), None),
        "divergence": (divergence_table(runs), None),
        "context": (context_table(runs), None),
    }
    written: dict[str, Path] = {}
    path = out_dir / "runs.csv"
    runs.to_csv(path, index=False)
    written[path.name] = path
    for name, (df, md_cols) in tables.items():
        csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
        df.to_csv(csv_path, index=False)
        md_path.write_text(markdown_table(df[[c for c in md_cols if c in df]] if md_cols else df) + "\n")
        written[csv_path.name] = csv_path
        written[md_path.name] = md_path
    return written


TEXT_COLUMNS = ("point", "seeds", "points_tried", "failure_kinds", "failing", "skipped", "selected_lrs", "source",
                "advantages", "answer", "sgd_sn_failures", "adam_failures", "variant")
"""Columns that hold text even when every value looks like a number ("64", "0 1 2")."""


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a table written by :func:`aggregate` (empty frame for a header-only file)."""
    try:
        return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
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
