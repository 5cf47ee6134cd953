"""Stage `validate`: the whole params file checked up front; its out is the training code's fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from optlab import paramfiles
from optlab import pipeline
from optlab.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_fingerprint_follows_training_code_not_analysis(tmp_path):
    (tmp_path / "analysis").mkdir()
    (tmp_path / "optim").mkdir()
    (tmp_path / "engine.py").write_text("x = 1\n")
    (tmp_path / "optim" / "sgd.py").write_text("y = 1\n")
    (tmp_path / "analysis" / "tables.py").write_text("z = 1\n")
    (tmp_path / "robustness.py").write_text("r = 1\n")
    base = pipeline.training_code_fingerprint(tmp_path)
    (tmp_path / "analysis" / "tables.py").write_text("z = 2\n")
    (tmp_path / "robustness.py").write_text("r = 2\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    assert pipeline.training_code_fingerprint(tmp_path) == base
    (tmp_path / "optim" / "sgd.py").write_text("y = 2\n")
    changed = pipeline.training_code_fingerprint(tmp_path)
    assert changed != base
    (tmp_path / "optim" / "muon.py").write_text("")  # a new module counts too
    assert pipeline.training_code_fingerprint(tmp_path) != changed


def test_validate_checks_every_study_and_writes_the_fingerprint(tmp_path, monkeypatch):
    out = tmp_path / "validated.txt"
    n = pipeline.validate(str(ROOT / "params.yaml"), out=str(out))
    params = paramfiles.read(ROOT / "params.yaml")
    assert n > len(params["studies"])  # the headline, every study slice's points, the ablation
    assert out.read_text() == f"training code sha256 {pipeline.training_code_fingerprint()}\n"


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(optimzer="adam"), r"optimzer: unknown key \(did you mean 'optimizer'\?\)"),
    (lambda p: p["studies"][next(iter(p["studies"]))]["quick"].update(lrs=[-1.0]), r"lr"),
    (lambda p: p["methods"]["sgd"].update(step_method="nope"), r"step_method: unknown value 'nope'"),
])
def test_validate_refuses_a_bad_file_before_writing(tmp_path, edit, message):
    params = paramfiles.read(ROOT / "params.yaml")
    edit(params)
    path = paramfiles.write(params, tmp_path / "params.yaml")
    out = tmp_path / "validated.txt"
    with pytest.raises(ConfigError, match=message):
        pipeline.validate(str(path), out=str(out))
    assert not out.exists()
