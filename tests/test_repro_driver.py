"""`make repro`'s driver (optlab.repro) and the per-stage config files that stage `validate` writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from optlab import paramfiles
from optlab import pipeline, repro

ROOT = Path(__file__).resolve().parents[1]
PARAMS = paramfiles.read(ROOT / "params.yaml")


def test_groups_are_studies_and_the_solo_training_stages():
    stale = ["validate", "prepare", "train", "mlp_depth@sgd", "gpt@adam", "mlp_depth@adam", "ablate", "aggregate", "report"]
    assert repro.groups(stale) == {"train": ["train"], "mlp_depth": ["mlp_depth@sgd", "mlp_depth@adam"],
                                   "gpt": ["gpt@adam"], "ablate": ["ablate"]}


def test_longest_group_first_and_untimed_groups_before_timed_ones():
    gs = {"a": ["a@x"], "b": ["b@x"], "c": ["c@x"], "new": ["new@x"]}
    assert repro.order(gs, {"a": 5.0, "b": 50.0, "c": 20.0}) == ["new", "b", "c", "a"]
    # a group not timed here falls back to its runs' recorded time
    assert repro.order(gs, {"a": 5.0, "b": 50.0, "c": 20.0}, {"new": 10.0, "a": 99.0}) == ["b", "c", "new", "a"]


def test_recorded_costs_sum_each_studys_run_times(tmp_path):
    table = tmp_path / "runs.csv"
    table.write_text("run_id,study,wall_time_s\nr1,a,1.5\nr2,a,2.0\nr3,b,\nr4,b,4\n")
    assert repro.recorded_costs(str(table)) == {"a": 3.5, "b": 4.0}
    assert repro.recorded_costs(str(tmp_path / "missing.csv")) == {}
    committed = repro.recorded_costs(str(ROOT / "reports/tables/runs.csv"))
    assert set(committed) >= {"mlp_depth", "ablate"} and all(v > 0 for v in committed.values())


def _docs(params):
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in pipeline.slice_configs(params, "f" * 64).items()}


def test_every_training_stage_in_dvc_yaml_has_its_config_file():
    docs = pipeline.slice_configs(PARAMS, "f" * 64)
    for study, raw in PARAMS["studies"].items():
        for method in raw["methods"]:
            assert f"{study}/{method}.json" in docs
    assert "ablate.json" in docs
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "runs/config/ablate.json" in dvc["stages"]["ablate"]["deps"]


def test_a_params_edit_changes_only_the_files_of_the_stages_it_concerns():
    base = _docs(PARAMS)
    study = "rho_digits"
    method = PARAMS["studies"][study]["methods"][0]

    def changed(edit):
        p = copy.deepcopy(PARAMS)
        edit(p)
        new = _docs(p)
        return sorted(k for k in set(base) | set(new) if base.get(k) != new.get(k))

    # the study's quick section: its slices only
    assert changed(lambda p: p["studies"][study]["quick"].update(lrs=[0.05, 0.5])) == \
        sorted(f"{study}/{m}.json" for m in PARAMS["studies"][study]["methods"])
    # its full section, at scale quick: nothing
    assert changed(lambda p: p["studies"][study]["full"].update(lrs=[0.05])) == []
    # a method added to the study: only the new slice's file
    p2 = copy.deepcopy(PARAMS)
    p2["methods"]["sgd_copy"] = dict(PARAMS["methods"][method])
    p2["studies"][study]["methods"] = [*PARAMS["studies"][study]["methods"], "sgd_copy"]
    new = _docs(p2)
    assert sorted(k for k in new if base.get(k) != new[k]) == [f"{study}/sgd_copy.json"]
    # an engine key: every training stage
    assert len(changed(lambda p: p.update(diverge_loss=50.0))) == len(base)
    # the headline run's keys: the headline run's file only, no study or ablation stage
    assert changed(lambda p: p.update(seed=3)) == ["train.json"]
    assert changed(lambda p: p.update(optimizer="adam")) == ["train.json"]


def test_a_code_change_changes_every_file():
    a = pipeline.slice_configs(PARAMS, "a" * 64)
    b = pipeline.slice_configs(PARAMS, "b" * 64)
    assert all(a[k] != b[k] for k in a)


def test_validate_writes_the_config_dir_and_removes_stale_files(tmp_path):
    cfg = tmp_path / "config"
    (cfg / "gone").mkdir(parents=True)
    (cfg / "gone" / "old.json").write_text("{}\n")
    pipeline.validate(str(ROOT / "params.yaml"), out=str(tmp_path / "validated.txt"), config_dir=str(cfg))
    assert not (cfg / "gone").exists()
    doc = json.loads((cfg / "rho_digits" / "rho_set_sgd.json").read_text())
    assert doc["training_code"] == pipeline.training_code_fingerprint()
    assert doc["method"] == PARAMS["methods"]["rho_set_sgd"] and doc["runs"][0]["method"] == "rho_set_sgd"
    assert "methods" not in doc["study"] and "full" not in doc["study"]


def test_finished_stages_are_counted_from_the_log_as_it_grows(tmp_path):
    """The poll loop reads only what a group's log gained since the last poll; a marker split
    between two polls counts once."""
    g = object.__new__(repro._Group)
    g.log = tmp_path / "g.log"
    g.log.write_bytes(b"")
    g._read, g._done, g._tail = 0, 0, b""
    for piece, expected in ((b"Running stage 'a@x'\nUpdating lock", 0), (b" file\n\rbar\rUpdating lock file\nUpd", 2),
                            (b"ating lock file\n", 3), (b"", 3)):
        with g.log.open("ab") as fh:
            fh.write(piece)
        assert g.done_stages() == expected


def test_force_retrains_every_training_stage_with_dvc_force(monkeypatch):
    calls: list[list[str]] = []

    class Done:
        returncode, stdout, stderr = 0, "validate\nprepare\ntrain\nmlp_depth@sgd\naggregate\n", ""

    def run(cmd, *a, **k):
        calls.append(list(cmd))
        return Done()

    started: list[tuple[list[str], bool]] = []
    monkeypatch.setattr(repro.subprocess, "run", run)
    monkeypatch.setattr(repro, "stale_stages", lambda: [])  # nothing changed: only --force retrains
    monkeypatch.setattr(repro, "prune_lock", lambda: [])

    def fake_groups(gs, jobs, workers, force=False):
        started.append((sorted(s for v in gs.values() for s in v), force))
        return []

    monkeypatch.setattr(repro, "run_groups", fake_groups)
    assert repro.main(["--force", "--no-warm"]) == 0
    assert started == [(["mlp_depth@sgd", "train"], True)]
    assert any(c[-3:] == ["list", "--name-only", "dvc.yaml"] for c in calls)
    started.clear()
    assert repro.main(["--no-warm"]) == 0 and started == []  # without --force, nothing stale: nothing trains


def test_a_forced_group_passes_force_to_dvc(tmp_path, monkeypatch):
    seen = {}

    class P:
        def __init__(self, cmd, **kw):
            seen["cmd"] = cmd

    monkeypatch.setattr(repro, "LOGS", tmp_path)
    monkeypatch.setattr(repro.subprocess, "Popen", P)
    repro._Group("g", ["g@a"], {}, force=True)
    assert seen["cmd"][-3:] == ["--single-item", "--force", "g@a"]
    repro._Group("h", ["h@a"], {})
    assert "--force" not in seen["cmd"]
