"""After the runs are in MLflow: mark what each sweep selected (stage ``track``).

A sweep's selection is known only once its search ends, after the searched runs finished, and
deferred runs reach the store only at the ``track`` stage. So this pass reads each slice's
``summary.json`` and, in the slice's experiment:

- tags every run at a selected LR (search and confirmation seeds, seed 0 included)
  ``optlab.selected = true`` with ``optlab.selected_lr``, so that the UI's filter
  ``tags.optlab.selected = "true"`` lists exactly the runs the report compares;
- gives the slice's parent run (``<study>@<method>``) the study's params (method, optimizer,
  analysis, select, LR grid, seeds), one ``selected_lr/<dataset>/<point>`` metric and tag per
  grid point, the search score there, and the tags ``optlab.study`` / ``optlab.method``;
- logs the study's figures (``reports/figures``, as its ``figures.json`` assigns them to
  studies) as artifacts of the parent, under ``figures/``. The tag ``optlab.figures_sha256``
  records what was logged, so a rerun with the same figures uploads nothing.

The headline run (``runs/train``) gets its curves figure (``runs/train/curves.png``) the same
way (:func:`annotate_headline`).

Runs are matched by name and git commit (the summary's), so older copies of a run in the same
store are left alone. No mlflow import at module level.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from optlab.tracking.flatten import clean_key

SELECTED_TAG = "optlab.selected"
SELECTED_LR_TAG = "optlab.selected_lr"
FIGURES_TAG = "optlab.figures_sha256"
FIGURES_ARTIFACT_DIR = "figures"
PARENT_PARAMS = ("study", "method", "optimizer", "step_method", "analysis", "select", "lr_policy", "lrs",
                 "search_seeds", "seeds", "phase")


def _point_key(point: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in point.items()) or "base"


def slice_marks(doc: dict[str, Any]) -> dict[str, Any]:
    """What one summary.json asks to mark: ``{"parent": name, "commit": sha, "params": {...},
    "metrics": {...}, "tags": {...}, "selected": {run name: lr}}``."""
    study, method = str(doc.get("study")), str(doc.get("method"))
    params = {k: json.dumps(doc[k]) if isinstance(doc[k], (list, dict)) else str(doc[k])
              for k in PARENT_PARAMS if doc.get(k) is not None}
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {"optlab.study": study, "optlab.method": method}
    selected: dict[str, float] = {}
    for pt in doc.get("points") or []:
        lr = pt.get("selected_lr")
        if lr is None:
            continue
        key = clean_key(f"{pt.get('dataset')}/{_point_key(pt.get('point') or {})}")
        metrics[f"selected_lr/{key}"] = float(lr)
        tags[f"optlab.selected_lr/{key}"] = f"{float(lr):g}"
        if isinstance(pt.get("score"), (int, float)):
            metrics[f"search_score/{key}"] = float(pt["score"])
        for name in pt.get("selected_runs") or []:
            selected[str(name)] = float(lr)
    return {"parent": f"{study}@{method}", "commit": doc.get("git_commit"), "params": params, "metrics": metrics,
            "tags": tags, "selected": selected}


def summaries(sweep_root: Path | str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(sweep_root).glob("*/*/summary.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def study_figures(figures_dir: Path | str | None) -> dict[str, list[Path]]:
    """``{study: [figure paths]}`` from ``figures.json`` in ``figures_dir`` (written by the plot
    stage); empty when there is none. Figures listed but missing are left out."""
    if figures_dir is None:
        return {}
    root = Path(figures_dir)
    try:
        manifest = json.loads((root / "figures.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, list[Path]] = {}
    for name, studies in sorted(manifest.items()):
        if (root / name).is_file():
            for study in studies:
                out.setdefault(str(study), []).append(root / name)
    return out


def files_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _all_runs(client: Any, experiment_id: str) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def annotate(sweep_root: Path | str = "runs/sweep", experiment: str = "optlab", tracking_uri: str | None = None,
             figures_dir: Path | str | None = None) -> dict[str, int]:
    """Mark the selected runs and fill the parents (see the module docstring); returns counts."""
    from mlflow.entities import Metric, Param, RunTag

    from optlab.tracking.mlflow_sink import _client, _retry

    docs = summaries(sweep_root)
    figures = study_figures(figures_dir)
    counts = {"slices": 0, "selected_runs": 0, "parents": 0, "figures": 0}
    if not docs:
        return counts
    client, _ = _client(tracking_uri)
    exp = _retry(client.get_experiment_by_name, experiment)
    if exp is None:
        return counts
    by_name: dict[tuple[str, str | None], list[Any]] = {}
    for run in _all_runs(client, exp.experiment_id):
        by_name.setdefault((run.info.run_name, run.data.tags.get("git_commit")), []).append(run)
    for doc in docs:
        marks = slice_marks(doc)
        counts["slices"] += 1
        commit = marks["commit"]
        for name, lr in marks["selected"].items():
            for run in by_name.get((name, commit), []):
                _retry(client.log_batch, run.info.run_id,
                       tags=[RunTag(SELECTED_TAG, "true"), RunTag(SELECTED_LR_TAG, f"{lr:g}")])
                counts["selected_runs"] += 1
        for parent in by_name.get((marks["parent"], commit), []):
            if parent.data.tags.get("optlab.role") != "parent":
                continue
            have = parent.data.params
            params = [Param(clean_key(k), v) for k, v in marks["params"].items() if have.get(clean_key(k)) in (None, v)]
            params = [p for p in params if p.key not in have]  # MLflow params are write-once
            metrics = [Metric(k, v, 0, 0) for k, v in marks["metrics"].items()]
            tags = [RunTag(k, v) for k, v in marks["tags"].items()]
            _retry(client.log_batch, parent.info.run_id, metrics=metrics, params=params, tags=tags)
            counts["parents"] += 1
            mine = figures.get(str(doc.get("study")), [])
            digest = files_digest(mine) if mine else None
            if digest and parent.data.tags.get(FIGURES_TAG) != digest:
                for path in mine:
                    _retry(client.log_artifact, parent.info.run_id, str(path), FIGURES_ARTIFACT_DIR)
                _retry(client.set_tag, parent.info.run_id, FIGURES_TAG, digest)
                counts["figures"] += len(mine)
    return counts


def annotate_headline(run_name: str, commit: str | None, curves: Path | str, experiment: str = "optlab",
                      tracking_uri: str | None = None) -> bool:
    """Log ``curves`` (the headline figure) under ``figures/`` of the newest run named
    ``run_name`` at ``commit``; False when there is no such run or figure. Idempotent (the
    :data:`FIGURES_TAG` digest)."""
    from optlab.tracking.mlflow_sink import _client, _retry

    curves = Path(curves)
    if not curves.is_file():
        return False
    client, _ = _client(tracking_uri)
    exp = _retry(client.get_experiment_by_name, experiment)
    if exp is None:
        return False
    quoted = run_name.replace("'", "\\'")
    found = [r for r in _retry(client.search_runs, [exp.experiment_id], f"attributes.run_name = '{quoted}'",
                               max_results=50, order_by=["attributes.start_time DESC"])
             if commit is None or r.data.tags.get("git_commit") == commit]
    if not found:
        return False
    run = found[0]
    digest = files_digest([curves])
    if run.data.tags.get(FIGURES_TAG) != digest:
        _retry(client.log_artifact, run.info.run_id, str(curves), FIGURES_ARTIFACT_DIR)
        _retry(client.set_tag, run.info.run_id, FIGURES_TAG, digest)
    return True
