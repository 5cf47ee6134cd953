"""Analysis of the study layout: runs/sweep/<study>/<method>/<run>, summary.json, runs/ablate.

A hand-written tree with known values: a depth study on a 10-class dataset (adam fails at depth
32 by chance-level accuracy and skips 64; sgd_sn trains to 32 and fails at 64 by vanishing
gradients), a language-model study selected on validation loss (one adam seed diverged), and an
ablation whose studies.yaml order is not alphabetical. Expectations are computed here by hand
or with numpy, never copied from a previous run of the code.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab.analysis.aggregate import (
    aggregate,
    best_lr_table,
    depth_to_failure_table,
    load_runs,
    load_summaries,
    read_ablation_order,
    read_table,
)
from optlab.analysis.report import END, START, write_report
from optlab.analysis.studies.sgd_sn.report import HEADING, answer_line
from optlab.analysis.studies.sgd_sn.tables import ablation_table, verdict_table

SEEDS = (0, 1, 2)
N_EPOCHS = 3

# ---- mlp_depth on digits: (optimizer, depth) -> selected LR, the other LR's search val_acc, per-seed results
# per seed: (status, val_acc, test_acc, epochs_to_90, failure)
MLP = {
    ("adam", 2): (0.01, {0.1: 0.90}, [("completed", 0.95, 0.96, 3, None), ("completed", 0.94, 0.94, 3, None),
                                       ("completed", 0.96, 0.95, 3, None)]),
    ("adam", 8): (0.01, {0.1: 0.50}, [("completed", 0.90, 0.90, 4, None), ("completed", 0.91, 0.88, 4, None),
                                       ("completed", 0.92, 0.92, 5, None)]),
    ("adam", 32): (0.1, {0.01: 0.12}, [("completed", 0.15, 0.15, None, None), ("completed", 0.11, 0.105, None, "chance"),
                                        ("completed", 0.14, 0.14, None, None)]),
    ("sgd_sn", 2): (0.1, {0.01: 0.80}, [("completed", 0.93, 0.93, 2, None), ("completed", 0.92, 0.92, 2, None),
                                         ("completed", 0.91, 0.90, 3, None)]),
    ("sgd_sn", 8): (0.1, {0.01: 0.60}, [("completed", 0.85, 0.80, None, None), ("completed", 0.84, 0.82, 4, None),
                                         ("completed", 0.86, 0.70, 5, None)]),
    ("sgd_sn", 32): (0.1, {0.01: 0.50}, [("completed", 0.70, 0.70, None, None), ("completed", 0.61, 0.60, None, None),
                                          ("completed", 0.66, 0.65, None, None)]),
    ("sgd_sn", 64): (0.1, {0.01: 0.09}, [("completed", 0.10, 0.10, None, "vanishing"),
                                          ("completed", 0.10, 0.10, None, "vanishing"),
                                          ("completed", 0.10, 0.10, None, "vanishing")]),
}
WALL = {("adam", 2): 1.0, ("sgd_sn", 2): 0.8, ("adam", 8): 2.0, ("sgd_sn", 8): 3.0, ("adam", 32): 4.0,
        ("sgd_sn", 32): 5.0, ("sgd_sn", 64): 9.0}
PEAK = {("adam", 8): 40.0, ("sgd_sn", 8): 50.0}  # CUDA peak only here; elsewhere CPU (null)


def state_mem(opt: str, depth: int) -> float:
    return (2.0 if opt == "adam" else 1.0) * depth


# ---- gpt on markov (language model, selected on val_loss): optimizer -> selected LR, other LR's search
# (val_loss, val_acc), per seed (status, val_loss, test_acc, test_bpb)
LM = {
    "adam": (0.01, (2.2, 0.50), [("completed", 2.0, 0.40, 1.5), ("completed", 2.1, 0.42, 1.4), ("diverged", None, None, None)]),
    "sgd_sn": (0.01, (2.6, 0.10), [("completed", 2.5, 0.36, 1.8), ("completed", 2.4, 0.38, 1.7),
                                   ("completed", 2.45, 0.37, 1.75)]),
}
LM_WALL = {"adam": 10.0, "sgd_sn": 9.0}

# ---- ablation: studies.yaml order (not alphabetical); per seed (status, test_acc, val_acc, wall, sigma, violations)
ABL_ORDER = ["mlp_sn_clip", "mlp_sgd", "mlp_sn_power1"]
ABL_CFG = {
    "mlp_sn_clip": {"optimizer": "sgd_sn", "sn_mode": "clip", "sn_sigma": "exact"},
    "mlp_sgd": {"optimizer": "sgd", "sn_mode": "clip", "sn_sigma": "exact"},
    "mlp_sn_power1": {"optimizer": "sgd_sn", "sn_mode": "clip", "sn_sigma": "power"},
}
ABL = {
    "mlp_sn_clip": [("completed", 0.70, 0.71, 1.0, 1.0, 0), ("completed", 0.64, 0.66, 1.2, 1.0, 0),
                    ("diverged", None, None, 0.3, 1.0, 0)],
    "mlp_sgd": [("completed", 0.85, 0.84, 0.5, 1.3, None), ("completed", 0.84, 0.83, 0.6, 1.31, None),
                ("completed", 0.86, 0.85, 0.7, 1.29, None)],
    "mlp_sn_power1": [("completed", 0.65, 0.66, 1.1, 1.0001, 9), ("completed", 0.63, 0.64, 1.1, 1.00002, 6),
                      ("completed", 0.62, 0.60, 1.0, 1.00004, 6)],
}


# ---------------------------------------------------------------- writing the tree


def _write(run_dir: Path, *, config: dict, final: dict, status: str, failure: str | None, sweep: dict,
           n_layers: int, grad_decay: float, lm: bool = False) -> None:
    """A run directory of the contract: ``method`` in config and sweep, long layers.csv."""
    run_dir.mkdir(parents=True)
    diverged = status == "diverged"
    config = {"method": config.get("optimizer"), "step_method": "backprop", **config}
    if sweep.get("role") != "ablation":
        sweep = {"method": config["method"], "verdict": True, "analysis": "sgd_sn", **sweep}
    metrics = {
        "run_id": run_dir.name, "status": status, "diverged_step": 7 if diverged else None,
        "diverge_reason": "nonfinite" if diverged else None, "error": None,
        "failure": "nonfinite" if diverged else failure, "sweep": sweep,
        "config": {"phase": "debug", "scale": "quick", "width": 16, **config, "run_id": run_dir.name},
        "final": final, "provenance": {"git_commit": "abc", "git_dirty": False, "frozen": False},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    epochs = 1 if diverged else N_EPOCHS
    with (run_dir / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "metric", "value"])
        for e in range(epochs):
            s = 10 * (e + 1)
            w.writerow([s, e, "train_loss", 2.0 / (e + 1)])
            if not diverged:
                w.writerow([s, e, "epoch_train_loss", 2.0 / (e + 1)])
                w.writerow([s, e, "val_loss", 2.2 / (e + 1)])
                w.writerow([s, e, "val_acc", 0.3 + 0.1 * e])
                if lm:
                    w.writerow([s, e, "val_bpb", 3.0 / (e + 1)])
                if final.get("tokens_per_s") is not None:  # the first epoch's warm-up is slower; then steady, +-1%
                    rate = final["tokens_per_s"]
                    w.writerow([s, e, "tokens_per_s", rate * (0.5 if e == 0 else 1.0 + 0.01 * (-1) ** e)])
    with (run_dir / "layers.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "layer", "role", "metric", "value"])
        for step in (5, 10 * epochs):
            for layer in range(n_layers):
                role = "input" if layer == 0 else "output" if layer == n_layers - 1 else "hidden"
                w.writerow([step, 0, layer, role, "grad_norm", grad_decay ** (n_layers - 1 - layer)])
                w.writerow([step, 0, layer, role, "sigma_max", 1.0 + 0.01 * step])


def make_tree(root: Path, *, summaries: bool = True) -> Path:
    """The study tree under ``root`` (= .../runs) and params.yaml beside it."""
    for (opt, depth), (sel_lr, others, seeds) in MLP.items():
        for lr in (sel_lr, *others):
            for seed in (SEEDS if lr == sel_lr else (0,)):
                if lr == sel_lr:
                    status, val, test, e90, failure = seeds[seed]
                else:
                    status, val, test, e90, failure = "completed", others[lr], others[lr], None, None
                final = {
                    "val_acc": val, "test_acc": test, "val_loss": 2.0 - val, "test_loss": 2.0 - test,
                    "train_loss": 1.0, "train_acc": val, "best_val_acc": val,
                    "wall_time_s": WALL[(opt, depth)], "seconds_per_epoch": WALL[(opt, depth)] / 10,
                    "examples_per_s": 1000.0, "peak_mem_mb": PEAK.get((opt, depth)), "peak_rss_mb": 500.0,
                    "state_mem_mb": state_mem(opt, depth), "epochs_to_90": e90, "steps": 30, "epochs_completed": 3,
                    "sigma_max_max": 1.0 if opt == "sgd_sn" else 3.0, "sn_violations": 0 if opt == "sgd_sn" else None,
                }
                role = "search" if seed == 0 else "confirm"
                _write(root / "sweep" / "mlp_depth" / opt / f"{opt}-digits-d{depth}-lr{lr:g}-s{seed}",
                       config={"optimizer": opt, "lr": lr, "arch": "mlp", "dataset": "digits", "depth": depth,
                               "seed": seed, "study": "mlp_depth", "n_classes": 10},
                       final=final, status=status, failure=failure,
                       sweep={"study": "mlp_depth", "role": role, "point": {"depth": depth}, "select": "val_acc"},
                       n_layers=depth + 2, grad_decay=0.5 if opt == "adam" else 0.99)
    for opt, (sel_lr, (other_loss, other_acc), seeds) in LM.items():
        for lr in (sel_lr, 0.001):
            for seed in (SEEDS if lr == sel_lr else (0,)):
                if lr == sel_lr:
                    status, vloss, test, bpb = seeds[seed]
                    vacc = 0.3
                else:
                    status, vloss, test, bpb, vacc = "completed", other_loss, 0.3, 2.0, other_acc
                done = status == "completed"
                final = {
                    "val_loss": vloss, "val_acc": vacc if done else None, "val_ppl": None, "val_bpb": None,
                    "test_loss": None, "test_acc": test, "test_ppl": float(np.exp(2.0)) if done else None,
                    "test_bpb": bpb, "train_loss": 2.0 if done else None,
                    "wall_time_s": LM_WALL[opt], "seconds_per_epoch": LM_WALL[opt] / 4, "tokens_per_s": 5000.0,
                    "peak_mem_mb": None, "state_mem_mb": 5.0 if opt == "sgd_sn" else 10.0, "epochs_to_90": None,
                    "steps": 40, "sigma_max_max": 1.0, "sn_violations": 0 if opt == "sgd_sn" else None,
                }
                role = "search" if seed == 0 else "confirm"
                _write(root / "sweep" / "gpt" / opt / f"{opt}-markov-d2-lr{lr:g}-s{seed}",
                       config={"optimizer": opt, "lr": lr, "arch": "gpt", "dataset": "markov", "depth": 2, "seed": seed,
                               "study": "gpt", "block_size": 64},
                       final=final, status=status, failure=None,
                       sweep={"study": "gpt", "role": role, "point": {"depth": 2}, "select": "val_loss"},
                       n_layers=4, grad_decay=0.9, lm=True)
    for name, seeds in ABL.items():
        cfg = ABL_CFG[name]
        for seed, (status, test, val, wall, sigma, viol) in enumerate(seeds):
            final = {"test_acc": test, "val_acc": val, "wall_time_s": wall, "sigma_max_max": sigma, "sn_violations": viol,
                     "state_mem_mb": 1.0, "peak_mem_mb": None, "epochs_to_90": None}
            _write(root / "ablate" / name / f"{name}-s{seed}",
                   config={"arch": "mlp", "dataset": "digits", "depth": 8, "lr": 0.01, "seed": seed, "study": "ablate",
                           "reparam": "none", "sn_power_iters": 1, "sn_conv": "operator", "residual": True,
                           "batch_norm": True, **cfg},
                   final=final, status=status, failure=None,
                   sweep={"study": "ablate", "role": "ablation", "variant": name}, n_layers=10, grad_decay=0.9)
    if summaries:
        _summary(root, "mlp_depth", "adam", "digits", [(2, 0.01, []), (8, 0.01, []), (32, 0.1, ["chance"]), (64, None, None)])
        _summary(root, "mlp_depth", "sgd_sn", "digits", [(2, 0.1, []), (8, 0.1, []), (32, 0.1, []), (64, 0.1, ["vanishing"])])
        _summary(root, "gpt", "adam", "markov", [(2, 0.01, ["nonfinite"])], select="val_loss", lrs=[0.1, 0.01, 0.001])
        _summary(root, "gpt", "sgd_sn", "markov", [(2, 0.01, [])], select="val_loss", lrs=[0.1, 0.01, 0.001])
    studies = {"profiles": {"quick": {"ablate": {"seeds": list(SEEDS), "variants": {
        n: {"arch": "mlp"} for n in ABL_ORDER}}}}}
    (root.parent / "params.yaml").write_text(json.dumps({"scale": "quick"}))  # JSON is YAML
    (root.parent / "studies.yaml").write_text(json.dumps(studies))
    return root


def _summary(root: Path, study: str, opt: str, dataset: str, points: list, select: str = "val_acc",
             lrs: list[float] = (0.3, 0.1, 0.01)) -> None:
    out = []
    for depth, lr, failures in points:
        if lr is None:
            out.append({"dataset": dataset, "point": {"depth": depth}, "skipped": "depth beyond failure at 32"})
        else:
            out.append({"dataset": dataset, "point": {"depth": depth}, "selected_lr": lr, "select": select,
                        "score": 0.5, "failures": failures})
    doc = {"study": study, "method": opt, "optimizer": opt, "analysis": "sgd_sn",
           "verdict": {"method": "sgd_sn", "reference": "adam", "metric": "test_acc", "bar": 0.95},
           "primary": {"metric": "test_acc", "direction": "up"}, "select": select, "lrs": list(lrs),
           "search_seeds": [0], "seeds": list(SEEDS), "points": out}
    (root / "sweep" / study / opt / "summary.json").write_text(json.dumps(doc))


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "runs")


def _one(df: pd.DataFrame, **kv) -> pd.Series:
    mask = np.ones(len(df), dtype=bool)
    for k, v in kv.items():
        mask &= (df[k] == v).to_numpy(dtype=bool)
    assert mask.sum() == 1, (kv, int(mask.sum()))
    return df[mask].iloc[0]


def _tests(opt: str, depth: int) -> dict[int, float]:
    return {s: r[2] for s, r in enumerate(MLP[(opt, depth)][2]) if r[0] == "completed"}


# ---------------------------------------------------------------- loading and selection


def test_layout_is_read(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    assert set(runs["kind"]) == {"sweep", "ablation"}
    r = _one(runs, run_id="adam-digits-d32-lr0.1-s1")
    assert (r["study"], r["role"], r["point"], r["axis"], r["axis_value"], r["failure"]) == (
        "mlp_depth", "confirm", "depth=32", "depth", 32.0, "chance")
    assert r["epochs_to_90"] == np.inf  # recorded as never reached
    assert _one(runs, run_id="adam-markov-d2-lr0.01-s0")["task"] == "lm"
    assert _one(runs, run_id="mlp_sgd-s0")["variant"] == "mlp_sgd"
    s = load_summaries(root)
    skipped = _one(s, method="adam", point="depth=64")
    assert skipped["skipped"].startswith("depth beyond") and np.isnan(skipped["selected_lr"])
    assert _one(s, method="sgd_sn", point="depth=64", study="mlp_depth")["failures"] == "vanishing"
    assert read_ablation_order(root.parent / "params.yaml") == ABL_ORDER


def test_best_lr_per_point_with_new_columns(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    best = best_lr_table(runs)
    for (opt, depth), (sel_lr, _, seeds) in MLP.items():
        row = _one(best, study="mlp_depth", method=opt, depth=depth)
        assert row["lr"] == sel_lr and row["point"] == f"depth={depth}" and row["seeds"] == "0 1 2"
        t = np.array(list(_tests(opt, depth).values()))
        assert row["test_acc_mean"] == pytest.approx(t.mean()) and row["test_acc_std"] == pytest.approx(t.std(ddof=1))
        e90 = [np.inf if s[3] is None else s[3] for s in seeds]
        assert row["epochs_to_90_mean"] == pytest.approx(np.mean(e90))
        assert row["n_reached_90"] == sum(s[3] is not None for s in seeds)
        reached = [s[3] for s in seeds if s[3] is not None]  # the median over the seeds that reached 90%, never inf
        assert (row["epochs_to_90_median"] == pytest.approx(np.median(reached)) if reached
                else np.isnan(row["epochs_to_90_median"]))
        assert row["seconds_per_epoch_mean"] == pytest.approx(WALL[(opt, depth)] / 10)
        assert row["state_mem_mb_mean"] == state_mem(opt, depth)
        assert row["n_chance"] == sum(s[4] == "chance" for s in seeds)
        assert row["n_vanishing"] == sum(s[4] == "vanishing" for s in seeds)
    # the language model selects on validation LOSS: lr 0.001 has the higher val_acc but the higher loss
    lm = _one(best, study="gpt", method="adam")
    assert lm["lr"] == 0.01 and lm["select"] == "val_loss" and lm["val_score"] == pytest.approx(-2.0)
    assert lm["task"] == "lm" and lm["n_diverged"] == 1 and lm["n_nonfinite"] == 1
    assert lm["test_bpb_mean"] == pytest.approx(np.mean([1.5, 1.4]))
    assert lm["test_acc_mean"] == pytest.approx(np.mean([0.40, 0.42]))


# ---------------------------------------------------------------- verdict


def test_verdict_ratios_equal_numpy(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    v = verdict_table(runs, failure_depths=depth_to_failure_table(runs, load_summaries(root)))
    assert sorted(zip(v["study"], v["depth"])) == [("gpt", 2), ("mlp_depth", 2), ("mlp_depth", 8), ("mlp_depth", 32)]
    for depth in (2, 8, 32):
        row = _one(v, study="mlp_depth", depth=depth)
        sn, ad = _tests("sgd_sn", depth), _tests("adam", depth)
        assert row["ratio_of_means"] == pytest.approx(np.mean(list(sn.values())) / np.mean(list(ad.values())))
        per_seed = np.array([sn[s] / ad[s] for s in sorted(set(sn) & set(ad))])
        q25, med, q75 = np.percentile(per_seed, [25, 50, 75])
        assert (row["ratio_median"], row["ratio_q25"], row["ratio_q75"]) == pytest.approx((med, q25, q75))
        assert row["ratio_iqr"] == pytest.approx(q75 - q25) and row["n_pairs"] == 3
        # 3 pairs: the expanded 95% interval is the range of the per-seed ratios
        assert (row["ratio_lo"], row["ratio_hi"]) == pytest.approx((per_seed.min(), per_seed.max()))
        expect = "yes" if per_seed.min() >= 0.95 else "no" if per_seed.max() < 0.95 else "inconclusive"
        assert row["reaches_bar"] == expect
        sn_vals = np.array([sn[s] for s in sorted(sn)])
        assert (row["sgd_sn_test_acc_median"], row["sgd_sn_test_acc_q25"], row["sgd_sn_test_acc_q75"]) == pytest.approx(
            (np.median(sn_vals), np.percentile(sn_vals, 25), np.percentile(sn_vals, 75)))
    assert [_one(v, study="mlp_depth", depth=d)["reaches_bar"] for d in (2, 8, 32)] == ["inconclusive", "no", "yes"]
    # language model: adam seed 2 diverged, so 2 seeds pair and the comparison is over those
    lm = _one(v, study="gpt")
    sn, ad = [0.36, 0.38], [0.40, 0.42]
    assert lm["ratio_of_means"] == pytest.approx(np.mean(sn) / np.mean(ad))
    assert (lm["sgd_sn_test_acc"], lm["adam_test_acc"]) == pytest.approx((np.mean(sn), np.mean(ad)))
    assert lm["n_pairs"] == 2 and lm["ratio_median"] == pytest.approx(np.median([0.36 / 0.40, 0.38 / 0.42]))
    assert lm["sgd_sn_test_bpb"] == pytest.approx(1.75) and lm["adam_test_bpb"] == pytest.approx(1.45)
    assert lm["adam_failures"] == "nonfinite 1" and lm["task"] == "lm"


def test_verdict_advantages(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    v = verdict_table(runs, failure_depths=depth_to_failure_table(runs, load_summaries(root)))
    win = _one(v, study="mlp_depth", depth=2)  # sgd_sn faster, smaller state, deeper, fewer epochs to 90%
    assert win["time_lower"] == "sgd_sn" and win["epoch_time_lower"] == "sgd_sn"
    assert (win["mem_basis"], win["mem_lower"]) == ("state", "sgd_sn")
    assert (win["sgd_sn_deepest"], win["adam_deepest"], win["depth_deeper"]) == (32, 8, "sgd_sn")
    assert win["sgd_sn_epochs_to_90"] == 2.0 and win["e90_fewer"] == "sgd_sn"  # median of 2, 2, 3 (adam: 3, 3, 3)
    assert "epochs to 90% validation accuracy (2 over 3 of 3 seeds vs 3 over 3 of 3 seeds)" in answer_line(win)
    assert win["advantages"] == "wall_time seconds_per_epoch memory depth_tolerance epochs_to_90"
    # per-seed ratios 0.969, 0.979, 0.947: the interval straddles 95%, so no "yes" despite the advantages
    assert win["reaches_bar"] == "inconclusive" and win["answer"] == "inconclusive"
    assert win["ratio_lo"] < 0.95 <= win["ratio_hi"] and int(win["seeds_needed"]) > 3
    lose = _one(v, study="mlp_depth", depth=8)  # slower; both have a CUDA peak and sgd_sn's is higher
    assert lose["time_lower"] == "adam" and lose["epoch_time_lower"] == "adam"
    assert (lose["mem_basis"], lose["sgd_sn_mem_mb"], lose["adam_mem_mb"], lose["mem_lower"]) == ("peak", 50.0, 40.0, "adam")
    # one sgd_sn seed never reached 90%: adam (every seed) is sooner, although sgd_sn's median over its 2 is 4.5 vs 4
    assert lose["sgd_sn_epochs_to_90"] == 4.5 and lose["sgd_sn_n_reached_90"] == 2 and lose["e90_fewer"] == "adam"
    assert lose["advantages"] == "depth_tolerance" and lose["reaches_bar"] == "no" and lose["answer"] == "no"
    deep = _one(v, study="mlp_depth", depth=32)  # neither reached 90%: no comparison
    assert deep["e90_fewer"] == "n/a" and deep["adam_failures"] == "chance 1"
    assert deep["reaches_bar"] == "yes" and deep["answer"] == "yes"


def test_depth_advantage_needs_the_other_to_fail(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    runs = runs[~((runs["optimizer"] == "adam") & (runs["depth"] == 32))]  # adam never tried depth 32
    dtf = depth_to_failure_table(runs)  # no summaries: the runs decide
    assert _one(dtf, study="mlp_depth", method="adam")["deepest_trained"] == 8
    row = _one(verdict_table(runs, failure_depths=dtf), study="mlp_depth", depth=2)
    assert row["depth_deeper"] == "n/a" and "depth_tolerance" not in row["advantages"]


# ---------------------------------------------------------------- depth to failure


def test_depth_to_failure(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    d = depth_to_failure_table(runs, load_summaries(root))
    adam, sn = _one(d, study="mlp_depth", method="adam"), _one(d, study="mlp_depth", method="sgd_sn")
    assert (adam["points_tried"], adam["deepest_trained"], adam["first_failing"]) == ("2 8 32", 8, 32)
    assert (adam["failure_kinds"], adam["skipped"], adam["failing"]) == ("chance", "64", "32: chance")
    assert adam["selected_lrs"] == "2:0.01 8:0.01 32:0.1"
    assert (sn["points_tried"], sn["deepest_trained"], sn["first_failing"]) == ("2 8 32 64", 32, 64)
    assert sn["failure_kinds"] == "vanishing" and sn["skipped"] == ""
    gpt = _one(d, study="gpt", method="adam")  # the diverged confirmation seed fails the only point
    assert pd.isna(gpt["deepest_trained"]) and gpt["first_failing"] == 2 and gpt["failure_kinds"] == "nonfinite"
    # without summary.json the runs alone give the same depths (nothing is known about skipped points)
    d2 = depth_to_failure_table(runs)
    a2 = _one(d2, study="mlp_depth", method="adam")
    assert (a2["deepest_trained"], a2["first_failing"], a2["failure_kinds"], a2["skipped"]) == (8, 32, "chance", "")
    assert _one(d2, study="mlp_depth", method="sgd_sn")["first_failing"] == 64


# ---------------------------------------------------------------- ablation


def test_ablation_table(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    a = ablation_table(runs, read_ablation_order(root.parent / "params.yaml"))
    assert a["variant"].tolist() == ABL_ORDER
    for name, seeds in ABL.items():
        row = _one(a, variant=name)
        done = [s for s in seeds if s[0] == "completed"]
        test = np.array([s[1] for s in done])
        assert row["test_acc_mean"] == pytest.approx(test.mean()) and row["test_acc_std"] == pytest.approx(test.std(ddof=1))
        assert row["val_acc_mean"] == pytest.approx(np.mean([s[2] for s in done]))
        assert row["wall_time_s_mean"] == pytest.approx(np.mean([s[3] for s in done]))
        assert row["sigma_max_max_mean"] == pytest.approx(np.mean([s[4] for s in done]))
        assert row["n_seeds"] == 3 and row["n_diverged"] == sum(s[0] == "diverged" for s in seeds)
        viol = [s[5] for s in seeds if s[5] is not None]
        assert (pd.isna(row["sn_violations_total"]) if not viol else row["sn_violations_total"] == sum(viol))
        assert (row["arch"], row["depth"], row["lr"]) == ("mlp", 8, 0.01)
        assert pd.isna(row["batch_norm"]) and pd.isna(row["residual"]) and pd.isna(row["sn_conv"])  # not a ResNet
    assert pd.isna(_one(a, variant="mlp_sgd")["sn_mode"])  # no projection for plain sgd
    p1 = _one(a, variant="mlp_sn_power1")
    assert (p1["sn_mode"], p1["sn_sigma"], p1["sn_power_iters"]) == ("clip", "power", 1)
    assert pd.isna(_one(a, variant="mlp_sn_clip")["sn_power_iters"])
    # without an order the variants come by name
    assert ablation_table(runs)["variant"].tolist() == sorted(ABL_ORDER)


# ---------------------------------------------------------------- outputs


def test_aggregate_plot_report(root: Path, tmp_path: Path) -> None:
    from optlab.analysis.plots import plot_all

    tables, figures = tmp_path / "reports" / "tables", tmp_path / "reports" / "figures"
    files = aggregate(root, tables)
    for name in ("verdict", "depth_to_failure", "ablation", "best_lr"):
        assert (tables / f"{name}.csv").is_file() and files[f"{name}.md"].read_text().startswith("|")
    assert pd.read_csv(tables / "ablation.csv")["variant"].tolist() == ABL_ORDER  # params.yaml found beside runs/
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plot_all(root, figures)
    names = sorted(p.name for p in paths)
    assert names == sorted(["loss_curves_gpt.png", "loss_curves_mlp_depth.png", "accuracy_vs_depth.png",
                            "grad_ratio_vs_depth.png", "grad_norm_vs_layer.png", "sigma_max.png", "ablation.png"])
    assert any("headline_curves.png skipped" in str(w.message) for w in caught)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    # identical data, identical bytes (no random jitter, no timestamps): no spurious image diffs per experiment
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = plot_all(root, tmp_path / "again")
    assert {p.name: p.read_bytes() for p in again} == {p.name: p.read_bytes() for p in paths}

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + START + "\nold\n" + END + "\n")
    text = write_report(tables, figures, tmp_path / "reports" / "results.md", readme)
    assert text.startswith(f"## {HEADING}\n") and HEADING == "Vanilla SGD + Spectral Norm: back to basics"
    assert "95% of Adam's test accuracy" in text.split("### The answer")[0]
    v = read_table(tables / "verdict.csv")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    r2 = _one(v, study="mlp_depth", depth=2)
    per_seed = np.array([0.93 / 0.96, 0.92 / 0.94, 0.90 / 0.95])
    line2 = next(s for s in text.splitlines() if s.startswith("- **mlp_depth / digits, depth 2**"))
    assert line2.startswith(
        f"- **mlp_depth / digits, depth 2**: sgd_sn reached {pct(np.mean([0.93, 0.92, 0.90]) / 0.95)} of Adam's mean "
        f"test accuracy ({pct(np.mean([0.93, 0.92, 0.90]))} vs {pct(0.95)}, means over 3 paired seeds), 95% interval "
        f"{pct(per_seed.min())}–{pct(per_seed.max())}; per-seed ratio median {pct(np.median(per_seed))}, IQR "
        f"{pct(np.percentile(per_seed, 25))}–{pct(np.percentile(per_seed, 75))}; medians (IQR) sgd_sn "
        f"{pct(0.92)} ({pct(0.91)}–{pct(0.925)}), Adam {pct(0.95)} ({pct(0.945)}–{pct(0.955)}). "
        f"Inconclusive at the 95% bar: the interval straddles it (about {r2['seeds_needed']} paired seeds would "
        "decide it, an estimate). Adam's selected LR 0.01 is the lowest it tried")
    assert "sgd_sn won on: wall time (0.8 s vs 1 s)" in line2 and line2.endswith("Answer: **inconclusive**.")
    assert "yes" not in line2.split("Answer:")[1]
    line8 = next(s for s in text.splitlines() if s.startswith("- **mlp_depth / digits, depth 8**"))
    assert "Below the 95% bar: the whole interval is under it." in line8
    assert "sgd_sn won on: deepest trainable depth (32 vs 8)." in line8
    assert "Adam won on: wall time (3 s vs 2 s)" in line8 and "peak CUDA memory (50 MB vs 40 MB)" in line8
    assert line8.endswith("Answer: **no**.")
    line32 = next(s for s in text.splitlines() if s.startswith("- **mlp_depth / digits, depth 32**"))
    assert "Adam: 1 of 3 selected-LR runs failed (chance)." in line32
    lm = next(s for s in text.splitlines() if s.startswith("- **gpt / markov, depth 2**"))
    assert "of Adam's mean next-token accuracy" in lm and "Test bits per byte: sgd_sn 1.75 vs Adam 1.45." in lm
    assert "means over 2 paired seeds" in lm and lm.endswith("Answer: **no**.")
    assert ("- **Overall**: at the 95% bar, 1 of 4 tasks reached it (whole interval above), 2 fell below it and 1 is "
            "inconclusive; 1 of 4 also won on wall time, memory or depth tolerance (answer yes): mlp_depth / digits, "
            "depth 32. Inconclusive (an advantage holds but the interval contains the bar): mlp_depth / digits, "
            "depth 2.") in text
    assert "| inconclusive |" in text  # the verdict table's reaches_bar and answer cells
    assert ("Deepest trainable network per optimizer, mlp_depth / digits (depth tried: 2, 8, 32, 64): "
            "adam 8 (first failure at 32: chance; skipped 64); sgd_sn 32 (first failure at 64: vanishing).") in text
    order = [text.index(h) for h in ("### The answer", "### Verdict per task", "### Depth to failure", "### Ablation",
                                     "### Selected learning rate", "### Figures", "### Seeds, scale and provenance",
                                     "### Measurement caveats")]
    assert order == sorted(order)
    assert "| mlp_sn_clip |" in text and text.index("| mlp_sn_clip |") < text.index("| mlp_sgd |")
    assert "67.0% ± 4.2%" in text  # mlp_sn_clip: mean and sd of 0.70, 0.64
    assert "CPU keeps no such peak" in text and "`entropy_floor_bits`" in text and "order-2 count model" in text
    assert "`*_val_last_change`" in text
    assert "no number here comes from frozen runs" in text
    assert "](reports/figures/loss_curves_mlp_depth.png)" in readme.read_text()
    assert "\nold\n" not in readme.read_text()


def test_overall_answer_counts(root: Path, tmp_path: Path) -> None:
    tables = tmp_path / "t"
    aggregate(root, tables)
    v = pd.read_csv(tables / "verdict.csv")
    text = write_report(tables, tmp_path / "nofigs", tmp_path / "r.md")
    reached, yes = int((v["reaches_bar"] == "yes").sum()), int((v["answer"] == "yes").sum())
    below, inc = int((v["reaches_bar"] == "no").sum()), int((v["reaches_bar"] == "inconclusive").sum())
    assert (f"- **Overall**: at the 95% bar, {reached} of {len(v)} tasks reached it (whole interval above), {below} "
            f"fell below it and {inc} is inconclusive; {yes} of {len(v)} also won") in text
    assert "### Figures" not in text


def test_focus_point_is_deepest_trained(root: Path) -> None:
    from optlab.analysis.plots import figure_data, focus
    from optlab.analysis.studies.sgd_sn.figures import reduce_layers

    _, per = figure_data(load_runs(root))
    fd = per["sgd_sn"]
    point, sel = focus(fd, "mlp_depth", "digits")
    assert point == "depth=32"  # nobody trained at 64; sgd_sn trained at 32
    assert set(sel["optimizer"]) == {"adam", "sgd_sn"} and set(sel["lr"]) == {0.1}
    # the reduced layer frames: the last check per run, and the largest sigma per check
    one = sel[sel["optimizer"] == "adam"]["run_dir"].iloc[0]
    reduced = fd.layers(reduce_layers)
    last = reduced["last"][reduced["last"]["run_dir"] == one]
    assert set(last["step"]) == {30.0} and len(last) == 34
    assert reduced["sigma"][reduced["sigma"]["run_dir"] == one]["sigma_max"].tolist() == pytest.approx([1.05, 1.3])
    # the same from the runs root (each layers file reduced as it is read)
    _, per_root = figure_data(root)
    again = per_root["sgd_sn"].layers(reduce_layers)
    assert again["last"].sort_values(["run_dir", "layer"]).reset_index(drop=True).equals(
        reduced["last"].sort_values(["run_dir", "layer"]).reset_index(drop=True))


def test_studies_without_a_depth_axis(root: Path) -> None:
    """A study without a grid (one configuration) and one along block_size (context length)."""
    for opt, acc, peak in (("adam", 0.90, 30.0), ("sgd_sn", 0.80, 24.0)):
        for seed in SEEDS:
            _write(root / "sweep" / "resnet" / opt / f"{opt}-digits-base-lr0.1-s{seed}",
                   config={"optimizer": opt, "lr": 0.1, "arch": "resnet18", "dataset": "digits", "seed": seed,
                           "study": "resnet", "n_classes": 10},
                   final={"val_acc": acc, "test_acc": acc + 0.01 * seed, "wall_time_s": 3.0, "state_mem_mb": 2.0,
                          "epochs_to_90": None, "examples_per_s": 1.0},
                   status="completed", failure=None, n_layers=5, grad_decay=0.9,
                   sweep={"study": "resnet", "role": "search" if seed == 0 else "confirm", "point": {}, "select": "val_acc"})
            for block in (256, 512):
                _write(root / "sweep" / "gpt_context" / opt / f"{opt}-ts-b{block}-lr0.001-s{seed}",
                       config={"optimizer": opt, "lr": 0.001, "arch": "gpt", "dataset": "tinyshakespeare", "depth": 4,
                               "seed": seed, "study": "gpt_context", "block_size": block},
                       final={"val_loss": 2.0, "val_acc": 0.3, "test_acc": 0.3, "test_bpb": 1.5, "wall_time_s": 3.0,
                              "state_mem_mb": 2.0, "peak_mem_mb": peak * block / 256, "epochs_to_90": None,
                              "tokens_per_s": 1.0},
                       status="completed", failure=None, n_layers=5, grad_decay=0.9, lm=True,
                       sweep={"study": "gpt_context", "role": "search", "point": {"block_size": block}, "select": "val_loss"})
    runs, _, _ = load_runs(root, series=False)
    dtf = depth_to_failure_table(runs, load_summaries(root))
    assert "resnet" not in set(dtf["study"])  # no grid axis
    ctx = _one(dtf, study="gpt_context", method="sgd_sn")
    assert (ctx["axis"], ctx["points_tried"], ctx["deepest_trained"]) == ("block_size", "256 512", 512)
    v = verdict_table(runs, failure_depths=dtf)
    res = _one(v, study="resnet")
    assert pd.isna(res["point"]) and res["ratio_of_means"] == pytest.approx(np.mean([0.80, 0.81, 0.82]) / np.mean([0.90, 0.91, 0.92]))
    assert res["depth_deeper"] == "n/a" and res["advantages"] == "none"  # equal time and memory: ties are no advantage
    for block in (256, 512):
        row = _one(v, study="gpt_context", point=f"block_size={block}")
        assert (row["mem_basis"], row["mem_lower"], row["ratio_of_means"]) == ("peak", "sgd_sn", 1.0)
        assert row["depth_deeper"] == "n/a" and row["advantages"] == "memory" and row["answer"] == "yes"
    from optlab.analysis.plots import figure_data, focus

    core, _ = figure_data(load_runs(root))
    assert focus(core, "gpt_context", "tinyshakespeare")[0] == "block_size=512"
    assert pd.isna(focus(core, "resnet", "digits")[0])


def test_cost_study_is_reported_apart_from_the_verdict(root: Path, tmp_path: Path) -> None:
    """A study marked verdict: false (the context sweep) gets the context table, not verdict rows."""
    from optlab.analysis.plots import plot_all
    from optlab.analysis.studies.sgd_sn.tables import context_table

    for opt, step_mb in (("adam", 12.0), ("sgd_sn", 8.0)):
        for block in (32, 64, 128):
            for seed in (0, 1):
                _write(root / "sweep" / "gpt_context" / opt / f"{opt}-markov-b{block}-lr0.003-s{seed}",
                       config={"optimizer": opt, "lr": 0.003, "arch": "gpt", "dataset": "markov", "depth": 2,
                               "seed": seed, "study": "gpt_context", "block_size": block},
                       final={"val_loss": 2.0, "val_acc": 0.3, "test_acc": 0.3, "val_bpb": 3.0 + seed, "wall_time_s": 1.0,
                              "state_mem_mb": 1.0, "peak_mem_mb": None, "step_mem_mb": step_mb * block / 32 + seed,
                              "epochs_to_90": None, "tokens_per_s": 1000.0 / block},
                       status="completed", failure=None, n_layers=4, grad_decay=0.9, lm=True,
                       sweep={"study": "gpt_context", "role": "search", "point": {"block_size": block},
                              "select": "val_loss", "verdict": False})
    runs, _, _ = load_runs(root, series=False)
    assert not runs.loc[runs["study"] == "gpt_context", "in_verdict"].any()
    assert runs.loc[runs["study"] == "mlp_depth", "in_verdict"].all()  # older runs without the key count
    v = verdict_table(runs)
    assert "gpt_context" not in set(v["study"]) and "mlp_depth" in set(v["study"])
    ctx = context_table(runs)
    assert len(ctx) == 6 and set(ctx["mem_basis"]) == {"step"}
    sn = ctx[ctx["method"] == "sgd_sn"].sort_values("block_size")
    assert sn["block_size"].tolist() == [32, 64, 128]
    assert sn["mem_mb"].tolist() == pytest.approx([8.5, 16.5, 32.5])  # mean over the two seeds
    # steady throughput: the median over the epochs after the first (warm-up excluded), its MAD beside it
    assert sn["tokens_per_s"].tolist() == pytest.approx([1000 / 32, 1000 / 64, 1000 / 128])
    assert sn["tokens_per_s_mad"].tolist() == pytest.approx([10 / 32, 10 / 64, 10 / 128])
    assert sn["steady_epochs"].tolist() == [2 * (N_EPOCHS - 1)] * 3
    assert sn["n_seeds"].tolist() == [2, 2, 2] and sn["val_bpb"].tolist() == pytest.approx([3.5] * 3)
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    aggregate(root, tables)
    written = {p.name for p in plot_all(root, figures)}
    assert "memory_vs_context.png" in written
    text = write_report(tables, figures, tmp_path / "results.md")
    assert "### Memory and throughput vs context length" in text
    assert "sgd_sn 8.5 → 32.5 MB (context 32 → 128)" in text
    assert "memory_vs_context.png" in text


def test_memory_basis_prefers_cuda_peak_then_step_then_state() -> None:
    from optlab.analysis.studies.sgd_sn.tables import mem_pair as _mem_pair

    both = {"peak_mem_mb_mean": 5.0, "step_mem_mb_mean": 3.0, "state_mem_mb_mean": 1.0}
    assert _mem_pair(pd.Series(both), pd.Series(both)) == ("peak", 5.0, 5.0)
    cpu = {"peak_mem_mb_mean": np.nan, "step_mem_mb_mean": 3.0, "state_mem_mb_mean": 1.0}
    assert _mem_pair(pd.Series(cpu), pd.Series({**cpu, "step_mem_mb_mean": 4.0})) == ("step", 3.0, 4.0)
    old = {"peak_mem_mb_mean": np.nan, "step_mem_mb_mean": np.nan, "state_mem_mb_mean": 1.0}
    assert _mem_pair(pd.Series(old), pd.Series(cpu)) == ("state", 1.0, 1.0)


def test_time_advantage_uses_the_median_seed(tmp_path: Path) -> None:
    """One seed slowed 100x (a busy shared machine) does not flip the wall-time comparison."""
    root = tmp_path / "runs"
    walls = {"sgd_sn": [1.0, 1.0, 100.0], "adam": [2.0, 2.0, 2.0]}
    for opt, ws in walls.items():
        for seed, wall in enumerate(ws):
            _write(root / "sweep" / "resnet" / opt / f"{opt}-digits-base-lr0.1-s{seed}",
                   config={"optimizer": opt, "lr": 0.1, "arch": "resnet18", "dataset": "digits", "seed": seed,
                           "study": "resnet", "n_classes": 10},
                   final={"val_acc": 0.9, "test_acc": 0.9, "wall_time_s": wall, "seconds_per_epoch": wall / 10,
                          "state_mem_mb": 2.0, "epochs_to_90": 1},
                   status="completed", failure=None, n_layers=3, grad_decay=0.9,
                   sweep={"study": "resnet", "role": "search" if seed == 0 else "confirm", "point": {}, "select": "val_acc"})
    runs, _, _ = load_runs(root, series=False)
    row = _one(verdict_table(runs), study="resnet")
    assert (row["sgd_sn_wall_time_s"], row["adam_wall_time_s"]) == (1.0, 2.0)
    assert row["time_lower"] == "sgd_sn" and row["epoch_time_lower"] == "sgd_sn"
    best = _one(best_lr_table(runs), method="sgd_sn")
    assert best["wall_time_s_mean"] == pytest.approx(34.0) and best["wall_time_s_median"] == 1.0


def test_report_says_when_the_projection_never_acted() -> None:
    from optlab.analysis.studies.sgd_sn.report import answers, binding_text

    assert "never acted" in binding_text(0.0) and "exactly as plain SGD" in binding_text(0.0)
    assert binding_text(0.25) == " The projection changed the weights at 25.0% of steps."
    assert binding_text(float("nan")) == "" and binding_text(None) == ""
    common = {"method": "sgd_sn", "reference": "adam", "metric": "test_acc", "bar": 0.95, "direction": "up",
              "n_pairs": 3, "ratio_median": 1.0, "ratio_q25": 1.0, "ratio_q75": 1.0, "seeds_needed": ""}
    rows = pd.DataFrame([
        {**common, "study": "gpt", "dataset": "markov", "point": "depth=2", "ratio_of_means": 1.0, "ratio_lo": 1.0,
         "ratio_hi": 1.0, "reaches_bar": "yes", "answer": "yes", "sgd_sn_sn_active_frac": 0.0, "sgd_sn_test_acc": 0.5,
         "adam_test_acc": 0.5},
        {**common, "study": "mlp_depth", "dataset": "digits", "point": "depth=2", "ratio_of_means": 0.8, "ratio_lo": 0.7,
         "ratio_hi": 0.9, "reaches_bar": "no", "answer": "no", "sgd_sn_sn_active_frac": 1.0, "sgd_sn_test_acc": 0.4,
         "adam_test_acc": 0.5},
    ])
    overall = answers(rows)[-1]
    assert "In gpt / markov, depth 2 the projection never acted" in overall and "mlp_depth" not in overall.split("In ")[-1]
