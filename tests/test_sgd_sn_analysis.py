"""The sgd_sn analysis beyond the core verdict: several verdict specs side by side, the
projection against plain SGD (``sn_vs_sgd``), memory advantages any stateless optimizer has,
wall-time advantages only beyond the spread over seeds, and the projected parameter roles.

A hand-written runs tree (the run-directory contract: ``runs/sweep/<study>/<method>/<run>`` and a
``summary.json`` per slice with its verdict spec); expectations are computed here by hand or
with numpy.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab.analysis.aggregate import aggregate, best_lr_table, load_runs, load_slices, read_table
from optlab.analysis.report import write_report
from optlab.analysis.studies.sgd_sn.report import advantages_text, answer_line, projection_lines, sn_vs_sgd_line
from optlab.analysis.studies.sgd_sn.tables import (
    difference_verdict,
    paired_difference_interval,
    sn_vs_sgd_table,
    verdict_table,
)

SEEDS = (0, 1, 2, 3)
# study -> (verdict spec, arch, sn_roles, methods)
STUDIES = {
    "alpha": ({"method": "sgd_sn", "reference": "adam", "bar": 0.95}, "mlp", ["input", "hidden", "output"],
              ("sgd", "adam", "sgd_sn")),
    "beta": ({"method": "sgd_sn", "reference": "sgd", "bar": 0.95}, "gpt", ["hidden"], ("sgd", "adam", "sgd_sn")),
    "gamma": ({"method": "sgd", "reference": "sgd", "bar": 0.95}, "mlp", None, ("sgd",)),  # a one-method study
    # the default spec of methods [sgd, adam] (last vs first): no projected method at all
    "delta": ({"method": "adam", "reference": "sgd", "bar": 0.95}, "mlp", None, ("sgd", "adam")),
}
# (study, method) -> per-seed test accuracy at LR 0.1 (validation accuracy = test accuracy - 0.01)
ACC = {
    ("alpha", "sgd_sn"): [0.90, 0.92, 0.91, 0.93], ("alpha", "sgd"): [0.85, 0.86, 0.88, 0.86],
    ("alpha", "adam"): [0.90, 0.91, 0.92, 0.90],
    ("beta", "sgd_sn"): [0.80, 0.82, 0.79, 0.81], ("beta", "sgd"): [0.81, 0.80, 0.80, 0.82],
    ("beta", "adam"): [0.82, 0.83, 0.81, 0.82],
    ("gamma", "sgd"): [0.70, 0.71, 0.72, 0.73],
    ("delta", "sgd"): [0.70, 0.71, 0.72, 0.73], ("delta", "adam"): [0.75, 0.76, 0.77, 0.78],
}
# sgd also tried LR 1.0: worse on validation, better on test (the selection must not see test)
SGD_LR1 = (0.50, 0.99)
WALL = {"sgd_sn": [1.0, 1.2, 1.1, 1.3], "adam": [1.15, 1.25, 1.05, 1.2], "sgd": [2.0, 2.0, 2.0, 2.0]}
STEP_MEM = {"adam": 12.0, "sgd": 9.0, "sgd_sn": 10.0}


def _run(root: Path, study: str, method: str, lr: float, seed: int, val: float, test: float) -> None:
    _, arch, roles, _ = STUDIES[study]
    d = root / "sweep" / study / method / f"{method}-d2-lr{lr}-s{seed}"
    d.mkdir(parents=True)
    config = {"optimizer": method, "method": method, "lr": lr, "depth": 2, "dataset": "digits", "seed": seed,
              "study": study, "arch": arch, "n_classes": 10, "phase": "debug", "scale": "quick"}
    if method == "sgd_sn":
        config.update(sn_roles=roles, sn_mode="scale")
    final = {"val_acc": val, "test_acc": test, "wall_time_s": WALL[method][seed],
             "seconds_per_epoch": WALL[method][seed] / 10, "step_mem_mb": STEP_MEM[method],
             "sn_active_frac": 0.5 if method == "sgd_sn" else None}
    doc = {"run_id": d.name, "status": "completed", "failure": None, "config": config, "final": final,
           "sweep": {"study": study, "method": method, "role": "search", "point": {"depth": 2}, "select": "val_acc",
                     "verdict": True, "analysis": "sgd_sn"},
           "provenance": {"git_commit": "abc", "git_dirty": False, "frozen": False}}
    (d / "metrics.json").write_text(json.dumps(doc))


def make_tree(root: Path, studies=("alpha", "beta", "gamma")) -> Path:
    for study in studies:
        spec, _, _, methods = STUDIES[study]
        for method in methods:
            for seed in SEEDS:
                acc = ACC[(study, method)][seed]
                _run(root, study, method, 0.1, seed, acc - 0.01, acc)
                if method == "sgd":
                    _run(root, study, method, 1.0, seed, *SGD_LR1)
            summary = {"study": study, "method": method, "optimizer": method, "analysis": "sgd_sn", "verdict": spec,
                       "primary": {"metric": "test_acc", "direction": "up"}, "select": "val_acc",
                       "lrs": [0.1, 1.0] if method == "sgd" else [0.1], "search_seeds": list(SEEDS),
                       "seeds": list(SEEDS), "points": []}
            (root / "sweep" / study / method / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "runs")


def _one(df: pd.DataFrame, **kv) -> pd.Series:
    m = pd.Series(True, index=df.index)
    for k, v in kv.items():
        m &= df[k] == v
    assert m.sum() == 1, (kv, m.sum())
    return df[m].iloc[0]


def _verdict(root: Path, **kw) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    runs, _, _ = load_runs(root, series=False)
    slices = load_slices(root)
    best = best_lr_table(runs, slices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = verdict_table(runs, best, slices=slices, n_resamples=2000, **kw)
    return runs, best, v


# ---------------------------------------------------------------- several verdict specs


def test_verdict_with_a_second_spec_and_a_self_comparison(root: Path) -> None:
    """alpha (sgd_sn vs adam), beta (sgd_sn vs sgd) and gamma (a one-method study whose default
    spec compares sgd with itself: its columns would be named twice, which made pd.concat raise
    InvalidIndexError). gamma is left out with a warning; alpha and beta keep their own columns."""
    runs, _, _ = load_runs(root, series=False)
    slices = load_slices(root)
    with pytest.warns(UserWarning, match="gamma: the verdict compares sgd with itself"):
        v = verdict_table(runs, slices=slices, n_resamples=2000)
    assert sorted(v["study"]) == ["alpha", "beta"] and v.columns.is_unique
    a, b = _one(v, study="alpha"), _one(v, study="beta")
    assert (a["reference"], b["reference"]) == ("adam", "sgd")
    assert a["adam_test_acc"] == pytest.approx(np.mean(ACC[("alpha", "adam")])) and pd.isna(b["adam_test_acc"])
    assert b["sgd_test_acc"] == pytest.approx(np.mean(ACC[("beta", "sgd")])) and pd.isna(a["sgd_test_acc"])
    assert b["sgd_lr"] == 0.1  # selected on validation (LR 1.0 has the better test accuracy)


def test_aggregate_and_report_with_two_specs(root: Path, tmp_path: Path) -> None:
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aggregate(root, tables)
    manifest = json.loads((tables / "analyses.json").read_text())["analyses"]
    assert "sn_vs_sgd" in manifest[0]["tables"]
    figures.mkdir()
    text = write_report(tables, figures, tmp_path / "results.md")
    assert "**The questions** (the studies' verdict specs differ):" in text
    assert "- alpha: Can vanilla SGD" in text and "95% of Adam's test accuracy" in text
    assert "- beta: Can vanilla SGD" in text and "95% of sgd's test accuracy" in text
    assert "#### sgd_sn vs Adam" in text and "#### sgd_sn vs sgd" in text
    assert "### Does the projection add anything over plain SGD?" in text
    assert "[sn_vs_sgd.csv](tables/sn_vs_sgd.csv)" in text
    d = read_table(tables / "sn_vs_sgd.csv")
    assert sorted(d["study"]) == ["alpha", "beta"]


def test_report_with_a_verdict_between_unprojected_methods(tmp_path: Path) -> None:
    """delta compares adam with sgd: its question does not speak of the projection, and it has no
    sn_vs_sgd row (there is no projection to compare with plain SGD)."""
    root = make_tree(tmp_path / "runs", studies=("alpha", "delta"))
    runs, best, v = _verdict(root)
    assert sorted(v["study"]) == ["alpha", "delta"] and v.columns.is_unique
    assert list(sn_vs_sgd_table(runs, best, v)["study"]) == ["alpha"]
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    aggregate(root, tables)
    figures.mkdir()
    text = write_report(tables, figures, tmp_path / "results.md")
    assert "- delta: Does `adam` reach at least 95% of sgd's test accuracy while winning on wall time" in text
    assert "- alpha: Can vanilla SGD with strict spectral normalization after every step (`sgd_sn`" in text


# ---------------------------------------------------------------- the projection against plain SGD


def test_paired_difference_interval_by_hand() -> None:
    a = pd.Series({0: 0.9, 1: 0.8, 2: 0.7, 5: 0.1})
    b = pd.Series({0: 0.8, 1: 0.8, 2: 0.6, 7: 0.5})  # seeds 5 and 7 have no partner
    d = paired_difference_interval(a, b, n_resamples=4000)
    diffs = np.array([0.1, 0.0, 0.1])
    assert d["n"] == 3 and d["diff"] == pytest.approx(diffs.mean())
    assert (d["method_mean"], d["reference_mean"]) == pytest.approx((0.8, 2.2 / 3))
    assert d["median"] == pytest.approx(0.1) and d["q25"] == pytest.approx(0.05)
    # with 3 pairs the expanded interval is the range of the per-seed differences
    assert (d["lo"], d["hi"]) == pytest.approx((0.0, 0.1))
    two = paired_difference_interval([0.5, 0.7], [0.4, 0.4], n_resamples=2000)
    assert (two["lo"], two["hi"]) == pytest.approx((0.1, 0.3))
    one = paired_difference_interval([0.5], [0.4])
    assert np.isnan(one["lo"]) and one["reason"] == "fewer than 2 paired seeds"


def test_difference_verdict_is_inconclusive_when_the_interval_contains_zero() -> None:
    assert difference_verdict(0.01, 0.05) == "better" and difference_verdict(-0.05, -0.01) == "worse"
    assert difference_verdict(-0.01, 0.05) == "inconclusive" and difference_verdict(0.0, 0.05) == "inconclusive"
    assert difference_verdict(0.0, 0.0) == "inconclusive" and difference_verdict(float("nan"), 1.0) == "inconclusive"
    # lower is better (a loss): an interval below 0 is an improvement
    assert difference_verdict(-0.3, -0.1, "down") == "better" and difference_verdict(0.1, 0.3, "down") == "worse"


def test_sn_vs_sgd_table(root: Path) -> None:
    runs, best, v = _verdict(root)
    d = sn_vs_sgd_table(runs, best, v, n_resamples=4000)
    assert sorted(d["study"]) == ["alpha", "beta"] and set(d["method"]) == {"sgd_sn"}
    a = _one(d, study="alpha")
    diffs = np.subtract(ACC[("alpha", "sgd_sn")], ACC[("alpha", "sgd")])  # 0.05 0.06 0.03 0.07
    assert (a["method_lr"], a["sgd_lr"], a["n_pairs"]) == (0.1, 0.1, 4)  # sgd's own selected LR, not LR 1.0
    assert a["diff"] == pytest.approx(diffs.mean()) and a["diff_median"] == pytest.approx(np.median(diffs))
    assert diffs.min() - 1e-12 <= a["diff_lo"] < a["diff"] < a["diff_hi"] <= diffs.max() + 1e-12
    assert a["verdict"] == "better" and not a["identical"]
    assert (a["mem_basis"], a["method_mem_mb"], a["sgd_mem_mb"]) == ("step", 10.0, 9.0)
    assert (a["method_wall_time_s"], a["sgd_wall_time_s"]) == pytest.approx((1.15, 2.0))
    b = _one(d, study="beta")
    diffs = np.subtract(ACC[("beta", "sgd_sn")], ACC[("beta", "sgd")])  # -0.01 0.02 -0.01 -0.01
    assert b["diff"] == pytest.approx(diffs.mean()) and b["diff_lo"] < 0 < b["diff_hi"]
    assert b["verdict"] == "inconclusive" and b["reason"] == "the interval contains 0"
    line = sn_vs_sgd_line(b)
    assert line.startswith("- **beta / digits, depth 2**: sgd_sn at LR 0.1, sgd at LR 0.1 (lowest tried); mean test accuracy "
                           "80.5% vs 80.8%")
    assert "difference -0.3 points" in line and "Verdict: **inconclusive** (the interval contains 0" in line
    assert "Verdict: **better** (the whole interval is above 0: sgd_sn is better)." in sn_vs_sgd_line(a)


def test_sn_vs_sgd_identical_runs(root: Path) -> None:
    """Where the projection never acted at the same LR, the projected runs are plain SGD runs:
    a zero difference on every seed is reported as such, and inconclusive."""
    for mdir in (root / "sweep" / "alpha" / "sgd_sn").iterdir():
        if mdir.is_dir():
            doc = json.loads((mdir / "metrics.json").read_text())
            seed = doc["config"]["seed"]
            doc["final"].update(test_acc=ACC[("alpha", "sgd")][seed], sn_active_frac=0.0)
            (mdir / "metrics.json").write_text(json.dumps(doc))
    runs, best, v = _verdict(root)
    a = _one(sn_vs_sgd_table(runs, best, v), study="alpha")
    assert a["identical"] and a["diff"] == 0.0 and (a["diff_lo"], a["diff_hi"]) == (0.0, 0.0)
    assert a["verdict"] == "inconclusive"
    line = sn_vs_sgd_line(a)
    assert "difference 0.0 points" in line and "here sgd_sn ran as plain SGD (the projection never acted)" in line


# ---------------------------------------------------------------- advantages


def test_memory_advantage_any_stateless_optimizer_has(root: Path) -> None:
    _, _, v = _verdict(root)
    a = _one(v, study="alpha")  # sgd_sn 10 MB < adam 12 MB, and plain sgd (9 MB) is below adam too
    assert a["mem_lower"] == "sgd_sn" and a["plain_sgd_mem_mb"] == 9.0 and bool(a["memory_stateless"])
    assert a["advantages"] == "memory" and a["answer"] == "yes"
    assert advantages_text(a) == "memory (any stateless optimizer: plain sgd has it too)"
    line = answer_line(a)
    assert "sgd_sn won on" not in line and "No advantage of its own held." in line
    assert ("Memory advantage of any stateless optimizer (plain sgd has it too): peak training-step memory "
            "(10 MB vs 12 MB; plain sgd 9 MB).") in line
    b = _one(v, study="beta")  # the reference is plain sgd itself: nothing to label
    assert pd.isna(b["plain_sgd_mem_mb"]) and not bool(b["memory_stateless"]) and b["mem_lower"] == "sgd"


def test_wall_time_counts_only_beyond_the_spread(root: Path) -> None:
    _, _, v = _verdict(root)
    a = _one(v, study="alpha")
    # medians 1.15 (sgd_sn) < 1.175 (adam), but the bands median ± MAD, 1.05-1.25 and 1.125-1.225, overlap
    assert (a["sgd_sn_wall_time_s"], a["adam_wall_time_s"]) == pytest.approx((1.15, 1.175))
    assert (a["sgd_sn_wall_time_s_mad"], a["adam_wall_time_s_mad"]) == pytest.approx((0.1, 0.05))
    assert a["time_lower"] == "tie" and a["epoch_time_lower"] == "tie" and "wall_time" not in a["advantages"]
    assert ("Within the timing spread over seeds (median ± MAD bands overlap): wall time (1.15 s vs 1.175 s)"
            in answer_line(a))
    b = _one(v, study="beta")  # 1.05-1.25 against plain sgd's constant 2 s: beyond the spread
    assert b["time_lower"] == "sgd_sn" and b["advantages"].startswith("wall_time seconds_per_epoch")


# ---------------------------------------------------------------- what is projected


def test_report_names_the_projected_roles(root: Path) -> None:
    runs, _, _ = load_runs(root, series=False)
    lines = projection_lines(runs)
    assert "- alpha (arch mlp): every weight matrix: `input` (input layer), `hidden` (hidden layers), `output` (output layer)." in lines
    assert ("- beta (arch gpt): `hidden` (attention and MLP matrices) only; not `input` (token and position "
            "embeddings) or `output` (LM head).") in lines
    assert lines[0].startswith("**What is projected.**")


# ---------------------------------------------------------------- strictness, budgets, LM references


def _patch_final(root: Path, study: str, method: str, fn) -> None:
    for p in sorted((root / "sweep" / study / method).glob("*/metrics.json")):
        doc = json.loads(p.read_text())
        doc["final"].update(fn(doc["config"]["seed"]))
        p.write_text(json.dumps(doc))


def test_verdict_reports_violations_and_unflattened_curves(root: Path) -> None:
    _patch_final(root, "alpha", "sgd_sn", lambda s: {"sn_violations": s, "sigma_max_max": 1 + 0.001 * s,
                                                     "sn_strict": False, "val_last_change": 0.001})
    _patch_final(root, "alpha", "adam", lambda s: {"val_last_change": 0.02 + 0.01 * s})
    _, _, v = _verdict(root)
    a = _one(v, study="alpha")
    assert a["sgd_sn_sn_violations"] == 0 + 1 + 2 + 3 and a["sgd_sn_sigma_max_max"] == pytest.approx(1.003)
    assert a["sgd_sn_sn_strict"] is False or a["sgd_sn_sn_strict"] == False  # noqa: E712
    assert a["adam_val_last_change"] == pytest.approx(0.035) and a["sgd_sn_val_last_change"] == pytest.approx(0.001)
    line = answer_line(a)
    assert ("sgd_sn used a projection labeled not strict (an estimate of σ): 6 layer-checks exceeded σ = 1 + 1e-4 in "
            "its selected runs; the largest σ_max any check saw was 1.0030, so there the method was not strictly "
            "normalized.") in line
    assert ("Last-epoch change of validation accuracy: sgd_sn +0.1 points, Adam +3.5 points; Adam had not flattened "
            "(beyond 0.5 points), so a longer budget may change the ratio.") in line
    b = _one(v, study="beta")  # nothing recorded: no sentence
    assert "layer-check" not in answer_line(b) and "Last-epoch change" not in answer_line(b)


def test_lm_reference_sentence() -> None:
    from optlab.analysis.studies.sgd_sn.report import lm_reference_text

    row = {"task": "lm", "sgd_sn_test_bits": 3.8, "adam_test_bits": 2.9, "entropy_floor_bits": 2.26,
           "ngram_order": 2, "ngram_test_bits": 2.41, "ngram_test_acc": 0.437}
    s = lm_reference_text(row, "sgd_sn", "adam")
    assert s == (" Reference: test bits per token sgd_sn 3.80, Adam 2.90; the data's entropy rate (floor) 2.26; an "
                 "order-2 count model of the training split 2.41 bits and 43.7% next-token accuracy. Both models are "
                 "above the count model's bits: they are undertrained at this budget.")
    assert "undertrained" not in lm_reference_text({**row, "adam_test_bits": 2.3}, "sgd_sn", "adam")
    assert lm_reference_text({**row, "task": "classification"}, "sgd_sn", "adam") == ""


def test_mode_lines_name_the_verdict_mode_and_the_ablation_numbers() -> None:
    from optlab.analysis.studies.sgd_sn.report import mode_lines

    runs = pd.DataFrame([
        {"kind": "sweep", "method": "sgd_sn", "optimizer": "sgd_sn", "sn_mode": "clip_sv", "in_verdict": True},
        {"kind": "sweep", "method": "sgd_sn_scale", "optimizer": "sgd_sn", "sn_mode": "scale", "in_verdict": True},
        {"kind": "sweep", "method": "sgd_sn", "optimizer": "sgd_sn", "sn_mode": "normalize", "in_verdict": False},
    ])
    ab = pd.DataFrame([
        {"optimizer": "sgd_sn", "arch": "mlp", "depth": 8, "sn_mode": m, "lr": lr, "test_acc_mean": acc}
        for m, lr, acc in (("clip_sv", 0.01, 0.822), ("scale", 0.01, 0.643), ("normalize", 0.01, 0.643),
                           ("clip_sv", 0.1, 0.908), ("scale", 0.1, 0.184))
    ] + [{"optimizer": "sgd", "arch": "mlp", "depth": 8, "sn_mode": None, "lr": 0.01, "test_acc_mean": 0.85}])
    text = mode_lines(runs, ab, ["sgd_sn"])[0]
    assert text.startswith("**Which projection answers it.** The verdict's projected runs use `clip_sv` (singular "
                           "values above 1 set to 1, the rest untouched).")  # not sgd_sn_scale's mode, not a cost study's
    assert ("The ablation (MLP, depth 8) compares the modes at one configuration: mean test accuracy at LR 0.01: "
            "clip_sv 82.2%, scale 64.3%, normalize 64.3%; at LR 0.1: clip_sv 90.8%, scale 18.4%.") in text
    assert mode_lines(runs.iloc[0:0], ab) == []
