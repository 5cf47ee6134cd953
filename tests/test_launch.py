"""optlab.launch: study slices as one submitit job array (the local executor here), outputs where
the DVC stage puts them and equal to the stage's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optlab import launch, pipeline
from tests.conftest import study_workspace

pytest.importorskip("submitit")


@pytest.fixture
def study_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return study_workspace(tmp_path, monkeypatch, {
        "x": {"analysis": "sgd_sn", "arch": "mlp", "methods": ["sgd", "adam"], "verdict": False,
              "quick": {"datasets": ["digits"], "grid": {"depth": [2]}, "lrs": [0.1, 0.03], "lr_extend": 0,
                        "search_seeds": [0], "seeds": [0, 1], "set": {"width": 8, "epochs": 1, "batch_size": 64}}},
    })


def _finals(root: Path) -> dict[str, dict]:
    out = {}
    for m in sorted(root.rglob("metrics.json")):
        doc = json.loads(m.read_text())
        out[str(m.parent.relative_to(root))] = {k: doc["final"].get(k) for k in ("test_acc", "test_loss", "steps")}
    return out


def test_local_array_writes_the_stage_outputs(study_dir, capsys):
    rc = launch.main(["--study", "x", "--executor", "local", "--folder", str(study_dir / "sub" / "%j"), "--timeout-min", "10"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "submitted 2 slice(s) of x" in out
    assert "dvc commit -f validate x@sgd x@adam" in out
    for method in ("sgd", "adam"):
        summary = json.loads((study_dir / "runs/sweep/x" / method / "summary.json").read_text())
        assert summary["points"][0]["selected_lr"] in (0.1, 0.03)
    assert (study_dir / "runs/config/x/sgd.json").is_file()  # validate ran first, as in dvc repro
    launched = _finals(study_dir / "runs/sweep")
    # the same slices run directly, as the DVC stage runs them: the same runs, number for number
    for method in ("sgd", "adam"):
        pipeline.sweep("x", method, out_root="direct")
    direct = _finals(study_dir / "direct")
    assert launched == direct and len(launched) >= 6


def test_unknown_method_is_one_line(study_dir, capsys):
    rc = launch.main(["--study", "x", "--method", "sgdd", "--executor", "local", "--folder", str(study_dir / "sub")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "optlab: error: --method: 'sgdd' is not a method of studies.x; allowed: sgd, adam"
