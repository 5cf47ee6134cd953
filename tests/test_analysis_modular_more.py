"""The modular analysis's items 6d-6h (optlab.analysis.studies.modular_more) on synthetic frames:
per-depth pairing of the LR scalings, the per-role benefit and its recommendation, bf16 against
fp32, spectra and NS diagnostics at the first and last check, skipped studies, and the sgd_sn
report's sigma growth where the projection never acted."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from optlab import stats
from optlab.analysis.studies import modular as MOD
from optlab.analysis.studies import modular_more as M
from optlab.analysis.studies.sgd_sn import report as SR
from optlab.analysis.studies.sgd_sn import tables as ST

SEEDS = (0, 1, 2, 3, 4)


def _rt(study: str, values: dict[tuple[str, int], list[float]], *, throughput: float = 100.0) -> pd.DataFrame:
    """run_table rows: values[(method, depth)] = test losses per seed."""
    rows = []
    for (method, depth), vs in values.items():
        for seed, v in zip(SEEDS, vs):
            rows.append({"study": study, "dataset": "digits", "method": method, "seed": seed, "depth": depth,
                         "status": "completed", "run_dir": f"{study}/{method}/d{depth}/s{seed}", "lm": False,
                         "train_loss": v, "test_loss": v, "train_acc": 0.9, "test_acc": 1 - v / 10, "val_loss": v,
                         "val_ppl": math.nan, "test_ppl": math.nan, "throughput": throughput * (1 + 0.01 * seed),
                         "throughput_unit": "examples/s", "grad_erank_mean": 3.0, "wall_time_s": 1.0})
    return pd.DataFrame(rows, columns=MOD.RUN_COLS)


def test_lr_scaling_pairs_each_depth_with_the_global_lr_at_that_depth():
    base = [1.0, 1.1, 0.9, 1.05, 0.95]
    vals = {("muon_lr_global", 2): base, ("muon_lr_depth", 2): [2 * v for v in base],
            ("muon_lr_global", 8): [3 * v for v in base], ("muon_lr_depth", 8): [1.5 * v for v in base]}
    rt = _rt("modular_lr", vals)
    assert M.grid_studies(rt) == {"modular_lr"}
    t = M.lr_scaling_table(rt, {"modular_lr": "muon_lr_global"})
    d2 = t[(t["depth"] == 2) & (t["method"] == "muon_lr_depth")].iloc[0]
    d8 = t[(t["depth"] == 8) & (t["method"] == "muon_lr_depth")].iloc[0]
    assert d2["rel_diff"] == pytest.approx(1.0) and d2["lower loss?"] == "no"    # twice the loss at depth 2
    assert d8["rel_diff"] == pytest.approx(-0.5) and d8["lower loss?"] == "yes"  # half the loss at depth 8
    ref = stats.paired_ratio_interval(pd.Series([1.5 * v for v in base], index=SEEDS),
                                      pd.Series([3 * v for v in base], index=SEEDS), direction="up")
    assert d8["rel_diff_low"] == pytest.approx(ref.low - 1) and d8["rel_diff_high"] == pytest.approx(ref.high - 1)
    # a grid study stays out of the flat tables (they pair by seed alone, across depths)
    tabs = MOD.build_tables(rt, pd.DataFrame(columns=["run_dir", "step", "epoch", "metric", "value"]),
                            pd.DataFrame(columns=["run_dir", "step", "epoch", "layer", "role", "metric", "value"]),
                            {"modular_lr": "muon_lr_global"}, {})
    assert tabs["modular_results"][0].empty and len(tabs["modular_lr_scaling"][0]) == 4


def test_role_benefit_words_and_the_recommendation_follow_the_interval():
    ref = [1.0, 1.2, 0.9, 1.1, 1.0]
    noisy = [0.8, 1.5, 0.7, 1.3, 1.05]  # straddles 0
    vals = {("baseline_adamw", 4): ref, ("role_muon_input", 4): [1.3 * v for v in ref],
            ("role_muon_hidden", 4): [0.8 * v for v in ref], ("role_muon_output", 4): noisy,
            ("role_muon_all", 4): ref}
    rt = _rt("modular_roles", vals)
    rec_ns = pd.DataFrame([{"study": "modular_roles", "role": "hidden", "recommended_k": 3}])
    benefit, rec = M.role_benefit_tables(rt, {"modular_roles": "baseline_adamw"}, rec_ns)
    words = benefit.set_index("role")["lower loss?"].to_dict()
    assert words == {"input": "no", "hidden": "yes", "output": "inconclusive"}
    assert list(benefit["role"]) == ["input", "hidden", "output"]  # role_muon_all is not a one-role method
    r = rec.set_index("role")
    assert r.loc["hidden", "optimizer (our rule)"] == "Muon" and r.loc["hidden", "NS steps"] == "3"
    assert r.loc["input", "optimizer (our rule)"] == "AdamW" and r.loc["input", "NS steps"] == "n/a"
    assert r.loc["output", "optimizer (our rule)"].startswith("either")


def test_bf16_pairs_each_preset_with_its_fp32_run():
    fp = _rt("modular_gpt", {("baseline_adamw", 2): [2.0] * 5}, throughput=100.0)
    lo = _rt("modular_bf16", {("baseline_adamw", 2): [2.2] * 5}, throughput=250.0)
    rt = pd.concat([fp, lo], ignore_index=True)
    rt["val_loss"] = rt["test_loss"]
    t = M.bf16_table(rt).iloc[0]
    assert t["preset"] == "baseline_adamw" and t["pairs"] == 5
    assert t["rel_diff"] == pytest.approx(0.1) and t["speedup"] == pytest.approx(2.5)
    assert M.bf16_table(fp).empty


def _layers(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["run_dir", "step", "epoch", "layer", "role", "metric", "value"])


def test_spectra_and_ns_dynamics_take_the_first_and_last_check():
    rt = _rt("modular_presets", {("baseline_muon", 4): [1.0] * 2})
    rd = rt["run_dir"].tolist()
    rows = []
    for i, d in enumerate(rd):
        for step, c in ((25, 2.0), (100, 5.0), (200, 10.0 + i)):
            rows += [(d, step, 0, 1, "hidden", "cond", c), (d, step, 0, 2, "hidden", "cond", c + 2),  # layer mean: c + 1
                     (d, step, 0, 1, "hidden", "top1_energy", 0.1), (d, step, 0, 1, "hidden", "sv_max", 1.0)]
            rows += [(d, step, 0, 1, "hidden", "ns_orth_err@k=5", 1.0 / step), (d, step, 0, 1, "hidden", "ns_angle@k=5", 0.5),
                     (d, step, 0, 1, "hidden", "ns_rel_diff@k=5", 2.0),
                     (d, step, 0, 1, "hidden", "grad_erank", 4.0), (d, step, 0, 1, "hidden", "ns_grad_erank", step / 25)]
    # a constraint-probe run (sv_max only) stays out of the spectra table
    rows.append(("other/run", 25, 0, 1, "hidden", "sv_max", 1.0))
    layers = _layers(rows)
    sp = M.spectra_table(rt, layers).iloc[0]
    assert sp["cond_first"] == pytest.approx(3.0) and sp["cond_last"] == pytest.approx(np.median([11.0, 12.0]))
    assert sp["steps"] == "25 → 200" and sp["runs"] == 2
    dyn, gain = M.ns_dynamics_tables(rt, layers)
    d = dyn.iloc[0]
    assert d["k"] == 5 and d["orth_err_first"] == pytest.approx(1 / 25) and d["orth_err_last"] == pytest.approx(1 / 200)
    g = gain.iloc[0]
    assert g["gain_first"] == pytest.approx(1 / 4) and g["gain_last"] == pytest.approx(8 / 4)


def test_skipped_slices_are_listed_with_their_reason():
    sl = [SimpleNamespace(study="modular_bf16", method="baseline_adamw", skipped="GPU only"),
          SimpleNamespace(study="modular_gpt", method="baseline_adamw", skipped=None)]
    t = M.skipped_table(sl)
    assert t.values.tolist() == [["modular_bf16", "baseline_adamw", "GPU only"]]


def test_sigma_growth_reads_the_projected_roles_and_says_why_the_projection_cannot_act(tmp_path):
    run = tmp_path / "runs" / "r0"
    run.mkdir(parents=True)
    rows = ["step,epoch,layer,role,metric,value"]
    for step, h in ((25, 0.40), (125, 0.42)):
        rows += [f"{step},0,0,input,sigma_max,0.9", f"{step},0,1,hidden,sigma_max,{h}", f"{step},0,2,hidden,sigma_max,{h - 0.1}"]
    (run / "layers.csv").write_text("\n".join(rows) + "\n")
    runs = pd.DataFrame([{"run_dir": "runs/r0", "status": "completed", "sn_roles": '["hidden"]'}])
    g = ST._sigma_growth(runs, "sgd_sn", tmp_path)
    assert g["sgd_sn_sigma_first"] == pytest.approx(0.40) and g["sgd_sn_sigma_last_check"] == pytest.approx(0.42)
    assert g["sgd_sn_sigma_growth_per_100"] == pytest.approx(0.02)
    row = {"sgd_sn_sn_active_frac": 0.0, **g}
    text = SR.idle_text(row, "sgd_sn")
    assert "0.4000 (step 25)" in text and "2,900 more steps" in text  # (1 - 0.42) / 0.02 * 100
    flat = dict(row, sgd_sn_sigma_growth_per_100=0.0)
    assert "not growing" in SR.idle_text(flat, "sgd_sn")
    assert SR.idle_text(dict(row, sgd_sn_sn_active_frac=0.5), "sgd_sn") == ""
    assert math.isnan(ST._sigma_growth(runs, "sgd_sn", None)["sgd_sn_sigma_first"])
