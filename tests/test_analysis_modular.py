"""The ``modular`` study analysis (issue #12 item 8) on synthetic runs: spreads equal pandas, the
verdict word follows the paired bootstrap interval, the published claims appear beside ours,
missing studies and probes are skipped, and the whole aggregate -> report path on a tiny tree."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab import stats
from optlab.analysis.aggregate import aggregate
from optlab.analysis.report import END, START, write_report
from optlab.analysis.studies import modular as M

SEEDS = (0, 1, 2)
PRESETS = ("baseline_adamw", "baseline_muon", "modular_sphere", "modular_stiefel", "full_modular")
CLAIMS = {"hypersphere on embeddings": "5.4% lower loss after 20 steps, one seed", "Stiefel": "costs 35% throughput",
          "combining constraints": "doesn't stack"}


def _runs(study: str, values: dict[str, list[float]], *, lm: bool = False, tput: dict[str, list[float]] | None = None,
          status: dict[tuple[str, int], str] | None = None) -> pd.DataFrame:
    rows = []
    for method, vs in values.items():
        for seed, v in zip(SEEDS, vs):
            st = (status or {}).get((method, seed), "completed")
            t = (tput or {}).get(method, [1000.0, 1000.0, 1000.0])[seed]
            rows.append({"kind": "sweep", "study": study, "dataset": "markov" if lm else "digits", "method": method,
                         "seed": seed, "status": st, "run_dir": f"{study}/{method}/s{seed}", "lr": 0.02,
                         "test_loss": v if st == "completed" else math.nan, "train_loss": v * 0.5,
                         "test_acc": 1.0 - v / 10, "train_acc": 1.0 - v / 20, "val_loss": v * 1.1,
                         "val_ppl": math.exp(v * 1.1) if lm else math.nan, "tokens_per_s": t if lm else math.nan,
                         "examples_per_s": math.nan if lm else t, "throughput_steady": t, "wall_time_s": 1.0, "grad_erank_mean": 3.0 + seed})
    return pd.DataFrame(rows)


def test_results_medians_and_iqrs_equal_pandas():
    vals = {"baseline_adamw": [1.0, 1.3, 0.9], "baseline_muon": [0.7, 0.95, 0.8]}
    rt = M.run_table(_runs("modular_presets", vals))
    res = M.results_table(rt).set_index("method")
    for method, v in vals.items():
        s = pd.Series(v)
        assert res.loc[method, "test_loss_median"] == pytest.approx(s.median())
        assert res.loc[method, "test_loss_q25"] == pytest.approx(s.quantile(0.25))
        assert res.loc[method, "test_loss_q75"] == pytest.approx(s.quantile(0.75))
        acc = 1.0 - s / 10
        assert res.loc[method, "test_acc_median"] == pytest.approx(acc.median())
    assert list(res.index) == ["baseline_adamw", "baseline_muon"]
    assert res.loc["baseline_adamw", "runs"] == "3 of 3 completed"
    # a diverged run is counted and left out of the spread
    rt = M.run_table(_runs("modular_presets", vals, status={("baseline_muon", 1): "diverged"}))
    r = M.results_table(rt).set_index("method").loc["baseline_muon"]
    assert r["runs"] == "2 of 3 completed" and r["test_loss_median"] == pytest.approx(np.median([0.7, 0.8]))


def test_verdict_word_follows_the_interval():
    vals = {"baseline_adamw": [1.0, 1.1, 0.9],
            "baseline_muon": [0.80, 0.88, 0.72],  # 20% lower on every seed: interval below 0
            "modular_sphere": [1.1, 0.99, 1.0],  # one seed higher, two lower / equal: straddles 0
            "modular_stiefel": [1.3, 1.43, 1.17]}  # 30% higher on every seed
    rt = M.run_table(_runs("modular_presets", vals))
    v = M.verdict_table(rt, {"modular_presets": "baseline_adamw"}).set_index("method")
    assert v.loc["baseline_muon", "verdict"] == "yes" and v.loc["baseline_muon", "rel_diff_high"] < 0
    assert v.loc["modular_stiefel", "verdict"] == "no" and v.loc["modular_stiefel", "rel_diff_low"] > 0
    s = v.loc["modular_sphere"]
    assert s["rel_diff_low"] < 0 < s["rel_diff_high"] and s["verdict"] == "inconclusive"
    # the estimate is the paired ratio of means minus 1, the interval stats' own
    ri = stats.paired_ratio_interval(pd.Series(vals["modular_sphere"], index=SEEDS),
                                     pd.Series(vals["baseline_adamw"], index=SEEDS))
    assert s["rel_diff"] == pytest.approx(np.mean(vals["modular_sphere"]) / np.mean(vals["baseline_adamw"]) - 1)
    assert (s["rel_diff_low"], s["rel_diff_high"]) == pytest.approx((ri.low - 1, ri.high - 1))
    # one paired seed: no interval, never yes
    rt1 = M.run_table(_runs("modular_presets", vals, status={("baseline_muon", 0): "diverged",
                                                            ("baseline_muon", 1): "diverged"}))
    v1 = M.verdict_table(rt1, {"modular_presets": "baseline_adamw"}).set_index("method")
    assert v1.loc["baseline_muon", "pairs"] == 1 and v1.loc["baseline_muon", "verdict"] == "inconclusive"


def _curves(rt: pd.DataFrame, early: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for _, r in rt.iterrows():
        rows.append({"run_dir": r["run_dir"], "step": 20, "epoch": 0, "metric": "train_loss",
                     "value": early[r["method"]][int(r["seed"])]})
        rows.append({"run_dir": r["run_dir"], "step": 200, "epoch": 3, "metric": "val_loss", "value": r["val_loss"]})
        accs = (0.5, 0.85, 0.95) if r["method"] == "baseline_muon" else (0.5, 0.92, 0.95)
        for step, acc in zip((10, 20, 30), accs):
            rows.append({"run_dir": r["run_dir"], "step": step, "epoch": 0, "metric": "val_acc", "value": acc})
    return pd.DataFrame(rows)


def test_lm_table_step20_vs_end_and_misleads():
    end = {"baseline_adamw": [2.0, 2.1, 1.9], "modular_sphere": [2.0, 2.12, 1.88], "modular_stiefel": [2.02, 2.12, 1.92]}
    early = {"baseline_adamw": [3.0, 3.1, 2.9], "modular_sphere": [2.7, 3.2, 3.0], "modular_stiefel": [3.03, 3.13, 2.93]}
    rt = M.run_table(_runs("modular_gpt", end, lm=True))
    t = M.lm_table(rt, _curves(rt, early), {"modular_gpt": "baseline_adamw"}).set_index("method")
    s = t.loc["modular_sphere"]
    assert s["early_metric"] == "train_loss"  # no validation at step 20: the training curve's point
    assert s["single_seed_diff20"] == pytest.approx(2.7 / 3.0 - 1)  # seed 0 alone, as published: -10%
    assert s["diff_end_low"] <= 0 <= s["diff_end_high"] and s["misleads"] == "yes"
    st = t.loc["modular_stiefel"]
    assert st["single_seed_diff20"] == pytest.approx(0.01) and st["diff20_verdict"] == "no"
    assert st["diff_end_low"] <= 0.01 <= st["diff_end_high"] and st["misleads"] == "no"
    assert t.loc["modular_sphere", "early_median"] == pytest.approx(np.median(early["modular_sphere"]))
    assert t.loc["baseline_adamw", "misleads"] == "—"


def test_steps_to_target_and_throughput_cost():
    vals = {m: [1.0, 1.0, 1.0] for m in PRESETS}
    tput = {"baseline_muon": [1000.0, 1100.0, 900.0], "modular_stiefel": [650.0, 700.0, 600.0]}
    rt = M.run_table(_runs("modular_presets", vals, tput=tput))
    st = M.steps_to_target(rt, _curves(rt, {m: [1.0] * 3 for m in PRESETS})).set_index("method")
    assert st.loc["baseline_adamw", "steps_median"] == 20  # first val_acc >= 0.9
    assert st.loc["baseline_muon", "steps_median"] == 30 and st.loc["baseline_muon", "reached"] == "3 of 3"
    thr = M.throughput_table(rt, {"modular_presets": CLAIMS})
    row = thr[(thr["constraint"] == "Stiefel (hidden)")].iloc[0]
    assert row["cost"] == pytest.approx(1 - np.mean(tput["modular_stiefel"]) / np.mean(tput["baseline_muon"]))
    assert row["exact"] and row["published"] == "Stiefel: costs 35% throughput" and row["unit"] == "examples/s"
    assert row["cost_low"] <= row["cost"] <= row["cost_high"]
    assert set(thr.loc[~thr["exact"].astype(bool), "published"]) == {"—"}


def _layers(rt: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, r in rt.iterrows():
        seed = int(r["seed"])
        for step in (25, 50):
            for layer, role in enumerate(("input", "hidden", "hidden", "output")):
                rows.append({"run_dir": r["run_dir"], "step": step, "epoch": 0, "layer": layer, "role": role,
                             "metric": "grad_erank", "value": 1.0 + layer + seed + step / 25})
                if role == "hidden":
                    rows.append({"run_dir": r["run_dir"], "step": step, "epoch": 0, "layer": layer, "role": role,
                                 "metric": "ns_grad_erank", "value": 2 * (1.0 + layer + seed + step / 25)})
                    for k, err in zip(M.NS_KS, (5.0, 3.0, 1.4, 1.1, 1.0)):
                        for q, v in (("angle", 0.1 * k), ("rel_diff", 0.5), ("orth_err", err + 0.01 * seed)):
                            rows.append({"run_dir": r["run_dir"], "step": step, "epoch": 0, "layer": layer,
                                         "role": role, "metric": f"ns_{q}@k={k}", "value": v})
    return pd.DataFrame(rows)


def test_role_rank_and_ns_recommendation():
    rt = M.run_table(_runs("modular_ns", {"adamw": [1.0] * 3, "muon_ns5": [1.0] * 3}))
    layers = _layers(rt)
    rr = M.role_rank_table(rt, layers)
    h = rr[(rr["method"] == "muon_ns5") & (rr["role"] == "hidden")].iloc[0]
    per_run = layers[(layers["metric"] == "grad_erank") & (layers["role"] == "hidden")].merge(rt[["run_dir", "method"]])
    per_run = per_run[per_run["method"] == "muon_ns5"].groupby("run_dir")["value"].mean()
    assert h["erank_median"] == pytest.approx(per_run.median())
    assert h["ns_erank_median"] == pytest.approx(2 * per_run.median())
    assert rr[rr["role"] == "input"]["NS(G) eff. rank median [IQR]"].eq("— (not Muon)").all()
    lr = M.layer_rank_table(rt, layers)
    one = lr[(lr["method"] == "adamw") & (lr["layer"] == 2)].iloc[0]
    ref = layers[(layers["metric"] == "grad_erank") & (layers["layer"] == 2)].merge(rt[["run_dir", "method"]])
    assert one["erank_median"] == pytest.approx(ref[ref["method"] == "adamw"].groupby("run_dir")["value"].mean().median())
    assert one["erank_q75"] == pytest.approx(ref[ref["method"] == "adamw"].groupby("run_dir")["value"].mean().quantile(0.75))
    diag, rec = M.ns_tables(rt, layers)
    assert sorted(diag["k"].unique()) == list(M.NS_KS)
    assert diag.loc[diag["k"] == 1, "orth_err"].iloc[0] == pytest.approx(5.01)
    r = rec.iloc[0]
    # 90% of the reduction 5.01 -> 1.01 is reached first at k = 3 (1.41 <= 5.01 - 0.9 * 4.0 = 1.41)
    assert r["role"] == "hidden" and r["recommended_k"] == 3
    assert M.recommend(np.array([1, 2, 3]), np.array([1.0, 1.0, 1.0])) == 1
    assert M.recommend(np.array([1, 2]), np.array([np.nan, np.nan])) is None


def test_published_claims_appear_beside_ours_and_missing_studies_are_skipped():
    vals = {"baseline_adamw": [1.0, 1.1, 0.9], "baseline_muon": [1.0, 1.1, 0.9], "modular_sphere": [0.9, 1.0, 0.8],
            "modular_stiefel": [1.0, 1.1, 0.9], "full_modular": [0.95, 1.05, 0.85]}
    rt = M.run_table(_runs("modular_gpt", vals, lm=True))
    tables = M.build_tables(rt, _curves(rt, {m: [3.0, 3.1, 2.9] for m in vals}), pd.DataFrame(
        columns=["run_dir", "step", "epoch", "layer", "role", "metric", "value"]), {"modular_gpt": "baseline_adamw"},
        {"modular_gpt": CLAIMS})
    pub, cols = tables["modular_published"]
    assert cols == M.PUBLISHED_MD and list(pub["claim"]) == list(CLAIMS)
    assert list(pub["published (reference)"]) == list(CLAIMS.values())
    sphere = pub.set_index("claim").loc["hypersphere on embeddings", "ours"]
    assert "step 20" in sphere and "end" in sphere
    assert "throughput cost" in pub.set_index("claim").loc["Stiefel", "ours"]
    assert "full_modular" in pub.set_index("claim").loc["combining constraints", "ours"]
    # no layer rows (probes not run): those tables are empty, nothing raises
    assert tables["modular_role_rank"][0].empty and tables["modular_ns_recommend"][0].empty
    # no runs at all: every table empty
    empty = M.build_tables(M.run_table(pd.DataFrame()), pd.DataFrame(columns=["run_dir", "step", "metric", "value"]),
                           pd.DataFrame(columns=["run_dir", "step", "role", "metric", "value"]), {}, {})
    assert all(df.empty for df, _ in empty.values())
    # a study without its reference is left out of the verdict, not an error
    only = M.run_table(_runs("modular_presets", {"modular_sphere": [1.0] * 3}))
    assert M.verdict_table(only, {"modular_presets": "baseline_adamw"}).empty


# ---------------------------------------------------------------- aggregate -> report on a tiny tree


def _write_run(root: Path, study: str, method: str, seed: int, test_loss: float, lm: bool) -> None:
    d = root / "sweep" / study / method / f"{method}-s{seed}"
    d.mkdir(parents=True)
    final = {"steps": 40, "test_loss": test_loss, "train_loss": test_loss / 2, "val_loss": test_loss * 1.05,
             "test_acc": 0.9, "val_acc": 0.9, "wall_time_s": 1.0, "grad_erank_mean": 4.0}
    final |= {"tokens_per_s": 1000.0 + seed, "val_ppl": math.exp(test_loss)} if lm else {"examples_per_s": 500.0 + seed}
    doc = {"run_id": d.name, "status": "completed", "diverged_step": None, "diverge_reason": None, "error": None,
           "failure": None, "sweep": {"study": study, "method": method, "role": "confirm", "point": {},
                                      "select": "val_loss", "verdict": True, "analysis": "modular"},
           "config": {"method": method, "optimizer": method, "step_method": "backprop", "seed": seed, "lr": 0.02,
                      "dataset": "markov" if lm else "digits", "phase": "debug", "scale": "quick", "run_id": d.name},
           "final": final, "provenance": {"git_commit": "abc", "git_dirty": False, "frozen": False}}
    (d / "metrics.json").write_text(json.dumps(doc))
    with (d / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "metric", "value"])
        for step in (10, 20, 30, 40):
            w.writerow([step, step // 20, "train_loss", test_loss * (1 + 1 / step)])
        w.writerow([20, 0, "val_acc", 0.85])
        w.writerow([40, 1, "val_acc", 0.92])
        w.writerow([40, 1, "val_loss", test_loss * 1.05])
    with (d / "layers.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "layer", "role", "metric", "value"])
        for step in (20, 40):
            for layer, role in enumerate(("input", "hidden", "output")):
                w.writerow([step, 0, layer, role, "grad_erank", 2.0 + layer])
            for k in M.NS_KS:
                w.writerow([step, 0, 1, "hidden", f"ns_orth_err@k={k}", 1.0 / k])
                w.writerow([step, 0, 1, "hidden", f"ns_angle@k={k}", 0.1 * k])


def _write_summary(root: Path, study: str, method: str, reference: str) -> None:
    doc = {"study": study, "method": method, "optimizer": method, "analysis": "modular",
           "verdict": {"method": "modular_sphere", "reference": reference, "metric": "test_loss", "bar": 1.0,
                       "direction": "down"}, "primary": {"metric": "test_loss", "direction": "down"},
           "select": "val_loss", "lr_policy": "fixed", "lrs": [0.02], "search_seeds": [], "seeds": list(SEEDS),
           "points": [{"dataset": "digits", "point": {}, "selected_lr": 0.02, "select": "val_loss", "score": -1.0,
                       "failures": [], "lr_edge": None}], "published": CLAIMS}
    (root / "sweep" / study / method / "summary.json").write_text(json.dumps(doc))


def test_aggregate_and_report_on_a_tiny_tree(tmp_path: Path):
    root = tmp_path / "runs"
    for i, method in enumerate(("baseline_adamw", "modular_sphere", "modular_stiefel")):
        for seed in SEEDS:
            _write_run(root, "modular_gpt", method, seed, 2.0 + 0.1 * i + 0.01 * seed, lm=True)
        _write_summary(root, "modular_gpt", method, "baseline_adamw")
    # modular_ns and modular_presets are missing: skipped
    written = aggregate(root, tmp_path / "tables")
    for name in ("modular_results", "modular_verdict", "modular_lm", "modular_published", "modular_role_rank",
                 "modular_ns_recommend"):
        assert f"{name}.csv" in written
    verdict = pd.read_csv(written["modular_verdict.csv"])
    assert set(verdict["study"]) == {"modular_gpt"} and set(verdict["verdict"]) <= {"yes", "no", "inconclusive"}
    rec = pd.read_csv(written["modular_ns_recommend.csv"])
    assert rec["recommended_k"].tolist() == [M.recommend(np.array(M.NS_KS), 1.0 / np.array(M.NS_KS, dtype=float))]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nSTALE TEXT\n{END}\n")
    write_report(tmp_path / "tables", tmp_path / "figures", tmp_path / "results.md", readme)
    text = readme.read_text()
    assert "## Modular manifolds" in text and "The published claims beside ours" in text
    assert "costs 35% throughput" in text and "The GPT at step 20 and at the end" in text
    assert text.startswith("intro\n") and "STALE TEXT" not in text
