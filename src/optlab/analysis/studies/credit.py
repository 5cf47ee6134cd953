"""Credit assignment scored against exact costates (issue #13): the ``credit`` study analysis.

Studies (``analysis: credit``): ``toy_lq_v1`` (the credit bridge without terminal gradient matching,
the ablation), ``toy_lq_v2`` (BP, DFA, state bridge, credit bridge), ``toy_lq_frozen`` (v2's setup
rerun in the frozen phase), ``credit_mlp`` (a flat deep MLP, per dataset). Every number comes from the
runs: the ``costate`` probe's run summary (``final``: layer means at the last measurement), its
per-layer rows (``layers.csv``) and curves (``curves.csv``: ``<metric>_mean``, the bridges'
``bridge_loss`` / ``credit_blend``), and each run's provenance (phase, commit, dirty tree).

Each method's definition is ours (there is no public reference implementation of any of them):
``credit_bp`` takes exact costates from autograd and updates each layer with the same normalized
local surrogate as the others; ``dfa`` uses fixed random feedback matrices; ``state_bridge`` and
``credit_bridge`` learn their credit (see :mod:`optlab.methods`). The report says so.

Tables (``aggregate``):

- ``credit_costate``: per task (study, dataset) and method, median [IQR] over seeds (completed runs,
  :func:`optlab.stats.spread`) of costate cosine, perturbation rho, nudging (and relative L2 error,
  norm ratio, update alignment, test accuracy / loss), the published reference beside ours in
  labeled columns (``published_<metric>``, parsed from the studies' ``published`` mapping), where
  the published number falls against our IQR (``<metric>_vs_published``), and the runs' ``phase``
  (``frozen``: every run of the row is frozen);
- ``credit_published``: one row per published number: ours, the reference, inside / outside our IQR;
- ``credit_update``: update alignment at the first and the last measurement, beside costate cosine;
- ``credit_layers``: per layer, medians over seeds at the last measurement, positive nudging counts;
- ``credit_bridge``: the bridges' own loss early and late, the credit bridge's final blend weight;
- ``credit_runs``: every run with its experiment ID (study), label ``<dataset>_seed<seed>``, phase,
  git commit, dirty flag, frozen commit, status and summary metrics (the notes page lists these).

Figures: ``credit_curves.png`` (accuracy and loss per epoch per method), ``credit_costate_cos.png``
(costate cosine over training per method and layer), ``credit_alignment.png`` (layer-mean costate
cosine and update alignment over training per method). Pages (``report``): ``credit_notes.md``,
the experiment notes: runs per phase, design decisions with their evidence, known issues.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from ... import stats
from ..aggregate import Table, best_runs, format_value, markdown_table, read_csv, sweep_runs
from . import AnalysisData, BaseAnalysis

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..plots import FigureData
    from ..report import ReportData

NOTES_PAGE = "credit_notes.md"
METRICS = ("costate_cos", "costate_rel_l2", "costate_norm_ratio", "perturb_rho", "nudge", "update_cos")
SCORED = ("costate_cos", "perturb_rho", "nudge")  # the published triple
OUTCOMES = ("test_acc", "test_loss")
STATS = (*METRICS, *OUTCOMES, "val_acc", "best_val_acc", "steps", "wall_time_s")
WORDS = {"costate_cos": "costate cosine", "costate_rel_l2": "relative L2 error", "costate_norm_ratio": "norm ratio",
         "perturb_rho": "perturbation rho", "nudge": "nudging", "update_cos": "update alignment",
         "test_acc": "test accuracy", "test_loss": "test loss", "val_acc": "final validation accuracy",
         "best_val_acc": "best validation accuracy", "steps": "steps", "wall_time_s": "wall time (s)"}
METHOD_ORDER = ("credit_bp", "dfa", "state_bridge", "credit_bridge", "credit_bridge_no_tgm")
STUDY_ORDER = ("toy_lq_v1", "toy_lq_v2", "toy_lq_frozen", "credit_mlp")
DATASET_ORDER = ("lq", "digits", "mnist", "fashion_mnist", "cifar10")
PHASE_ORDER = ("frozen", "pilot", "debug")
NAMES = {"credit_bp": "BP", "dfa": "DFA", "state_bridge": "state bridge", "credit_bridge": "credit bridge",
         "credit_bridge_no_tgm": "credit bridge without terminal gradient matching"}
ALIASES = {"credit_bp": ("bp", "backprop", "backpropagation"), "dfa": ("dfa", "direct feedback alignment"),
           "state_bridge": ("state bridge",), "credit_bridge": ("credit bridge",),
           "credit_bridge_no_tgm": ("credit bridge without terminal gradient matching", "credit bridge without tgm",
                                    "credit bridge no tgm")}
"""How a published label names each method (the longest match wins)."""
METRIC_ALIASES = (("costate_cos", ("costate cosine", "costate cos")), ("costate_rel_l2", ("relative l2",)),
                  ("costate_norm_ratio", ("norm ratio",)), ("perturb_rho", ("perturbation rho", "perturb rho")),
                  ("nudge", ("nudging", "nudge")), ("update_cos", ("update alignment", "update cosine")),
                  ("test_acc", ("test accuracy", "accuracy")))
NUMBER = re.compile(r"[-+−]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
TOL = 1e-12
FELL = 0.05  # a fall of validation accuracy from its best to the end that the notes report

COSTATE_MD = ["task", "method", "phase", "seeds", "costate cosine median [IQR]", "published costate cosine",
              "perturbation rho median [IQR]", "published perturbation rho", "nudging median [IQR]",
              "published nudging", "test accuracy / loss median [IQR]", "published test accuracy"]
PUBLISHED_MD = ["task", "method", "metric", "ours median [IQR]", "published", "published setup", "our steps", "where"]
UPDATE_MD = ["task", "method", "phase", "seeds", "update alignment at the first measurement, median",
             "update alignment at the end, median [IQR]", "costate cosine at the end, median [IQR]"]
LAYER_MD = ["task", "method", "layer", "costate_cos_median", "perturb_rho_median", "nudge_median", "update_cos_median",
            "n_positive_nudge", "n_runs"]
BRIDGE_MD = ["task", "method", "phase", "bridge_loss_early_median", "bridge_loss_late_median", "credit_blend_last_median",
             "n_runs"]
RUNS_MD = ["study", "run", "method", "run_id", "status", "phase", "git_commit", "git_dirty", "frozen_commit"]


# ---------------------------------------------------------------- small helpers


def _rank(order: tuple[str, ...], v: Any) -> tuple[int, str]:
    s = str(v)
    return (order.index(s), s) if s in order else (len(order), s)


def task_label(study: Any, dataset: Any) -> str:
    """``toy_lq_v2`` for the toy tasks (one dataset, lq), ``credit_mlp / digits`` otherwise."""
    if not isinstance(dataset, str) or dataset == "lq":
        return str(study)
    return f"{study} / {dataset}"


def run_label(dataset: Any, seed: Any) -> str:
    """``<dataset>_seed<seed>``: how the issue names a run."""
    s = "?" if seed is None or pd.isna(seed) else str(int(seed))
    return f"{dataset if isinstance(dataset, str) else '?'}_seed{s}"


def method_name(method: Any) -> str:
    return NAMES.get(str(method), str(method))


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _cell(med: Any, q25: Any, q75: Any, col: str = "") -> str:
    if pd.isna(med):
        return "n/a"
    return f"{format_value(float(med), col)} [{format_value(float(q25), col)}–{format_value(float(q75), col)}]"


def _norm_token(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _phrase(text: str, phrase: str) -> int:
    """Position of ``phrase`` in ``text`` as whole words (-1 when absent)."""
    m = re.search(r"(?<![a-z0-9])" + re.escape(phrase) + r"(?![a-z0-9])", text)
    return m.start() if m else -1


def method_key(method: Any, step_method: Any = None, term_grad_weight: Any = None) -> str:
    """The method's alias key: its params section name when known, else derived from its
    step method (a credit bridge with ``term_grad_weight`` 0 is the no-TGM ablation)."""
    if str(method) in ALIASES:
        return str(method)
    if str(step_method) == "credit_bridge" and _num(term_grad_weight) == 0:
        return "credit_bridge_no_tgm"
    return str(step_method) if str(step_method) in ALIASES else str(method)


# ---------------------------------------------------------------- the published references


def parse_number(text: Any) -> float:
    """``0.942`` -> 0.942, ``"about 59%"`` -> 0.59, ``"-0.001"`` -> -0.001 (NaN without a number)."""
    if isinstance(text, bool):
        return math.nan
    if isinstance(text, (int, float, np.integer, np.floating)):
        return float(text)
    s = str(text)
    m = NUMBER.search(s)
    if not m:
        return math.nan
    v = float(m.group(0).replace("−", "-").replace(",", ""))
    return v / 100.0 if "%" in s[m.end():m.end() + 2] else v


def parse_published(study: str, items: Iterable[tuple[str, Any]], methods: Mapping[str, str],
                    datasets: Iterable[str] = ()) -> pd.DataFrame:
    """The study's ``published`` mapping (label -> value) as rows (study, dataset, method, metric,
    value, text, label, setup).

    ``methods``: the study's method names -> alias keys (:func:`method_key`). A label names its method
    (:data:`ALIASES`, the longest match), the metrics in the order its value lists them separated by
    ``/`` (``"DFA, costate cosine / perturbation rho / nudging": "0.003 / 0.010 / -0.001"``), and
    optionally a dataset (``"CIFAR-10 flat MLP, ..."``: the row then applies to that dataset only;
    ``dataset`` is None for every dataset). A value may also be a mapping metric -> value. The
    ``setup`` entry is copied onto every row. Labels that name no method or metric are kept with
    ``method``/``metric`` None (shown as they are)."""
    cols = ["study", "dataset", "method", "metric", "value", "text", "label", "setup"]
    items = list(items)
    setup = next((str(v) for k, v in items if str(k).strip().lower() == "setup"), "")
    known = {_norm_token(d): d for d in (*DATASET_ORDER, *datasets)}
    rows = []
    for label, value in items:
        if str(label).strip().lower() == "setup":
            continue
        text = str(label).lower().replace("_", " ")
        best: tuple[int, str | None] = (0, None)
        for m, key in methods.items():
            for alias in ALIASES.get(key, (str(m).replace("_", " "),)):
                if _phrase(text, alias) >= 0 and len(alias) > best[0]:
                    best = (len(alias), m)
        method = best[1]
        dataset = next((known[_norm_token(t)] for t in re.split(r"[\s,;:()]+", str(label)) if _norm_token(t) in known
                        and _norm_token(t) not in ("lq",)), None)
        if isinstance(value, Mapping):
            pairs = []
            for k, v in value.items():
                metric = next((mm for mm, al in METRIC_ALIASES if mm == k or any(_phrase(str(k).lower(), a) >= 0 for a in al)),
                              None)
                pairs.append((metric, v))
        else:
            found = []
            for mm, al in METRIC_ALIASES:
                pos = [p for p in (_phrase(text, a) for a in al) if p >= 0]
                if pos and not any(f[1] == mm for f in found):
                    found.append((min(pos), mm))
            found.sort()
            metrics = [mm for _, mm in found]
            parts = [p.strip() for p in str(value).split("/")] if len(metrics) > 1 else [value]
            pairs = list(zip(metrics, parts)) if len(parts) == len(metrics) and metrics else [(None, value)]
        for metric, v in pairs:
            rows.append({"study": study, "dataset": dataset, "method": method, "metric": metric,
                         "value": parse_number(v) if metric else math.nan, "text": str(v).strip(), "label": str(label),
                         "setup": setup})
    return pd.DataFrame(rows, columns=cols)


def published_rows(data: AnalysisData, runs: pd.DataFrame) -> pd.DataFrame:
    """Every study's parsed published references (first slice that gives them)."""
    frames, seen = [], set()
    for s in data.slices:
        if s.study in seen or not s.published:
            continue
        seen.add(s.study)
        mine = runs[runs["study"] == s.study] if len(runs) else runs
        methods = {str(m): method_key(m, r.get("step_method"), r.get("method_options_term_grad_weight"))
                   for m, r in ((r["method"], r) for r in mine.drop_duplicates("method").to_dict("records"))}
        for sl in data.slices:
            if sl.study == s.study:
                methods.setdefault(sl.method, method_key(sl.method))
        for key in METHOD_ORDER:  # a reference for a method the study does not run is still shown
            if key not in methods.values():
                methods[key] = key
        datasets = mine["dataset"].dropna().astype(str).unique() if len(mine) else []
        frames.append(parse_published(s.study, s.published, methods, datasets))
    if not frames:
        return parse_published("", [], {})
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- runs


def _provenance(base: Path | None, run_dir: Any) -> dict[str, Any]:
    if base is None or not isinstance(run_dir, str):
        return {}
    try:
        m = json.loads((base / run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    prov = m.get("provenance") if isinstance(m, dict) else None
    return prov if isinstance(prov, dict) else {}


def run_table(runs: pd.DataFrame, base: Path | None, selected: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per sweep run: experiment ID (study), label, method, phase (the run's recorded
    provenance phase, else its config's; ``frozen`` when only the frozen flag says so), commit,
    dirty flag, frozen commit, status and its summary metrics; ``selected``: a run of the selected
    LR (with ``lr_policy: fixed`` and one LR, every run)."""
    cols = ["study", "dataset", "method", "method_key", "seed", "run", "run_id", "run_dir", "lr", "status",
            "diverged_step", "diverge_reason", "phase", "frozen", "git_commit", "git_dirty", "frozen_commit",
            "selected", "feedback_seed", *STATS]
    sw = sweep_runs(runs) if len(runs) else runs
    if not len(sw):
        return pd.DataFrame(columns=cols)
    chosen = set(selected["run_dir"]) if selected is not None and len(selected) else set(sw["run_dir"])
    out = []
    for r in sw.to_dict("records"):
        prov = _provenance(base, r.get("run_dir"))
        phase = prov.get("phase") or (r.get("phase") if isinstance(r.get("phase"), str) else None)
        frozen = bool(prov.get("frozen", r.get("frozen", False)))
        phase = phase or ("frozen" if frozen else "unknown")
        row = {"study": r.get("study"), "dataset": r.get("dataset"), "method": r.get("method"),
               "method_key": method_key(r.get("method"), r.get("step_method"), r.get("method_options_term_grad_weight")),
               "seed": r.get("seed"), "run": run_label(r.get("dataset"), r.get("seed")), "run_id": r.get("run_id"),
               "run_dir": r.get("run_dir"), "lr": r.get("lr"), "status": r.get("status"),
               "diverged_step": r.get("diverged_step"), "diverge_reason": r.get("diverge_reason"), "phase": phase,
               "frozen": frozen, "git_commit": prov.get("git_commit") or r.get("git_commit"),
               "git_dirty": prov.get("git_dirty", r.get("git_dirty")),
               "frozen_commit": prov.get("frozen_commit") or r.get("frozen_commit") or r.get("config_frozen_commit"),
               "selected": r.get("run_dir") in chosen, "feedback_seed": r.get("feedback_seed")}
        for k in STATS:
            row[k] = _num(r.get(k))
        out.append(row)
    df = pd.DataFrame(out, columns=cols)
    df["frozen_commit"] = df["frozen_commit"].where(df["frozen_commit"].notna(), None)
    return _sorted(df, ["seed"])


def _sorted(df: pd.DataFrame, extra: list[str] = ()) -> pd.DataFrame:
    if df.empty:
        return df.reset_index(drop=True)
    keys = [df["study"].map(lambda v: _rank(STUDY_ORDER, v)), df["dataset"].map(lambda v: _rank(DATASET_ORDER, v)),
            df["method"].map(lambda v: _rank(METHOD_ORDER, v))]
    order = sorted(range(len(df)), key=lambda i: (*(k.iloc[i] for k in keys),
                                                  *(_sort_value(df[c].iloc[i]) for c in extra if c in df)))
    return df.iloc[order].reset_index(drop=True)


def _sort_value(v: Any) -> tuple:
    f = _num(v)
    return (0, f, "") if not math.isnan(f) else (1, 0.0, str(v))


def phase_text(phases: Iterable[Any]) -> str:
    """``frozen`` when every run is in one phase, else ``mixed (debug 2, frozen 1)``."""
    ph = [str(p) for p in phases]
    if not ph:
        return "n/a"
    uniq = sorted(set(ph), key=lambda p: _rank(PHASE_ORDER, p))
    if len(uniq) == 1:
        return uniq[0]
    return "mixed (" + ", ".join(f"{p} {ph.count(p)}" for p in uniq) + ")"


# ---------------------------------------------------------------- series


def read_series(rt: pd.DataFrame, base: Path | None, name: str, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """The selected runs' ``curves.csv`` / ``layers.csv`` rows (with ``run_dir``), only ``metrics``."""
    frames = []
    keep = set(metrics) if metrics is not None else None
    if base is not None:
        for run_dir in rt.loc[rt["selected"].astype(bool), "run_dir"].dropna().unique():
            f = read_csv(base / str(run_dir) / name)
            if f is None or f.empty or "metric" not in f:
                continue
            if keep is not None:
                f = f[f["metric"].astype(str).isin(keep)]
            f = f.copy()
            f.insert(0, "run_dir", run_dir)
            f["value"] = pd.to_numeric(f["value"], errors="coerce").astype(float)
            frames.append(f)
    cols = ["run_dir", "step", "epoch", *(["layer", "role"] if name == "layers.csv" else []), "metric", "value"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


# ---------------------------------------------------------------- tables


def costate_table(rt: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Per (study, dataset, method) over its selected runs: median/q25/q75/n of every summary
    metric over the completed runs with a finite value (:func:`optlab.stats.spread`), the published
    reference beside ours and where it falls against our IQR."""
    keys = ["study", "dataset", "method"]
    rows = []
    sel = rt[rt["selected"].astype(bool)] if len(rt) else rt
    for key, g in (sel.groupby(keys, dropna=False, sort=False) if len(sel) else []):
        study, dataset, method = key
        done = g[g["status"] == "completed"]
        row: dict[str, Any] = {"study": study, "dataset": dataset, "method": method, "task": task_label(study, dataset),
                               "method_name": method_name(g["method_key"].iloc[0]), "method_key": g["method_key"].iloc[0],
                               "phase": phase_text(g["phase"]), "frozen": bool(g["frozen"].all()), "n_runs": len(g),
                               "n_completed": len(done),
                               "seeds": " ".join(str(int(s)) for s in sorted(g["seed"].dropna().astype(int)))}
        for m in STATS:
            s = stats.spread(done[m].to_numpy(dtype=float))
            row.update({f"{m}_median": s.median, f"{m}_q25": s.q25, f"{m}_q75": s.q75, f"{m}_n": s.n})
        for m in (*SCORED, "test_acc", "update_cos", "costate_rel_l2", "costate_norm_ratio"):
            p = _published_for(published, study, dataset, method, m)
            row[f"published_{m}"] = p["value"] if p is not None else math.nan
            row[f"published_{m}_text"] = p["text"] if p is not None else ""
            row[f"{m}_vs_published"] = where(p["value"], row[f"{m}_q25"], row[f"{m}_q75"]) if p is not None else ""
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(dict.fromkeys([*keys, "task", "method_name", "phase", "frozen", *COSTATE_MD])))
    for m, col in (("costate_cos", "costate cosine"), ("perturb_rho", "perturbation rho"), ("nudge", "nudging")):
        df[f"{col} median [IQR]"] = [_cell(a, b, c) for a, b, c in zip(df[f"{m}_median"], df[f"{m}_q25"], df[f"{m}_q75"])]
        df[f"published {col}"] = [t or "—" for t in df[f"published_{m}_text"]]
    df["test accuracy / loss median [IQR]"] = [
        (_cell(a, b, c, "test_acc") if pd.notna(a) else
         (f"loss {_cell(d, e, f)}" if pd.notna(d) else "n/a"))
        for a, b, c, d, e, f in zip(df["test_acc_median"], df["test_acc_q25"], df["test_acc_q75"],
                                    df["test_loss_median"], df["test_loss_q25"], df["test_loss_q75"])]
    df["published test accuracy"] = [t or "—" for t in df["published_test_acc_text"]]
    df["seeds"] = [f"{s} ({c} of {n} completed)" if c < n else s
                   for s, c, n in zip(df["seeds"], df["n_completed"], df["n_runs"])]
    return _sorted(df)


def _published_for(pub: pd.DataFrame, study: Any, dataset: Any, method: Any, metric: str) -> dict[str, Any] | None:
    if pub.empty:
        return None
    g = pub[(pub["study"] == study) & (pub["method"] == method) & (pub["metric"] == metric)]
    exact = g[g["dataset"] == dataset]
    anyds = g[g["dataset"].isna()]
    g = exact if len(exact) else anyds
    return g.iloc[0].to_dict() if len(g) else None


def where(value: Any, q25: Any, q75: Any) -> str:
    """Where a published value falls against our IQR: ``inside our IQR``, ``outside our IQR
    (ours higher)`` / ``(ours lower)``, ``n/a`` without either number."""
    v, lo, hi = _num(value), _num(q25), _num(q75)
    if math.isnan(v) or math.isnan(lo) or math.isnan(hi):
        return "n/a"
    if lo - TOL <= v <= hi + TOL:
        return "inside our IQR"
    return "outside our IQR (ours higher)" if v < lo else "outside our IQR (ours lower)"


def published_table(costate: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """One row per published number: ours (median [IQR], steps), the reference, where it falls; a
    reference without our runs (a dataset this profile does not run) says so."""
    cols = ["study", "dataset", "task", "method", "method_name", "metric", "ours_median", "ours_q25", "ours_q75", "ours_n",
            "published_value", "phase", *PUBLISHED_MD]
    rows = []
    for p in published.to_dict("records"):
        if p["metric"] is None or p["method"] is None:
            continue
        g = costate[(costate["study"] == p["study"]) & (costate["method"] == p["method"])] if len(costate) else costate
        if p["dataset"] is not None and len(g):
            g = g[g["dataset"] == p["dataset"]]
        m = p["metric"]
        base = {"study": p["study"], "metric": m, "published_value": p["value"], "published": p["text"],
                "published setup": p["setup"] or "—", "method": p["method"],
                "method_name": method_name(method_key(p["method"]))}
        if g.empty:
            ds = p["dataset"] or "its task"
            rows.append({**base, "dataset": p["dataset"], "task": task_label(p["study"], p["dataset"]),
                         "ours_median": math.nan, "ours_q25": math.nan, "ours_q75": math.nan, "ours_n": 0,
                         "phase": "n/a", "ours median [IQR]": "n/a", "our steps": "n/a",
                         "where": f"no runs of {p['method']} on {ds} in this profile"})
            continue
        for r in g.to_dict("records"):
            rows.append({**base, "dataset": r["dataset"], "task": r["task"], "ours_median": r[f"{m}_median"],
                         "ours_q25": r[f"{m}_q25"], "ours_q75": r[f"{m}_q75"], "ours_n": r[f"{m}_n"], "phase": r["phase"],
                         "ours median [IQR]": _cell(r[f"{m}_median"], r[f"{m}_q25"], r[f"{m}_q75"], m),
                         "our steps": format_value(r["steps_median"]),
                         "where": where(p["value"], r[f"{m}_q25"], r[f"{m}_q75"])})
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(cols)))
    df["metric"] = [WORDS.get(m, m) for m in df["metric"]] if len(df) else df["metric"]
    df["metric_key"] = [next((k for k, w in WORDS.items() if w == m), m) for m in df["metric"]] if len(df) else []
    return _sorted(df) if len(df) else df


def _first_last(cur: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per run: the first and the last logged value of ``metric`` (by step)."""
    f = cur[cur["metric"] == metric].dropna(subset=["value"])
    if f.empty:
        return pd.DataFrame(columns=["run_dir", "first", "last", "early", "late"])
    out = []
    for run_dir, g in f.groupby("run_dir", sort=False):
        g = g.sort_values("step", kind="mergesort")
        v = g["value"].to_numpy(dtype=float)
        k = max(1, len(v) // 10)  # the first / last tenth of the logged steps
        out.append({"run_dir": run_dir, "first": v[0], "last": v[-1], "early": float(np.median(v[:k])),
                    "late": float(np.median(v[-k:]))})
    return pd.DataFrame(out)


def update_table(rt: pd.DataFrame, curves: pd.DataFrame, costate: pd.DataFrame) -> pd.DataFrame:
    """Update alignment (cosine between the method's weight update and the backprop gradient,
    layer mean) at the first measurement (median over completed runs) and at the end (median
    [IQR]), beside the costate cosine at the end."""
    fl = _first_last(curves, "update_cos_mean") if len(curves) else pd.DataFrame(columns=["run_dir", "first"])
    rows = []
    for r in costate.to_dict("records"):
        g = rt[(rt["study"] == r["study"]) & (rt["method"] == r["method"]) & rt["selected"].astype(bool)
               & (rt["status"] == "completed")]
        g = g[g["dataset"] == r["dataset"]] if pd.notna(r["dataset"]) else g
        first = fl[fl["run_dir"].isin(g["run_dir"])]["first"].to_numpy(dtype=float) if len(fl) else np.array([])
        s = stats.spread(first)
        rows.append({"study": r["study"], "dataset": r["dataset"], "method": r["method"], "task": r["task"],
                     "method_name": r["method_name"], "phase": r["phase"], "frozen": r["frozen"], "seeds": r["seeds"],
                     "update_cos_first_median": s.median, "update_cos_first_q25": s.q25, "update_cos_first_q75": s.q75,
                     "update_cos_median": r["update_cos_median"], "update_cos_q25": r["update_cos_q25"],
                     "update_cos_q75": r["update_cos_q75"], "update_cos_change": r["update_cos_median"] - s.median,
                     "costate_cos_median": r["costate_cos_median"], "costate_cos_q25": r["costate_cos_q25"],
                     "costate_cos_q75": r["costate_cos_q75"],
                     UPDATE_MD[4]: format_value(s.median),
                     UPDATE_MD[5]: _cell(r["update_cos_median"], r["update_cos_q25"], r["update_cos_q75"]),
                     UPDATE_MD[6]: _cell(r["costate_cos_median"], r["costate_cos_q25"], r["costate_cos_q75"])})
    cols = ["study", "dataset", "method", "task", "method_name", "phase", "frozen", "seeds", "update_cos_first_median",
            "update_cos_first_q25", "update_cos_first_q75", "update_cos_median", "update_cos_q25", "update_cos_q75",
            "update_cos_change", "costate_cos_median", "costate_cos_q25", "costate_cos_q75", *UPDATE_MD[4:]]
    return pd.DataFrame(rows, columns=cols)


def layer_table(rt: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method, layer) at each completed run's last measurement: median over runs of
    every probe metric and how many runs had positive nudging (the credit pointing uphill)."""
    cols = ["study", "dataset", "method", "task", "layer", *(f"{m}_median" for m in METRICS), "n_positive_nudge", "n_runs"]
    if layers.empty:
        return pd.DataFrame(columns=cols)
    f = layers[layers["metric"].isin(METRICS)].copy()
    f["step"] = pd.to_numeric(f["step"], errors="coerce")
    last = f.groupby("run_dir")["step"].transform("max")
    f = f[f["step"] == last]
    done = rt[(rt["status"] == "completed") & rt["selected"].astype(bool)][["run_dir", "study", "dataset", "method"]]
    f = f.merge(done, on="run_dir", how="inner")
    rows = []
    for (study, dataset, method, layer), g in f.groupby(["study", "dataset", "method", "layer"], dropna=False, sort=False):
        row = {"study": study, "dataset": dataset, "method": method, "task": task_label(study, dataset), "layer": layer}
        for m in METRICS:
            v = g.loc[g["metric"] == m, "value"].to_numpy(dtype=float)
            row[f"{m}_median"] = stats.spread(v).median
        nud = g[g["metric"] == "nudge"]
        row["n_positive_nudge"] = int((nud["value"] > 0).sum())
        row["n_runs"] = int(g["run_dir"].nunique())
        rows.append(row)
    return _sorted(pd.DataFrame(rows, columns=cols), ["layer"])


def bridge_table(rt: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The bridges' own training: median over runs of ``bridge_loss`` over the first and the last
    tenth of the logged steps, and of the credit bridge's last ``credit_blend`` (1: its own credit)."""
    cols = ["study", "dataset", "method", "task", "phase", "bridge_loss_early_median", "bridge_loss_late_median",
            "credit_blend_last_median", "n_runs"]
    if curves.empty:
        return pd.DataFrame(columns=cols)
    loss, blend = _first_last(curves, "bridge_loss"), _first_last(curves, "credit_blend")
    if loss.empty:
        return pd.DataFrame(columns=cols)
    sel = rt[rt["selected"].astype(bool) & (rt["status"] == "completed")]
    rows = []
    for (study, dataset, method), g in sel.groupby(["study", "dataset", "method"], dropna=False, sort=False):
        lg = loss[loss["run_dir"].isin(g["run_dir"])]
        if lg.empty:
            continue
        bg = blend[blend["run_dir"].isin(g["run_dir"])] if len(blend) else blend
        rows.append({"study": study, "dataset": dataset, "method": method, "task": task_label(study, dataset),
                     "phase": phase_text(g["phase"]), "bridge_loss_early_median": float(np.median(lg["early"])),
                     "bridge_loss_late_median": float(np.median(lg["late"])),
                     "credit_blend_last_median": float(np.median(bg["last"])) if len(bg) else math.nan,
                     "n_runs": len(lg)})
    return _sorted(pd.DataFrame(rows, columns=cols))


def build_tables(rt: pd.DataFrame, curves: pd.DataFrame, layers: pd.DataFrame, published: pd.DataFrame) -> dict[str, Table]:
    """Every table of the analysis from frames (see the module docstring)."""
    costate = costate_table(rt, published)
    return {"credit_costate": (costate, COSTATE_MD), "credit_published": (published_table(costate, published), PUBLISHED_MD),
            "credit_update": (update_table(rt, curves, costate), UPDATE_MD),
            "credit_layers": (layer_table(rt, layers), LAYER_MD), "credit_bridge": (bridge_table(rt, curves), BRIDGE_MD),
            "credit_runs": (rt, RUNS_MD)}


# ---------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class CreditAnalysis(BaseAnalysis):
    def tables(self, data: AnalysisData) -> dict[str, Table]:
        from .rho.tables import runs_base

        base = runs_base(data)
        selected = best_runs(data.runs, data.best) if len(data.best) else None
        rt = run_table(data.runs, base, selected)
        curves = read_series(rt, base, "curves.csv", ["update_cos_mean", "costate_cos_mean", "bridge_loss", "credit_blend"])
        layers = read_series(rt, base, "layers.csv", METRICS)
        return build_tables(rt, curves, layers, published_rows(data, rt))

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        return {"credit_curves.png": lambda: _curves_figure(data),
                "credit_costate_cos.png": lambda: _costate_figure(data),
                "credit_alignment.png": lambda: _alignment_figure(data)}

    def section(self, report: "ReportData") -> str:
        return section(report)

    def pages(self, report: "ReportData") -> dict[str, str]:
        return {NOTES_PAGE: notes_page(report)}


# ---------------------------------------------------------------- figures


def _panels(fd: "FigureData") -> list[tuple[Any, Any]]:
    return sorted(fd.panels, key=lambda p: (_rank(STUDY_ORDER, p[0]), _rank(DATASET_ORDER, p[1])))


def _curves_figure(fd: "FigureData") -> "Figure":
    import seaborn as sns

    from .. import plots as P

    panels = _panels(fd)
    if not panels or fd.curves.empty:
        raise P.NoData("no credit runs with curves")
    fig, axes = P.figure(len(panels), 2, w=5.5, h=3.6)
    drawn = 0
    for row, (study, dataset) in enumerate(panels):
        sel = P.match(fd.chosen, study=study, dataset=dataset)
        cur = P.tag(fd.curves[fd.curves["run_dir"].isin(sel["run_dir"])], sel)
        acc = cur[cur["metric"] == "val_acc"].dropna(subset=["value"])
        first = ("val_acc", "validation accuracy") if len(acc) else ("epoch_train_loss", "train loss (epoch mean)")
        for col, (metric, ylab) in enumerate((first, ("val_loss", "validation loss"))):
            ax = axes[row, col]
            d = cur[cur["metric"] == metric].dropna(subset=["value"])
            d = d[np.isfinite(d["value"])].assign(epoch_n=lambda f: f["epoch"] + 1)
            if metric != "val_acc":
                d = P.positive(d, "value")
            if d.empty:
                P.empty(ax)
            else:
                sns.lineplot(data=d, x="epoch_n", y="value", estimator="median", errorbar=("pi", 50), ax=ax,
                             **P.hue(fd, d, "epoch_n"))
                if metric == "val_acc":
                    from matplotlib.ticker import PercentFormatter

                    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
                else:
                    P.log_y(ax)
                P.int_x(ax)
                P.legend(ax)
                drawn += 1
            ax.set_title(f"{task_label(study, dataset)}: {ylab}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylab)
    if not drawn:
        raise P.NoData("no per-epoch curves in the credit runs")
    P.suptitle(fig, "credit assignment: accuracy (toy LQ: train loss) and validation loss per epoch, per method "
                    "(median and IQR over seeds)")
    return fig


def _layer_rows(fd: "FigureData", metric: str) -> pd.DataFrame:
    got = fd.layers(lambda f: {"x": f[f["metric"] == metric][["run_dir", "step", "layer", "value"]]})
    return got.get("x", pd.DataFrame(columns=["run_dir", "step", "layer", "value"]))


def _costate_figure(fd: "FigureData") -> "Figure":
    import seaborn as sns

    from .. import plots as P

    rows = _layer_rows(fd, "costate_cos")
    if rows.empty:
        raise P.NoData("no costate probe rows")
    rows = rows.merge(fd.chosen[["run_dir", "study", "dataset", "method"]], on="run_dir", how="inner")
    panels = [p for p in _panels(fd) if len(P.match(rows, study=p[0], dataset=p[1]))]
    methods = [m for m in fd.method_order(rows["method"].dropna().unique())]
    methods = sorted(methods, key=lambda m: _rank(METHOD_ORDER, m))
    if not panels:
        raise P.NoData("no costate probe rows for the credit panels")
    fig, axes = P.figure(len(panels), len(methods), w=3.6, h=3.0)
    n_layers = int(pd.to_numeric(rows["layer"], errors="coerce").nunique())
    pal = sns.color_palette("viridis", max(n_layers, 1))
    legend_done = False
    for i, (study, dataset) in enumerate(panels):
        for j, method in enumerate(methods):
            ax = axes[i, j]
            d = P.match(rows, study=study, dataset=dataset, method=method)
            if d.empty:
                P.empty(ax, "not run")
            else:
                d = d.assign(layer=pd.to_numeric(d["layer"], errors="coerce"))
                med = d.groupby(["layer", "step"], as_index=False)["value"].median()
                for k, (layer, g) in enumerate(med.groupby("layer", sort=True)):
                    ax.plot(g["step"], g["value"], color=pal[k % len(pal)], lw=1.2, label=f"{int(layer)}")
                ax.axhline(0.0, color="0.6", lw=0.6, ls=":")
                ax.set_ylim(-1.05, 1.05)
                if not legend_done:
                    ax.legend(fontsize=6, ncol=2, title="layer (0: first)", title_fontsize=6)
                    legend_done = True
            ax.set_title(f"{task_label(study, dataset)}: {method_name(method)}", fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel("costate cosine" if j == 0 else "")
    P.suptitle(fig, "costate cosine cos(lambda_hat_l, lambda_l) on the probe batch over training, per layer "
                    "(median over seeds)")
    return fig


def _alignment_figure(fd: "FigureData") -> "Figure":
    import seaborn as sns

    from .. import plots as P

    cur = fd.curves[fd.curves["metric"].isin(["costate_cos_mean", "update_cos_mean"])] if len(fd.curves) else fd.curves
    if cur.empty:
        raise P.NoData("no costate curves")
    panels = _panels(fd)
    if not panels:
        raise P.NoData("no credit panels")
    fig, axes = P.figure(len(panels), 2, w=5.0, h=3.4)
    drawn = 0
    for i, (study, dataset) in enumerate(panels):
        sel = P.match(fd.chosen, study=study, dataset=dataset)
        c = P.tag(cur[cur["run_dir"].isin(sel["run_dir"])], sel)
        for j, (metric, ylab) in enumerate((("costate_cos_mean", "costate cosine (layer mean)"),
                                            ("update_cos_mean", "update alignment (layer mean)"))):
            ax = axes[i, j]
            d = c[c["metric"] == metric].dropna(subset=["value"])
            if d.empty:
                P.empty(ax)
            else:
                sns.lineplot(data=d, x="step", y="value", estimator="median", errorbar=("pi", 50), ax=ax,
                             **P.hue(fd, d, "step"))
                ax.axhline(0.0, color="0.6", lw=0.6, ls=":")
                P.legend(ax)
                drawn += 1
            ax.set_title(f"{task_label(study, dataset)}: {ylab}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(ylab)
    if not drawn:
        raise P.NoData("no costate curves in the credit runs")
    P.suptitle(fig, "credit quality over training: costate cosine and update alignment with the backprop gradient "
                    "(median and IQR over seeds)")
    return fig


# ---------------------------------------------------------------- words

OURS = ("Each method's definition is ours; none has a public reference implementation. BP (`credit_bp`) takes "
        "exact costates lambda_l = dL/dh_l from autograd; DFA (`dfa`) uses lambda_hat_l = B_l e with fixed random "
        "B_l (seeded, never trained); the state bridge (`state_bridge`) differentiates the loss at a learned "
        "prediction of the terminal state; the credit bridge (`credit_bridge`) uses the gradient of a learned value "
        "network V(h_l, l), with terminal gradient matching (`term_grad_weight`, 0 in `credit_bridge_no_tgm`) and a "
        "DFA warm-up blended into its own credit. Every method updates layer l with the same local surrogate "
        "<stopgrad(a_l), h_l>, a_l = lambda_hat_l / (RMS(lambda_hat_l) + 1e-6). The published numbers are printed "
        "beside ours as labeled references, from their own setup.")

METRIC_NOTE = ("Metrics on the task's fixed probe batch, layer means at the last measurement: costate cosine "
               "between lambda_hat_l and the exact lambda_l over the flattened batch; perturbation rho, the Spearman "
               "correlation over random unit perturbations xi of h_l between lambda_hat_l·xi and the central "
               "difference of the loss; nudging, the relative change of the loss when every h_l moves a small step "
               "along -a_l (negative: the credit points downhill); update alignment, the cosine between the method's "
               "weight update and the backprop gradient. Median [IQR: 25th–75th percentile] over the completed seeds.")


def _has(rd: "ReportData", name: str) -> bool:
    return name in rd.table_names and (rd.tables_dir / f"{name}.csv").is_file()


DISPLAY = {*COSTATE_MD, *PUBLISHED_MD, *UPDATE_MD, "published", "text", "label", "task", "method_name", "phase", "seeds",
           "where", "run", "run_id", "git_commit", "frozen_commit", "study", "dataset", "method", "status",
           *(f"published_{m}_text" for m in METRICS), "published_test_acc_text"}


def _tab(rd: "ReportData", name: str) -> pd.DataFrame:
    """A table of this analysis, its display columns read as text exactly as written."""
    if not _has(rd, name):
        return pd.DataFrame()
    path = rd.tables_dir / f"{name}.csv"
    try:
        head = pd.read_csv(path, nrows=0).columns
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    text = [c for c in head if c in DISPLAY]
    df = pd.read_csv(path, dtype={c: str for c in text})
    for c in text:
        df[c] = df[c].where(df[c].notna(), "n/a" if c in (*COSTATE_MD, *PUBLISHED_MD, *UPDATE_MD) else None)
    return df


def agreement_sentences(pub: pd.DataFrame) -> list[str]:
    """One plain sentence per (task, method) with published numbers: where each falls against our IQR."""
    if pub.empty:
        return []
    out = []
    for (task, method), g in pub.groupby(["task", "method"], sort=False):
        parts, inside, outside = [], 0, 0
        for r in g.to_dict("records"):
            w = str(r["where"])
            if w == "inside our IQR":
                inside += 1
            elif w.startswith("outside"):
                outside += 1
            ours = _cell(r["ours_median"], r["ours_q25"], r["ours_q75"], str(r.get("metric_key") or ""))
            parts.append(f"{r['metric']}: ours {ours}, published {r['published']} ({w})")
        name = str(g["method_name"].iloc[0])
        if inside + outside == 0:
            out.append(f"- **{name}** on {task}: not run in this profile; published: "
                       + "; ".join(f"{r['metric']} {r['published']}" for r in g.to_dict("records")) + ".")
            continue
        elif outside == 0:
            verdict = "agrees with the published reference (every number inside our IQR)"
        elif inside == 0:
            verdict = "does not agree with the published reference (every number outside our IQR)"
        else:
            verdict = f"agrees on {inside} and disagrees on {outside} of {inside + outside} numbers"
        steps = format_value(_num(g["our steps"].iloc[0]))
        setup = str(g["published setup"].iloc[0])
        tail = f" Our runs: {steps} steps (median); published setup: {setup}." if steps != "n/a" else ""
        out.append(f"- **{name}** on {task}: {verdict}: {'; '.join(parts)}.{tail}")
    return out


def _provenance_line(runs: pd.DataFrame) -> str:
    if runs.empty:
        return "Provenance: no runs."
    n = len(runs)
    frozen = runs["frozen"].astype(str).str.lower().eq("true")
    dirty = int(runs["git_dirty"].astype(str).str.lower().eq("true").sum())
    by = ", ".join(f"{p} {c}" for p, c in sorted(runs["phase"].astype(str).value_counts().items(),
                                                  key=lambda kv: _rank(PHASE_ORDER, kv[0])))
    s = f"Provenance: {int(frozen.sum())} of {n} runs are frozen (runs by phase: {by}); the `phase` column says which rows come from frozen runs."
    if dirty:
        s += f" {dirty} of {n} runs were made from a work tree with uncommitted changes."
    return s


def section(rd: "ReportData") -> str:
    lines = [f"## {rd.title}", "", rd.comment(), ""]
    cost = _tab(rd, "credit_costate")
    if cost.empty:
        return "\n".join(lines + ["No credit-assignment runs yet.", ""])
    lines += ["Issue #13. A network is a discrete-time system h_{l+1} = F_l(h_l; theta_l); the costate "
              "lambda_l = dL/dh_l is what backprop computes exactly. Each method estimates it and learns from its "
              "estimate; we score the estimate against the exact costate and what it does to learning.", "",
              OURS, "", METRIC_NOTE, "",
              "### Costate cosine, perturbation rho and nudging per method and task", "",
              markdown_table(cost[[c for c in COSTATE_MD if c in cost]]), ""]
    pub = _tab(rd, "credit_published")
    sentences = agreement_sentences(pub)
    if sentences:
        lines += ["**Against the published reference** (inside / outside our IQR over seeds):", "", *sentences, ""]
    upd = _tab(rd, "credit_update")
    if len(upd):
        lines += ["### Update alignment", "",
                  "Cosine between each method's weight update and the backprop gradient (layer mean), at the first "
                  "measurement and at the end, beside the costate cosine.", "",
                  markdown_table(upd[[c for c in ["task", "method", *UPDATE_MD[2:]] if c in upd]]), ""]
    figs = rd.figure_lines([("credit_curves.png", "credit assignment: accuracy and loss curves per method"),
                            ("credit_costate_cos.png", "costate cosine over training per method and layer"),
                            ("credit_alignment.png", "costate cosine and update alignment over training")])
    if figs:
        lines += ["### Figures", "", *figs]
    runs = _tab(rd, "credit_runs")
    lines += ["### Provenance", "", _provenance_line(runs), ""]
    if rd.pages_dir is not None:
        lines += [f"Experiment notes (runs per phase with commits, design decisions with their evidence, known "
                  f"issues): [{NOTES_PAGE}]({rd.rel(rd.pages_dir / NOTES_PAGE)}).", ""]
    names = ["credit_costate", "credit_published", "credit_update", "credit_layers", "credit_bridge", "credit_runs"]
    lines += [f"Tables: {rd.table_links([f'{n}.csv' for n in names if _has(rd, n)])}.", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------- the notes page


def _row(df: pd.DataFrame, **kv: Any) -> dict[str, Any] | None:
    if df.empty:
        return None
    m = np.ones(len(df), dtype=bool)
    for k, v in kv.items():
        if k not in df:
            return None
        m &= (df[k].astype(object) == v).to_numpy()
    return df[m].iloc[0].to_dict() if m.any() else None


def _iqr(r: Mapping[str, Any], m: str) -> str:
    return _cell(r.get(f"{m}_median"), r.get(f"{m}_q25"), r.get(f"{m}_q75"))


def decisions(cost: pd.DataFrame, upd: pd.DataFrame, runs: pd.DataFrame, bridge: pd.DataFrame,
              pub: pd.DataFrame) -> list[str]:
    """The design decisions, each with the evidence the runs give for it (numbers from the tables)."""
    out = []
    bp = cost[cost["method"] == "credit_bp"] if len(cost) else cost
    # 1. the reference and the probe
    if len(bp):
        ev = "; ".join(f"{r['task']}: costate cosine {_iqr(r, 'costate_cos')}, update alignment {_iqr(r, 'update_cos')}"
                       for r in bp.to_dict("records"))
        exact = all(abs(_num(r["costate_cos_median"]) - 1) < 1e-4 for r in bp.to_dict("records"))
        word = ("consistent: BP's costate cosine is 1 to numerical precision" if exact else
                "**not confirmed**: BP's costate cosine is not 1, a probe or method bug to find")
        out.append(f"**BP with the same normalized local surrogate is the reference** (`credit_bp`): every method "
                   f"updates from a_l through <stopgrad(a_l), h_l>, so differences come from the credit alone. "
                   f"Evidence: {ev}. Verdict: {word}.")
    else:
        out.append("**BP with the same normalized local surrogate is the reference**: no `credit_bp` runs yet.")
    # 2. terminal gradient matching
    v1 = _row(cost, study="toy_lq_v1", method="credit_bridge_no_tgm") if len(cost) else None
    v2 = _row(cost, study="toy_lq_v2", method="credit_bridge") if len(cost) else None
    ref_no = _row(pub, study="toy_lq_v1", method="credit_bridge_no_tgm", metric="costate cosine") if len(pub) else None
    ref_yes = _row(pub, study="toy_lq_v2", method="credit_bridge", metric="costate cosine") if len(pub) else None
    if v1 and v2:
        lo1, hi1, lo2, hi2 = (_num(v1["costate_cos_q25"]), _num(v1["costate_cos_q75"]), _num(v2["costate_cos_q25"]),
                              _num(v2["costate_cos_q75"]))
        if lo2 > hi1:
            word = "supports it: with matching the IQR lies wholly above the ablation's"
        elif hi2 < lo1:
            word = "**contradicts it**: with matching the IQR lies wholly below the ablation's"
        else:
            word = "inconclusive: the two IQRs overlap"
        ref = ""
        if ref_no or ref_yes:
            ref = (f" Published: {ref_yes['published'] if ref_yes else 'n/a'} with, "
                   f"{ref_no['published'] if ref_no else 'n/a'} without.")
        out.append(f"**Terminal gradient matching in the credit bridge** (`term_grad_weight` 1.0; the toy_lq_v1 "
                   f"ablation sets 0). Evidence: costate cosine {_iqr(v2, 'costate_cos')} with (toy_lq_v2, seeds "
                   f"{v2['seeds']}) vs {_iqr(v1, 'costate_cos')} without (toy_lq_v1, seeds {v1['seeds']}); our runs' "
                   f"verdict: {word}.{ref}")
    else:
        out.append("**Terminal gradient matching in the credit bridge**: the toy_lq_v1 / toy_lq_v2 pair has not run "
                   "yet, so the ablation's evidence is pending.")
    # 3. costates, not update alignment alone
    dfa = upd[upd["method"] == "dfa"] if len(upd) else upd
    if len(dfa):
        ev = "; ".join(f"{r['task']}: costate cosine {_cell(r['costate_cos_median'], r['costate_cos_q25'], r['costate_cos_q75'])}, "
                       f"update alignment {format_value(r['update_cos_first_median'])} at the first measurement -> "
                       f"{_cell(r['update_cos_median'], r['update_cos_q25'], r['update_cos_q75'])} at the end"
                       for r in dfa.to_dict("records"))
        recs = dfa.to_dict("records")
        gap = sum(_num(r["update_cos_median"]) > _num(r["costate_cos_median"]) for r in recs)
        grew = sum(_num(r["update_cos_median"]) > _num(r["update_cos_first_median"]) for r in recs)
        word = (f"update alignment exceeds costate cosine on {gap} of {len(recs)} tasks and grew from the first "
                f"measurement to the end on {grew} of {len(recs)}")
        out.append(f"**Score the credit itself (costates), and report update alignment beside it**: a random-feedback "
                   f"update can align with the gradient while the credit it used does not. Evidence: {ev}. {word[0].upper() + word[1:]}.")
    # 4. frozen rerun
    fz = runs[runs["study"] == "toy_lq_frozen"] if len(runs) else runs
    v2r = runs[runs["study"] == "toy_lq_v2"] if len(runs) else runs
    if len(fz) and len(v2r):
        keys = ["method", "seed"]
        both = fz.merge(v2r, on=keys, suffixes=("_f", "_v"))
        diffs = {m: float(np.nanmax(np.abs(both[f"{m}_f"].astype(float) - both[f"{m}_v"].astype(float))))
                 if len(both) and np.isfinite(both[f"{m}_f"].astype(float) - both[f"{m}_v"].astype(float)).any() else math.nan
                 for m in SCORED}
        commits_f = ", ".join(sorted({str(c)[:12] for c in fz["git_commit"].dropna()})) or "?"
        commits_v = ", ".join(sorted({str(c)[:12] for c in v2r["git_commit"].dropna()})) or "?"
        same = all(d == 0 for d in diffs.values() if not math.isnan(d))
        differ = [m for m in SCORED if not math.isnan(diffs[m]) and diffs[m] > 0]
        word = ("the rerun reproduces toy_lq_v2 bitwise" if same and not all(math.isnan(d) for d in diffs.values()) else
                f"the rerun differs from toy_lq_v2 (largest per-seed difference: "
                + ", ".join(f"{WORDS[m]} {format_value(diffs[m])}" for m in differ) + ")" if differ else
                "no paired seeds to compare")
        out.append(f"**Report the frozen rerun (toy_lq_frozen), not the development runs**: frozen numbers come from "
                   f"code and configuration fixed at the frozen commit. Evidence: {len(both)} (method, seed) pairs; "
                   f"{word}; commits: toy_lq_frozen {commits_f}, toy_lq_v2 {commits_v}; phases: toy_lq_frozen "
                   f"{phase_text(fz['phase'])}, toy_lq_v2 {phase_text(v2r['phase'])}.")
    # 5. the quick profile's cut
    toy = runs[runs["study"].astype(str).str.startswith("toy_lq")] if len(runs) else runs
    setup = next((str(p["published setup"]) for p in pub.to_dict("records") if str(p.get("study", "")).startswith("toy_lq")
                  and str(p.get("published setup")) not in ("", "—", "nan")), "") if len(pub) else ""
    if len(toy):
        steps = stats.spread(toy["steps"].astype(float).to_numpy())
        wall = float(np.nansum(toy["wall_time_s"].astype(float))) if toy["wall_time_s"].notna().any() else math.nan
        out.append(f"**Toy LQ length in this profile**: {format_value(steps.median)} steps per run (median over "
                   f"{steps.n} runs), {len(toy)} runs, {format_value(wall)} s of training in all"
                   + (f"; the published setup: {setup}" if setup else "") + ".")
    # 6. the credit bridge's warm-up
    cb = bridge[bridge["method"].isin(["credit_bridge", "credit_bridge_no_tgm"])] if len(bridge) else bridge
    if len(cb):
        ev = "; ".join(f"{r['task']} {r['method']}: final blend weight {format_value(r['credit_blend_last_median'])}, "
                       f"bridge loss {format_value(r['bridge_loss_early_median'])} early -> "
                       f"{format_value(r['bridge_loss_late_median'])} late" for r in cb.to_dict("records"))
        out.append(f"**Credit bridge: DFA warm-up (first 20% of training) blended linearly into its own credit**, so "
                   f"layers learn while the value network is still untrained. Evidence: {ev}.")
    return out


def known_issues(cost: pd.DataFrame, runs: pd.DataFrame, layers: pd.DataFrame, bridge: pd.DataFrame,
                 pub: pd.DataFrame) -> list[str]:
    """Problems observed in the runs (every item from the tables)."""
    out = []
    if len(runs):
        bad = runs[runs["status"] != "completed"]
        for r in bad.to_dict("records"):
            step = f" at step {int(_num(r['diverged_step']))}" if not math.isnan(_num(r["diverged_step"])) else ""
            why = f" ({r['diverge_reason']})" if isinstance(r.get("diverge_reason"), str) and r["diverge_reason"] else ""
            out.append(f"Run {r['study']} / {r['run']} ({r['method']}, `{r['run_id']}`) ended {r['status']}{step}{why}.")
    if len(cost):
        pos = cost[cost["nudge_median"].astype(float) > 0]
        for r in pos.to_dict("records"):
            out.append(f"{r['method_name']} on {r['task']}: positive nudging {_iqr(r, 'nudge')} (moving along its "
                       "credit raises the loss: it points uphill).")
        neg = cost[cost["costate_cos_median"].astype(float) < 0]
        for r in neg.to_dict("records"):
            out.append(f"{r['method_name']} on {r['task']}: negative costate cosine {_iqr(r, 'costate_cos')}.")
        missing = cost[cost["costate_cos_n"].astype(float) < cost["n_completed"].astype(float)]
        for r in missing.to_dict("records"):
            out.append(f"{r['method_name']} on {r['task']}: {int(r['n_completed'] - r['costate_cos_n'])} completed runs "
                       "have no costate summary (probe missing or non-finite).")
    if len(cost) and "best_val_acc_median" in cost:
        fell = cost[(cost["best_val_acc_median"].astype(float) - cost["val_acc_median"].astype(float)) > FELL]
        for r in fell.to_dict("records"):
            out.append(f"{r['method_name']} on {r['task']}: validation accuracy fell from its best "
                       f"{format_value(r['best_val_acc_median'], 'acc')} to {format_value(r['val_acc_median'], 'acc')} at "
                       "the end (medians over seeds): training lost what it had learned.")
    if len(layers):
        lp = layers[layers["n_positive_nudge"].astype(float) > 0]
        if len(lp):
            grp = lp.groupby(["task", "method"], sort=False)["layer"].apply(lambda s: " ".join(str(int(_num(v))) for v in s))
            for (task, method), ls in grp.items():
                out.append(f"{method_name(method)} on {task}: positive nudging at the last measurement in some run at "
                           f"layers {ls}.")
    if len(bridge):
        up = bridge[bridge["bridge_loss_late_median"].astype(float) >= bridge["bridge_loss_early_median"].astype(float)]
        for r in up.to_dict("records"):
            out.append(f"{method_name(r['method'])} on {r['task']}: the bridge loss did not fall "
                       f"({format_value(r['bridge_loss_early_median'])} early, {format_value(r['bridge_loss_late_median'])} late).")
    if len(pub):
        off = pub[pub["where"].astype(str).str.startswith("outside")]
        if len(off):
            out.append(f"{len(off)} of {int(pub['where'].astype(str).str.contains('IQR').sum())} published numbers lie "
                       "outside our IQR: " + "; ".join(f"{r['method_name']} {r['metric']} on {r['task']}"
                                                      for r in off.to_dict("records")) + ".")
    if len(runs):
        fz = runs[runs["study"] == "toy_lq_frozen"]
        notfz = fz[fz["phase"].astype(str) != "frozen"]
        if len(notfz):
            out.append(f"{len(notfz)} of {len(fz)} toy_lq_frozen runs were not made in the frozen phase "
                       f"({phase_text(notfz['phase'])}): their numbers are not frozen numbers.")
        dirty = runs[runs["git_dirty"].astype(str).str.lower() == "true"]
        if len(dirty):
            out.append(f"{len(dirty)} of {len(runs)} runs were made from a work tree with uncommitted changes "
                       f"(studies {', '.join(sorted(dirty['study'].astype(str).unique(), key=lambda s: _rank(STUDY_ORDER, s)))}).")
    return out


def notes_page(rd: "ReportData") -> str:
    """``credit_notes.md``: runs per phase (experiment IDs, runs, commits), design decisions with
    their evidence, known issues; generated from the tables only."""
    cost, runs = _tab(rd, "credit_costate"), _tab(rd, "credit_runs")
    upd, layers, bridge, pub = (_tab(rd, n) for n in ("credit_update", "credit_layers", "credit_bridge", "credit_published"))
    lines = ["# Credit assignment: experiment notes", "", rd.comment(), "",
             "Issue #13. Generated from the runs' outputs (tables in "
             f"[{rd.rel(rd.tables_dir)}]({rd.rel(rd.tables_dir)})); no number here is written by hand.", "",
             "**Definitions are ours.** " + OURS, ""]
    lines += ["## Runs per phase", ""]
    if runs.empty:
        lines += ["No credit-assignment runs yet.", ""]
    else:
        runs = runs.copy()
        runs["git_commit"] = [str(c)[:12] if isinstance(c, str) else "n/a" for c in runs["git_commit"]]
        runs["frozen_commit"] = [str(c)[:12] if isinstance(c, str) and c and c != "nan" else "—" for c in runs["frozen_commit"]]
        for phase in sorted(runs["phase"].astype(str).unique(), key=lambda p: _rank(PHASE_ORDER, p)):
            g = runs[runs["phase"].astype(str) == phase]
            studies = sorted(g["study"].astype(str).unique(), key=lambda s: _rank(STUDY_ORDER, s))
            commits = sorted(g["git_commit"].unique())
            lines += [f"### Phase `{phase}`", "",
                      f"{len(g)} runs; experiment IDs (studies): {', '.join(studies)}; commits: "
                      f"{', '.join(commits)}.", ""]
            for study in studies:
                gs = g[g["study"].astype(str) == study]
                lines += [f"#### {study}", "", markdown_table(gs[[c for c in RUNS_MD if c in gs and c != "study"]]), ""]
    lines += ["## Design decisions and the evidence for them", ""]
    lines += [f"{i}. {d}" for i, d in enumerate(decisions(cost, upd, runs, bridge, pub), 1)] + [""]
    lines += ["## Known issues observed in the runs", ""]
    issues = known_issues(cost, runs, layers, bridge, pub)
    lines += [f"- {s}" for s in issues] if issues else ["- None observed."]
    lines += ["", "## Results", ""]
    if len(cost):
        lines += [markdown_table(cost[[c for c in COSTATE_MD if c in cost]]), ""]
        lines += agreement_sentences(pub) + [""]
    names = ["credit_costate", "credit_published", "credit_update", "credit_layers", "credit_bridge", "credit_runs"]
    lines += [f"Tables: {rd.table_links([f'{n}.csv' for n in names if _has(rd, n)])}.", ""]
    lines += rd.figure_lines([("credit_curves.png", "accuracy and loss curves per method"),
                              ("credit_costate_cos.png", "costate cosine over training per method and layer"),
                              ("credit_alignment.png", "costate cosine and update alignment over training")])
    return "\n".join(lines).rstrip("\n") + "\n"


ANALYSIS = CreditAnalysis(name="credit", title="Credit assignment: estimated costates against exact ones", order=40,
                          method_order=METHOD_ORDER)
