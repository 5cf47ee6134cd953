"""The ``credit`` study analysis (issue #13) on synthetic run directories: medians and IQRs equal
pandas on the synthetic values, the published references sit beside ours and are compared with our
IQR, frozen runs are labeled, the notes page lists phases, commits and experiment IDs, and missing
studies (or probes) are skipped gracefully."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab.analysis.aggregate import aggregate
from optlab.analysis.report import END, START, write_report
from optlab.analysis.studies import credit as C

SEEDS = (42, 123, 456)
TOY_PUBLISHED = {"DFA, costate cosine / perturbation rho / nudging": "0.003 / 0.010 / -0.001",
                 "state bridge, costate cosine / perturbation rho / nudging": "0.941 / 0.927 / -0.335",
                 "credit bridge, costate cosine / perturbation rho / nudging": "0.942 / 0.929 / -0.334",
                 "setup": "toy LQ, 3 seeds, 8,000 steps"}
V1_PUBLISHED = {"credit bridge without terminal gradient matching, costate cosine": "about 0.03",
                "setup": "toy LQ, 3 seeds, 8,000 steps"}
MLP_PUBLISHED = {"CIFAR-10 flat MLP, test accuracy at epoch 30, BP": "about 59%",
                 "CIFAR-10 flat MLP, test accuracy at epoch 30, DFA": "about 28%"}
STEP = {"credit_bp": "credit_bp", "dfa": "dfa", "state_bridge": "state_bridge", "credit_bridge": "credit_bridge",
        "credit_bridge_no_tgm": "credit_bridge"}
COMMIT_DEV, COMMIT_FROZEN = "a1b2c3d4e5f6" + "0" * 28, "f00dfeedbeef" + "1" * 28


def _values(study: str, method: str, seed: int) -> dict[str, float]:
    """Deterministic, distinct per (study, method, seed) summary values."""
    rng = np.random.default_rng(zlib.crc32(f"{study}/{method}/{seed}".encode()))
    return {"costate_cos": float(rng.uniform(-0.2, 1.0)), "costate_rel_l2": float(rng.uniform(0, 2)),
            "costate_norm_ratio": float(rng.uniform(0.5, 2)), "perturb_rho": float(rng.uniform(-0.2, 1.0)),
            "nudge": float(rng.uniform(-0.4, 0.1)), "update_cos": float(rng.uniform(-0.2, 1.0)),
            "test_loss": float(rng.uniform(0.1, 5.0)), "wall_time_s": 1.0, "steps": 20}


def write_run(root: Path, study: str, method: str, dataset: str, seed: int, *, phase: str = "debug",
              commit: str = COMMIT_DEV, dirty: bool = False, status: str = "completed", lr: float = 0.01,
              final: dict | None = None, probes: bool = True) -> dict[str, float]:
    run_id = f"{method}-{dataset}-base-lr{lr:g}-s{seed}"
    d = root / "sweep" / study / method / run_id
    d.mkdir(parents=True, exist_ok=True)
    vals = dict(final if final is not None else _values(study, method, seed))
    if dataset != "lq":
        vals.setdefault("test_acc", float(0.5 + 0.4 * (zlib.crc32(f"{study}/{method}/{seed}/acc".encode()) % 1000) / 1000))
    frozen = phase == "frozen"
    if status != "completed":
        vals = {k: math.nan for k in vals}
    doc = {"run_id": run_id, "status": status, "diverged_step": 7 if status == "diverged" else None,
           "diverge_reason": "nonfinite" if status == "diverged" else None, "error": None, "failure": None,
           "sweep": {"study": study, "method": method, "role": "confirm", "point": {}, "select": "val_loss",
                     "verdict": False, "analysis": "credit"},
           "config": {"optimizer": "sgd", "lr": lr, "step_method": STEP[method], "method": method,
                      "method_options": {"term_grad_weight": 0.0 if method.endswith("no_tgm") else 1.0},
                      "arch": "lq" if dataset == "lq" else "mlp", "dataset": dataset, "seed": seed, "study": study,
                      "scale": "quick", "phase": phase, "frozen_commit": COMMIT_FROZEN if frozen else None,
                      "run_id": run_id},
           "final": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vals.items()},
           "provenance": {"git_commit": commit, "git_dirty": dirty, "frozen": frozen, "phase": phase,
                          "frozen_commit": COMMIT_FROZEN if frozen else None}}
    (d / "metrics.json").write_text(json.dumps(doc))
    if probes and status == "completed":
        curves = [(10, 0, "update_cos_mean", vals["update_cos"] - 0.3), (20, 1, "update_cos_mean", vals["update_cos"]),
                  (10, 0, "costate_cos_mean", vals["costate_cos"] - 0.1), (20, 1, "costate_cos_mean", vals["costate_cos"]),
                  (10, 0, "val_loss", 2.0), (20, 1, "val_loss", 1.0), (10, 0, "epoch_train_loss", 2.1),
                  (20, 1, "epoch_train_loss", 1.1)]
        if dataset != "lq":
            curves += [(10, 0, "val_acc", 0.4), (20, 1, "val_acc", 0.6)]
        if "bridge" in method:
            curves += [(s, 0, "bridge_loss", 10.0 / s) for s in range(1, 21)]
            curves += [(s, 0, "credit_blend", min(1.0, s / 4)) for s in range(1, 21)]
        pd.DataFrame(curves, columns=["step", "epoch", "metric", "value"]).to_csv(d / "curves.csv", index=False)
        rows = []
        for step in (10, 20):
            for layer in (0, 1):
                for m in C.METRICS:
                    v = vals[m] + (0.05 * layer if step == 20 else -0.5)
                    rows.append((step, step // 10 - 1, layer, "hidden", m, v))
        pd.DataFrame(rows, columns=["step", "epoch", "layer", "role", "metric", "value"]).to_csv(d / "layers.csv", index=False)
    return vals


def write_summary(root: Path, study: str, method: str, dataset: str, published: dict, lr: float = 0.01) -> None:
    doc = {"study": study, "method": method, "optimizer": "sgd", "step_method": STEP[method], "analysis": "credit",
           "verdict": False, "primary": {"metric": "test_loss", "direction": "down"}, "select": "val_loss",
           "lr_policy": "fixed", "lrs": [lr], "search_seeds": [], "seeds": list(SEEDS),
           "points": [{"dataset": dataset, "point": {}, "selected_lr": lr, "select": "val_loss", "failures": []}],
           "published": published}
    (root / "sweep" / study / method / "summary.json").write_text(json.dumps(doc))


def make_tree(root: Path, *, studies=("toy_lq_v1", "toy_lq_v2", "toy_lq_frozen", "credit_mlp"),
              diverged: tuple[str, str, int] | None = None) -> dict:
    """The four studies; returns {(study, method): [summary values of each completed seed]}."""
    out: dict = {}
    plan = {"toy_lq_v1": ("lq", ["credit_bridge_no_tgm"], V1_PUBLISHED, "debug", COMMIT_DEV),
            "toy_lq_v2": ("lq", ["credit_bp", "dfa", "state_bridge", "credit_bridge"], TOY_PUBLISHED, "debug", COMMIT_DEV),
            "toy_lq_frozen": ("lq", ["credit_bp", "dfa", "state_bridge", "credit_bridge"], TOY_PUBLISHED, "frozen",
                              COMMIT_FROZEN),
            "credit_mlp": ("digits", ["credit_bp", "dfa", "state_bridge", "credit_bridge"], MLP_PUBLISHED, "debug",
                           COMMIT_DEV)}
    for study in studies:
        dataset, methods, pub, phase, commit = plan[study]
        for method in methods:
            for seed in SEEDS:
                status = "diverged" if diverged == (study, method, seed) else "completed"
                v = write_run(root, study, method, dataset, seed, phase=phase, commit=commit, dirty=phase != "frozen",
                              status=status)
                if status == "completed":
                    out.setdefault((study, method), []).append(v)
            write_summary(root, study, method, dataset, pub)
    return out


ANALYSES = {"credit": C.ANALYSIS}


def _aggregate(tmp_path: Path, root: Path) -> Path:
    tables = tmp_path / "reports" / "tables"
    aggregate(root, tables, analyses=ANALYSES)
    return tables


def _row(df: pd.DataFrame, **kv) -> pd.Series:
    m = np.ones(len(df), dtype=bool)
    for k, v in kv.items():
        m &= (df[k] == v).to_numpy()
    assert m.sum() == 1, (kv, m.sum())
    return df[m].iloc[0]


def test_parse_published_names_methods_metrics_and_datasets():
    methods = {m: C.method_key(m) for m in C.METHOD_ORDER}
    p = C.parse_published("toy_lq_v2", TOY_PUBLISHED.items(), methods)
    r = _row(p, method="dfa", metric="nudge")
    assert r["value"] == pytest.approx(-0.001) and r["text"] == "-0.001" and r["setup"] == TOY_PUBLISHED["setup"]
    assert _row(p, method="state_bridge", metric="perturb_rho")["value"] == pytest.approx(0.927)
    assert _row(p, method="credit_bridge", metric="costate_cos")["value"] == pytest.approx(0.942)
    assert set(p["metric"]) == set(C.SCORED) and len(p) == 9 and p["dataset"].isna().all()
    # the longest method name wins: the ablation is not the credit bridge
    p1 = C.parse_published("toy_lq_v1", V1_PUBLISHED.items(), methods)
    assert p1["method"].tolist() == ["credit_bridge_no_tgm"] and p1["value"].tolist() == pytest.approx([0.03])
    # a dataset named in the label restricts the reference; percentages are fractions
    pm = C.parse_published("credit_mlp", MLP_PUBLISHED.items(), methods, ["digits"])
    assert pm["dataset"].tolist() == ["cifar10", "cifar10"] and pm["metric"].tolist() == ["test_acc", "test_acc"]
    assert dict(zip(pm["method"], pm["value"])) == pytest.approx({"credit_bp": 0.59, "dfa": 0.28})
    # a method named only by its step method and options
    assert C.method_key("cb0", "credit_bridge", 0.0) == "credit_bridge_no_tgm"
    assert C.where(0.5, 0.4, 0.6) == "inside our IQR" and C.where(0.1, 0.4, 0.6).endswith("(ours higher)")
    assert C.where(0.9, 0.4, 0.6).endswith("(ours lower)") and C.where(math.nan, 0, 1) == "n/a"


def test_costate_table_equals_pandas_with_published_beside(tmp_path: Path):
    root = tmp_path / "runs"
    vals = make_tree(root, diverged=("toy_lq_v2", "state_bridge", 123))
    tables = _aggregate(tmp_path, root)
    t = pd.read_csv(tables / "credit_costate.csv")
    assert set(zip(t["study"], t["method"])) == set(vals)
    for (study, method), vs in vals.items():
        r = _row(t, study=study, method=method)
        frame = pd.DataFrame(vs)
        for m in (*C.SCORED, "update_cos", "costate_rel_l2", "test_loss"):
            s = frame[m]
            assert r[f"{m}_median"] == pytest.approx(s.median()), (study, method, m)
            assert r[f"{m}_q25"] == pytest.approx(s.quantile(0.25))
            assert r[f"{m}_q75"] == pytest.approx(s.quantile(0.75))
            assert r[f"{m}_n"] == len(vs)
    # the diverged run is counted and left out of the spread
    sb = _row(t, study="toy_lq_v2", method="state_bridge")
    assert sb["n_runs"] == 3 and sb["n_completed"] == 2 and "2 of 3 completed" in sb["seeds"]
    # published references in labeled columns beside ours, compared with our IQR
    dfa = _row(t, study="toy_lq_v2", method="dfa")
    assert dfa["published_costate_cos"] == pytest.approx(0.003) and dfa["published_nudge"] == pytest.approx(-0.001)
    assert dfa["costate_cos_vs_published"] == C.where(0.003, dfa["costate_cos_q25"], dfa["costate_cos_q75"])
    assert _row(t, study="toy_lq_v1", method="credit_bridge_no_tgm")["published_costate_cos"] == pytest.approx(0.03)
    assert math.isnan(_row(t, study="toy_lq_v2", method="credit_bp")["published_costate_cos"])
    md = (tables / "credit_costate.md").read_text()
    header = md.splitlines()[0]
    assert header.index("costate cosine median [IQR]") < header.index("published costate cosine")
    assert "0.941" in md and "about 0.03" in md and "phase" in header
    # accuracy for the MLP, loss for the toy task
    mlp = _row(t, study="credit_mlp", method="dfa")
    accs = pd.Series([v["test_acc"] for v in vals[("credit_mlp", "dfa")]])
    assert mlp["test_acc_median"] == pytest.approx(accs.median())
    # the published table: one row per published number with our runs, the CIFAR-10 ones say they did not run
    pub = pd.read_csv(tables / "credit_published.csv")
    r = _row(pub, study="toy_lq_frozen", method="state_bridge", metric="perturbation rho")
    ref = _row(t, study="toy_lq_frozen", method="state_bridge")
    assert r["ours_median"] == pytest.approx(ref["perturb_rho_median"]) and r["published_value"] == pytest.approx(0.927)
    assert r["where"] == C.where(0.927, ref["perturb_rho_q25"], ref["perturb_rho_q75"])
    cifar = pub[pub["study"] == "credit_mlp"]
    assert len(cifar) == 2 and cifar["where"].str.contains("no runs").all()
    # update alignment: the first measurement's median over seeds equals pandas
    upd = pd.read_csv(tables / "credit_update.csv")
    u = _row(upd, study="toy_lq_v2", method="dfa")
    first = pd.Series([v["update_cos"] - 0.3 for v in vals[("toy_lq_v2", "dfa")]])
    assert u["update_cos_first_median"] == pytest.approx(first.median())
    assert u["update_cos_median"] == pytest.approx(dfa["update_cos_median"])
    # layers: the last measurement per layer
    lay = pd.read_csv(tables / "credit_layers.csv")
    l1 = _row(lay, study="toy_lq_v2", method="dfa", layer=1)
    assert l1["costate_cos_median"] == pytest.approx(pd.Series([v["costate_cos"] + 0.05 for v in vals[("toy_lq_v2", "dfa")]]).median())
    nud = [v["nudge"] + 0.05 for v in vals[("toy_lq_v2", "dfa")]]
    assert l1["n_positive_nudge"] == sum(x > 0 for x in nud)
    br = pd.read_csv(tables / "credit_bridge.csv")
    b = _row(br, study="toy_lq_v2", method="credit_bridge")
    assert b["bridge_loss_early_median"] == pytest.approx(np.median([10.0, 5.0])) and b["credit_blend_last_median"] == 1.0


def test_frozen_runs_are_labeled_and_the_notes_page_lists_phases(tmp_path: Path):
    from optlab.analysis.plots import plot_all

    root = tmp_path / "runs"
    make_tree(root)
    # one toy_lq_v1 seed rerun in pilot: its row is mixed
    write_run(root, "toy_lq_v1", "credit_bridge_no_tgm", "lq", 456, phase="pilot", commit="c0ffee" + "2" * 34)
    tables = _aggregate(tmp_path, root)
    t = pd.read_csv(tables / "credit_costate.csv")
    assert set(t.loc[t["study"] == "toy_lq_frozen", "phase"]) == {"frozen"}
    assert t.loc[t["study"] == "toy_lq_frozen", "frozen"].all()
    assert set(t.loc[t["study"] == "toy_lq_v2", "phase"]) == {"debug"} and not t.loc[t["study"] == "toy_lq_v2", "frozen"].any()
    assert _row(t, study="toy_lq_v1", method="credit_bridge_no_tgm")["phase"] == "mixed (pilot 1, debug 2)"
    runs = pd.read_csv(tables / "credit_runs.csv")
    assert len(runs) == 39 and set(runs["run"]) == {"lq_seed42", "lq_seed123", "lq_seed456", "digits_seed42",
                                                     "digits_seed123", "digits_seed456"}
    fz = runs[runs["study"] == "toy_lq_frozen"]
    assert set(fz["phase"]) == {"frozen"} and set(fz["frozen_commit"]) == {COMMIT_FROZEN}
    figures = tmp_path / "reports" / "figures"
    written = {p.name for p in plot_all(root, figures, analyses=ANALYSES)}
    assert {"credit_curves.png", "credit_costate_cos.png", "credit_alignment.png"} <= written
    readme = tmp_path / "README.md"
    readme.write_text(f"# optlab\n\n{START}\nold\n{END}\n")
    write_report(tables, figures, tmp_path / "reports" / "results.md", readme, analyses=ANALYSES)
    notes = (tmp_path / "reports" / C.NOTES_PAGE).read_text()
    for phase in ("frozen", "pilot", "debug"):
        assert f"### Phase `{phase}`" in notes
    assert notes.index("### Phase `frozen`") < notes.index("### Phase `pilot`") < notes.index("### Phase `debug`")
    assert COMMIT_FROZEN[:12] in notes and COMMIT_DEV[:12] in notes and "c0ffee222222" in notes
    for study in ("toy_lq_v1", "toy_lq_v2", "toy_lq_frozen", "credit_mlp"):
        assert f"#### {study}" in notes
    assert "lq_seed42" in notes and "digits_seed456" in notes and "definition is ours" in notes
    assert "Terminal gradient matching" in notes and "toy_lq_v1" in notes
    assert "## Known issues observed in the runs" in notes
    # the frozen rerun is compared with toy_lq_v2 seed by seed (the synthetic values differ)
    assert "the rerun differs from toy_lq_v2" in notes
    text = readme.read_text()
    section = text[text.index(START):text.index(END)]
    assert "## Credit assignment" in section and "definition is ours" in section
    assert "credit_notes.md" in section and "| phase |" in section.replace("| task | method | phase |", "| phase |")
    assert "frozen" in section and "published costate cosine" in section
    assert "(inside our IQR)" in section or "(outside our IQR" in section
    assert "not run in this profile" in section  # the CIFAR-10 reference without CIFAR-10 runs


def test_missing_studies_and_probes_are_skipped(tmp_path: Path):
    root = tmp_path / "runs"
    make_tree(root, studies=("credit_mlp",))
    # a run without curves or layers files
    write_run(root, "credit_mlp", "dfa", "digits", 7, probes=False)
    tables = _aggregate(tmp_path, root)
    t = pd.read_csv(tables / "credit_costate.csv")
    assert set(t["study"]) == {"credit_mlp"} and _row(t, method="dfa")["n_runs"] == 4
    write_report(tables, tmp_path / "nofigs", tmp_path / "reports" / "results.md", analyses=ANALYSES)
    notes = (tmp_path / "reports" / C.NOTES_PAGE).read_text()
    assert "has not run yet" in notes and "### Phase `debug`" in notes
    # no credit runs at all: the page is still written (the report stage's out), saying so
    from optlab.analysis.report import write_pages

    out = tmp_path / "bare"
    out.mkdir()
    paths = write_pages([], ANALYSES, out / "tables", out / "figures", out)
    assert [p.name for p in paths] == [C.NOTES_PAGE] and "No credit-assignment runs yet." in paths[0].read_text()
    # a method whose validation accuracy fell from its best is a known issue
    t2 = pd.DataFrame([{"method": "credit_bridge", "method_name": "credit bridge", "task": "credit_mlp / digits",
                        "nudge_median": -0.1, "costate_cos_median": 0.5, "costate_cos_n": 3, "n_completed": 3,
                        "best_val_acc_median": 0.62, "val_acc_median": 0.2}])
    issues = C.known_issues(t2, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame())
    assert len(issues) == 1 and "62.0% to 20.0%" in issues[0]
    t2["val_acc_median"] = 0.6
    assert C.known_issues(t2, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame()) == []
    # frames with nothing in them
    empty = C.run_table(pd.DataFrame(), None)
    assert empty.empty
    tabs = C.build_tables(empty, pd.DataFrame(columns=["run_dir", "step", "epoch", "metric", "value"]),
                          pd.DataFrame(columns=["run_dir", "step", "epoch", "layer", "role", "metric", "value"]),
                          C.parse_published("", [], {}))
    assert all(df.empty for df, _ in tabs.values())
