"""Analysis layer: tables, figures and report from a hand-written runs/ tree with known values."""

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
    depth_tolerance_table,
    divergence_table,
    load_runs,
    markdown_table,
    verdict_table,
)
from optlab.analysis.report import END, START, write_report

# (optimizer, depth, lr, seed) -> (status, val_acc, test_acc); None = NaN.
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
WALL = {"adam": 1.0, "sgd_sn": 2.0, "sgd": 1.5}
MEM = {"adam": 120.0, "sgd_sn": 100.0, "sgd": 90.0}
DIVERGED_STEP = 37
EPOCHS, STEPS_PER_EPOCH = 3, 10


def _run_id(opt: str, depth: int, lr: float, seed: int) -> str:
    return f"{opt}-d{depth}-lr{lr}-s{seed}"


def write_run(run_dir: Path, opt: str, depth: int, lr: float, seed: int, status: str,
              val: float | None, test: float | None) -> None:
    run_dir.mkdir(parents=True)
    diverged = status == "diverged"
    final = {
        "train_loss": None if val is None else 1.0 - val, "val_loss": None if val is None else 1.2 - val,
        "val_acc": val, "best_val_acc": val, "test_loss": None if test is None else 1.1 - test, "test_acc": test,
        "wall_time_s": WALL[opt], "peak_mem_mb": MEM[opt], "steps": DIVERGED_STEP if diverged else 30,
        "epochs_completed": 3 if status == "completed" else 0, "sigma_max_max": 1.0 if opt == "sgd_sn" else 3.0,
        "sn_violations": 0 if opt == "sgd_sn" else None,
    }
    metrics = {
        "run_id": run_dir.name, "status": status,
        "diverged_step": DIVERGED_STEP if diverged else None, "diverge_reason": "nonfinite" if diverged else None,
        "error": "RuntimeError: boom" if status == "failed" else None,
        "config": {"optimizer": opt, "lr": lr, "depth": depth, "width": 64, "dataset": "mnist", "seed": seed,
                   "study": "sgd_sn_depth", "phase": "debug", "scale": "quick", "arch": "mlp"},
        "final": final,
        "provenance": {"git_commit": "abc", "git_dirty": False, "frozen": False},
    }
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
    with (run_dir / "layers.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "layer", "role", "grad_norm", "sigma_max"])
        for step in range(10, last_step + 1, 10):
            for layer in range(depth + 2):
                role = "input" if layer == 0 else "output" if layer == depth + 1 else "hidden"
                sig = 1.0 if opt == "sgd_sn" else 1.0 + step / 10 + layer / 10
                w.writerow([step, (step - 1) // STEPS_PER_EPOCH, layer, role, scale * 0.5**layer, sig])
        if diverged:
            for layer in range(depth + 2):
                w.writerow([DIVERGED_STEP, 3, layer, "hidden", "inf", "nan"])


def make_tree(root: Path, runs: dict = RUNS, headline: bool = True) -> Path:
    for (opt, depth, lr, seed), (status, val, test) in runs.items():
        write_run(root / "sweep" / opt / _run_id(opt, depth, lr, seed), opt, depth, lr, seed, status, val, test)
    if headline:
        write_run(root / "train", "adam", 4, 0.01, 0, "completed", 0.95, 0.99)
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
    assert head["run_dir"] == "runs/train" and head["test_acc"] == 0.99
    div = _row(runs, status="diverged")
    assert div["diverged_step"] == DIVERGED_STEP and div["diverge_reason"] == "nonfinite"
    assert math.isnan(div["test_acc"]) and div["optimizer"] == "sgd_sn" and div["depth"] == 16
    assert {"width", "arch", "wall_time_s", "sigma_max_max", "frozen"} <= set(runs.columns)
    assert not runs["frozen"].any()
    # curves/layers carry the run's identity; the failed run has none (tolerated)
    assert {"run_dir", "run_id", "optimizer", "depth", "lr", "seed"} <= set(curves.columns)
    failed_dir = _row(runs, status="failed")["run_dir"]
    assert failed_dir not in set(curves["run_dir"]) and failed_dir not in set(layers["run_dir"])
    one = curves[(curves["run_dir"] == head["run_dir"]) & (curves["metric"] == "val_acc")]
    assert one["value"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert (one["optimizer"] == "adam").all() and (one["lr"] == 0.01).all()
    lay = layers[layers["run_dir"] == div["run_dir"]]
    assert lay["layer"].max() == 17 and np.isinf(lay["grad_norm"]).any()


def test_load_runs_empty_root(tmp_path: Path) -> None:
    runs, curves, layers = load_runs(tmp_path)
    assert runs.empty and curves.empty and layers.empty
    assert {"status", "optimizer", "lr"} <= set(runs.columns)
    assert best_lr_table(runs).empty and divergence_table(runs).empty


# ---------------------------------------------------------------- tables


def test_best_lr_selects_on_validation_not_test(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    best = best_lr_table(runs)
    assert len(best) == 4  # 2 optimizers x 2 depths
    chosen = {(r.optimizer, int(r.depth)): r.lr for r in best.itertuples()}
    # adam d4: lr 0.1 has the higher test accuracy (0.96 vs 0.85) but lower validation accuracy
    assert chosen == {("adam", 4): 0.01, ("adam", 16): 0.01, ("sgd_sn", 4): 0.1, ("sgd_sn", 16): 0.01}
    for (opt, depth), lr in chosen.items():
        row = _row(best, optimizer=opt, depth=depth)
        t = _tests(opt, depth, lr)
        assert row["test_acc_mean"] == pytest.approx(np.mean(t))
        assert row["test_acc_std"] == pytest.approx(np.std(t, ddof=1))
        assert row["test_acc_min"] == pytest.approx(t.min()) and row["test_acc_max"] == pytest.approx(t.max())
        vals = [RUNS[(opt, depth, lr, s)][1] for s in (0, 1)]
        assert row["val_acc_mean"] == pytest.approx(np.mean(vals))
        assert row["n_seeds"] == 2 and row["wall_time_s_mean"] == WALL[opt] and not row["frozen"]
    # the headline run (adam d4 lr 0.01 seed 0) is not counted as a third seed
    assert _row(best, optimizer="adam", depth=4)["seeds"] == "0 1"


def test_diverged_counts_as_zero_in_selection(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    best = best_lr_table(runs)
    # sgd_sn d16: lr 0.1 has the best single validation accuracy (0.20) but one diverged seed
    row = _row(best, optimizer="sgd_sn", depth=16)
    assert row["lr"] == 0.01 and row["val_score"] == pytest.approx(0.125)
    # if the diverged seed had not diverged, lr 0.1 would win: the selection must see it as 0
    runs2 = runs.copy()
    mask = runs2["status"] == "diverged"
    runs2.loc[mask, ["status", "val_acc", "test_acc"]] = ["completed", 0.2, 0.2]
    assert _row(best_lr_table(runs2), optimizer="sgd_sn", depth=16)["lr"] == 0.1


def test_verdict_ratio_matches_hand_computation(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    v = verdict_table(runs)
    assert sorted(v["depth"].tolist()) == [4, 16]
    for depth, sn_lr, adam_lr in ((4, 0.1, 0.01), (16, 0.01, 0.01)):
        row = _row(v, depth=depth)
        sn, ad = _tests("sgd_sn", depth, sn_lr), _tests("adam", depth, adam_lr)
        assert row["ratio_of_means"] == pytest.approx(sn.mean() / ad.mean())
        per_seed = sn / ad
        assert row["ratio_median"] == pytest.approx(np.median(per_seed))
        assert row["ratio_q25"] == pytest.approx(np.percentile(per_seed, 25))
        assert row["ratio_q75"] == pytest.approx(np.percentile(per_seed, 75))
        assert row["n_pairs"] == 2
        assert row["time_lower"] == "adam" and row["mem_lower"] == "sgd_sn"
    assert _row(v, depth=4)["ratio_of_means"] == pytest.approx(0.84 / 0.85)


def test_verdict_needs_both_optimizers(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    assert verdict_table(runs[runs["optimizer"] != "adam"]).empty


def test_depth_tolerance(runs_root: Path) -> None:
    runs, _, _ = load_runs(runs_root)
    tol = depth_tolerance_table(runs)
    adam, sn = _row(tol, optimizer="adam"), _row(tol, optimizer="sgd_sn")
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
    assert _row(best, optimizer="adam", depth=16)["lr"] == 0.1
    assert _row(depth_tolerance_table(frame, best), optimizer="adam")["deepest_trainable"] == 4


def test_aggregate_writes_tables(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    files = aggregate(runs_root, out)
    for name in ("runs.csv", "best_lr.csv", "best_lr.md", "verdict.csv", "verdict.md", "depth_tolerance.csv",
                 "depth_tolerance.md", "divergence.csv", "divergence.md"):
        assert files[name] == out / name and (out / name).stat().st_size > 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == len(RUNS) + 1  # every run kept, diverged and failed included
    assert _row(runs, status="diverged")["diverged_step"] == DIVERGED_STEP
    div = pd.read_csv(out / "divergence.csv")
    assert sorted(div["status"]) == ["diverged", "failed"]
    d = _row(div, status="diverged")
    assert (d["optimizer"], d["depth"], d["lr"], d["seed"], d["diverged_step"], d["diverge_reason"]) == (
        "sgd_sn", 16, 0.1, 1, DIVERGED_STEP, "nonfinite")
    assert "RuntimeError" in _row(div, status="failed")["error"]
    md = (out / "divergence.md").read_text()
    assert "| sgd_sn-d16-lr0.1-s1 |" in md and "| 37 |" in md
    best_md = (out / "best_lr.md").read_text().splitlines()
    assert best_md[0].startswith("| study | dataset | optimizer | depth | point | lr |") and len(best_md) == 2 + 4
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

# a tree without study directories: its one study is named by the runs' config (study: sgd_sn_depth)
FIGS = ["loss_curves_sgd_sn_depth.png", "accuracy_vs_depth.png", "grad_ratio_vs_depth.png", "grad_norm_vs_layer.png",
        "sigma_max.png", "headline_curves.png"]


def test_plot_all_with_an_all_diverged_optimizer(tmp_path: Path) -> None:
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
    ratio4 = f"{100 * 0.84 / 0.85:.1f}%"
    per_seed = np.array([0.87 / 0.86, 0.81 / 0.84])
    q25, med, q75 = (f"{100 * x:.1f}%" for x in np.percentile(per_seed, [25, 50, 75]))
    assert (f"- **sgd_sn_depth / mnist, depth 4**: sgd_sn reached {ratio4} of Adam's mean test accuracy (84.0% vs "
            f"85.0%); per-seed ratio median {med}, IQR {q25}–{q75} over 2 paired seeds (fewer than 3). "
            "At or above the 95% bar. sgd_sn won on: peak CUDA memory (100 MB vs 120 MB). "
            "Adam won on: wall time (2 s vs 1 s), deepest trainable depth (4 vs 16). Answer: **yes**.") in text
    # sgd_sn d16 at chance level (runs without the engine's `failure` key: the engine's rule applied)
    assert "network per optimizer, sgd_sn_depth / mnist (depth tried: 4, 16): adam 16; sgd_sn 4 (first failure at 16: chance)." in text
    assert "| sgd_sn | depth=16 | diverged | 1 | 0.1 | 37 | 37 | nonfinite |" in text
    assert "| adam | depth=16 | failed | 1 | 0.1 | n/a | n/a | RuntimeError |" in text
    assert "none of these runs are frozen (phase=debug)" in text
    assert "seeds 0, 1; 16 runs" in text and "datasets mnist" in text and "scale quick" in text
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
