"""The phase policy end to end: frozen means "same code and params as frozen_commit", per-study
phases, seeds per configuration, pilot's clean tree. Each test builds a tiny git repository."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from optlab import paramfiles
from optlab import pipeline
from optlab.config import ConfigError, determining_params, load_params, resolve_study, study_run, validate_params
from optlab.tracking.policy import PhaseError, check_phase, code_changed_since, params_changed
from repo_copy import tiny_study

_GIT_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_PREFIX")


def git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_VARS}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()


def base_params() -> dict[str, Any]:
    """Valid params with two tiny studies (``a`` on sgd, ``b`` on adam), 3 seeds each."""
    return {
        "scale": "quick", "phase": "debug", "frozen_commit": None, "device": "cpu", "threads": 1, "log_every": 10,
        "data": {"mirror": None, "val_fraction": 0.1},
        "methods": {"sgd": {"optimizer": "sgd"}, "adam": {"optimizer": "adam"}},
        "studies": {"a": tiny_study(["sgd"], [0.1], [0, 1, 2]), "b": tiny_study(["adam"], [0.01], [0, 1, 2])},
    }


def write_params(repo: Path, params: dict[str, Any]) -> None:
    paramfiles.write(params, repo / "params.yaml")


def commit(repo: Path, msg: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", msg)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed repo shaped like optlab: code, lock file, params, pipeline, results."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.name", "Test")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "commit.gpgsign", "false")
    for rel, text in {"src/optlab/engine.py": "STEP = 1\n", "src/optlab/analysis/report.py": "TITLE = 'a'\n",
                      "stages/sweep.py": "print('sweep')\n", "requirements.lock": "torch==2.0\n",
                      "pyproject.toml": "[project]\nname = 'optlab'\n", "dvc.yaml": "stages: {}\n",
                      "dvc.lock": "schema: '2.0'\n", "README.md": "# optlab\n", "reports/notes.md": "old\n",
                      ".gitignore": "__pycache__/\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    write_params(root, base_params())
    commit(root, "code")
    return root


def freeze(repo: Path, study: str = "a", seeds: list[int] | None = None) -> tuple[str, dict[str, Any]]:
    """Freeze the current commit for ``study`` (its own phase keys) and commit that: the
    workflow README describes. Returns (frozen sha, params)."""
    sha = git(repo, "rev-parse", "HEAD")
    params = paramfiles.read(repo / "params.yaml")
    params["studies"][study].update(phase="frozen", frozen_commit=sha[:10])
    if seeds is not None:
        params["studies"][study]["quick"]["seeds"] = seeds
    write_params(repo, params)
    commit(repo, f"freeze {study}")
    return sha, params


def sweep_check(repo: Path, study: str, monkeypatch) -> tuple[dict[str, str], dict[str, Any]]:
    """What ``python stages/sweep.py --study <study>`` checks before it trains: the phase of the
    study's first run and its provenance (through the pipeline's own code path)."""
    monkeypatch.chdir(repo)
    params = load_params("params.yaml")
    spec = resolve_study(params, study)
    cfg = study_run(params, spec, spec.methods[0], dataset=spec.datasets[0], point=spec.points()[0], lr=spec.lrs[0],
                    seed=spec.seeds[0], run_id="check")
    where = f"studies.{study}." if spec.phase is not None else ""
    return pipeline._provenance(cfg, spec.seeds_per_config(), "check", params=params, study=study, where=where,
                                seeds_key=f"studies.{study}.quick.seeds")


# -- frozen: what determines the runs, not HEAD ------------------------------------------------
def test_frozen_run_succeeds_after_results_only_commit(repo: Path, monkeypatch) -> None:
    sha, params = freeze(repo)
    (repo / "reports" / "notes.md").write_text("frozen results\n")
    (repo / "runs" / "sweep" / "a").mkdir(parents=True)
    (repo / "runs" / "sweep" / "a" / "metrics.json").write_text("{}\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {a: {}}\n")
    (repo / "README.md").write_text("# optlab\n\nresults\n")
    (repo / "src" / "optlab" / "analysis" / "report.py").write_text("TITLE = 'b'\n")  # report code, not run code
    (repo / "src" / "optlab" / "repro.py").write_text("JOBS = 2\n")  # the make-repro driver, not run code
    (repo / "src" / "optlab" / "zygote.py").write_text("WARM = 1\n")  # its warm process, not run code
    params["studies"]["b"]["quick"]["lrs"] = [0.02, 0.05]  # another study's params
    params["methods"]["adam"]["optimizer_options"] = {"eps": 1e-6}  # a method study a does not use
    params["studies"]["c"] = tiny_study(["sgd"], [0.3], [0])  # a new study
    params["workers"] = 2  # never changes a result
    write_params(repo, params)
    head = commit(repo, "results and notes")
    (repo / "reports" / "draft.md").write_text("uncommitted notes\n")  # untracked, not code
    tags, prov = sweep_check(repo, "a", monkeypatch)
    assert prov == {"phase": "frozen", "git_commit": head, "git_dirty": False, "frozen": True, "frozen_commit": sha}
    assert tags["phase"] == "frozen" and tags["frozen_commit"] == sha and tags["git_commit"] == head


def test_frozen_refused_after_code_change(repo: Path, monkeypatch) -> None:
    sha, _ = freeze(repo)
    (repo / "src" / "optlab" / "engine.py").write_text("STEP = 2\n")
    commit(repo, "change the engine")
    with pytest.raises(PhaseError) as err:
        sweep_check(repo, "a", monkeypatch)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"studies.a.frozen_commit: {sha[:12]}: src/optlab/engine.py changed since the frozen commit")
    # an uncommitted, untracked stage counts too: the working tree is compared, not HEAD
    git(repo, "revert", "--no-edit", "HEAD")
    assert code_changed_since(repo, sha) == []
    (repo / "stages" / "extra.py").write_text("pass\n")
    with pytest.raises(PhaseError, match=r": stages/extra\.py changed since the frozen commit"):
        sweep_check(repo, "a", monkeypatch)


def test_frozen_refused_after_lock_file_change(repo: Path, monkeypatch) -> None:
    freeze(repo)
    (repo / "requirements.lock").write_text("torch==2.1\n")
    commit(repo, "upgrade torch")
    with pytest.raises(PhaseError, match=r"^studies\.a\.frozen_commit: [0-9a-f]{12}: requirements\.lock changed"):
        sweep_check(repo, "a", monkeypatch)


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["studies"]["a"]["quick"].__setitem__("lrs", [0.2]), "studies.a.quick.lrs"),
    (lambda p: p["studies"]["a"]["quick"]["set"].__setitem__("width", 16), "studies.a.quick.set.width"),
    (lambda p: p["methods"]["sgd"].__setitem__("optimizer_options", {"weight_decay": 0.1}),
     "methods.sgd.optimizer_options.weight_decay"),
    (lambda p: p.__setitem__("log_every", 5), "log_every"),  # an engine key that reaches the runs
    (lambda p: p["data"].__setitem__("val_fraction", 0.2), "data.val_fraction"),
])
def test_frozen_refused_after_own_params_change(repo: Path, monkeypatch, edit, key) -> None:
    sha, params = freeze(repo)
    edit(params)
    write_params(repo, params)
    commit(repo, "retune")
    with pytest.raises(PhaseError) as err:
        sweep_check(repo, "a", monkeypatch)
    assert str(err.value).startswith(f"studies.a.frozen_commit: {sha[:12]}: params {key} changed since the frozen commit")
    # and uncommitted, the same edit is refused the same way (the file on disk is what runs)
    git(repo, "revert", "--no-edit", "HEAD")
    edit(params)
    write_params(repo, params)
    with pytest.raises(PhaseError, match="params " + re.escape(key) + " changed"):
        sweep_check(repo, "a", monkeypatch)


def test_params_compare_as_parsed_yaml(repo: Path) -> None:
    now = base_params()
    then = copy.deepcopy(now)
    then["phase"], then["frozen_commit"] = "frozen", "abcdef1"
    then["studies"]["a"]["phase"] = "frozen"
    then["studies"]["a"]["quick"]["lrs"] = [1e-1]  # the same number written differently
    assert params_changed(now, then, "a") == []
    then["compile"] = 1  # true and 1 are different YAML values
    now["compile"] = True
    assert params_changed(now, then, "a") == ["compile"]
    assert determining_params(now, "a")["studies"] == {"a": {k: v for k, v in now["studies"]["a"].items()}}
    assert set(determining_params(now, "a")["methods"]) == {"sgd"}
    assert "mirror" not in determining_params(now, "a")["data"]


# -- seeds per configuration -------------------------------------------------------------------
@pytest.mark.parametrize("seeds", [[0, 1], [0, 1, 1]])
def test_frozen_needs_three_seeds_per_configuration(repo: Path, monkeypatch, seeds) -> None:
    freeze(repo, seeds=seeds)
    with pytest.raises(PhaseError, match=r"^studies\.a\.quick\.seeds: 2 distinct seeds per configuration .* below 3"):
        sweep_check(repo, "a", monkeypatch)


def test_seeds_per_configuration_counts_what_each_lr_x_point_gets() -> None:
    params = base_params()
    fixed = tiny_study(["sgd"], [0.1, 0.2], [0, 1, 2])
    fixed["lr_policy"] = "fixed"
    params["studies"]["fixed"] = fixed
    assert resolve_study(params, "fixed").seeds_per_config() == 3  # every LR x point runs every seed
    search = tiny_study(["sgd"], [0.1, 0.2], [0, 1, 2])
    search["quick"]["search_seeds"] = [5]
    params["studies"]["search"] = search
    assert resolve_study(params, "search").seeds_per_config() == 4  # selected LR: search seed + 3 confirm seeds
    with pytest.raises(PhaseError, match=r"^seeds_per_config: 2 distinct"):
        check_phase("frozen", frozen_commit="abcdef1", seeds_per_config=2, root=None)


# -- per-study phase ---------------------------------------------------------------------------
def test_per_study_phase_overrides_only_that_study(repo: Path, monkeypatch) -> None:
    sha, params = freeze(repo)
    (repo / "src" / "optlab" / "engine.py").write_text("STEP = 3\n")  # uncommitted code: fine for debug
    _, prov_b = sweep_check(repo, "b", monkeypatch)
    assert prov_b["phase"] == "debug" and prov_b["frozen"] is False and prov_b["git_dirty"] is True
    spec_a, spec_b = resolve_study(params, "a"), resolve_study(params, "b")
    run = dict(dataset="digits", point={"depth": 2}, seed=0, run_id="r")
    cfg_a = study_run(params, spec_a, "sgd", lr=0.1, **run)
    cfg_b = study_run(params, spec_b, "adam", lr=0.01, **run)
    assert (cfg_a.phase, cfg_a.frozen_commit) == ("frozen", sha[:10])
    assert (cfg_b.phase, cfg_b.frozen_commit) == ("debug", None)
    with pytest.raises(PhaseError, match=r"^studies\.a\.frozen_commit: .*src/optlab/engine\.py changed"):
        sweep_check(repo, "a", monkeypatch)
    # the top-level pair applies to a study without its own: top-level pilot refuses b's dirty tree
    params["phase"] = "pilot"
    write_params(repo, params)
    with pytest.raises(PhaseError, match=r"^phase: 'pilot' needs a clean tree.*src/optlab/engine\.py"):
        sweep_check(repo, "b", monkeypatch)


def test_frozen_sweep_refused_through_the_pipeline(repo: Path, monkeypatch) -> None:
    """``pipeline.sweep`` (the stage's code) refuses before writing anything."""
    freeze(repo)
    (repo / "src" / "optlab" / "engine.py").write_text("STEP = 4\n")
    monkeypatch.chdir(repo)
    with pytest.raises(PhaseError, match=r"^studies\.a\.frozen_commit: .*src/optlab/engine\.py changed"):
        pipeline.sweep("a", "sgd", params_path="params.yaml", out_root=str(repo / "runs" / "sweep"))
    assert not (repo / "runs").exists()


@pytest.mark.parametrize("section, message", [
    ({"phase": "final"}, r"^studies\.a\.phase: unknown value 'final'; allowed: debug, pilot, frozen$"),
    ({"phase": "frozen"}, r"^studies\.a\.frozen_commit: required when studies\.a\.phase is 'frozen'"),
    ({"phase": "frozen", "frozen_commit": 1234567}, r"^studies\.a\.frozen_commit: expected null or a commit sha"),
    ({"phase": "frozen", "frozen_commit": "xyz1234"}, r"^studies\.a\.frozen_commit: expected null or a commit sha"),
    ({"frozen_commit": "abcdef1"}, r"^studies\.a\.frozen_commit: set studies\.a\.phase too.*debug, pilot, frozen$"),
])
def test_study_phase_keys_validate(section, message) -> None:
    params = base_params()
    params["studies"]["a"].update(section)
    with pytest.raises(ConfigError, match=message):
        validate_params(params)


def test_top_level_phase_keys_validate() -> None:
    params = base_params()
    params["frozen_commit"] = 123456789
    with pytest.raises(ConfigError, match=r"^frozen_commit: expected null or a commit sha"):
        validate_params(params)
    params["frozen_commit"], params["phase"] = None, "final"
    with pytest.raises(ConfigError, match=r"^phase: unknown value 'final'; allowed: debug, pilot, frozen$"):
        validate_params(params)


# -- pilot keeps its rule ------------------------------------------------------------------------
def test_pilot_still_refuses_a_dirty_tree(repo: Path, monkeypatch) -> None:
    params = base_params()
    params["studies"]["a"]["phase"] = "pilot"
    write_params(repo, params)
    head = commit(repo, "pilot a")
    _, prov = sweep_check(repo, "a", monkeypatch)
    assert prov == {"phase": "pilot", "git_commit": head, "git_dirty": False, "frozen": False, "frozen_commit": None}
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {x: {}}\n")  # DVC-written: not watched
    sweep_check(repo, "a", monkeypatch)
    (repo / "src" / "optlab" / "engine.py").write_text("STEP = 5\n")
    with pytest.raises(PhaseError, match=r"^studies\.a\.phase: 'pilot' needs a clean tree.*src/optlab/engine\.py"):
        sweep_check(repo, "a", monkeypatch)


# -- provenance reaches the run's records --------------------------------------------------------
def test_frozen_provenance_reaches_metrics_json(repo: Path, monkeypatch, toy_splits, tmp_path: Path) -> None:
    import json

    from optlab import engine
    from optlab.config import RunConfig
    from optlab.tracking.sink import MemorySink

    sha, _ = freeze(repo)
    tags, prov = sweep_check(repo, "a", monkeypatch)
    tags["frozen"] = str(prov["frozen"]).lower()
    cfg = RunConfig(optimizer="sgd", lr=0.1, depth=2, width=8, epochs=1, batch_size=64, device="cpu", phase="frozen",
                    frozen_commit=sha[:10], probes={})
    sink = MemorySink()
    engine.train(cfg, sinks=[sink], data=toy_splits, run_dir=tmp_path / "run", tags=tags, progress=False)
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert doc["provenance"]["phase"] == "frozen" and doc["provenance"]["frozen"] is True
    assert doc["provenance"]["frozen_commit"] == sha and doc["provenance"]["git_commit"] == git(repo, "rev-parse", "HEAD")
    assert sink.tags["phase"] == "frozen" and sink.tags["frozen_commit"] == sha


def test_frozen_sweep_runs_and_records_its_phase(repo: Path, monkeypatch) -> None:
    """A whole frozen slice through ``pipeline.sweep``, after a results-only commit: every run's
    metrics.json and the slice's summary.json say frozen, with the frozen commit."""
    import json

    import torch

    from tests.conftest import make_splits, save_prepared

    sha, _ = freeze(repo)
    (repo / "reports" / "notes.md").write_text("notes after freezing\n")
    head = commit(repo, "notes")
    prep = repo / "data" / "prepared"  # DVC-written data: not code
    prep.mkdir(parents=True)
    s = make_splits(n_train=128, dim=64, n_classes=10)
    save_prepared(s, prep / "digits.pt")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("OPTLAB_TRACKING", "0")
    monkeypatch.setenv("OPTLAB_CHECKPOINT_DIR", str(repo.parent / "ck"))
    results = pipeline.sweep("a", "sgd", params_path="params.yaml", out_root="runs/sweep")
    assert len(results) == 3
    summary = json.loads((repo / "runs" / "sweep" / "a" / "sgd" / "summary.json").read_text())
    assert (summary["phase"], summary["frozen"], summary["frozen_commit"], summary["git_commit"]) == ("frozen", True, sha, head)
    for r in results:
        doc = json.loads((repo / "runs" / "sweep" / "a" / "sgd" / r.run_id / "metrics.json").read_text())
        assert doc["provenance"]["frozen"] is True and doc["provenance"]["frozen_commit"] == sha
        assert doc["provenance"]["phase"] == "frozen" and doc["config"]["phase"] == "frozen"
