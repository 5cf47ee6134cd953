"""A study slice: LR search with several search seeds, the grid-edge flag, fixed-LR policies and
a method section that fixes its own LR; the summary carries the verdict spec for the analysis."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from optlab import paramfiles
from optlab import pipeline
from optlab.config import ConfigError
from tests.conftest import study_workspace



@pytest.fixture
def study_dir(tmp_path, monkeypatch):
    return study_workspace(tmp_path, monkeypatch, {
        "s": {"analysis": "sgd_sn", "arch": "mlp", "methods": ["sgd", "sgd_fixed", "adam"],
              "verdict": {"method": "sgd", "reference": "adam", "bar": 0.9},
              "quick": {"datasets": ["digits"], "grid": {"depth": [2]}, "lrs": [1.0, 0.1, 0.01],
                        "search_seeds": [0, 1], "seeds": [0, 1, 2], "lr_extend": 0,
                        "set": {"width": 8, "epochs": 1, "batch_size": 64}}},
        "x": {"analysis": "sgd_sn", "arch": "mlp", "methods": ["sgd"], "verdict": False,
              "quick": {"datasets": ["digits"], "grid": {"depth": [2]}, "lrs": [0.1, 0.03],
                        "search_seeds": [0], "seeds": [0, 1], "set": {"width": 8, "epochs": 1, "batch_size": 64}}},
        "f": {"analysis": "sgd_sn", "arch": "mlp", "methods": ["sgd"], "verdict": False, "lr_policy": "fixed",
              "quick": {"datasets": ["digits"], "lrs": [0.1, 0.01], "seeds": [0, 1],
                        "set": {"depth": 2, "width": 8, "epochs": 1, "batch_size": 64}}},
    }, methods={"sgd_fixed": {"optimizer": "sgd", "lr": 0.05}})


def test_search_then_confirm_with_two_search_seeds(study_dir):
    res = pipeline.sweep("s", "sgd")
    roles = [r.sweep["role"] for r in res]
    assert roles.count("search") == 3 * 2 and roles.count("confirm") == 1  # seeds 0, 1 searched; seed 2 confirms
    doc = json.loads((study_dir / "runs/sweep/s/sgd/summary.json").read_text())
    assert doc["verdict"] == {"method": "sgd", "reference": "adam", "metric": "test_acc", "direction": "up", "bar": 0.9}
    assert doc["search_seeds"] == [0, 1] and doc["analysis"] == "sgd_sn"
    pt = doc["points"][0]
    assert pt["lr_edge"] == pipeline.lr_edge(pt["selected_lr"], [1.0, 0.1, 0.01])
    assert set(pt["search_scores"]) == {"1", "0.1", "0.01"}
    assert all(r.config["method"] == "sgd" for r in res)
    lr = pt["selected_lr"]  # what stage track tags optlab.selected: both search seeds and the confirm seed
    assert pt["selected_runs"] == [f"sgd-digits-d2-lr{lr:g}-s{s}" for s in (0, 1, 2)]
    assert sorted(pt["selected_runs"]) == sorted(r.run_id for r in res if r.config["lr"] == lr)


def test_headline_run_is_named_for_what_it_trains(monkeypatch):
    from optlab.config import RunConfig

    cfg = RunConfig(optimizer="adam", lr=0.01, depth=8, dataset="digits", seed=3)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert pipeline.headline_run_name(cfg) == "headline: adam mlp digits d8 lr0.01 s3"
    monkeypatch.setenv("DVC_EXP_NAME", "brave-fish")  # under dvc exp run
    assert pipeline.headline_run_name(cfg) == "brave-fish: adam mlp digits d8 lr0.01 s3"


def test_method_section_lr_is_the_only_lr_tried(study_dir):
    res = pipeline.sweep("s", "sgd_fixed")
    assert {r.config["lr"] for r in res} == {0.05}
    assert len(res) == 2 + 1
    doc = json.loads((study_dir / "runs/sweep/s/sgd_fixed/summary.json").read_text())
    assert doc["lrs"] == [0.05] and doc["points"][0]["lr_edge"] is None


def test_fixed_policy_runs_every_lr_with_every_seed(study_dir):
    res = pipeline.sweep("f", "sgd")
    assert sorted((r.config["lr"], r.config["seed"]) for r in res) == [(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]
    assert {r.sweep["role"] for r in res} == {"confirm"}
    doc = json.loads((study_dir / "runs/sweep/f/sgd/summary.json").read_text())
    assert doc["verdict"] is False and doc["search_seeds"] == []


def test_method_outside_the_study_is_refused(study_dir):
    with pytest.raises(ConfigError, match=r"method 'sgd_sn' is not in studies.s.methods; allowed: sgd, sgd_fixed, adam"):
        pipeline.sweep("s", "sgd_sn")


def test_half_decade_ladder():
    assert pipeline.half_decade_step(0.1, "high") == 0.3 and pipeline.half_decade_step(0.3, "high") == 1.0
    assert pipeline.half_decade_step(0.01, "low") == 0.003 and pipeline.half_decade_step(0.003, "low") == 0.001
    assert pipeline.half_decade_step(0.05, "high") == 0.1 and pipeline.half_decade_step(0.05, "low") == 0.03
    assert pipeline.half_decade_step(3.0, "high") == 10.0


def _fake_score(best):
    import math

    def score(results, select):
        return -abs(math.log10(results[0].config["lr"] / best)) if results else -math.inf
    return score


@pytest.mark.parametrize("best, added, selected, at_limit", [
    (0.3, [0.3, 1.0], 0.3, False),  # high edge -> 0.3 (edge again) -> 1: 0.3 is interior
    (1e-4, [0.01, 0.003], 0.003, True),  # low edge twice, the limit (2 steps) leaves it at the edge
    (0.05, [0.01], 0.03, False),  # 0.03 (nearest on a log scale) is the low edge -> 0.01: interior
])
def test_search_extends_past_an_edge_until_interior_or_the_limit(study_dir, monkeypatch, best, added, selected, at_limit):
    monkeypatch.setattr(pipeline, "_score", _fake_score(best))
    # the edge rule alone: these one-epoch runs may end near chance, which would add the no-LR-trains rule
    monkeypatch.setattr(pipeline, "all_failed", lambda results: False)
    res = pipeline.sweep("x", "sgd")
    pt = json.loads((study_dir / "runs/sweep/x/sgd/summary.json").read_text())["points"][0]
    assert pt["lrs_added"] == added and pt["selected_lr"] == selected
    assert pt["lr_edge_limit"] is at_limit and (pt["lr_edge"] is not None) is at_limit
    assert set(pt["search_scores"]) == {f"{lr:g}" for lr in [0.1, 0.03, *added]}
    searched = sorted({r.config["lr"] for r in res if r.sweep["role"] == "search"})
    assert searched == sorted([0.1, 0.03, *added])
    assert {r.config["lr"] for r in res if r.sweep["role"] == "confirm"} == {selected}


def test_lr_edge():
    assert pipeline.lr_edge(1.0, [1.0, 0.1]) == "high"
    assert pipeline.lr_edge(0.1, [1.0, 0.1]) == "low"
    assert pipeline.lr_edge(0.1, [1.0, 0.1, 0.01]) is None
    assert pipeline.lr_edge(0.1, [0.1]) is None


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_worker_processes_give_the_same_runs(study_dir, monkeypatch, start):
    """Two worker processes run the slice's runs side by side: the same runs, bitwise, in the same
    order, as one process (each run's threads are fixed by its config, not by the pool), whether
    the workers are forked (CPU on Linux, the default there) or spawned (elsewhere)."""
    if start == "fork" and not pipeline._can_fork("cpu"):
        pytest.skip("fork is not available here")
    if start == "spawn":
        monkeypatch.setattr(pipeline, "_can_fork", lambda device: False)
    one = pipeline.sweep("f", "sgd", out_root="runs/one")
    monkeypatch.setenv("OPTLAB_WORKERS", "2")
    two = pipeline.sweep("f", "sgd", out_root="runs/two")
    assert [r.run_id for r in one] == [r.run_id for r in two]
    for a, b in zip(one, two):
        assert a.status == b.status
        for k in ("train_loss", "val_loss", "val_acc", "test_acc", "test_loss"):
            assert a.final[k] == b.final[k], (a.run_id, k)
        la = [(s, m, v) for s, e, m, v in a.curves if m == "train_loss"]
        assert la == [(s, m, v) for s, e, m, v in b.curves if m == "train_loss"]
    assert pipeline.sweep_workers({"workers": "auto", "threads": 1}, 5, torch.device("cpu")) == min(5, 8, __import__("os").cpu_count())
    assert pipeline.sweep_workers({"workers": 3}, 2, torch.device("cpu")) == 2
    monkeypatch.delenv("OPTLAB_WORKERS")
    assert pipeline.sweep_workers({"workers": "auto", "threads": 1}, 5, torch.device("cuda")) == 1
    assert pipeline.sweep_workers({"workers": "auto", "threads": 0}, 5, torch.device("cpu")) == 1


def test_search_selects_the_best_mean_validation_lr_not_test_nor_worst(study_dir, monkeypatch):
    """The search scores each LR by its search seeds' mean validation accuracy, a diverged seed
    counting as 0, and picks the best: here 0.1. Test accuracy is best at 1.0 (selecting on test
    would pick it), the worst LR is 0.01, and 0.01's one good seed would win a max over seeds."""
    from optlab import engine

    val = {(1.0, 0): 0.50, (1.0, 1): 0.52, (0.1, 0): 0.90, (0.1, 1): 0.88, (0.01, 0): 0.99, (0.01, 1): None}
    test = {1.0: 0.99, 0.1: 0.60, 0.01: 0.70}
    calls = []

    def fake_train(cfg, **kw):
        calls.append((cfg.lr, cfg.seed))
        v = val.get((cfg.lr, cfg.seed), 0.95)  # confirm seed 2
        status = "diverged" if v is None else "completed"
        final = {"val_acc": v, "test_acc": None if v is None else test[cfg.lr]}
        return engine.RunResult(cfg.run_id, status, {"lr": cfg.lr, "seed": cfg.seed, "method": "sgd"}, final,
                                diverged_step=3 if v is None else None, diverge_reason="nonfinite" if v is None else None,
                                sweep=kw.get("sweep"))

    monkeypatch.setenv("OPTLAB_WORKERS", "1")
    monkeypatch.setattr(pipeline.engine, "train", fake_train)
    pipeline.sweep("s", "sgd")
    pt = json.loads((study_dir / "runs/sweep/s/sgd/summary.json").read_text())["points"][0]
    assert pt["selected_lr"] == 0.1
    assert pt["search_scores"] == pytest.approx({"1": 0.51, "0.1": 0.89, "0.01": 0.495})
    assert calls[-1] == (0.1, 2)  # the confirm seed runs at the selected LR


def test_a_search_where_no_lr_trains_looks_past_both_ends(study_dir, monkeypatch):
    """Every grid LR fails (vanishing, near chance): the best of them is noise, interior or not.
    The search extends below the grid first (0.003, 0.001, the lr_extend limit of 2), finds the
    LR that trains, and selects it; the summary says the grid had not trained."""
    from optlab import engine

    params = paramfiles.read(study_dir / "params.yaml")
    params["studies"]["s"]["quick"]["lr_extend"] = 2
    paramfiles.write(params, study_dir / "params.yaml")
    val = {1.0: 0.10, 0.1: 0.14, 0.01: 0.11, 0.003: 0.60, 0.001: 0.90}  # 0.1 is interior and "best" among failures

    def fake_train(cfg, **kw):
        v = val.get(cfg.lr, 0.10)
        fail = "vanishing" if v < 0.2 else None
        return engine.RunResult(cfg.run_id, "completed", {"lr": cfg.lr, "seed": cfg.seed, "method": "sgd"},
                                {"val_acc": v, "test_acc": v}, failure=fail, sweep=kw.get("sweep"))

    monkeypatch.setenv("OPTLAB_WORKERS", "1")
    monkeypatch.setattr(pipeline.engine, "train", fake_train)
    pipeline.sweep("s", "sgd")
    pt = json.loads((study_dir / "runs/sweep/s/sgd/summary.json").read_text())["points"][0]
    assert pt["lrs_added"] == [0.003, 0.001] and pt["selected_lr"] == 0.001
    assert pt["untrained_search"] is True and pt["trained"] is True
    assert pt["lr_edge"] == "low" and pt["lr_edge_limit"] is True  # still at the edge when the limit stopped it

    val.update({0.003: 0.12, 0.001: 0.12})  # nothing trains anywhere: both ends tried, then it stops
    pipeline.sweep("s", "sgd")
    pt = json.loads((study_dir / "runs/sweep/s/sgd/summary.json").read_text())["points"][0]
    assert pt["lrs_added"] == [0.003, 0.001, 3.0, 10.0] and pt["trained"] is False
