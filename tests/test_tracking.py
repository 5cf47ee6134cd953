"""Tests for optlab.tracking: provenance, store location, phase policy, sinks, MLflow sink."""

from __future__ import annotations

import math
import os
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from optlab.tracking.flatten import MAX_PARAM_VALUE_LENGTH, flatten_params
from optlab.tracking.policy import PhaseError, check_phase
from optlab.tracking.provenance import (
    dvc_exp_name,
    dvc_stage,
    find_repo_root,
    find_work_tree,
    git_info,
)
from optlab.tracking.sink import REQUIRED_TAGS, MemorySink, NullSink, Sink
from optlab.tracking.store import default_artifact_location, default_tracking_uri, sqlite_path

_GIT_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_PREFIX")


def git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_VARS}
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def make_repo(root: Path) -> Path:
    """A committed repo shaped like optlab: src/, stages/, params.yaml, dvc.yaml, dvc.lock."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    git(root, "config", "user.name", "Test")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "commit.gpgsign", "false")
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "a.py").write_text("x = 1\n")
    (root / "stages").mkdir()
    (root / "stages" / "train.py").write_text("print('train')\n")
    (root / "params.yaml").write_text("lr: 0.1\n")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    (root / "reports").mkdir()
    (root / "reports" / "x.md").write_text("old\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "plain"
    d.mkdir()
    if find_work_tree(d) is not None:
        pytest.skip("tmp_path lies inside a git checkout")
    return d


# -- provenance ------------------------------------------------------------------------------
def test_find_repo_root_in_dvc_temp_workspace_path(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    fake = root / ".dvc" / "tmp" / "exps" / "tmpabc" / "stages"
    assert find_repo_root(fake) == root.resolve()


def test_find_repo_root_vs_work_tree_in_real_temp_checkout(repo: Path, monkeypatch) -> None:
    # DVC's temp executor is its own git checkout under <repo>/.dvc/tmp/exps/<tmpdir>/.
    tmp = make_repo(repo / ".dvc" / "tmp" / "exps" / "tmpk2j9")
    monkeypatch.chdir(tmp / "src")
    assert find_repo_root() == repo.resolve()
    assert find_work_tree() == tmp.resolve()
    assert git_info(find_work_tree())["git_commit"] == git(tmp, "rev-parse", "HEAD")


def test_find_repo_root_plain(repo: Path, outside: Path) -> None:
    assert find_repo_root(repo / "src" / "pkg") == repo.resolve()
    assert find_repo_root(outside) is None


def test_git_info(repo: Path, outside: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    assert git_info(repo) == {"git_commit": head, "git_dirty": False, "diff": None}
    (repo / "src" / "pkg" / "a.py").write_text("x = 2\n")
    info = git_info(repo)
    assert info["git_commit"] == head and info["git_dirty"] is True
    assert "-x = 1\n+x = 2" in info["diff"]
    assert git_info(outside) == {"git_commit": None, "git_dirty": None, "diff": None}
    assert git_info(None)["git_commit"] is None


def test_git_info_ignores_hook_git_dir(repo: Path, tmp_path: Path, monkeypatch) -> None:
    other = make_repo(tmp_path / "other")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))  # as inside a git hook
    assert git_info(repo)["git_commit"] == git(repo, "rev-parse", "HEAD")


def test_dvc_env(monkeypatch) -> None:
    for var in ("OPTLAB_DVC_STAGE", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert dvc_stage() is None and dvc_exp_name() is None
    monkeypatch.setenv("DVC_STAGE", "mlp_depth@sgd")
    assert dvc_stage() == "mlp_depth@sgd"
    monkeypatch.setenv("OPTLAB_DVC_STAGE", "train")
    assert dvc_stage() == "train"
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-lark")
    assert dvc_exp_name() == "sunny-lark"


# -- store -----------------------------------------------------------------------------------
def test_default_tracking_uri_env(monkeypatch, repo: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert default_tracking_uri(repo) == "http://tracker:5000"


def test_default_tracking_uri_sqlite_at_root(monkeypatch, repo: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = "sqlite:///" + (repo.resolve() / "mlflow.db").as_posix()
    assert expected.startswith("sqlite:////")  # absolute path
    assert default_tracking_uri(repo) == expected
    tmp = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    tmp.mkdir(parents=True)
    monkeypatch.chdir(tmp)
    assert default_tracking_uri() == expected
    assert sqlite_path(expected) == repo.resolve() / "mlflow.db"
    assert default_artifact_location(expected) == (repo.resolve() / "mlartifacts").as_uri()
    assert default_artifact_location("http://tracker:5000") is None
    monkeypatch.chdir(repo)
    sub_db = (repo.resolve() / "sub" / "mlflow.db").as_posix()
    assert default_tracking_uri(Path("sub")) == "sqlite:///" + sub_db


# -- phase policy ----------------------------------------------------------------------------
def check(phase: str, root: Path, frozen_commit: str | None = None, seeds: int = 3) -> dict:
    return check_phase(phase, frozen_commit=frozen_commit, seeds_per_config=seeds, root=root)


def test_unknown_phase(repo: Path) -> None:
    with pytest.raises(PhaseError, match=r"^phase: 'final' is not one of debug, pilot, frozen$"):
        check("final", repo)


def test_debug_accepts_dirty_tree(repo: Path, outside: Path) -> None:
    (repo / "src" / "pkg" / "a.py").write_text("x = 2\n")
    out = check("debug", repo)
    head = git(repo, "rev-parse", "HEAD")
    assert out == {"phase": "debug", "git_commit": head, "git_dirty": True, "frozen": False, "frozen_commit": None}
    assert check("debug", outside)["git_commit"] is None


def test_pilot_refuses_dirty_watched_file(repo: Path) -> None:
    (repo / "src" / "pkg" / "a.py").write_text("x = 2\n")
    (repo / "stages" / "new_stage.py").write_text("pass\n")  # untracked code counts too
    with pytest.raises(PhaseError) as err:
        check("pilot", repo)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("phase: 'pilot'")
    assert "src/pkg/a.py" in msg and "stages/new_stage.py" in msg
    assert "Commit them" in msg


def test_pilot_refuses_params_edit_like_dvc_exp_set(repo: Path) -> None:
    (repo / "params.yaml").write_text("lr: 0.2\n")  # what `dvc exp run -S lr=0.2` does
    with pytest.raises(PhaseError, match=r"params\.yaml.*-S key=val"):
        check("pilot", repo)


def test_pilot_accepts_unwatched_changes(repo: Path) -> None:
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "reports" / "x.md").write_text("new\n")
    (repo / "reports" / "y.md").write_text("untracked\n")
    out = check("pilot", repo / "src")
    head = git(repo, "rev-parse", "HEAD")
    assert out == {"phase": "pilot", "git_commit": head, "git_dirty": False, "frozen": False, "frozen_commit": None}


def test_pilot_refuses_outside_git(outside: Path) -> None:
    with pytest.raises(PhaseError, match=r"^phase: 'pilot' needs a git repository"):
        check("pilot", outside)


def test_frozen_rules(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    with pytest.raises(PhaseError, match=r"^frozen_commit: required"):
        check("frozen", repo, None)
    wrong = ("0" if head[0] != "0" else "1") + head[1:]
    with pytest.raises(PhaseError, match=rf"^frozen_commit: '{wrong}' is not a commit of the repository"):
        check("frozen", repo, wrong)
    with pytest.raises(PhaseError, match=r"^frozen_commit: '[0-9a-f]{6}' is not a commit sha"):
        check("frozen", repo, head[:6])
    with pytest.raises(PhaseError, match=r"^seeds_per_config: 2 distinct seeds per configuration .* below 3"):
        check("frozen", repo, head, seeds=2)
    expected = {"phase": "frozen", "git_commit": head, "git_dirty": False, "frozen": True, "frozen_commit": head}
    assert check("frozen", repo, head) == expected
    assert check("frozen", repo, head[:7].upper()) == expected
    # the frozen commit need not be HEAD: a later results-only commit keeps the runs frozen
    (repo / "reports" / "x.md").write_text("results\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {a: 1}\n")
    git(repo, "commit", "-qam", "results")
    new_head = git(repo, "rev-parse", "HEAD")
    assert check("frozen", repo, head) == {**expected, "git_commit": new_head}
    (repo / "src" / "pkg" / "a.py").write_text("x = 3\n")
    with pytest.raises(PhaseError) as err:
        check("frozen", repo, head)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"frozen_commit: {head[:12]}: src/pkg/a.py changed since the frozen commit")


def test_policy_module_does_not_import_mlflow() -> None:
    code = "import sys, optlab.tracking, optlab.tracking.policy; print('mlflow' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


# -- flatten_params and simple sinks ---------------------------------------------------------
@dataclass
class _Opt:
    name: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.99)


def test_flatten_params() -> None:
    dropped: list[str] = []
    params = {
        "lr": 0.1,
        "model": {"depth": 4, "widths": [8, 16], "act": None},
        "opt": _Opt(),
        "data": {"tokenizer": "char", "mirror": Path("/m/d")},
        "hf_token": "abc",
        "auth": {"api-key": "k", "AWS_SECRET_ACCESS_KEY": "s", "Password": "p", "ok": 1},
        "credentials": {"user": "u"},
        "note": "ghp_" + "A" * 36,
        "url": "https://user:hunter2@host/x",
        "long": "z" * 10_000,
    }
    flat = flatten_params(params, dropped=dropped)
    assert {k: v for k, v in flat.items() if k != "long"} == {
        "lr": "0.1",
        "model.depth": "4",
        "model.widths": "[8, 16]",
        "model.act": "None",
        "opt.name": "sgd",
        "opt.betas": "[0.9, 0.99]",
        "data.tokenizer": "char",
        "data.mirror": "/m/d",
        "auth.ok": "1",
        "url": "https://user:***@host/x",
    }
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH and flat["long"].endswith("...")
    assert sorted(dropped) == [
        "auth.AWS_SECRET_ACCESS_KEY",
        "auth.Password",
        "auth.api-key",
        "credentials",
        "hf_token",
        "note",
    ]
    assert flatten_params({"a": {"b": 1}}, sep="/") == {"a/b": "1"}


def test_memory_and_null_sink() -> None:
    sink = MemorySink()
    assert isinstance(sink, Sink) and isinstance(NullSink(), Sink)
    sink.start({"lr": 0.1}, {"phase": "debug"})
    sink.log_metrics([("loss", 2.0, 0), ("acc", 0.5, 0)])
    sink.log_metrics([("loss", 1.0, 10)])
    sink.finish("diverged", {"val_acc": None})
    assert sink.history("loss") == [(0, 2.0), (10, 1.0)]
    assert sink.status == "diverged" and sink.summary == {"val_acc": None}
    with pytest.raises(ValueError, match="status: 'ok'"):
        sink.finish("ok", {})
    with pytest.raises(ValueError, match="status"):
        NullSink().finish("done", {})


def test_retry_on_locked_database() -> None:
    from optlab.tracking.mlflow_sink import _retry

    calls = []

    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return x * 2

    assert _retry(flaky, 21, base_delay=0.0) == 42 and len(calls) == 3

    def broken() -> None:
        calls.append(0)
        raise ValueError("no such table")

    calls.clear()
    with pytest.raises(ValueError):
        _retry(broken, base_delay=0.0)
    assert len(calls) == 1

    def locked() -> None:
        calls.append(0)
        raise RuntimeError("database is locked")

    calls.clear()
    with pytest.raises(RuntimeError):
        _retry(locked, attempts=4, base_delay=0.0)
    assert len(calls) == 4


# -- MLflow sink (one sqlite store for the module) -------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{db.as_posix()}"
    MlflowClient(uri).search_experiments()  # create the schema once
    return uri


def base_tags(**extra) -> dict:
    tags = {
        "phase": "debug",
        "git_commit": "0123456789abcdef",
        "git_dirty": False,
        "study": "unit",
        "dvc_stage": "mlp_depth@sgd",
        "seed": 3,
        "torch_version": "2.x",
        "device": "cpu",
        "scale": "quick",
    }
    tags.update(extra)
    return tags


def test_mlflow_sink_end_to_end(store: str, monkeypatch) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.mlflow_sink import MlflowSink, end_run, parent_run

    monkeypatch.setenv("OPTLAB_FAKE_SECRET_ENV", "s3cr3t-env-value")
    calls: list[int] = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags,
                        synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)

    parent = parent_run("e2e", tracking_uri=store, tags=base_tags(seed=None))
    sink = MlflowSink(store, run_name="child", parent_run_id=parent, flush_every=1000)
    params = {"lr": 0.05, "model": {"depth": 3, "widths": [4, 4]}, "api_key": "k",
              "hf": {"token": "t"}}
    sink.start(params, {k: v for k, v in base_tags().items() if k != "device"})
    for chunk in range(25):  # 25 x 100 = 2500 points
        steps = range(chunk * 100, (chunk + 1) * 100)
        sink.log_metrics([("train_loss", 1.0 / (s + 1), s) for s in steps])
    assert calls == [1000, 1000]
    summary = {"val_acc": 0.875, "test_loss": None, "sigma": float("nan"), "steps": 2500}
    sink.finish("completed", summary)
    assert calls == [1000, 1000, 502]
    end_run(parent, "completed", tracking_uri=store)

    client = MlflowClient(store)
    run = client.get_run(sink.run_id)
    tags = run.data.tags
    for key in REQUIRED_TAGS:
        assert key in tags, key
    assert tags["device"] == "unknown" and tags["seed"] == "3" and tags["git_dirty"] == "false"
    assert tags["status"] == "completed" and tags["mlflow.parentRunId"] == parent
    assert tags["mlflow.runName"] == "child"
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.05", "model.depth": "3", "model.widths": "[4, 4]"}
    assert tags["optlab.redacted"] == "api_key,hf.token"
    everything = " ".join([*tags, *tags.values(), *run.data.params, *run.data.params.values()])
    assert "s3cr3t" not in everything and "OPTLAB_FAKE_SECRET_ENV" not in everything
    history = client.get_metric_history(sink.run_id, "train_loss")
    assert len(history) == 2500
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / (s + 1)) for s in range(2500)]
    assert run.data.metrics["final.val_acc"] == 0.875 and run.data.metrics["final.steps"] == 2500
    assert "final.test_loss" not in run.data.metrics and "final.sigma" not in run.data.metrics
    assert run.info.artifact_uri.startswith(default_artifact_location(store))
    assert client.list_artifacts(sink.run_id) == []  # clean tree: no diff artifact

    prun = client.get_run(parent)
    assert prun.info.status == "FINISHED" and prun.data.tags["status"] == "completed"
    assert prun.data.tags["optlab.role"] == "parent" and prun.data.tags["seed"] == "unknown"
    assert "mlflow.parentRunId" not in prun.data.tags


@pytest.mark.parametrize(
    ("status", "mlflow_status"), [("diverged", "FINISHED"), ("failed", "FAILED")]
)
def test_mlflow_sink_outcomes(store: str, status: str, mlflow_status: str) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.mlflow_sink import MlflowSink

    sink = MlflowSink(store)
    sink.start({"lr": 10.0}, base_tags(_diff="ignored: the tree is clean"))
    sink.log_metrics([("train_loss", 3.0, 0), ("train_loss", math.inf, 1)])
    sink.finish(status, {"train_loss": math.nan, "diverged_step": 1})
    run = MlflowClient(store).get_run(sink.run_id)
    assert run.info.status == mlflow_status and run.data.tags["status"] == status
    assert run.data.metrics["final.diverged_step"] == 1
    assert len(MlflowClient(store).get_metric_history(sink.run_id, "train_loss")) == 2
    assert MlflowClient(store).list_artifacts(sink.run_id) == []


def test_mlflow_sink_dirty_diff_artifact(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.mlflow_sink import MlflowSink

    diff = "diff --git a/src/a.py b/src/a.py\n-x = 1\n+x = 2\n"
    extra = tmp_path / "curves.csv"
    extra.write_text("step,epoch,metric,value\n")
    with MlflowSink(store) as sink:
        sink.start({}, base_tags(git_dirty=True, _diff=diff))
        sink.log_artifact(extra)
    client = MlflowClient(store)
    run = client.get_run(sink.run_id)
    assert "_diff" not in run.data.tags and run.data.tags["git_dirty"] == "true"
    assert run.data.tags["status"] == "completed"  # ended by the context manager
    names = sorted(f.path for f in client.list_artifacts(sink.run_id, "provenance"))
    assert names == ["provenance/git.diff"]
    local = client.download_artifacts(sink.run_id, "provenance/git.diff", str(tmp_path / "dl"))
    assert Path(local).read_text() == diff
    assert [f.path for f in client.list_artifacts(sink.run_id) if not f.is_dir] == ["curves.csv"]


def test_parent_run_reuse(store: str) -> None:
    from optlab.tracking.mlflow_sink import parent_run

    first = parent_run("reuse", tracking_uri=store, tags=base_tags(), reuse=True)
    again = parent_run("reuse", tracking_uri=store, tags=base_tags(), reuse=True)
    other = parent_run("reuse", tracking_uri=store, tags=base_tags(git_commit="feed"), reuse=True)
    assert first == again and other != first


def test_parent_run_as_context_manager(store: str) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.mlflow_sink import parent_run

    with parent_run("scope", tracking_uri=store, tags=base_tags()) as ok_id:
        assert type(ok_id) is str
    with pytest.raises(KeyError):
        with parent_run("scope", tracking_uri=store, tags=base_tags()) as bad_id:
            raise KeyError("boom")
    client = MlflowClient(store)
    ok, bad = client.get_run(ok_id), client.get_run(bad_id)
    assert ok.info.status == "FINISHED" and ok.data.tags["status"] == "completed"
    assert bad.info.status == "FAILED" and bad.data.tags["status"] == "failed"


def test_credential_filter_drops_secrets_and_keeps_token_counts() -> None:
    dropped: list[str] = []
    flat = flatten_params({"eval_tokens": 4096, "max_tokens": 64, "tokens_per_s": 1.5, "tokenizer": "char",
                           "AWS_SECRET_ACCESS_KEY": "x", "api_key": "k", "hf_token": "t", "auth_token": "a",
                           "token": "z"}, dropped=dropped)
    assert flat == {"eval_tokens": "4096", "max_tokens": "64", "tokens_per_s": "1.5", "tokenizer": "char"}
    assert sorted(dropped) == ["AWS_SECRET_ACCESS_KEY", "api_key", "auth_token", "hf_token", "token"]


def test_experiment_opens_on_training_runs(store: str) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.mlflow_sink import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment

    client = MlflowClient(store)
    new = ensure_experiment(client, "kind-new", store)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("kind-old")  # made before the tag existed: tagged when next used
    assert ensure_experiment(client, "kind-old", store) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_track_marks_selected_runs_and_fills_parents(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.annotate import SELECTED_TAG, annotate

    client = MlflowClient(store)
    exp = client.create_experiment("annotate")
    parent = client.create_run(exp, run_name="s@sgd", tags={"git_commit": "c1", "optlab.role": "parent"})
    names = [f"sgd-digits-d2-lr{lr}-s{s}" for lr in ("0.1", "0.01") for s in (0, 1, 2)]
    runs = {n: client.create_run(exp, run_name=n, tags={"git_commit": "c1"}).info.run_id for n in names}
    stale = client.create_run(exp, run_name="sgd-digits-d2-lr0.1-s0", tags={"git_commit": "old"}).info.run_id
    doc = {"study": "s", "method": "sgd", "optimizer": "sgd", "select": "val_acc", "lrs": [0.1, 0.01],
           "seeds": [0, 1, 2], "git_commit": "c1",
           "points": [{"dataset": "digits", "point": {"depth": 2}, "selected_lr": 0.1, "score": 0.9,
                       "selected_runs": [f"sgd-digits-d2-lr0.1-s{s}" for s in (0, 1, 2)]}]}
    (tmp_path / "s" / "sgd").mkdir(parents=True)
    (tmp_path / "s" / "sgd" / "summary.json").write_text(json.dumps(doc))
    n = annotate(tmp_path, experiment="annotate", tracking_uri=store)
    assert n == {"slices": 1, "selected_runs": 3, "parents": 1, "figures": 0}
    for name, rid in runs.items():
        tags = client.get_run(rid).data.tags
        assert (tags.get(SELECTED_TAG) == "true") is ("lr0.1-" in name)  # seed 0 included
    assert SELECTED_TAG not in client.get_run(stale).data.tags  # another commit's copy is left alone
    p = client.get_run(parent.info.run_id).data
    assert p.params["method"] == "sgd" and p.params["lrs"] == "[0.1, 0.01]" and p.params["seeds"] == "[0, 1, 2]"
    assert p.metrics["selected_lr/digits/depth_2"] == 0.1 and p.metrics["search_score/digits/depth_2"] == 0.9
    assert p.tags["optlab.selected_lr/digits/depth_2"] == "0.1" and p.tags["optlab.study"] == "s"
    found = client.search_runs([exp], filter_string=f"tags.{SELECTED_TAG} = 'true'")
    assert sorted(r.info.run_name for r in found) == sorted(n for n in names if "lr0.1-" in n)
    assert annotate(tmp_path, experiment="annotate", tracking_uri=store)["parents"] == 1  # rerun: params kept


def _artifacts(client, run_id: str) -> dict[str, int]:
    return {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "figures")}


def test_track_logs_each_studys_figures_to_its_parents(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.annotate import FIGURES_TAG, annotate

    client = MlflowClient(store)
    exp = client.create_experiment("figs")
    parents = {n: client.create_run(exp, run_name=n, tags={"git_commit": "c1", "optlab.role": "parent"}).info.run_id
               for n in ("s@sgd", "s@adam", "t@sgd")}
    sweep = tmp_path / "sweep"
    for study, method in (("s", "sgd"), ("s", "adam"), ("t", "sgd")):
        (sweep / study / method).mkdir(parents=True)
        (sweep / study / method / "summary.json").write_text(json.dumps(
            {"study": study, "method": method, "git_commit": "c1", "points": []}))
    figs = tmp_path / "figures"
    figs.mkdir()
    for name, size in (("loss_curves_s.png", 10), ("both.png", 20), ("loss_curves_t.png", 30)):
        (figs / name).write_bytes(b"x" * size)
    (figs / "figures.json").write_text(json.dumps(
        {"loss_curves_s.png": ["s"], "both.png": ["s", "t"], "loss_curves_t.png": ["t"], "gone.png": ["s"]}))
    n = annotate(sweep, experiment="figs", tracking_uri=store, figures_dir=figs)
    assert n["parents"] == 3 and n["figures"] == 2 + 2 + 2
    assert _artifacts(client, parents["s@sgd"]) == {"loss_curves_s.png": 10, "both.png": 20}
    assert _artifacts(client, parents["s@adam"]) == {"loss_curves_s.png": 10, "both.png": 20}
    assert _artifacts(client, parents["t@sgd"]) == {"both.png": 20, "loss_curves_t.png": 30}
    assert annotate(sweep, experiment="figs", tracking_uri=store, figures_dir=figs)["figures"] == 0  # unchanged
    (figs / "both.png").write_bytes(b"y" * 25)  # a redrawn figure is logged again
    assert annotate(sweep, experiment="figs", tracking_uri=store, figures_dir=figs)["figures"] == 6
    assert _artifacts(client, parents["t@sgd"])["both.png"] == 25
    assert client.get_run(parents["t@sgd"]).data.tags[FIGURES_TAG]


def test_track_logs_the_headline_figure_to_the_headline_run(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from optlab.tracking.annotate import annotate_headline

    client = MlflowClient(store)
    exp = client.create_experiment("head")
    name = "headline: sgd mlp digits d2 lr0.1 s0"
    old = client.create_run(exp, run_name=name, tags={"git_commit": "c0"}, start_time=1).info.run_id
    new = client.create_run(exp, run_name=name, tags={"git_commit": "c1"}, start_time=2).info.run_id
    curves = tmp_path / "curves.png"
    assert not annotate_headline(name, "c1", curves, experiment="head", tracking_uri=store)  # no figure yet
    curves.write_bytes(b"png")
    assert not annotate_headline("other", "c1", curves, experiment="head", tracking_uri=store)
    assert annotate_headline(name, "c1", curves, experiment="head", tracking_uri=store)
    assert _artifacts(client, new) == {"curves.png": 3} and _artifacts(client, old) == {}


def test_tracked_params_are_the_runs_own_model_and_method() -> None:
    from optlab.config import RunConfig

    mlp = RunConfig(optimizer="sgd", arch="mlp", dataset="digits").tracked_params()
    assert {"depth", "width", "activation", "init", "optimizer", "lr", "seed", "dataset"} <= set(mlp)
    assert not {"n_head", "block_size", "residual", "batch_norm", "eval_tokens"} & set(mlp)
    assert not any(k.startswith("sn_") for k in mlp) and "lr_spike_step" not in mlp and "optimizer_options" not in mlp
    sn = RunConfig(optimizer="sgd_sn", arch="mlp", dataset="digits").tracked_params()
    assert sn["sn_mode"] == "clip_sv" and "sn_roles" in sn
    gpt = RunConfig(optimizer="adam", arch="gpt", dataset="markov", block_size=64, eval_tokens=512).tracked_params()
    assert gpt["n_head"] == 4 and gpt["block_size"] == 64 and gpt["eval_tokens"] == 512
    assert not {"activation", "init", "residual", "batch_norm", "norm", "act_checkpoint"} & set(gpt)
    res = RunConfig(optimizer="sgd", arch="resnet18", dataset="digits", lr_spike_step=5, lr_spike_factor=10.0)
    assert {"residual", "batch_norm", "lr_spike_step", "lr_spike_factor"} <= set(res.tracked_params())
    full = RunConfig(optimizer="sgd", arch="mlp", dataset="digits").flat()
    assert set(mlp) < set(full) and all(mlp[k] == full[k] for k in mlp)  # a subset, values unchanged
