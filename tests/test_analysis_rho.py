"""The rho study analysis (issue #11 item 2, study ``rho_digits``): its tables, figures and README
section, on a synthetic run tree in the engine's run-directory format (checked against one real
engine run), beside the SGD + spectral-norm tree of the core tests.
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab.analysis.aggregate import aggregate, read_table
from optlab.analysis.report import END, START, write_report
from optlab.analysis.studies import registry
from optlab.analysis.studies.rho import ANALYSIS, figures as rho_figures, tables as rho_tables

sys.path.insert(0, str(Path(__file__).parent))
import test_analysis as base  # noqa: E402  (the SN tree of the core tests)
from conftest import make_splits, one_thread_fixture  # noqa: E402

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)

STUDY = "rho_digits"
METHODS = {"rho_fixed_sgd": "fixed", "rho_capped_sgd": "capped", "rho_set_sgd": "set"}
LRS = (0.05, 0.5, 5.0)
SEEDS = (7, 0, 1, 2, 3, 4)
MULTI = (0, 1, 2, 3, 4)
EPOCHS, STEPS = 3, 2  # steps per epoch
DIVERGED_STEP = 2


def _acc(method: str, lr: float, seed: int) -> float:
    if METHODS[method] == "set":  # the LR is ignored: the same run at every LR
        return 0.90 + 0.011 * (seed % 5)
    return 0.80 + 0.013 * seed + 0.03 * LRS.index(lr) + 0.02 * list(METHODS).index(method)


def _final(method: str, lr: float, seed: int) -> dict:
    mode = METHODS[method]
    if mode == "fixed":
        peak, eta, frac = 0.3 * lr * (1 + 0.1 * seed), lr, 0.0
    elif mode == "capped":
        peak, eta = min(0.3 * lr * (1 + 0.1 * seed), 1.0), min(lr, 0.2 + 0.01 * seed)
        frac = 0.0 if lr == LRS[0] else 0.4 + 0.1 * (seed % 5)
    else:
        peak, eta, frac = 1.0, 0.2 + 0.01 * (seed % 5), 1.0
    return {"peak_r": peak, "mean_r": 0.8 * peak, "capped_frac": frac, "final_r_mean": 0.9 * peak,
            "final_eta_eff": eta, "final_capped_frac": frac}


def write_rho_run(root: Path, method: str, lr: float, seed: int, diverged: bool, study: str = STUDY) -> Path:
    """One run directory as the engine and the study slice write it (metrics.json, curves.csv, layers.csv)."""
    mode = METHODS[method]
    run = root / "sweep" / study / method / f"{method}-digits-base-lr{lr:g}-s{seed}"
    run.mkdir(parents=True)
    ctl = _final(method, lr, seed)
    final = {"steps": DIVERGED_STEP if diverged else EPOCHS * STEPS, "epochs_completed": 0 if diverged else EPOCHS,
             "wall_time_s": 1.0, "peak_mem_mb": None, "step_mem_mb": 0.1, "state_mem_mb": 0.01,
             "best_val_acc": None if diverged else 0.9, **ctl,
             "train_loss": None if diverged else 0.1, "val_loss": None if diverged else 0.2,
             "val_acc": None if diverged else _acc(method, lr, seed) + 0.01,
             "test_loss": None if diverged else 0.2, "test_acc": None if diverged else _acc(method, lr, seed)}
    if diverged:
        ctl_peak = 1e5 * lr * (1 + seed)  # measured on the way to the divergence
        final.update(peak_r=ctl_peak, mean_r=ctl_peak / 2, final_r_mean=ctl_peak / 2)
    options = {"mode": mode, "samples": "batch"} | ({} if mode == "fixed" else {"r_target": 1.0})
    metrics = {
        "run_id": run.name, "status": "diverged" if diverged else "completed",
        "diverged_step": DIVERGED_STEP if diverged else None, "diverge_reason": "exploding" if diverged else None,
        "error": None, "failure": "exploding" if diverged else None,
        "sweep": {"study": study, "method": method, "role": "confirm", "point": {}, "select": "val_acc",
                  "verdict": {"method": "rho_capped_sgd", "reference": "rho_fixed_sgd", "metric": "test_acc", "bar": 0.95},
                  "analysis": "rho"},
        "config": {"optimizer": "sgd", "optimizer_options": {}, "lr": lr, "step_method": "rho",
                   "method_options": options, "method": method, "probes": {"rho": {"every": 1}}, "arch": "mlp",
                   "depth": 1, "width": 128, "activation": "gelu", "init": "kaiming", "dataset": "digits",
                   "epochs": EPOCHS, "batch_size": 128, "seed": seed, "device": "cpu", "study": study,
                   "scale": "quick", "phase": "debug", "run_id": run.name},
        "final": final,
        "provenance": {"git_commit": "abc", "git_dirty": False, "frozen": False},
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (run / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "metric", "value"])
        for step in range(1, (DIVERGED_STEP if diverged else EPOCHS * STEPS) + 1):
            epoch = (step - 1) // STEPS
            r = (1e3 * step * lr) if diverged else ctl["peak_r"] * (0.5 + 0.5 * step / (EPOCHS * STEPS))
            eta = ctl["final_eta_eff"] * (1 + 0.1 * epoch)
            for key, v in (("tau", r * 0.1), ("rho", 0.1), ("r", r), ("eta_eff", eta),
                           ("capped", ctl["final_capped_frac"]), ("delta_a", 31.4)):
                w.writerow([step, epoch, key, v])
            if diverged and step == DIVERGED_STEP:
                w.writerow([step, epoch, "train_loss", 1e4])
            if not diverged and step % STEPS == 0:
                w.writerow([step, epoch, "train_loss", 1.0 / step])
                for key, v in (("epoch_train_loss", 1.0 / (epoch + 1)), ("val_acc", 0.5 + 0.1 * epoch),
                               ("epoch_r_mean", r * 0.8), ("epoch_r_max", r), ("epoch_eta_eff_mean", eta),
                               ("epoch_capped_frac", ctl["final_capped_frac"])):
                    w.writerow([step, epoch, key, v])
    (run / "layers.csv").write_text("step,epoch,layer,role,metric,value\n")
    return run


def make_rho_tree(root: Path, diverges=lambda method, lr, seed: METHODS[method] == "fixed" and lr == 5.0,
                  skip=()) -> Path:
    for method in METHODS:
        for lr in LRS:
            for seed in SEEDS:
                if (method, lr, seed) not in skip:
                    write_rho_run(root, method, lr, seed, diverges(method, lr, seed))
        doc = {"study": STUDY, "method": method, "optimizer": "sgd", "step_method": "rho", "analysis": "rho",
               "verdict": {"method": "rho_capped_sgd", "reference": "rho_fixed_sgd", "metric": "test_acc", "bar": 0.95},
               "primary": {"metric": "test_acc", "direction": "up"}, "select": "val_acc", "lr_policy": "fixed",
               "lrs": list(LRS), "search_seeds": [], "seeds": list(SEEDS),
               "points": [{"dataset": "digits", "point": {}, "selected_lr": 0.5, "select": "val_acc", "score": 0.9,
                           "failures": [], "lr_edge": None}]}
        (root / "sweep" / STUDY / method / "summary.json").write_text(json.dumps(doc))
    return root


def _aggregate(root: Path, out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aggregate(root, out)
    return out


def _row(df: pd.DataFrame, method: str, lr: float) -> pd.Series:
    g = df[(df["method"] == method) & np.isclose(df["lr"].astype(float), lr)]
    assert len(g) == 1, (method, lr, len(g))
    return g.iloc[0]


# ---------------------------------------------------------------- tables


def test_the_registry_holds_the_rho_analysis() -> None:
    reg = registry()
    assert reg["rho"] is not None and reg["rho"].title.startswith("Step-length control from the softmax")
    assert list(reg)[:2] == ["sgd_sn", "rho"] and not reg["rho"].claims_unlabelled
    assert {"sgd_sn", "rho", "rho_scan", "rho_phase", "rho_spike"} <= set(reg)  # other families add theirs


def test_single_seed_table_has_a_row_per_method_and_lr_and_keeps_diverged_runs(tmp_path: Path) -> None:
    tables = _aggregate(make_rho_tree(tmp_path / "runs"), tmp_path / "tables")
    manifest = json.loads((tables / "analyses.json").read_text())["analyses"]
    assert [(a["name"], a["studies"]) for a in manifest] == [("rho", [STUDY])]
    assert manifest[0]["tables"] == ["rho_digits", "rho_digits_seeds", "rho_verdict", "rho_references"]
    t = read_table(tables / "rho_digits.csv")
    assert len(t) == len(METHODS) * len(LRS) and set(t["seed"]) == {7}
    assert [(m, float(lr)) for m, lr in zip(t["method"], t["lr"])] == [(m, lr) for m in METHODS for lr in LRS]
    for method in METHODS:
        for lr in LRS:
            row = _row(t, method, lr)
            ctl = _final(method, lr, 7)
            assert row["mode"] == METHODS[method]
            if METHODS[method] == "fixed" and lr == 5.0:
                assert row["status"] == f"diverged (exploding, step {DIVERGED_STEP})"
                assert pd.isna(row["test_acc"]) and row["test accuracy"] == "diverged"
                assert row["peak_r"] == pytest.approx(1e5 * lr * 8)  # measured up to the divergence: kept
            else:
                assert row["status"] == "completed"
                assert row["test_acc"] == pytest.approx(_acc(method, lr, 7))
                assert row["peak_r"] == pytest.approx(ctl["peak_r"])
            assert row["final_eta_eff"] == pytest.approx(ctl["final_eta_eff"])
            assert row["final_capped_frac"] == pytest.approx(ctl["final_capped_frac"])
    md = (tables / "rho_digits.md").read_text()
    assert md.splitlines()[0] == ("| method | mode | lr | status | test accuracy | peak r | final mean eta_eff | "
                                  "final capped fraction |")
    assert f"| rho_fixed_sgd | fixed | 5 | diverged (exploding, step {DIVERGED_STEP}) | diverged |" in md
    assert f"| rho_capped_sgd | capped | 5 | completed | {100 * _acc('rho_capped_sgd', 5.0, 7):.1f}% |" in md


def test_a_missing_seed_7_run_is_a_row_marked_not_run(tmp_path: Path) -> None:
    root = make_rho_tree(tmp_path / "runs", skip={("rho_capped_sgd", 0.5, 7), ("rho_capped_sgd", 0.5, 3)})
    tables = _aggregate(root, tmp_path / "tables")
    row = _row(read_table(tables / "rho_digits.csv"), "rho_capped_sgd", 0.5)
    assert row["status"] == "not run" and row["test accuracy"] == "not run"
    s = _row(read_table(tables / "rho_digits_seeds.csv"), "rho_capped_sgd", 0.5)
    assert int(s["n_seeds"]) == 4 and rho_tables.text(s["missing_seeds"]) == "3" and s["runs"].endswith("seed 3 not run")


def test_seed_medians_and_iqr_match_numpy_percentile(tmp_path: Path) -> None:
    def diverges(method, lr, seed):
        return (METHODS[method] == "fixed" and lr == 5.0 and seed != 4) or (method, lr, seed) == ("rho_capped_sgd", 5.0, 2)

    tables = _aggregate(make_rho_tree(tmp_path / "runs", diverges), tmp_path / "tables")
    t = read_table(tables / "rho_digits_seeds.csv")
    assert len(t) == len(METHODS) * len(LRS) and set(t["seeds"]) == {"0 1 2 3 4"}
    for method in METHODS:
        for lr in LRS:
            row = _row(t, method, lr)
            div = [s for s in MULTI if diverges(method, lr, s)]
            done = [s for s in MULTI if s not in div]
            assert (row["n_seeds"], row["n_completed"], row["n_diverged"]) == (5, len(done), len(div))
            acc = np.array([_acc(method, lr, s) for s in done])
            q25, med, q75 = np.percentile(acc, [25, 50, 75])
            assert (row["test_acc_median"], row["test_acc_q25"], row["test_acc_q75"]) == pytest.approx((med, q25, q75))
            assert row["test_acc_n"] == len(done)
            # controller columns: every seed that recorded them, diverged ones included
            peak = np.array([1e5 * lr * (1 + s) if s in div else _final(method, lr, s)["peak_r"] for s in MULTI])
            assert (row["peak_r_q25"], row["peak_r_median"], row["peak_r_q75"]) == pytest.approx(
                tuple(np.percentile(peak, [25, 50, 75])))
            for col in ("final_eta_eff", "final_capped_frac"):
                v = np.array([_final(method, lr, s)[col] for s in MULTI])
                assert (row[f"{col}_q25"], row[f"{col}_median"], row[f"{col}_q75"]) == pytest.approx(
                    tuple(np.percentile(v, [25, 50, 75])))
    fixed5 = _row(t, "rho_fixed_sgd", 5.0)
    assert fixed5["runs"] == "1 of 5 completed, 4 diverged (exploding 4)"
    assert fixed5["test accuracy median [IQR]"].endswith("over 1 of 5")
    md = (tables / "rho_digits_seeds.md").read_text()
    assert "| rho_capped_sgd | capped | 5 | 0 1 2 3 4 | 4 of 5 completed, 1 diverged (exploding 1) |" in md


def test_an_all_diverged_configuration_reads_diverged(tmp_path: Path) -> None:
    tables = _aggregate(make_rho_tree(tmp_path / "runs"), tmp_path / "tables")
    row = _row(read_table(tables / "rho_digits_seeds.csv"), "rho_fixed_sgd", 5.0)
    assert row["runs"] == "0 of 5 completed, 5 diverged (exploding 5)"
    assert row["test accuracy median [IQR]"] == "diverged" and pd.isna(row["test_acc_median"])
    assert np.isfinite(row["peak_r_median"])


# ---------------------------------------------------------------- the section


def _sections(tmp_path: Path, with_rho: bool, diverges=None) -> tuple[str, str]:
    root = base.make_tree(tmp_path / "runs")
    if with_rho:
        make_rho_tree(root, diverges) if diverges else make_rho_tree(root)
    tables = _aggregate(root, tmp_path / "tables")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + START + "\nold\n" + END + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = write_report(tables, tmp_path / "figures", tmp_path / "results.md", readme)
    return text, readme.read_text()


def test_the_section_is_written_from_the_tables_and_the_sn_section_is_untouched(tmp_path: Path) -> None:
    sn_only, _ = _sections(tmp_path / "a", with_rho=False)
    text, readme = _sections(tmp_path / "b", with_rho=True)
    head = "## Step-length control from the softmax convergence radius (rho)"
    assert head in text and text.index("## Vanilla SGD + Spectral Norm") < text.index(head)
    assert text.split(head)[0].rstrip("\n") == sn_only.rstrip("\n")  # the SN section, byte for byte
    assert text.strip() in readme
    rho = text.split(head)[1]
    tables = tmp_path / "b" / "tables"
    for name in ("rho_digits", "rho_digits_seeds"):  # the README's tables are the .md files
        assert (tables / f"{name}.md").read_text().strip() in rho
    assert "- **Seed 7**: fixed SGD at the largest LR (5) diverged (exploding, step 2); every capped run completed" in rho
    assert "**Agrees** with the claim." in rho
    assert "- **Seeds 0–4**: fixed SGD at LR 5 diverged in 5 of 5 seeds; capped SGD diverged in 0 of 15 runs" in rho
    assert "**Agrees** with the claim in every seed." in rho
    assert "no step exceeded r_target" in rho and "identical in every column for the single seed" in rho
    assert "75/25 stratified" in rho and "Initialization: `kaiming`" in rho
    assert "rho_digits" not in text.split(head)[0]


def test_the_section_says_where_the_runs_do_not_agree(tmp_path: Path) -> None:
    def diverges(method, lr, seed):
        return (METHODS[method] == "fixed" and lr == 5.0 and seed != 4) or (method, lr, seed) == ("rho_capped_sgd", 5.0, 2)

    text, _ = _sections(tmp_path, with_rho=True, diverges=diverges)
    rho = text.split("## Step-length control")[1]
    assert "**Agrees** with the claim." in rho  # seed 7 still does
    assert ("fixed SGD at LR 5 diverged in 4 of 5 seeds; capped SGD diverged in 1 of 15 runs" in rho
            and "**Does not agree**: capped SGD diverged in 1 runs." in rho)


# ---------------------------------------------------------------- figures


def test_the_figures_are_drawn(tmp_path: Path) -> None:
    from optlab.analysis.plots import plot_all

    root = make_rho_tree(tmp_path / "runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = {p.name for p in plot_all(root, tmp_path / "figures", analyses={"rho": ANALYSIS})}
    assert {"rho_digits_curves.png", "rho_digits_control.png", "loss_curves_rho_digits.png"} <= names
    # the manifest stage `track` logs the figures from: each drawn figure and the studies it shows
    manifest = json.loads((tmp_path / "figures" / "figures.json").read_text())
    assert set(manifest) == names
    assert manifest["rho_digits_control.png"] == ["rho_digits"] == manifest["loss_curves_rho_digits.png"]


def test_a_figure_belongs_to_the_longest_study_name_in_it() -> None:
    from optlab.analysis.plots import figure_studies

    studies = ["gpt", "gpt_context", "rho_cap_gpt", "mlp_depth"]
    assert figure_studies("rho_cap_gpt_control.png", studies) == ["rho_cap_gpt"]
    assert figure_studies("loss_curves_gpt_context.png", studies) == ["gpt_context"]
    assert figure_studies("loss_curves_gpt.png", studies) == ["gpt"]
    assert figure_studies("memory_vs_context.png", studies) == studies  # no study named: all of them
    assert figure_studies("gptx.png", ["gpt"]) == ["gpt"]  # fallback, not a match on a prefix
    assert figure_studies("a_gptx_b.png", ["gpt", "mlp"]) == ["gpt", "mlp"]


def test_per_epoch_controller_values_fall_back_to_the_steps_of_a_diverged_epoch(tmp_path: Path) -> None:
    from optlab.analysis.aggregate import load_runs

    root = make_rho_tree(tmp_path / "runs")
    runs, series, _ = load_runs(root)
    runs = runs.assign(mode=[rho_tables.run_mode(r) for r in runs.to_dict("records")],
                       r_target=[rho_tables.run_r_target(r) for r in runs.to_dict("records")])
    ep = rho_figures.epoch_frame(runs, series[series["metric"].isin(rho_figures.WANTED)])
    div = ep[(ep["method"] == "rho_fixed_sgd") & (ep["lr"] == 5.0) & (ep["seed"] == 7)]
    assert len(div) == 1 and bool(div["from_steps"].iloc[0]) and div["epoch"].iloc[0] == 1
    assert div["r_max"].iloc[0] == pytest.approx(1e3 * DIVERGED_STEP * 5.0)
    ok = ep[(ep["method"] == "rho_capped_sgd") & (ep["lr"] == 0.5) & (ep["seed"] == 7)]
    assert len(ok) == EPOCHS and not ok["from_steps"].any()
    d = rho_figures.diverged_epochs(runs[runs["study"] == STUDY], series)
    assert len(d) == len(SEEDS) and set(d["epoch"]) == {1}


# ---------------------------------------------------------------- the engine's format


def test_a_real_engine_run_reads_into_the_table(tmp_path: Path) -> None:
    from optlab import engine
    from optlab.config import RunConfig
    from optlab.methods.rho import RhoOptions

    assert rho_tables.R_TARGET_DEFAULT == RhoOptions().r_target
    root = tmp_path / "runs"
    out = root / "sweep" / STUDY / "rho_capped_sgd" / "rho_capped_sgd-toy-base-lr5-s7"
    cfg = RunConfig(optimizer="sgd", lr=5.0, depth=1, width=8, epochs=2, batch_size=32, log_every=3, device="cpu",
                    step_method="rho", method_options={"mode": "capped", "r_target": 1.0}, probes={"rho": {"every": 1}},
                    seed=7, study=STUDY, method="rho_capped_sgd")
    res = engine.train(cfg, data=make_splits(n_train=96, n_val=32, n_test=32), progress=False, run_dir=out,
                       sweep={"study": STUDY, "method": "rho_capped_sgd", "role": "confirm", "point": {},
                              "select": "val_acc", "verdict": True, "analysis": "rho"})
    assert res.status == "completed"
    tables = _aggregate(root, tmp_path / "tables")
    row = _row(read_table(tables / "rho_digits.csv"), "rho_capped_sgd", 5.0)
    assert row["mode"] == "capped" and row["r_target"] == 1.0 and row["samples"] == "batch"
    for col in ("test_acc", "peak_r", "final_eta_eff", "final_capped_frac", "capped_frac"):
        assert row[col] == pytest.approx(res.final[col])
    from optlab.analysis.aggregate import load_runs

    runs, series, _ = load_runs(root)
    runs = runs.assign(mode="capped", r_target=1.0)
    ep = rho_figures.epoch_frame(runs, series[series["metric"].isin(rho_figures.WANTED)])
    assert len(ep) == 2 and not ep["from_steps"].any() and ep["eta_eff"].notna().all()
    assert ep["r_max"].max() == pytest.approx(res.final["peak_r"])


def test_an_overflowed_peak_r_is_read_from_the_steps_and_kept_as_inf(tmp_path: Path) -> None:
    root = make_rho_tree(tmp_path / "runs")
    for seed in (7, 0):  # as the engine writes a run whose r overflowed: peak_r null, inf in the step rows
        run = root / "sweep" / STUDY / "rho_fixed_sgd" / f"rho_fixed_sgd-digits-base-lr5-s{seed}"
        m = json.loads((run / "metrics.json").read_text())
        m["final"].update(peak_r=None, mean_r=None, final_r_mean=None)
        (run / "metrics.json").write_text(json.dumps(m))
        with (run / "curves.csv").open("a", newline="") as f:
            csv.writer(f).writerows([[DIVERGED_STEP + 1, 0, "r", "inf"], [DIVERGED_STEP + 2, 0, "r", "nan"]])
    tables = _aggregate(root, tmp_path / "tables")
    row = _row(read_table(tables / "rho_digits.csv"), "rho_fixed_sgd", 5.0)
    assert row["peak_r"] == np.inf and row["peak_r_source"] == "steps"
    assert f"| rho_fixed_sgd | fixed | 5 | diverged (exploding, step {DIVERGED_STEP}) | diverged | inf |" in (
        tables / "rho_digits.md").read_text()
    s = _row(read_table(tables / "rho_digits_seeds.csv"), "rho_fixed_sgd", 5.0)
    peaks = sorted([1e5 * 5.0 * (1 + sd) for sd in MULTI if sd != 0])  # 4 finite, seed 0 inf
    assert s["peak_r_n"] == 5 and s["peak_r_from_steps"] == 1  # the inf counts: it is the largest of the five
    assert (s["peak_r_q25"], s["peak_r_median"], s["peak_r_q75"]) == pytest.approx(
        tuple(np.percentile(peaks + [1e300], [25, 50, 75])))


def test_spread_is_the_stats_spread_and_treats_inf_as_the_largest_value() -> None:
    from optlab import stats

    x = np.array([0.3, 0.1, np.nan, 0.7, 0.2])
    assert rho_tables.spread(x) == stats.spread(x)
    s = rho_tables.spread(np.array([1.0, 2.0, 3.0, 4.0, np.inf]))  # positions 1, 2, 3 of 0..4: no inf reached
    assert (s.q25, s.median, s.q75, s.n) == (2.0, 3.0, 4.0, 5)
    s = rho_tables.spread(np.array([3.0, np.inf, np.inf]))
    assert (s.q25, s.median, s.q75) == (np.inf, np.inf, np.inf)
