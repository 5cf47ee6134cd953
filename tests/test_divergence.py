"""Divergence at scale: a sweep with learning rates up to 10 on a deep MLP completes, and
every diverged run has its record (status, step) in the tables and in MLflow."""

from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import yaml

from optlab import paramfiles
from optlab import pipeline
from tests.conftest import make_splits, save_prepared

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_with_huge_lrs_completes_and_records_divergence(tmp_path, monkeypatch):
    params = paramfiles.read(ROOT / "params.yaml")
    params = copy.deepcopy(params)
    params["studies"] = {"deep": {"arch": "mlp", "methods": ["sgd", "sgd_sn"], "analysis": "sgd_sn",
                                  "quick": {"datasets": ["digits"], "grid": {"depth": [24]}, "lrs": [10.0, 3.0, 0.01], "lr_extend": 0,
                                            "search_seeds": [0, 1], "seeds": [0, 1],
                                            "set": {"width": 32, "epochs": 2, "batch_size": 64}}}}
    paramfiles.write(params, tmp_path / "params.yaml")
    prep = tmp_path / "data" / "prepared"
    prep.mkdir(parents=True)
    s = make_splits(n_train=512, dim=64, n_classes=10)
    save_prepared(s, prep / "digits.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("OPTLAB_CHECKPOINT_DIR", str(tmp_path / "ck"))
    results = pipeline.sweep("deep", "sgd") + pipeline.sweep("deep", "sgd_sn")
    assert len(results) == 12
    diverged = [r for r in results if r.status == "diverged"]
    assert diverged, "plain SGD at lr 10 on a 24-layer MLP should diverge"
    assert all(r.config["optimizer"] == "sgd" for r in diverged)
    assert all(r.diverged_step is not None and r.failure in ("nonfinite", "exploding") for r in diverged)
    # sgd_sn keeps every layer at sigma <= 1: no divergence at any of these LRs
    assert all(r.status == "completed" for r in results if r.config["optimizer"] == "sgd_sn")

    pipeline.aggregate("runs", "reports/tables")
    div = pd.read_csv(tmp_path / "reports/tables/divergence.csv")
    got = {(row.run_id, int(row.diverged_step)) for row in div.itertuples() if row.status == "diverged"}
    assert got == {(r.run_id, r.diverged_step) for r in diverged}

    assert not (tmp_path / "mlflow.db").exists()  # on a CPU the runs wait in the spool (tracking.upload: auto)
    assert pipeline.track() == 0  # the `track` stage uploads them
    con = sqlite3.connect(tmp_path / "mlflow.db")
    rows = con.execute(
        "SELECT t1.value, r.status FROM runs r JOIN tags t1 ON t1.run_uuid=r.run_uuid AND t1.key='run_id' "
        "JOIN tags t2 ON t2.run_uuid=r.run_uuid AND t2.key='status' WHERE t2.value='diverged'"
    ).fetchall()
    assert {name for name, _ in rows} == {r.run_id for r in diverged}
    assert {status for _, status in rows} == {"FINISHED"}  # a divergence is a result, not a failure
    steps = dict(con.execute(
        "SELECT t.value, m.value FROM metrics m JOIN tags t ON t.run_uuid=m.run_uuid AND t.key='run_id' "
        "WHERE m.key='final.diverged_step'"
    ).fetchall())
    assert {k: int(v) for k, v in steps.items()} == {r.run_id: r.diverged_step for r in diverged}
    # deferred upload keeps the nesting: 2 slice parents, 12 children, each child's parent exists
    parents = {u for (u,) in con.execute("SELECT run_uuid FROM runs r WHERE NOT EXISTS (SELECT 1 FROM tags t "
                                          "WHERE t.run_uuid=r.run_uuid AND t.key='mlflow.parentRunId')")}
    links = con.execute("SELECT value FROM tags WHERE key='mlflow.parentRunId'").fetchall()
    assert len(parents) == 2 and len(links) == 12 and {v for (v,) in links} == parents
    statuses = {s for (s,) in con.execute("SELECT status FROM runs")}
    assert statuses == {"FINISHED"}
    assert pipeline.track() == 0  # nothing left: a second upload is a no-op
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 14
