"""Analysis core: tables, figures and report from a hand-written runs/ tree with known values.

The tree follows the run-directory contract (``runs/sweep/<study>/<method>/<run_id>``, ``method``
in config, long ``layers.csv``, a ``summary.json`` per slice with its verdict spec and LR grid);
an older tree (no sweep key, wide layers, no summaries) is read too. Expectations are computed
here by hand or with numpy.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab.analysis.aggregate import (
    aggregate,
    best_lr_table,
    divergence_table,
    load_runs,
    load_slices,
    lr_edge,
    markdown_table,
    wide_layers,
)
from optlab.analysis.report import END, START, write_report
from optlab.analysis.studies.sgd_sn.tables import depth_tolerance_table, verdict_table

STUDY = "sgd_sn_depth"
# (method, depth, lr, seed) -> (status, val_acc, test_acc); None = NaN.
# adam d4: lr 0.1 has the better TEST accuracy but lr 0.01 the better VALIDATION accuracy.
# adam d16 lr 0.1 seed 1 failed; sgd_sn d16 lr 0.1 seed 1 diverged at step 37.
# sgd_sn d16 selects lr 0.01 (val 0.125 > 0.1) whose test mean 0.1125 is < chance + 2 points.
RUNS = {
    ("adam", 4, 0.01, 0): ("completed", 0.90, 0.86),
    ("adam", 4, 0.01, 1): ("completed", 0.92, 0.84),
    ("adam", 4, 0.1, 0): ("completed", 0.88, 0.97),
    ("adam", 4, 0.1, 1): ("completed", 0.90, 0.95),
    ("adam", 16, 0.01, 0): ("completed", 0.80, 0.79),
    ("adam", 16, 0.01, 1): ("completed", 0.82, 0.81),
    ("adam", 16, 0.1, 0): ("completed", 0.85, 0.90),
    ("adam", 16, 0.1, 1): ("failed", None, None),
    ("sgd_sn", 4, 0.01, 0): ("completed", 0.70, 0.69),
    ("sgd_sn", 4, 0.01, 1): ("completed", 0.72, 0.73),
    ("sgd_sn", 4, 0.1, 0): ("completed", 0.88, 0.87),
    ("sgd_sn", 4, 0.1, 1): ("completed", 0.86, 0.81),
    ("sgd_sn", 16, 0.01, 0): ("completed", 0.13, 0.115),
    ("sgd_sn", 16, 0.01, 1): ("completed", 0.12, 0.11),
    ("sgd_sn", 16, 0.1, 0): ("completed", 0.20, 0.20),
    ("sgd_sn", 16, 0.1, 1): ("diverged", None, None),
}
# the LR grid each slice declares in summary.json: sgd_sn's also has 1.0 (so 0.1 is not its edge)
LRS = {"adam": [0.1, 0.01], "sgd_sn": [1.0, 0.1, 0.01]}
SPEC = {"method": "sgd_sn", "reference": "adam", "metric": "test_acc", "bar": 0.95}
WALL = {"adam": 1.0, "sgd_sn": 2.0, "sgd": 1.5}
MEM = {"adam": 120.0, "sgd_sn": 100.0, "sgd": 90.0}
DIVERGED_STEP = 37
EPOCHS, STEPS_PER_EPOCH = 3, 10


def _run_id(opt: str, depth: int, lr: float, seed: int) -> str:
    return f"{opt}-d{depth}-lr{lr}-s{seed}"


def write_run(run_dir: Path, opt: str, depth: int, lr: float, seed: int, status: str,
              val: float | None, test: float | None, *, legacy: bool = False) -> None:
    """One run directory; ``legacy``: the format before the contract (no sweep key, wide layers)."""
    run_dir.mkdir(parents=True)
    diverged = status == "diverged"
    final = {
        "train_loss": None if val is None else 1.0 - val, "val_loss": None if val is None else 1.2 - val,
        "val_acc": val, "best_val_acc": val, "test_loss": None if test is None else 1.1 - test, "test_acc": test,
        "wall_time_s": WALL[opt], "peak_mem_mb": MEM[opt], "steps": DIVERGED_STEP if diverged else 30,
        "epochs_completed": 3 if status == "completed" else 0, "sigma_max_max": 1.0 if opt == "sgd_sn" else 3.0,
        "sn_violations": 0 if opt == "sgd_sn" else None, "sn_active_frac": 0.5 if opt == "sgd_sn" else None,
    }
    config = {"optimizer": opt, "lr": lr, "depth": depth, "width": 64, "dataset": "mnist", "seed": seed,
              "study": STUDY, "phase": "debug", "scale": "quick", "arch": "mlp"}
    metrics = {
        "run_id": run_dir.name, "status": status,
        "diverged_step": DIVERGED_STEP if diverged else None, "diverge_reason": "nonfinite" if diverged else None,
        "error": "RuntimeError: boom" if status == "failed" else None,
        "config": config, "final": final,
        "provenance": {"git_commit": "abc", "git_dirty": False, "frozen": False},
    }
    if not legacy:
        config.update(method=opt, step_method="backprop", probes={"grad_norm": {"every": 10}, "sigma_max": {"every": 10}})
        metrics["sweep"] = {"study": STUDY, "method": opt, "role": "search", "point": {"depth": depth},
                            "select": "val_acc", "verdict": True, "analysis": "sgd_sn"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if status == "failed":
        return  # a failed run may leave no curves/layers: tolerated
    last_step = DIVERGED_STEP if diverged else EPOCHS * STEPS_PER_EPOCH
    scale = 1.0 + 0.1 * seed + (0.5 if opt == "sgd_sn" else 0.0)
    with (run_dir / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "metric", "value"])
        for step in range(5, last_step + 1, 5):
            w.writerow([step, (step - 1) // STEPS_PER_EPOCH, "train_loss", scale / step])
        if diverged:
            w.writerow([DIVERGED_STEP, 3, "train_loss", "nan"])
        for e in range(last_step // STEPS_PER_EPOCH):
            s = (e + 1) * STEPS_PER_EPOCH
            w.writerow([s, e, "epoch_train_loss", scale / (e + 1)])
            w.writerow([s, e, "val_loss", 1.5 * scale / (e + 1)])
            w.writerow([s, e, "val_acc", 0.5 + 0.1 * e])
    rows = []  # (step, epoch, layer, role, grad_norm, sigma_max)
    for step in range(10, last_step + 1, 10):
        for layer in range(depth + 2):
            role = "input" if layer == 0 else "output" if layer == depth + 1 else "hidden"
            sig = 1.0 if opt == "sgd_sn" else 1.0 + step / 10 + layer / 10
            rows.append((step, (step - 1) // STEPS_PER_EPOCH, layer, role, scale * 0.5**layer, sig))
    if diverged:
        rows += [(DIVERGED_STEP, 3, layer, "hidden", "inf", "nan") for layer in range(depth + 2)]
    with (run_dir / "layers.csv").open("w", newline="") as f:
        w = csv.writer(f)
        if legacy:
            w.writerow(["step", "epoch", "layer", "role", "grad_norm", "sigma_max"])
            w.writerows(rows)
        else:
            w.writerow(["step", "epoch", "layer", "role", "metric", "value"])
            for step, epoch, layer, role, g, s in rows:
                w.writerow([step, epoch, layer, role, "grad_norm", g])
                w.writerow([step, epoch, layer, role, "sigma_max", s])
                w.writerow([step, epoch, layer, role, "effective_rank", 3.0])  # a probe the analysis does not know


def write_summary(root: Path, opt: str, runs: dict) -> None:
    best = best_lr_table(load_runs(root, series=False)[0])
    points = []
    for depth in sorted({d for (o, d, _, _) in runs if o == opt}):
        row = best[(best["method"] == opt) & (best["depth"] == depth)].iloc[0]
        points.append({"dataset": "mnist", "point": {"depth": depth}, "selected_lr": float(row["lr"]),
                       "select": "val_acc", "score": float(row["val_score"]), "failures": [], "lr_edge": None})
    doc = {"study": STUDY, "method": opt, "optimizer": opt, "analysis": "sgd_sn", "verdict": SPEC,
           "primary": {"metric": "test_acc", "direction": "up"}, "select": "val_acc", "lrs": LRS[opt],
           "search_seeds": [0, 1], "seeds": [0, 1], "points": points}
    (root / "sweep" / STUDY / opt / "summary.json").write_text(json.dumps(doc))


def make_tree(root: Path, runs: dict = RUNS, headline: bool = True, *, legacy: bool = False,
              summaries: bool = True) -> Path:
    for (opt, depth, lr, seed), (status, val, test) in runs.items():
        where = root / "sweep" / opt if legacy else root / "sweep" / STUDY / opt
        write_run(where / _run_id(opt, depth, lr, seed), opt, depth, lr, seed, status, val, test, legacy=legacy)
    if summaries and not legacy:
        for opt in sorted({o for (o, *_) in runs if o in LRS}):
            write_summary(root, opt, runs)
    if headline:
        write_run(root / "train", "adam", 4, 0.01, 0, "completed", 0.95, 0.99, legacy=True)
    return root


@pytest.fixture()
def runs_root(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "runs")


def _row(df: pd.DataFrame, **kv) -> pd.Series:
    mask = np.ones(len(df), dtype=bool)
    for k, v in kv.items():
        mask &= (df[k] == v).to_numpy(dtype=bool)
    assert mask.sum() == 1, (kv, mask.sum())
    return df[mask].iloc[0]


def _tests(opt: str, depth: int, lr: float) -> np.ndarray:
    return np.array([RUNS[(opt, depth, lr, s)][2] for s in (0, 1) if RUNS[(opt, depth, lr, s)][0] == "completed"])


# ---------------------------------------------------------------- loading


def test_load_runs_frames(runs_root: Path) -> None:
    runs, curves, layers = load_runs(runs_root)
    assert len(runs) == len(RUNS) + 1
    assert set(runs["status"]) == {"completed", "diverged", "failed"}
    head = _row(runs, kind="headline")
    assert head["run_dir"] == "runs/train" and head["test_acc"] == 0.99 and head["method"] == "adam"
    div = _row(runs, status="diverged")
    assert div["diverged_step"] == DIVERGED_STEP and div["diverge_reason"] == "nonfinite"
    assert math.isnan(div["test_acc"]) and div["method"] == "sgd_sn" and div["depth"] == 16
    assert (div["step_method"], div["analysis"], div["probes_sigma_max_every"]) == ("backprop", "sgd_sn", 10)
    assert {"width", "arch", "wall_time_s", "sigma_max_max", "frozen"} <= set(runs.columns)
    assert not runs["frozen"].any()
    # curves/layers carry the run's identity; the failed run has none (tolerated)
    assert {"run_dir", "run_id", "method", "optimizer", "depth", "lr", "seed"} <= set(curves.columns)
    failed_dir = _row(runs, status="failed")["run_dir"]
    assert failed_dir not in set(curves["run_dir"]) and failed_dir not in set(layers["run_dir"])
    one = curves[(curves["run_dir"] == head["run_dir"]) & (curves["metric"] == "val_acc")]
    assert one["value"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert (one["method"] == "adam").all() and (one["lr"] == 0.01).all()
    # layers are long; the wide view pivots the metrics the plots need
    lay = layers[layers["run_dir"] == div["run_dir"]]
    assert set(lay["metric"]) == {"grad_norm", "sigma_max", "effective_rank"}
    wide = wide_layers(lay, ("grad_norm", "sigma_max"))
    assert wide["layer"].max() == 17 and np.isinf(wide["grad_norm"]).any()
    assert len(wide) == (DIVERGED_STEP // 10 + 1) * 18  # checks at 10, 20, 30 and the diverged step 37
    # the headline run writes the old wide layers: read as long, pivoted back to the same numbers
    hl = wide_layers(layers[layers["run_dir"] == "runs/train"], ("grad_norm", "sigma_max"))
    first = hl[(hl["step"] == 10) & (hl["layer"] == 1)].iloc[0]
    assert (first["grad_norm"], first["sigma_max"]) == pytest.approx((0.5, 2.1))


def test_load_runs_empty_root(tmp_path: Path) -> None:
    runs, curves, layers = load_runs(tmp_path)
    assert runs.empty and curves.empty and layers.empty
    assert {"status", "method", "optimizer", "lr"} <= set(runs.columns)
    assert best_lr_table(runs).empty and divergence_table(runs).empty


def test_slice_summaries_carry_the_verdict_spec(runs_root: Path) -> None:
    slices = {s.method: s for s in load_slices(runs_root)}
    sn = slices["sgd_sn"]
    assert (sn.study, sn.analysis, sn.in_verdict, sn.lrs) == (STUDY, "sgd_sn", True, (1.0, 0.1, 0.01))
    spec = sn.verdict
    assert (spec.method, spec.reference, spec.metric, spec.bar, spec.direction) == ("sgd_sn", "adam", "test_acc", 0.95, "up")


# ---------------------------------------------------------------- tables


def test_best_lr_selects_on_validation_not_test(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    best = best_lr_table(runs, load_slices(runs_root))
    assert len(best) == 4  # 2 methods x 2 depths
    chosen = {(r.method, int(r.depth)): r.lr for r in best.itertuples()}
    # adam d4: lr 0.1 has the higher test accuracy (0.96 vs 0.85) but lower validation accuracy
    assert chosen == {("adam", 4): 0.01, ("adam", 16): 0.01, ("sgd_sn", 4): 0.1, ("sgd_sn", 16): 0.01}
    for (opt, depth), lr in chosen.items():
        row = _row(best, method=opt, depth=depth)
        t = _tests(opt, depth, lr)
        assert row["test_acc_mean"] == pytest.approx(np.mean(t))
        assert row["test_acc_std"] == pytest.approx(np.std(t, ddof=1))
        assert row["test_acc_min"] == pytest.approx(t.min()) and row["test_acc_max"] == pytest.approx(t.max())
        q25, med, q75 = np.percentile(t, [25, 50, 75])
        assert (row["test_acc_median"], row["test_acc_q25"], row["test_acc_q75"]) == pytest.approx((med, q25, q75))
        assert (row["primary_metric"], row["primary_median"]) == ("test_acc", pytest.approx(med))
        vals = [RUNS[(opt, depth, lr, s)][1] for s in (0, 1)]
        assert row["val_acc_mean"] == pytest.approx(np.mean(vals))
        assert row["n_seeds"] == 2 and row["wall_time_s_mean"] == WALL[opt] and not row["frozen"]
        assert row["optimizer"] == opt and row["analysis"] == "sgd_sn"
    # the headline run (adam d4 lr 0.01 seed 0) is not counted as a third seed
    assert _row(best, method="adam", depth=4)["seeds"] == "0 1"


def test_lr_edge_from_the_declared_grid(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root, series=False)
    best = best_lr_table(runs, load_slices(runs_root))
    # summary.json grids: adam [0.1, 0.01] (0.01 is its lowest), sgd_sn [1, 0.1, 0.01] (0.1 is inside)
    assert _row(best, method="adam", depth=4)["lr_edge"] == "low"
    assert pd.isna(_row(best, method="sgd_sn", depth=4)["lr_edge"]) and _row(best, method="sgd_sn", depth=4)["n_lrs"] == 3
    assert _row(best, method="sgd_sn", depth=16)["lr_edge"] == "low"
    # without summaries the runs' LRs are the grid: 0.1 is then sgd_sn's highest
    assert _row(best_lr_table(runs), method="sgd_sn", depth=4)["lr_edge"] == "high"
    assert lr_edge(0.3, [0.3]) is None and lr_edge(0.3, [1.0, 0.3, 0.1]) is None
    assert (lr_edge(1.0, [1.0, 0.1]), lr_edge(0.1, [1.0, 0.1])) == ("high", "low")


def test_diverged_counts_as_zero_in_selection(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    best = best_lr_table(runs)
    # sgd_sn d16: lr 0.1 has the best single validation accuracy (0.20) but one diverged seed
    row = _row(best, method="sgd_sn", depth=16)
    assert row["lr"] == 0.01 and row["val_score"] == pytest.approx(0.125)
    # if the diverged seed had not diverged, lr 0.1 would win: the selection must see it as 0
    runs2 = runs.copy()
    mask = runs2["status"] == "diverged"
    runs2.loc[mask, ["status", "val_acc", "test_acc"]] = ["completed", 0.2, 0.2]
    assert _row(best_lr_table(runs2), method="sgd_sn", depth=16)["lr"] == 0.1


def test_verdict_interval_matches_hand_computation(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    v = verdict_table(runs, slices=load_slices(runs_root))
    assert sorted(v["depth"].tolist()) == [4, 16]
    for depth, sn_lr, adam_lr in ((4, 0.1, 0.01), (16, 0.01, 0.01)):
        row = _row(v, depth=depth)
        sn, ad = _tests("sgd_sn", depth, sn_lr), _tests("adam", depth, adam_lr)
        assert row["ratio_of_means"] == pytest.approx(sn.mean() / ad.mean())
        per_seed = sn / ad
        assert row["ratio_median"] == pytest.approx(np.median(per_seed))
        assert row["ratio_q25"] == pytest.approx(np.percentile(per_seed, 25))
        assert row["ratio_q75"] == pytest.approx(np.percentile(per_seed, 75))
        # 2 pairs: the 95% interval is the range of the per-seed ratios
        assert (row["ratio_lo"], row["ratio_hi"]) == pytest.approx((per_seed.min(), per_seed.max()))
        assert row["n_pairs"] == 2 and (row["method"], row["reference"], row["bar"]) == ("sgd_sn", "adam", 0.95)
        assert row["time_lower"] == "adam" and row["mem_lower"] == "sgd_sn"
        assert row["sgd_sn_test_acc_median"] == pytest.approx(np.median(sn))
    assert _row(v, depth=4)["ratio_of_means"] == pytest.approx(0.84 / 0.85)
    d4, d16 = _row(v, depth=4), _row(v, depth=16)
    assert (d4["reaches_bar"], d4["answer"]) == ("yes", "yes")  # both per-seed ratios above 95%, less memory
    assert (d16["reaches_bar"], d16["answer"]) == ("no", "no")


def test_verdict_needs_both_methods(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    assert verdict_table(runs[runs["method"] != "adam"]).empty


def test_depth_tolerance(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    tol = depth_tolerance_table(runs)
    adam, sn = _row(tol, method="adam"), _row(tol, method="sgd_sn")
    assert adam["deepest_trainable"] == 16  # best LR at d16 completed on both seeds, 80% >> 12%
    assert adam["n_runs"] == 8 and adam["n_failed"] == 1 and adam["n_diverged"] == 0
    assert sn["deepest_trainable"] == 4  # d16 best LR completed but 11.25% < chance + 2 points
    assert sn["depths_trained"] == "4" and sn["n_diverged"] == 1 and sn["chance"] == pytest.approx(0.1)


def test_depth_tolerance_requires_all_seeds_completed(tmp_path: Path) -> None:
    runs = dict(RUNS)
    runs[("adam", 16, 0.01, 1)] = ("diverged", None, None)  # now lr 0.01 score 0.40 < lr 0.1 score 0.425
    runs[("adam", 16, 0.1, 1)] = ("diverged", None, None)
    frame, _, _ = load_runs(make_tree(tmp_path / "runs", runs, headline=False))
    best = best_lr_table(frame)
    assert _row(best, method="adam", depth=16)["lr"] == 0.1
    assert _row(depth_tolerance_table(frame, best), method="adam")["deepest_trainable"] == 4


def test_legacy_tree_is_read(tmp_path: Path) -> None:
    """Runs without the sweep key, method or summaries, and wide layers.csv files."""
    root = make_tree(tmp_path / "runs", legacy=True)
    runs, _, layers = load_runs(root)
    sw = runs[runs["kind"] == "sweep"]
    assert (sw["method"] == sw["optimizer"]).all() and set(sw["point"]) == {"depth=4", "depth=16"}
    assert sw["analysis"].isna().all()  # unlabelled: the claiming analysis (sgd_sn) takes them in aggregate
    assert set(layers["metric"]) == {"grad_norm", "sigma_max"}
    files = aggregate(root, tmp_path / "tables")
    out = pd.read_csv(files["runs.csv"])
    assert (out["analysis"] == "sgd_sn").all()
    v = pd.read_csv(files["verdict.csv"])
    assert sorted(v["depth"]) == [4, 16] and _row(v, depth=4)["ratio_of_means"] == pytest.approx(0.84 / 0.85)


def test_aggregate_writes_tables(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    files = aggregate(runs_root, out)
    for name in ("runs.csv", "best_lr.csv", "best_lr.md", "verdict.csv", "verdict.md", "depth_tolerance.csv",
                 "depth_tolerance.md", "divergence.csv", "divergence.md", "depth_to_failure.csv", "ablation.csv",
                 "context.csv", "analyses.json"):
        assert files[name] == out / name and (out / name).stat().st_size > 0
    manifest = json.loads((out / "analyses.json").read_text())["analyses"]
    assert [(a["name"], a["studies"], a["registered"]) for a in manifest] == [("sgd_sn", [STUDY], True)]
    assert set(manifest[0]["tables"]) == {"verdict", "depth_to_failure", "ablation", "depth_tolerance", "context"}
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == len(RUNS) + 1  # every run kept, diverged and failed included
    assert _row(runs, status="diverged")["diverged_step"] == DIVERGED_STEP
    div = pd.read_csv(out / "divergence.csv")
    assert sorted(div["status"]) == ["diverged", "failed"]
    d = _row(div, status="diverged")
    assert (d["method"], d["depth"], d["lr"], d["seed"], d["diverged_step"], d["diverge_reason"]) == (
        "sgd_sn", 16, 0.1, 1, DIVERGED_STEP, "nonfinite")
    assert "RuntimeError" in _row(div, status="failed")["error"]
    md = (out / "divergence.md").read_text()
    assert "| sgd_sn-d16-lr0.1-s1 |" in md and "| 37 |" in md
    best_md = (out / "best_lr.md").read_text().splitlines()
    assert best_md[0].startswith("| study | dataset | method | depth | point | analysis | optimizer | lr | lr_edge |")
    assert len(best_md) == 2 + 4
    assert "85.0%" in (out / "best_lr.md").read_text()  # adam d4 test mean 0.85 as a percentage


def test_markdown_table_format() -> None:
    df = pd.DataFrame({"name": ["a|b", None], "lr": [0.0031623, 1.0], "test_acc": [0.8512, float("nan")],
                       "depth": pd.array([4, None], dtype="Int64"), "ok": [True, False]})
    assert markdown_table(df).splitlines() == [
        "| name | lr | test_acc | depth | ok |",
        "| --- | --- | --- | --- | --- |",
        "| a\\|b | 0.003162 | 85.1% | 4 | yes |",
        "| n/a | 1 | n/a | n/a | no |",
    ]
    assert markdown_table(df.iloc[0:0]) == "_(none)_"


# ---------------------------------------------------------------- figures

FIGS = [f"loss_curves_{STUDY}.png", "accuracy_vs_depth.png", "grad_ratio_vs_depth.png", "grad_norm_vs_layer.png",
        "sigma_max.png", "headline_curves.png"]


def test_plot_all_with_an_all_diverged_method(tmp_path: Path) -> None:
    from optlab.analysis.plots import plot_all

    runs = dict(RUNS)
    for depth in (4, 16):
        for lr in (0.01, 0.1):
            for seed in (0, 1):
                runs[("sgd", depth, lr, seed)] = ("diverged", None, None)
    root = make_tree(tmp_path / "runs", runs)
    out = tmp_path / "figures"
    with pytest.warns(UserWarning, match="ablation.png skipped"):  # this tree has no ablation
        paths = plot_all(load_runs(root), out)  # the three frames (a root path is used below)
    assert sorted(p.name for p in paths) == sorted(FIGS)
    for p in paths:
        assert p.parent == out and p.stat().st_size > 10_000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_all_skips_what_is_missing(tmp_path: Path) -> None:
    from optlab.analysis.plots import plot_all

    runs = {k: ("diverged", None, None) for k in RUNS}
    root = make_tree(tmp_path / "runs", runs, headline=False)
    for p in root.rglob("layers.csv"):
        p.unlink()
    out = tmp_path / "figures"
    out.mkdir()
    (out / "headline_curves.png").write_bytes(b"stale")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plot_all(root, out)
    names = {p.name for p in paths}
    assert "accuracy_vs_depth.png" in names  # diverged configurations are still shown
    assert "grad_norm_vs_layer.png" not in names and "sigma_max.png" not in names
    assert "grad_ratio_vs_depth.png" not in names and "ablation.png" not in names
    assert not (out / "headline_curves.png").exists()  # stale figure removed
    assert any("headline_curves.png skipped" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="skipped"):
        assert plot_all(load_runs(tmp_path / "nothing"), tmp_path / "f3") == []


# ---------------------------------------------------------------- report


README = "# optlab\n\nIntro text.\n\n## Results\n\n" + START + "\nold results\n" + END + "\n\nFooter.\n"


def _report_tree(tmp_path: Path) -> tuple[Path, Path]:
    root = make_tree(tmp_path / "runs")
    tables, figures = tmp_path / "reports" / "tables", tmp_path / "reports" / "figures"
    aggregate(root, tables)
    figures.mkdir(parents=True)
    (figures / "accuracy_vs_depth.png").write_bytes(b"png")  # only existence matters to the report
    return tables, figures


def test_write_report_and_readme_section(tmp_path: Path) -> None:
    tables, figures = _report_tree(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out_md = tmp_path / "reports" / "results.md"
    text = write_report(tables, figures, out_md, readme)
    assert out_md.read_text() == text
    assert "](figures/accuracy_vs_depth.png)" in text and "loss_curves" not in text
    assert text.startswith("## Vanilla SGD + Spectral Norm: back to basics\n")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    per_seed = np.array([0.87 / 0.86, 0.81 / 0.84])
    q25, med, q75 = (pct(x) for x in np.percentile(per_seed, [25, 50, 75]))
    assert (f"- **{STUDY} / mnist, depth 4**: sgd_sn reached {pct(0.84 / 0.85)} of Adam's mean test accuracy "
            f"(84.0% vs 85.0%, means over 2 paired seeds), 95% interval {pct(per_seed.min())}–{pct(per_seed.max())}; "
            f"per-seed ratio median {med}, IQR {q25}–{q75}; medians (IQR) sgd_sn 84.0% (82.5%–85.5%), "
            "Adam 85.0% (84.5%–85.5%). Reaches the 95% bar: the whole interval is at or above it. "
            "Adam's selected LR 0.01 is the lowest it tried (after extending the grid past that edge up to the study's lr_extend limit), so a better one may lie beyond it. "
            "sgd_sn won on: peak CUDA memory (100 MB vs 120 MB). "
            "Adam won on: wall time (2 s vs 1 s), deepest trainable depth (4 vs 16). "
            "The projection changed the weights at 50.0% of steps. sgd_sn used its projection: no layer-check "
            "exceeded σ = 1 + 1e-4 in its selected runs; the largest σ_max any check saw was 1.0000. "
            "Answer: **yes**.") in text
    assert "| 0.01 (lowest tried) |" in text  # the verdict table's LR cell says it is at the grid's edge
    assert "Selected LR at the edge of the grid: adam at" in text
    # sgd_sn d16 at chance level (runs without the engine's `failure` key: the engine's rule applied)
    assert f"network per optimizer, {STUDY} / mnist (depth tried: 4, 16): adam 16; sgd_sn 4 (first failure at 16: chance)." in text
    assert "| sgd_sn | depth=16 | diverged | 1 | 0.1 | 37 | 37 | nonfinite |" in text
    assert "| adam | depth=16 | failed | 1 | 0.1 | n/a | n/a | RuntimeError |" in text
    assert "none of these runs are frozen (phase=debug)" in text
    assert "LRs searched with seeds 0, 1 (no reruns); 16 runs" in text and "datasets mnist" in text and "scale quick" in text
    assert "covers the true ratio only about 75% of the time" in text
    new = readme.read_text()
    before, after = README.split(START)[0], README.split(END)[1]
    assert new.startswith(before + START + "\n") and new.endswith(END + after)
    assert "old results" not in new
    assert "](reports/figures/accuracy_vs_depth.png)" in new
    inner = new.split(START)[1].split(END)[0]
    assert inner.strip() == text.replace("figures/accuracy", "reports/figures/accuracy").replace(
        "](tables/", "](reports/tables/").replace("from the tables in tables/", "from the tables in reports/tables/").strip()
    # idempotent: a second run gives the same README
    write_report(tables, figures, out_md, readme)
    assert readme.read_text() == new


def test_write_report_without_markers_fails_clearly(tmp_path: Path) -> None:
    tables, figures = _report_tree(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# optlab\n\nno markers here\n")
    with pytest.raises(ValueError, match="results:start"):
        write_report(tables, figures, tmp_path / "results.md", readme)
    assert readme.read_text() == "# optlab\n\nno markers here\n"
    readme.write_text(END + "\n" + START + "\n")
    with pytest.raises(ValueError, match="before"):
        write_report(tables, figures, tmp_path / "results.md", readme)
    (tables / "analyses.json").unlink()
    with pytest.raises(FileNotFoundError, match="analyses.json"):
        write_report(tables, figures, tmp_path / "results.md")


def test_edge_lines_name_edges_and_tasks_where_no_lr_trained() -> None:
    from optlab.analysis.report import edge_lines

    best = pd.DataFrame([
        {"study": "mlp_depth", "dataset": "digits", "point": "depth=32", "method": "adam", "lr": 0.0003,
         "lr_edge": "low", "n_seeds": 5, "n_vanishing": 0, "n_chance": 0},
        {"study": "mlp_depth", "dataset": "digits", "point": "depth=64", "method": "sgd", "lr": 0.1,
         "lr_edge": None, "n_seeds": 5, "n_vanishing": 3, "n_chance": 2},
        {"study": "mlp_depth", "dataset": "digits", "point": "depth=8", "method": "sgd", "lr": 0.1,
         "lr_edge": None, "n_seeds": 5, "n_vanishing": 4, "n_chance": 0},
    ])
    lines = edge_lines(best)
    assert lines[0] == "Selected LR at the edge of the grid: adam at mlp_depth / digits, depth 32 (0.0003, lowest)."
    assert lines[2].startswith("No LR tried trained") and "sgd at mlp_depth / digits, depth 64." in lines[2]
    assert "depth 8" not in lines[2]  # one of its five seeds trained
