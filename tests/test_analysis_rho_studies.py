"""The rho family's new analyses (issue #11 items 3-5) on synthetic frames: the LR-choice rule,
the spike tables beside the published reference, the one-step summary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from optlab.analysis.studies import rho_phase, rho_scan, rho_spike


def _scan(rows):
    return pd.DataFrame([{"study": "rho_lr_scan", "optimizer": o, "method": f"rho_fixed_{o}", "lr": lr, "seed": 7,
                          "status": st, "diverged_step": None, "val_acc": v, "test_acc": v, "peak_r": 1.0,
                          "run_dir": f"r{i}"} for i, (o, lr, st, v) in enumerate(rows)])


def test_scan_rule_picks_the_largest_lr_near_the_best():
    scan = _scan([("adam", 0.001, "completed", 0.95), ("adam", 0.01, "completed", 0.96), ("adam", 0.03, "completed", 0.945),
                  ("adam", 0.1, "completed", 0.50), ("adam", 0.3, "diverged", math.nan)])
    c = rho_scan.choose(scan)
    assert c["best_lr"] == 0.01 and c["b"] == 0.03
    assert (c["safe"], c["borderline"], c["unstable"]) == pytest.approx((0.003, 0.03, 0.3))
    # a diverged run is never b, however high its (missing) accuracy
    c = rho_scan.choose(_scan([("sgd", 0.1, "completed", 0.9), ("sgd", 1.0, "diverged", 0.99)]))
    assert c["b"] == 0.1
    assert math.isnan(rho_scan.choose(_scan([("sgd", 1.0, "diverged", math.nan)]))["b"])


def test_scan_choice_compares_with_the_configured_study(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("scale: quick\n")
    (tmp_path / "studies.yaml").write_text("studies:\n  rho_adam:\n    quick: {lrs: [0.003, 0.03, 0.3]}\n"
                                           "  rho_momentum:\n    quick: {lrs: [0.01, 0.1]}\n")
    scan = _scan([("adam", 0.03, "completed", 0.95), ("sgd_momentum", 0.1, "completed", 0.9)])
    t = rho_scan.choice_table(scan, p).set_index("optimizer")
    assert t.loc["adam", "agrees"] == "yes" and t.loc["sgd_momentum", "agrees"] == "no"
    assert rho_scan.choice_table(scan, None)["agrees"].tolist() == ["n/a", "n/a"]


def test_spike_names_scores_and_published_reference():
    assert rho_spike.model_name("arch=mlp norm=layer lr_spike_factor=10000") == "mlp+ln"
    assert rho_spike.model_name("arch=vit lr_spike_factor=1000") == "transformer"
    assert rho_spike.model_name("arch=cnn lr_spike_factor=1000") == "cnn+bn"
    assert rho_spike.spike_factor("arch=cnn lr_spike_factor=1000") == 1000
    runs = pd.DataFrame([
        {"kind": "sweep", "study": "rho_spike", "point": "arch=vit lr_spike_factor=10000", "method": m, "lr": lr,
         "seed": s, "status": st, "test_acc": acc, "run_dir": f"{m}{lr}{s}"}
        for m, st, acc in (("adam", "diverged", None), ("adam_clip", "completed", 0.5), ("rho_capped_adam", "completed", 0.9))
        for lr in (1e-3, 1e-2) for s in (0, 1, 2)])
    rt = rho_spike.run_table(runs)
    assert set(rt.loc[rt["method"] == "adam", "score"]) == {0.1}  # non-finite runs score chance
    pooled = rho_spike.pooled_table(rt)
    assert pooled["method_key"].tolist() == list(rho_spike.METHODS)
    assert pooled["published_median_pct"].tolist() == ["31.8%", "38.7%", "95.3%"]
    assert pooled["score_median"].tolist() == pytest.approx([0.1, 0.5, 0.9])
    assert "3 of 6 completed" not in pooled["runs"].tolist()[0] and "non-finite" in pooled["runs"].tolist()[0]
    detail = rho_spike.detail_table(rt)
    assert len(detail) == 6 and detail["lr_value"].tolist()[:2] == [1e-3, 1e-2]


def test_phase_summary_counts_rises_below_one():
    rows = []
    for run, seed in (("a", 0), ("b", 1)):
        for d, kind in enumerate(["grad", "random", "random"]):
            rise = {("a", 0): 3.0, ("a", 1): 0.5, ("a", 2): math.inf}.get((run, d), 1.8)
            rows.append({"point": "arch=mlp", "seed": seed, "run_dir": run, "kind": kind, "direction": d,
                         "metric": "one_step_r_rise", "r": np.nan, "value": rise})
            for r, q in ((0.1, 0.9), (1.0, 1.05 + d)):
                rows.append({"point": "arch=mlp", "seed": seed, "run_dir": run, "kind": kind, "direction": d,
                             "metric": "ratio", "r": r, "value": q})
    t = rho_phase.summary_table(pd.DataFrame(rows)).iloc[0]
    assert t["pairs_below_1"] == 1 and t["n_pairs"] == 6
    assert t["r_rise_grad_median"] == pytest.approx((3.0 + 1.8) / 2)
    assert t["ratio_r1_grad_median"] == pytest.approx(1.05)
    cur = rho_phase.curves_table(pd.DataFrame(rows))
    g = cur[(cur["kind"] == "random") & (cur["r"] == 1.0)].iloc[0]
    assert g["n"] == 4 and g["median"] == pytest.approx(2.55)
    frame = pd.DataFrame({"step": [5, 5], "epoch": [1, 1], "layer": [0, 1], "role": ["grad", "random"],
                          "metric": ["one_step_ratio@r=0.316228", "one_step_r_rise"], "value": [0.9, "inf"]})
    long = rho_phase._long(frame)
    assert long["r"].iloc[0] == pytest.approx(0.316228) and long["metric"].tolist() == ["ratio", "one_step_r_rise"]
    assert math.isinf(long["value"].iloc[1])
