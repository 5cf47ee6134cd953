"""The generic core of the analysis: run directories -> pandas tables, for every study.

Every run found is kept: diverged and failed runs are results and appear in ``runs.csv`` and
``divergence.csv``. Learning rates are selected on the validation split only, never on test.

Layout read (the run-directory contract):

- ``runs/sweep/<study>/<method>/<run_id>/metrics.json``: ``config`` (flat; ``method`` is the
  study's method section name, the column runs are grouped by, falling back to ``optimizer``;
  ``step_method``, ``probes``), ``sweep`` (study, method, role search|confirm, grid point,
  select, verdict, analysis), ``final``. ``curves.csv`` (step, epoch, metric, value) and
  ``layers.csv``, long (step, epoch, layer, role, metric, value; the older wide files with one
  column per metric are read too).
- ``runs/sweep/<study>/<method>/summary.json``: the slice's analysis, verdict spec (method,
  reference, metric, bar) or ``false`` for a cost study, primary metric and direction, the LR
  grid and seeds, and per grid point the selected LR, failures or the reason it was skipped.
- ``runs/ablate/<variant>/<variant>-s<seed>/`` and the headline run ``runs/train``.

Older trees (no ``sweep`` key, no ``method``, no summaries) are read too: the grid point is then
the run's depth and the method its optimizer. A run's ``analysis`` is its ``sweep.analysis``, else
its slice summary's, else that of the registered study analysis that claims unlabelled runs
(see :mod:`optlab.analysis.studies`).

``aggregate`` writes the core tables (runs, best_lr, divergence), then each study analysis's own
tables, and ``analyses.json``: which analyses ran, on which studies, with which tables (the report
reads it to dispatch).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from .. import stats

if TYPE_CHECKING:  # pragma: no cover
    from .studies import StudyAnalysis

CONFIG_KEYS = ("study", "dataset", "method", "optimizer", "step_method", "depth", "lr", "seed")
"""Config columns that every runs frame has (NaN where a run's config lacks them)."""

GROUP_KEYS = ("study", "dataset", "method", "depth", "point")
"""One best-LR row per value of these keys."""

TASK_KEYS = ("study", "dataset", "depth", "point")
"""A task of a verdict: one grid point of a study on one dataset."""

RUN_TAGS = ("run_dir", "run_id", "study", "dataset", "method", "optimizer", "depth", "lr", "seed")
"""Run columns copied onto every curves/layers row."""

LAYER_KEYS = ("step", "epoch", "layer", "role")
LAYER_COLS = (*LAYER_KEYS, "metric", "value")
"""``layers.csv`` (long): one row per (step, layer, metric)."""

TOP_KEYS = ("run_id", "run_dir", "kind", "analysis", "status", "diverged_step", "diverge_reason", "error", "failure",
            "role", "point", "select", "variant", "axis", "axis_value", "task", "in_verdict")

FINAL_NUMERIC = (
    "train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "test_loss", "test_acc",
    "wall_time_s", "peak_mem_mb", "step_mem_mb", "state_mem_mb", "peak_rss_mb", "steps", "epochs_completed", "sigma_max_max",
    "sigma_max_last", "sn_violations", "sn_violating_checks", "sn_strict", "sn_active_frac", "epochs_to_90", "seconds_per_epoch", "examples_per_s", "tokens_per_s",
    "val_ppl", "val_bpb", "test_ppl", "test_bpb", "val_last_change", "entropy_floor_bits", "ngram_order",
    "ngram_test_acc", "ngram_test_bits", "throughput_steady", "throughput_steady_mad", "steady_epochs",
)

FAILURE_KINDS = ("nonfinite", "exploding", "vanishing", "chance")
"""The engine's names for a run that did not train (metrics.json ``failure``)."""


HEADLINE_DIR = "train"
ABLATE_DIR = "ablate"
DEFAULT_N_CLASSES = 10
TRAINABLE_MARGIN = 0.02  # accuracy (fraction) above chance that counts as "trained"
DEFAULT_PRIMARY = "test_acc"

CORE_TABLES = ("runs", "best_lr", "divergence")
MANIFEST = "analyses.json"
"""Written beside the tables: the analyses that ran, their studies and tables."""


# ---------------------------------------------------------------- loading runs


PROFILE_ROOT_MARK = "validated.txt"  # stage validate's out: marks a pipeline's runs root (runs/, runs/cpu/)


def run_files(root: Path, name: str) -> list[Path]:
    """Every file called ``name`` under ``root``, sorted, leaving out nested runs roots of other
    profiles' pipelines (a subdirectory holding its own ``validated.txt``: runs/cpu/ under runs/),
    so the quick profile's tables never take in the cpu profile's runs."""
    out: list[Path] = []
    for d, dirs, files in os.walk(root):
        here = Path(d)
        if here != root and PROFILE_ROOT_MARK in files:
            dirs[:] = []
            continue
        dirs.sort()
        out += [here / name] if name in files else []
    return sorted(out)


def load_runs(root: Path | str, *, series: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Find every ``metrics.json`` under ``root``; return the (runs, curves, layers) frames.

    ``run_dir`` is the run's directory relative to ``root``'s parent (``runs/sweep/mlp_depth/adam/x``).
    ``kind`` is ``headline`` for a directory named ``train``, ``ablation`` under ``ablate/``, else
    ``sweep``. A metrics file that cannot be parsed becomes a ``failed`` row with the parse error.
    Missing or empty ``curves.csv``/``layers.csv`` are tolerated; layers come back long
    (:data:`LAYER_COLS`). ``series=False`` skips reading them (empty frames; see :func:`load_series`).
    The ``analysis`` column holds only the runs' own labels here (see :func:`assign_analyses`).
    """
    root = Path(root)
    base = root.resolve().parent
    rows = [_run_row(mpath, mpath.parent.resolve().relative_to(base).as_posix()) for mpath in run_files(root, "metrics.json")]
    runs = _runs_frame(rows)
    if not series:
        return runs, *load_series(root, [])
    return runs, *load_series(root, runs)


def load_series(root: Path | str, runs: pd.DataFrame | list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (curves, layers) frames of the given runs (rows of a runs frame), tagged with RUN_TAGS.

    Layers are long (step, epoch, layer, role, metric, value); old wide files are melted.
    """
    base = Path(root).resolve().parent
    curves: list[pd.DataFrame] = []
    layers: list[pd.DataFrame] = []
    rows = runs.to_dict("records") if isinstance(runs, pd.DataFrame) else list(runs)
    for row in rows:
        run_dir = base / row["run_dir"]
        tags = {k: row.get(k, np.nan) for k in RUN_TAGS}
        frame = read_csv(run_dir / "curves.csv")
        if frame is not None and len(frame):
            curves.append(_tagged(frame, tags))
        frame = read_csv(run_dir / "layers.csv")
        if frame is not None and len(frame):
            layers.append(_tagged(long_layers(frame), tags))
    curve_cols = [*RUN_TAGS, "step", "epoch", "metric", "value"]
    layer_cols = [*RUN_TAGS, *LAYER_COLS]
    return _concat(curves, curve_cols, ("value",)), _concat(layers, layer_cols, ("value",))


def long_layers(frame: pd.DataFrame) -> pd.DataFrame:
    """A layers frame in the long format (``metric``, ``value``); a wide one (a column per
    metric, the format before probes) is melted, its other columns kept as identifiers."""
    if "metric" in frame.columns and "value" in frame.columns:
        out = frame.copy()
    else:
        ids = [c for c in frame.columns if c in (*LAYER_KEYS, *RUN_TAGS)]
        values = [c for c in frame.columns if c not in ids]
        out = frame.melt(id_vars=ids, value_vars=values, var_name="metric", value_name="value")
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(float)
    for c in LAYER_KEYS:
        if c not in out.columns:
            out[c] = np.nan
    return out


def wide_layers(frame: pd.DataFrame, metrics: Iterable[str]) -> pd.DataFrame:
    """Long layer rows -> one row per (run, step, layer) with a float column per metric in
    ``metrics`` (NaN where a step has no row for it: probes have their own cadences)."""
    metrics = list(metrics)
    long = long_layers(frame)
    long = long[long["metric"].isin(metrics)]
    keys = [c for c in long.columns if c not in ("metric", "value")]
    if long.empty:
        out = long[keys].copy()
        for m in metrics:
            out[m] = pd.Series(dtype=float)
        return out
    filled = long.assign(**{k: long[k].astype(object).where(long[k].notna(), "\0") for k in keys})
    wide = (filled.drop_duplicates([*keys, "metric"], keep="last").set_index([*keys, "metric"])["value"]
            .unstack("metric").reset_index())
    wide.columns.name = None
    for k in keys:
        wide[k] = wide[k].where(wide[k] != "\0", np.nan)
    for c in ("step", "epoch", "layer"):
        if c in wide:
            wide[c] = pd.to_numeric(wide[c], errors="coerce").astype(float)
    for m in metrics:
        wide[m] = pd.to_numeric(wide[m], errors="coerce").astype(float) if m in wide else np.nan
    return wide[[*keys, *metrics]]


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
    cfg = m.get("config") or {}
    row["role"] = sw.get("role")
    row["select"] = sw.get("select")
    row["in_verdict"] = sw.get("verdict", True) is not False  # False: a cost study
    row["variant"] = sw.get("variant") or (Path(rel).parent.name if row["kind"] == "ablation" else None)
    row["analysis"] = sw.get("analysis") if isinstance(sw.get("analysis"), str) else None
    method = next((v for v in (sw.get("method"), cfg.get("method"), cfg.get("optimizer")) if isinstance(v, str) and v), None)
    row["method"] = method
    point = sw.get("point") or {}
    row["point"] = point_label(point) or None
    if point:
        axis, value = next(iter(point.items()))
        row["axis"], row["axis_value"] = axis, _axis_number(value)
    for k, v in _flatten(cfg).items():
        if k not in row:
            row[k] = v
        elif k not in ("run_id", "method") and row[k] != v:
            row[f"config_{k}"] = v
    if not isinstance(row.get("study"), str) and isinstance(sw.get("study"), str):
        row["study"] = sw["study"]
    final = m.get("final") or {}
    for k, v in _flatten(final).items():
        row[k if k not in row else f"final_{k}"] = v
    if "epochs_to_90" in final and final["epochs_to_90"] is None:
        row["epochs_to_90"] = math.inf  # recorded as never reached (a missing key stays NaN)
    lm = "tokens_per_s" in final or "val_bpb" in final or "test_bpb" in final
    row["task"] = "lm" if lm else "classification"
    row.update(steady_throughput(mpath.parent / "curves.csv", "tokens" if lm else "examples"))
    prov = m.get("provenance") or {}
    row["frozen"] = bool(prov.get("frozen", False))
    row["git_commit"] = prov.get("git_commit")
    row["git_dirty"] = prov.get("git_dirty")
    return row


STEADY_COLS = ("throughput_steady", "throughput_steady_mad", "steady_epochs")
"""Per run, from its curves: the median training throughput (``tokens_per_s`` for language
models, else ``examples_per_s``) over the epochs after the first, its median absolute deviation
over those epochs, and how many there were. The first epoch holds the warm-up (allocator, caches,
the profiled step), so a run of one epoch has no steady measurement (NaN)."""


def steady_throughput(curves_csv: Path, unit: str) -> dict[str, float]:
    """:data:`STEADY_COLS` of one run (NaN where its curves are missing or hold one epoch)."""
    key = f"{unit}_per_s"
    rates: list[float] = []
    try:
        with open(curves_csv, newline="") as fh:
            header = next(csv.reader(fh), [])
            if {"epoch", "metric", "value"} <= set(header):
                ie, im, iv = header.index("epoch"), header.index("metric"), header.index("value")
                # one epoch-end row per epoch among the per-step losses: parse only the lines naming it
                for rec in csv.reader(line for line in fh if key in line):
                    if rec[im] == key and rec[ie] not in ("", "0"):
                        try:
                            rates.append(float(rec[iv]))
                        except ValueError:
                            pass
    except OSError:
        pass
    n, med, mad = median_mad(rates)
    return {"throughput_steady": med, "throughput_steady_mad": mad, "steady_epochs": n}


def median_mad(values: Iterable[float]) -> tuple[int, float, float]:
    """(n, median, median absolute deviation from the median) of the finite ``values`` ((0, NaN,
    NaN) for none)."""
    x = np.asarray(list(values), dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return 0, math.nan, math.nan
    med = float(np.median(x))
    return len(x), med, float(np.median(np.abs(x - med)))


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
            df[col] = maybe_int(df[col])
    df["frozen"] = df["frozen"].fillna(False).astype(bool)
    df["in_verdict"] = df["in_verdict"].map(lambda v: v is not False).astype(bool)
    for col in ("analysis", "method", "point", "axis"):
        df[col] = df[col].astype(object)
    if len(df):
        # runs written before the sweep key: the grid point is the depth
        legacy = (df["kind"] == "sweep") & df["point"].isna() & df["role"].isna() & df["depth"].notna()
        df.loc[legacy, "point"] = [f"depth={int(d)}" for d in df.loc[legacy, "depth"]]
        df.loc[legacy, "axis"] = "depth"
        df.loc[legacy, "axis_value"] = df.loc[legacy, "depth"].astype(float)
        df["method"] = df["method"].where(df["method"].notna(), df["optimizer"])
    first = [*TOP_KEYS, *CONFIG_KEYS]
    rest = [c for c in df.columns if c not in first]
    return df[first + rest]


def maybe_int(s: pd.Series) -> pd.Series:
    """Integer-valued numeric column -> nullable Int64; anything else unchanged."""
    num = pd.to_numeric(s, errors="coerce")
    if num.notna().sum() != s.notna().sum():
        return s
    vals = num.dropna().to_numpy(dtype=float)
    if len(vals) and not np.all(np.isfinite(vals) & (vals == np.round(vals))):
        return num
    return num.astype("Int64")


def read_csv(path: Path) -> pd.DataFrame | None:
    """A run's CSV file, or None when missing, empty or unreadable (with a warning)."""
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


def slug(s: Any) -> str:
    """A study name as a file-name part (``loss_curves_<slug>.png``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)) if isinstance(s, str) and s else "study"


def method_order(methods: Any, first: tuple[str, ...] = ()) -> list[str]:
    """``methods`` with those in ``first`` first (in that order), the rest by name."""
    present = {str(m) for m in methods}
    return [m for m in first if m in present] + sorted(m for m in present if m not in first)


# ---------------------------------------------------------------- slice summaries and verdict specs




@dataclass(frozen=True)
class VerdictSpec:
    """A study's verdict: does ``method`` reach ``bar`` of ``reference`` on ``metric``?"""

    method: str
    reference: str
    metric: str = DEFAULT_PRIMARY
    bar: float = 0.95
    direction: stats.Direction = "up"

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], primary: Mapping[str, Any] | None = None) -> "VerdictSpec":
        """From summary.json's ``verdict`` object; the direction is the verdict's own, else the
        primary metric's when it is the same metric, else inferred from the metric's name."""
        metric = str(doc.get("metric") or (primary or {}).get("metric") or DEFAULT_PRIMARY)
        direction = doc.get("direction")
        if direction is None and primary and primary.get("metric") == metric:
            direction = primary.get("direction")
        if direction not in ("up", "down"):
            direction = stats.metric_direction(metric)
        return cls(str(doc["method"]), str(doc["reference"]), metric, float(doc.get("bar", 0.95)), direction)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reference": self.reference, "metric": self.metric, "bar": self.bar,
                "direction": self.direction}


@dataclass(frozen=True)
class SliceSummary:
    """One ``summary.json``: a (study, method) slice of the sweep."""

    study: str
    method: str
    optimizer: str | None
    analysis: str | None
    verdict: VerdictSpec | None  # None: no spec given
    in_verdict: bool  # False: a cost study (``verdict: false``)
    primary_metric: str | None
    primary_direction: str | None
    select: str | None
    lrs: tuple[float, ...]
    search_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    points: tuple[dict[str, Any], ...]
    source: str
    skipped: str | None = None  # why the slice did not run at its scale (``<scale>: {skip: reason}``)
    published: tuple[tuple[str, Any], ...] = ()  # the study's labeled published reference (``studies.<s>.published``)


def load_slices(root: Path | str) -> list[SliceSummary]:
    """Every sweep slice's ``summary.json`` under ``root`` (unreadable ones skipped with a warning)."""
    root = Path(root)
    base = root.resolve().parent
    out: list[SliceSummary] = []
    for path in run_files(root, "summary.json"):
        try:
            doc = json.loads(path.read_text())
            points = doc["points"]
            if not isinstance(points, list):
                raise ValueError("points is not a list")
            primary = doc.get("primary") if isinstance(doc.get("primary"), dict) else None
            v = doc.get("verdict", None)
            spec = VerdictSpec.from_doc(v, primary) if isinstance(v, dict) else None
            lrs = tuple(float(x) for x in (doc.get("lrs") or []))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"{path}: unreadable summary ({exc}); skipped", stacklevel=2)
            continue
        method = doc.get("method") or doc.get("optimizer") or path.parent.name
        out.append(SliceSummary(
            study=str(doc.get("study") or path.parent.parent.name), method=str(method),
            optimizer=doc.get("optimizer"), analysis=doc.get("analysis") if isinstance(doc.get("analysis"), str) else None,
            verdict=spec, in_verdict=v is not False,
            primary_metric=(primary or {}).get("metric"), primary_direction=(primary or {}).get("direction"),
            select=doc.get("select"), lrs=lrs,
            search_seeds=tuple(int(s) for s in doc.get("search_seeds") or []),
            seeds=tuple(int(s) for s in doc.get("seeds") or []),
            points=tuple(p for p in points if isinstance(p, dict)),
            source=path.resolve().relative_to(base).as_posix(),
            skipped=doc.get("skipped") if isinstance(doc.get("skipped"), str) else None,
            published=tuple((str(k), v) for k, v in (doc.get("published") or {}).items())
            if isinstance(doc.get("published"), dict) else (),
        ))
    return out


SUMMARY_COLS = ["study", "method", "optimizer", "analysis", "dataset", "point", "axis", "axis_value", "selected_lr",
                "select", "score", "failures", "skipped", "lr_edge", "source"]


def load_summaries(root: Path | str | None = None, slices: list[SliceSummary] | None = None) -> pd.DataFrame:
    """The slices' grid points: one row per (slice, dataset, grid point).

    ``failures`` is the space-separated failure kinds of the selected configuration (empty when it
    trained); ``skipped`` is the reason a point was not run (beyond a failure), else None.
    """
    slices = load_slices(root) if slices is None else slices
    rows: list[dict[str, Any]] = []
    for s in slices:
        for p in s.points:
            pt = p.get("point") or {}
            axis, value = next(iter(pt.items())) if pt else (None, None)
            rows.append({
                "study": s.study, "method": s.method, "optimizer": s.optimizer, "analysis": s.analysis,
                "dataset": p.get("dataset"), "point": point_label(pt) or None, "axis": axis,
                "axis_value": _axis_number(value), "selected_lr": p.get("selected_lr"), "select": p.get("select"),
                "score": p.get("score"), "failures": " ".join(sorted(p.get("failures") or [])),
                "skipped": p.get("skipped") or None, "lr_edge": p.get("lr_edge"), "source": s.source,
            })
    df = pd.DataFrame(rows, columns=SUMMARY_COLS)
    for c in ("axis_value", "selected_lr", "score"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def verdict_specs(slices: Iterable[SliceSummary]) -> dict[str, VerdictSpec]:
    """study -> its verdict spec, from the slices' summaries (the first slice that gives one;
    a study whose slices disagree keeps the first, with a warning)."""
    out: dict[str, VerdictSpec] = {}
    for s in slices:
        if s.verdict is None or not s.in_verdict:
            continue
        if s.study in out and out[s.study] != s.verdict:
            warnings.warn(f"{s.source}: verdict {s.verdict} differs from {out[s.study]} for study {s.study}; "
                          "the first is used", stacklevel=2)
            continue
        out.setdefault(s.study, s.verdict)
    return out


def cost_studies(runs: pd.DataFrame, slices: Iterable[SliceSummary] = ()) -> set[str]:
    """Studies marked ``verdict: false`` (in a run's sweep key or a slice summary)."""
    out = {s.study for s in slices if not s.in_verdict}
    if len(runs):
        out |= set(runs.loc[~runs["in_verdict"].astype(bool), "study"].dropna())
    return out


def assign_analyses(runs: pd.DataFrame, slices: Iterable[SliceSummary], claimer: str | None) -> pd.DataFrame:
    """``runs`` with ``analysis`` filled: the run's own label, else its slice summary's, else
    ``claimer`` (the analysis that claims unlabelled runs; None leaves them unassigned)."""
    runs = runs.copy()
    by_slice = {(s.study, s.method): s.analysis for s in slices if s.analysis}
    if len(runs):
        own = runs["analysis"].astype(object)
        from_slice = pd.Series([by_slice.get((st, me)) for st, me in zip(runs["study"], runs["method"])],
                               index=runs.index, dtype=object)
        filled = own.where(own.notna(), from_slice)
        runs["analysis"] = filled.where(filled.notna(), claimer)
    return runs


def read_ablation_order(params: Path | str | None) -> list[str]:
    """The ablation variants' names in file order (``profiles.<scale>.ablate.variants`` of the
    studies.yaml beside ``params``, the params.yaml path; ``scale`` from params.yaml).

    Empty when the files are missing or unreadable (the table is then in directory order).
    """
    if params is None or not Path(params).is_file():
        return []
    try:
        from optlab import paramfiles

        doc = paramfiles.read(params)
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
    legacy = recorded is not None and not isna(recorded) and not bool(recorded)
    if legacy and status == "completed" and row.get("task") != "lm":
        acc, n = row.get("test_acc"), row.get("n_classes")
        chance = 1.0 / float(n) if not isna(n) and float(n) > 0 else 1.0 / DEFAULT_N_CLASSES
        if not isna(acc) and float(acc) < chance + TRAINABLE_MARGIN:
            return "chance"
    return None


def failure_text(chosen: pd.DataFrame) -> str:
    """``"chance 1, nonfinite 2"``: failure kinds (with counts) of a configuration's runs; '' if none."""
    kinds = [f for f in (run_failure(r) for r in chosen.to_dict("records")) if f]
    return ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))


BEST_COLS = [
    *GROUP_KEYS, "analysis", "optimizer", "lr", "lr_edge", "n_lrs", "n_seeds", "n_completed", "n_diverged", "n_failed",
    "select", "val_score", "val_acc_mean", "val_loss_mean", "test_acc_mean", "test_acc_std", "test_acc_min",
    "test_acc_max", "test_acc_median", "test_acc_q25", "test_acc_q75", "primary_metric", "primary_direction",
    "primary_mean", "primary_median", "primary_q25", "primary_q75", "test_bpb_mean", "test_ppl_mean",
    "wall_time_s_mean", "wall_time_s_median", "seconds_per_epoch_mean", "seconds_per_epoch_median", "epochs_to_90_mean",
    "epochs_to_90_median", "n_reached_90", "peak_mem_mb_mean", "step_mem_mb_mean", "state_mem_mb_mean", "sn_active_frac_mean",
    *(f"n_{k}" for k in FAILURE_KINDS), "task", "frozen", "seeds",
]


def best_lr_table(runs: pd.DataFrame, slices: Iterable[SliceSummary] = ()) -> pd.DataFrame:
    """One row per (study, dataset, method, depth, point): the LR selected on validation.

    The selection score ``val_score`` is over the LR-search runs (role ``search``; all runs in
    trees without roles): mean final ``val_acc`` with diverged/failed (NaN) runs counted as 0,
    or ``-val_loss`` (NaN as -inf) for studies that select on ``val_loss`` (language models).
    An LR that has confirmation runs is the one the sweep selected and wins; else ties go to
    fewer non-completed runs, then the smaller LR. Statistics for the chosen LR are over its
    completed seeds (search and confirmation); test metrics never enter the selection.
    ``*_median``/``*_q25``/``*_q75``: median and quartiles over those seeds
    (:func:`optlab.stats.spread`), for test accuracy and the study's primary metric (from the
    slice summary, default test accuracy). ``lr_edge``: ``high``/``low`` when the selected LR is
    the highest/lowest of the LRs tried (the summary's ``lrs`` and every LR the runs tried: a search
    extends past an edge of its grid; empty for a fixed LR), i.e. the best LR may lie outside them. ``epochs_to_90_median`` is the median over
    the completed seeds that reached 90% validation accuracy (``n_reached_90`` counts them, NaN for
    none); ``epochs_to_90_mean`` is inf when a completed seed never reached it;
    ``n_<kind>`` count runs by failure kind.
    """
    slices = list(slices)
    sw = sweep_runs(runs)
    sw = sw[sw["lr"].notna()]
    if sw.empty:
        return pd.DataFrame(columns=BEST_COLS)
    grids = {(s.study, s.method): s.lrs for s in slices if s.lrs}
    primary = {(s.study, s.method): (s.primary_metric, s.primary_direction) for s in slices if s.primary_metric}
    per_lr = []
    for key, g in sw.groupby([*GROUP_KEYS, "lr"], dropna=False, sort=True):
        k = dict(zip([*GROUP_KEYS, "lr"], key))
        metric, direction = primary.get((k["study"], k["method"]), (None, None))
        per_lr.append({**k, **_lr_stats(g, metric or DEFAULT_PRIMARY, direction)})
    lr_stats = pd.DataFrame(per_lr)
    lr_stats["_bad"] = lr_stats["n_seeds"] - lr_stats["n_completed"]
    lr_stats = lr_stats.sort_values(["_confirmed", "val_score", "_bad", "lr"], ascending=[False, False, True, True],
                                    kind="mergesort")
    group = list(GROUP_KEYS)
    tried = {_norm_key(k): tuple(sorted(set(g.astype(float))))
             for k, g in lr_stats.groupby(group, dropna=False, sort=False)["lr"]}
    best = lr_stats.groupby(group, dropna=False, sort=True).head(1)
    best = best.sort_values(group, kind="mergesort").reset_index(drop=True)
    edges, n_lrs = [], []
    for r in best.itertuples(index=False):
        key = tuple(getattr(r, c) for c in group)
        # the configured grid and every LR the runs tried (a search extends past an edge of its grid)
        grid = tuple(set(grids.get((r.study, r.method)) or ()) | set(tried.get(_norm_key(key)) or ()))
        edges.append(lr_edge(r.lr, grid))
        n_lrs.append(len(set(grid)))
    best["lr_edge"], best["n_lrs"] = edges, n_lrs
    best["depth"] = maybe_int(best["depth"])
    return best[BEST_COLS]


def _norm_key(key: Any) -> tuple:
    """A group key usable in a dict: NaN parts become None, numbers floats."""
    key = key if isinstance(key, tuple) else (key,)
    return tuple(None if isna(k) else float(k) if isinstance(k, (int, float, np.integer, np.floating)) else k
                 for k in key)


def lr_edge(lr: Any, grid: Iterable[float]) -> str | None:
    """``high`` / ``low`` when ``lr`` is the largest / smallest of a grid of at least 2 LRs, else None."""
    grid = sorted({float(x) for x in grid if not isna(x)})
    if isna(lr) or len(grid) < 2:
        return None
    if np.isclose(float(lr), grid[-1], rtol=1e-9, atol=0.0):
        return "high"
    if np.isclose(float(lr), grid[0], rtol=1e-9, atol=0.0):
        return "low"
    return None


def _lr_stats(g: pd.DataFrame, primary: str, direction: str | None) -> dict[str, Any]:
    done = g[g["status"] == "completed"]
    # selection uses the LR-search runs only (the selected LR also has confirmation seeds)
    search = g[g["role"] == "search"] if "role" in g and (g["role"] == "search").any() else g
    select = search["select"].dropna().iloc[0] if "select" in search and search["select"].notna().any() else "val_acc"
    test = done["test_acc"] if "test_acc" in done else pd.Series(dtype=float)

    def mean(col: str) -> float:
        return float(done[col].mean()) if col in done and done[col].notna().any() else math.nan

    def median(col: str) -> float:
        return float(done[col].median()) if col in done and done[col].notna().any() else math.nan

    def col(c: str) -> np.ndarray:
        return pd.to_numeric(done[c], errors="coerce").to_numpy(dtype=float) if c in done else np.array([])

    if select == "val_loss":
        vl = search["val_loss"] if "val_loss" in search else pd.Series(np.nan, index=search.index)
        score = float(-vl.astype(float).fillna(np.inf).mean())
    else:
        val = search["val_acc"] if "val_acc" in search else pd.Series(np.nan, index=search.index)
        score = float(val.astype(float).fillna(0.0).mean())
    seeds = sorted(int(s) for s in g["seed"].dropna())
    failures = [run_failure(r) for r in g.to_dict("records")]
    e90 = done["epochs_to_90"] if "epochs_to_90" in done else pd.Series(dtype=float)
    e90f = pd.to_numeric(e90, errors="coerce").to_numpy(dtype=float)
    tasks = g["task"].dropna().unique() if "task" in g else []
    acc, prim = stats.spread(col("test_acc")), stats.spread(col(primary))
    opts = sorted({str(o) for o in g["optimizer"].dropna()}) if "optimizer" in g else []
    analyses = sorted({str(a) for a in g["analysis"].dropna()}) if "analysis" in g else []
    return {
        "analysis": " ".join(analyses) if analyses else math.nan,
        "optimizer": " ".join(opts) if opts else math.nan,
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
        "test_acc_median": acc.median, "test_acc_q25": acc.q25, "test_acc_q75": acc.q75,
        "primary_metric": primary, "primary_direction": direction or stats.metric_direction(primary),
        "primary_mean": mean(primary), "primary_median": prim.median, "primary_q25": prim.q25, "primary_q75": prim.q75,
        "test_bpb_mean": mean("test_bpb"),
        "test_ppl_mean": mean("test_ppl"),
        "wall_time_s_mean": mean("wall_time_s"),
        "wall_time_s_median": median("wall_time_s"),
        "seconds_per_epoch_mean": mean("seconds_per_epoch"),
        "seconds_per_epoch_median": median("seconds_per_epoch"),
        "epochs_to_90_mean": mean("epochs_to_90"),
        # over the seeds that reached 90% only, with their count beside it (never inf)
        "epochs_to_90_median": float(np.median(e90f[np.isfinite(e90f)])) if np.isfinite(e90f).any() else math.nan,
        "n_reached_90": int(np.isfinite(e90f).sum()) if e90.notna().any() else math.nan,
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


def match(df: pd.DataFrame, **kv: Any) -> pd.DataFrame:
    """Rows of ``df`` whose columns equal ``kv`` (NaN matches NaN)."""
    mask = pd.Series(True, index=df.index)
    for col, v in kv.items():
        if col not in df:
            mask &= pd.isna(v)
            continue
        mask &= df[col].isna() if isna(v) else (df[col] == v).fillna(False).astype(bool)
    return df[mask]


def isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- the generic paired verdict

PairExtra = Callable[[dict[str, Any], pd.Series, pd.Series, pd.DataFrame, pd.DataFrame], dict[str, Any]]
"""A study analysis's extra verdict columns: (task, method best row, reference best row,
method's selected runs, reference's selected runs) -> columns."""


def verdict_columns(spec: VerdictSpec) -> list[str]:
    """The columns :func:`paired_verdict_table` writes for ``spec``."""
    m, r, x = spec.method, spec.reference, spec.metric
    return [
        *TASK_KEYS, "task", "method", "reference", "metric", "direction", "bar", f"{m}_lr", f"{r}_lr",
        f"{m}_lr_edge", f"{r}_lr_edge", f"{m}_{x}", f"{r}_{x}", f"{m}_{x}_median", f"{m}_{x}_q25", f"{m}_{x}_q75",
        f"{r}_{x}_median", f"{r}_{x}_q25", f"{r}_{x}_q75", "ratio_of_means", "ratio_lo", "ratio_hi", "ratio_median",
        "ratio_q25", "ratio_q75", "ratio_iqr", "n_pairs", "reaches_bar", "seeds_needed", "verdict_reason",
        f"{m}_n_seeds", f"{r}_n_seeds", f"{m}_n_completed", f"{r}_n_completed", f"{m}_n_diverged", f"{r}_n_diverged",
        f"{m}_failures", f"{r}_failures", "frozen",
    ]


def paired_verdict_table(
    runs: pd.DataFrame,
    best: pd.DataFrame,
    spec: VerdictSpec,
    *,
    studies: Iterable[str] | None = None,
    extra: PairExtra | None = None,
    n_resamples: int = stats.N_RESAMPLES,
    seed: int = stats.SEED,
) -> pd.DataFrame:
    """Per task (study, dataset, grid point) with both sides: does ``spec.method`` reach
    ``spec.bar`` of ``spec.reference`` on ``spec.metric``? (:func:`optlab.stats.reaches`)

    Each side runs at its own selected LR; the comparison is over the seeds that completed under
    both with a finite metric (pairs matched by seed): ``{side}_{metric}`` means and
    ``_median``/``_q25``/``_q75`` over those seeds, ``ratio_of_means`` (mean(method)/mean(reference),
    reference/method for a lower-is-better metric), its paired bootstrap 95% interval
    ``ratio_lo``–``ratio_hi``, the per-seed ratio's median and quartiles, ``reaches_bar``
    (yes / no / inconclusive) and ``seeds_needed`` (an estimate, for inconclusive answers;
    ``>1000`` beyond the cap). ``{side}_lr_edge`` flags a selected LR at the edge of its grid.
    ``extra`` adds a study analysis's own columns. ``studies`` restricts the tasks.
    """
    m, r, x = spec.method, spec.reference, spec.metric
    cols = verdict_columns(spec)
    if best.empty:
        return pd.DataFrame(columns=cols)
    chosen = best_runs(runs, best)
    best = best if studies is None else best[best["study"].isin(set(studies))]
    out = []
    for key, g in best.groupby(list(TASK_KEYS), dropna=False, sort=True):
        a, b = g[g["method"] == m], g[g["method"] == r]
        if a.empty or b.empty:
            continue
        a, b = a.iloc[0], b.iloc[0]
        task = dict(zip(TASK_KEYS, key))
        ra, rb = match(chosen, **task, method=m), match(chosen, **task, method=r)
        va, vb = (_per_seed(runs_, x) for runs_ in (ra, rb))
        v = stats.reaches(va, vb, spec.bar, direction=spec.direction, n_resamples=n_resamples, seed=seed)
        pm, pr, _ = stats.paired(va, vb)
        per_seed = pm / pr if spec.direction == "up" else pr / pm
        per_seed = per_seed[np.isfinite(per_seed)]
        q = stats.spread(per_seed)
        row = {
            **task, "task": a.get("task"), "method": m, "reference": r, "metric": x, "direction": spec.direction,
            "bar": spec.bar, f"{m}_lr": a["lr"], f"{r}_lr": b["lr"],
            f"{m}_lr_edge": a.get("lr_edge"), f"{r}_lr_edge": b.get("lr_edge"),
            f"{m}_{x}": float(pm.mean()) if len(pm) else math.nan, f"{r}_{x}": float(pr.mean()) if len(pr) else math.nan,
            f"{m}_{x}_median": v.method.median, f"{m}_{x}_q25": v.method.q25, f"{m}_{x}_q75": v.method.q75,
            f"{r}_{x}_median": v.reference.median, f"{r}_{x}_q25": v.reference.q25, f"{r}_{x}_q75": v.reference.q75,
            "ratio_of_means": v.estimate, "ratio_lo": v.low, "ratio_hi": v.high,
            "ratio_median": q.median, "ratio_q25": q.q25, "ratio_q75": q.q75, "ratio_iqr": q.iqr,
            "n_pairs": v.n_pairs, "reaches_bar": v.answer, "seeds_needed": v.seeds_needed_text,
            "verdict_reason": v.reason,
            f"{m}_n_seeds": a["n_seeds"], f"{r}_n_seeds": b["n_seeds"],
            f"{m}_n_completed": a["n_completed"], f"{r}_n_completed": b["n_completed"],
            f"{m}_n_diverged": a["n_diverged"], f"{r}_n_diverged": b["n_diverged"],
            f"{m}_failures": failure_text(ra), f"{r}_failures": failure_text(rb),
            "frozen": bool(a["frozen"] and b["frozen"]),
        }
        if extra is not None:
            row.update(extra(task, a, b, ra, rb))
        out.append(row)
    extra_cols = [c for row in out for c in row if c not in cols]
    df = pd.DataFrame(out, columns=[*cols, *dict.fromkeys(extra_cols)])
    df["depth"] = maybe_int(df["depth"])
    return df


def _per_seed(chosen: pd.DataFrame, metric: str) -> pd.Series:
    """seed -> the metric of the completed runs (mean over duplicates), finite values only."""
    done = chosen[(chosen["status"] == "completed") & chosen["seed"].notna()]
    if metric not in done or done.empty:
        return pd.Series(dtype=float)
    vals = pd.to_numeric(done[metric], errors="coerce").astype(float)
    s = vals.groupby(done["seed"].astype(int)).mean()
    return s[np.isfinite(s)]


# ---------------------------------------------------------------- depth to failure


def depth_to_failure_table(runs: pd.DataFrame, summaries: pd.DataFrame | None = None,
                           best: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (study, dataset, method), along the first grid axis (depth for the depth studies).

    A point trained when its selected configuration had no failure: the slice's ``summary.json``
    failures together with the failure kinds of the selected LR's runs (``failure``, divergence
    reason, ``error`` for a crashed run). Where a slice has no summary (still running, or an
    older tree) the runs alone decide. ``deepest_trained``: the largest axis value at which every
    point trained; ``first_failing``: the smallest at which one failed, with its kinds;
    ``skipped``: points not run beyond a failure (the depth-to-failure search).
    """
    cols = ["study", "dataset", "method", "axis", "points_tried", "deepest_trained", "first_failing",
            "failure_kinds", "failing", "skipped", "selected_lrs", "n_runs", "source"]
    best = best_lr_table(runs) if best is None else best
    chosen = best_runs(runs, best) if len(best) else runs.iloc[0:0]
    sw = sweep_runs(runs)
    summaries = summaries if summaries is not None else pd.DataFrame(columns=SUMMARY_COLS)
    studies = set(sw["study"].dropna())
    recs: dict[tuple, dict[str, Any]] = {}
    for s in summaries.to_dict("records"):
        if not isinstance(s["axis"], str) or isna(s["axis_value"]) or s["study"] not in studies:
            continue
        k = (s["study"], s["dataset"], s["method"], s["point"])
        recs[k] = {"axis": s["axis"], "value": s["axis_value"], "lr": s["selected_lr"], "skipped": bool(s["skipped"]),
                   "kinds": set(str(s["failures"]).split()) if isinstance(s["failures"], str) else set(),
                   "source": "summary"}
    for key, g in best.groupby(["study", "dataset", "method", "point"], dropna=False, sort=False):
        study, dataset, meth, point = key
        pt = parse_point(point)
        if not pt:
            continue
        axis, value = next(iter(pt.items()))
        rec = recs.setdefault(key, {"axis": axis, "value": _axis_number(value), "lr": g.iloc[0]["lr"], "skipped": False,
                                    "kinds": set(), "source": "runs"})
        lr = rec["lr"] if pd.notna(rec["lr"]) else g.iloc[0]["lr"]
        sel = match(sw, study=study, dataset=dataset, method=meth, point=point)
        sel = sel[np.isclose(sel["lr"].astype(float), float(lr))] if pd.notna(lr) else match(chosen, study=study, dataset=dataset, method=meth, point=point)
        rec["kinds"] |= {f for f in (run_failure(r) for r in sel.to_dict("records")) if f}
        rec["skipped"] = rec["skipped"] and sel.empty
    out = []
    by_slice: dict[tuple, list[dict[str, Any]]] = {}
    for (study, dataset, meth, point), rec in recs.items():
        by_slice.setdefault((study, dataset, meth, rec["axis"]), []).append(rec)
    for (study, dataset, meth, axis), pts in sorted(by_slice.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        values = sorted({p["value"] for p in pts})
        state: dict[float, tuple[str, set[str]]] = {}
        for v in values:
            here = [p for p in pts if p["value"] == v]
            ran = [p for p in here if not p["skipped"]]
            kinds = set().union(*(p["kinds"] for p in ran)) if ran else set()
            state[v] = ("skipped", set()) if not ran else ("failed", kinds) if kinds else ("trained", set())
        trained = [v for v in values if state[v][0] == "trained"]
        failed = [v for v in values if state[v][0] == "failed"]
        mine = match(sw, study=study, dataset=dataset, method=meth)
        n_runs = int((mine["axis"] == axis).sum())
        out.append({
            "study": study, "dataset": dataset, "method": meth, "axis": axis,
            "points_tried": " ".join(num_text(v) for v in values if state[v][0] != "skipped"),
            "deepest_trained": max(trained) if trained else math.nan,
            "first_failing": min(failed) if failed else math.nan,
            "failure_kinds": " ".join(sorted(state[min(failed)][1])) if failed else "",
            "failing": "; ".join(f"{num_text(v)}: {' '.join(sorted(state[v][1]))}" for v in failed),
            "skipped": " ".join(num_text(v) for v in values if state[v][0] == "skipped"),
            "selected_lrs": " ".join(f"{num_text(p['value'])}:{format_value(p['lr'])}" for p in
                                     sorted(pts, key=lambda p: p["value"]) if not p["skipped"] and pd.notna(p["lr"])),
            "n_runs": n_runs,
            "source": " ".join(sorted({p["source"] for p in pts})),
        })
    df = pd.DataFrame(out, columns=cols)
    for c in ("deepest_trained", "first_failing"):
        df[c] = maybe_int(df[c])
    return df


def num_text(v: Any) -> str:
    return str(int(v)) if isinstance(v, (int, float, np.floating)) and float(v) == int(v) else str(v)


def divergence_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run that did not complete (headline and ablations included), with its step and reason."""
    cols = ["run_id", "run_dir", "kind", "analysis", "study", "dataset", "method", "optimizer", "point", "depth", "lr",
            "seed", "status", "diverged_step", "diverge_reason", "error"]
    bad = runs[runs["status"] != "completed"]
    bad = bad.sort_values(["study", "method", "depth", "lr", "seed", "run_dir"], kind="mergesort", na_position="last")
    return bad[cols].reset_index(drop=True)


# ---------------------------------------------------------------- output

Table = tuple[pd.DataFrame, "list[str] | None"]
"""A table to write: the frame (all columns go to CSV) and the columns of its Markdown view (None: all)."""


def aggregate(
    runs_root: Path | str,
    out_dir: Path | str,
    *,
    params: Path | str | None = None,
    analyses: Mapping[str, "StudyAnalysis"] | None = None,
    headline: bool = True,
) -> dict[str, Path]:
    """Write the core tables (runs, best_lr, divergence), every present study analysis's tables
    (CSV + Markdown) and ``analyses.json`` into ``out_dir``.

    The analyses present are those named by the runs and slice summaries (unlabelled runs go to
    the analysis that claims them); ``analyses`` replaces the registry
    (:func:`optlab.analysis.studies.registry`), e.g. to add one in a test. ``params`` (default:
    ``params.yaml`` beside ``runs_root``, when present) gives the order of the ablation variants.
    ``headline=False`` leaves the headline run (``runs/train``) out of every table.
    Returns a mapping from file name (e.g. ``"best_lr.md"``) to its path.
    """
    from .studies import AnalysisData, analysis_order, claiming_analysis, registry, resolve

    reg = registry() if analyses is None else dict(analyses)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, _, _ = load_runs(runs_root, series=False)
    if not headline:  # the pipeline's tables: a headline experiment must not rerun the studies' analysis
        runs = runs[runs["kind"] != "headline"].reset_index(drop=True)
    slices = load_slices(runs_root)
    runs = assign_analyses(runs, slices, claiming_analysis(reg))
    if params is None:
        params = Path(runs_root).resolve().parent / "params.yaml"
    best = best_lr_table(runs, slices)
    written: dict[str, Path] = {}
    path = out_dir / "runs.csv"
    runs.to_csv(path, index=False)
    written[path.name] = path
    written.update(write_tables(out_dir, {"best_lr": (best, None), "divergence": (divergence_table(runs), None)}))
    manifest = []
    taken = set(CORE_TABLES)
    names = {*runs["analysis"].dropna().astype(str), *(s.analysis for s in slices if s.analysis)}
    for name in analysis_order(names, reg):
        analysis = resolve(reg, name)
        data = AnalysisData.build(name, runs, slices, best, params=params)
        tables = analysis.tables(data)
        clash = taken & set(tables)
        if clash:
            raise ValueError(f"study analysis {name!r}: table names {sorted(clash)} are already written by another")
        taken |= set(tables)
        written.update(write_tables(out_dir, tables))
        manifest.append({"name": name, "title": analysis.title, "registered": name in reg,
                         "studies": list(data.studies), "tables": list(tables)})
    path = out_dir / MANIFEST
    path.write_text(json.dumps({"analyses": manifest}, indent=2) + "\n")
    written[path.name] = path
    return written


def write_tables(out_dir: Path, tables: Mapping[str, Table]) -> dict[str, Path]:
    """``<name>.csv`` (every column) and ``<name>.md`` (the Markdown view) for each table."""
    written = {}
    for name, (df, md_cols) in tables.items():
        csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
        df.to_csv(csv_path, index=False)
        md_path.write_text(markdown_table(df[[c for c in md_cols if c in df]] if md_cols else df) + "\n")
        written[csv_path.name] = csv_path
        written[md_path.name] = md_path
    return written


TEXT_COLUMNS = ("point", "seeds", "points_tried", "failure_kinds", "failing", "skipped", "selected_lrs", "source",
                "advantages", "answer", "variant", "reaches_bar", "seeds_needed", "verdict_reason", "lr_edge",
                "method", "reference", "metric", "direction", "analysis")
"""Columns that hold text even when every value looks like a number ("64", "0 1 2")."""


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a table written by :func:`aggregate` (empty frame for a header-only file).

    Text columns (:data:`TEXT_COLUMNS`, and any ``*_failures`` / ``*_lr_edge``) stay text.
    """
    try:
        head = pd.read_csv(path, nrows=0).columns
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    text = {c: str for c in head if c in TEXT_COLUMNS or c.endswith(("_failures", "_lr_edge"))}
    return pd.read_csv(path, dtype=text)


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
