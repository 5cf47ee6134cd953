"""The study-analysis registry: a new family plugs in as a new module, selected by summary.json.

A dummy analysis registered only in the test gets its tables, figure and README section next to
the SGD + spectral-norm one (whose tables do not change); an ``analysis`` with no module gets
the generic section; a module file added to the package is found without editing anything.
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab.analysis.aggregate import aggregate, read_table
from optlab.analysis.report import END, START, write_report
from optlab.analysis.studies import BaseAnalysis, registry

sys.path.insert(0, str(Path(__file__).parent))
import test_analysis as base  # noqa: E402  (the SN tree of the core tests)

SEEDS = (0, 1, 2)
# method -> selected lr, per-seed test_loss at it (lower is better); the other lr's val_acc is lower
TOY = {"fast": (0.1, [0.50, 0.55, 0.52]), "slow": (0.1, [1.00, 1.10, 1.05])}
# an overlapping pair for the generic (unregistered) analysis: per-seed slow/fast 1.2, 0.8, 1.0
MYSTERY = {"fast": (0.1, [1.00, 1.25, 1.00]), "slow": (0.1, [1.20, 1.00, 1.00])}


def _write_study(root: Path, study: str, analysis: str, table: dict, bar: float = 0.9) -> None:
    for method, (sel, losses) in table.items():
        for lr in (sel, 0.01):
            for seed in (SEEDS if lr == sel else (0,)):
                loss = losses[seed] if lr == sel else 2.0
                run = root / "sweep" / study / method / f"{method}-lr{lr:g}-s{seed}"
                run.mkdir(parents=True)
                metrics = {
                    "run_id": run.name, "status": "completed", "failure": None,
                    "config": {"method": method, "optimizer": "sgd", "step_method": "backprop", "lr": lr,
                               "seed": seed, "dataset": "toyset", "study": study, "depth": 3, "arch": "mlp",
                               "probes": {}},
                    "sweep": {"study": study, "method": method, "role": "search" if seed == 0 else "confirm",
                              "point": {"depth": 3}, "select": "val_acc", "verdict": True, "analysis": analysis},
                    "final": {"val_acc": 0.9 if lr == sel else 0.5, "test_acc": 0.9, "test_loss": loss, "val_loss": loss,
                              "wall_time_s": 1.0},
                    "provenance": {"git_commit": "abc", "git_dirty": False, "frozen": False},
                }
                (run / "metrics.json").write_text(json.dumps(metrics))
                with (run / "curves.csv").open("w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["step", "epoch", "metric", "value"])
                    for e in range(2):
                        w.writerow([10 * (e + 1), e, "epoch_train_loss", loss * (2 - e)])
                        w.writerow([10 * (e + 1), e, "val_loss", loss * (2 - e)])
                with (run / "layers.csv").open("w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["step", "epoch", "layer", "role", "metric", "value"])
                    w.writerow([10, 0, 0, "hidden", "costate_cosine", 0.5])
        doc = {"study": study, "method": method, "optimizer": "sgd", "analysis": analysis,
               "verdict": {"method": "fast", "reference": "slow", "metric": "test_loss", "bar": bar},
               "primary": {"metric": "test_loss", "direction": "down"}, "select": "val_acc", "lrs": [0.1, 0.01],
               "search_seeds": [0], "seeds": list(SEEDS),
               "points": [{"dataset": "toyset", "point": {"depth": 3}, "selected_lr": sel, "select": "val_acc",
                           "score": 0.9, "failures": [], "lr_edge": "high"}]}
        (root / "sweep" / study / method / "summary.json").write_text(json.dumps(doc))


@dataclass(frozen=True)
class ToyAnalysis(BaseAnalysis):
    """A study analysis defined only in this test: the generic verdict plus a table, a figure
    and its own section text."""

    def tables(self, data):
        out = super().tables(data)
        out["toy_counts"] = (pd.DataFrame({"study": list(data.studies), "n_runs": [len(data.runs)] * len(data.studies)}), None)
        return out

    def figures(self, data):
        from optlab.analysis.plots import figure

        def draw():
            fig, axes = figure(1, 1)
            axes[0, 0].bar(data.chosen["method"], data.chosen["test_loss"])
            return fig

        return {"toy_losses.png": draw}

    def section(self, rd):
        v = rd.table("toy_verdict")
        counts = rd.table("toy_counts")
        return (f"## {rd.title}\n\nToy section: {len(rd.runs)} runs in {int(counts['n_runs'].sum())}; "
                f"fast vs slow: {' '.join(v['reaches_bar'])}.\n")


def _tree(tmp_path: Path) -> Path:
    root = base.make_tree(tmp_path / "runs")
    _write_study(root, "toy_loss", "toy", TOY)
    return root


def test_the_registry_holds_the_sgd_sn_analysis() -> None:
    reg = registry()
    assert "sgd_sn" in reg and reg["sgd_sn"].claims_unlabelled and list(reg)[0] == "sgd_sn"
    assert registry() is not reg  # built afresh: no global registration state


def test_a_registered_dummy_analysis_gets_its_section(tmp_path: Path) -> None:
    from optlab.analysis.plots import plot_all

    root = _tree(tmp_path)
    analyses = {**registry(), "toy": ToyAnalysis(name="toy", title="Toy study")}
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    aggregate(root, tables, analyses=analyses)
    manifest = json.loads((tables / "analyses.json").read_text())["analyses"]
    assert [(a["name"], a["studies"]) for a in manifest] == [("sgd_sn", [base.STUDY]), ("toy", ["toy_loss"])]
    assert manifest[1]["tables"] == ["toy_verdict", "toy_counts"]
    # the toy verdict: lower is better, so the ratio is slow / fast, paired by seed
    v = read_table(tables / "toy_verdict.csv")
    row = v.iloc[0]
    fast, slow = np.array(TOY["fast"][1]), np.array(TOY["slow"][1])
    assert (row["method"], row["reference"], row["metric"], row["direction"]) == ("fast", "slow", "test_loss", "down")
    assert row["ratio_of_means"] == pytest.approx(slow.mean() / fast.mean())
    assert (row["ratio_lo"], row["ratio_hi"]) == pytest.approx(((slow / fast).min(), (slow / fast).max()))
    assert row["reaches_bar"] == "yes" and row["fast_test_loss_median"] == pytest.approx(np.median(fast))
    # the SN tables are untouched by the toy study; runs and best LRs carry the analysis
    assert "toy_loss" not in set(read_table(tables / "verdict.csv")["study"])
    runs = read_table(tables / "runs.csv")
    assert set(runs.loc[runs["study"] == "toy_loss", "analysis"]) == {"toy"}
    assert set(runs.loc[runs["study"] == base.STUDY, "analysis"]) == {"sgd_sn"}
    best = read_table(tables / "best_lr.csv")
    fb = best[(best["study"] == "toy_loss") & (best["method"] == "fast")].iloc[0]
    assert (fb["primary_metric"], fb["primary_direction"], fb["lr_edge"]) == ("test_loss", "down", "high")
    assert fb["primary_median"] == pytest.approx(np.median(fast))
    # figures: the core's loss curves for the toy study, and the toy analysis's own figure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = {p.name for p in plot_all(root, figures, analyses=analyses)}
    assert {"loss_curves_toy_loss.png", "toy_losses.png", f"loss_curves_{base.STUDY}.png", "sigma_max.png"} <= names
    # the README gets both sections, the SN one first
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + START + "\nold\n" + END + "\n")
    text = write_report(tables, figures, tmp_path / "results.md", readme, analyses=analyses)
    assert text.index("## Vanilla SGD + Spectral Norm") < text.index("## Toy study")
    assert "Toy section: 8 runs in 8; fast vs slow: yes." in text
    assert "toy_loss" not in text.split("## Toy study")[0]  # the SN section does not mention the toy study
    assert text.strip() in readme.read_text()  # results.md and the README sit side by side here


def test_an_unregistered_analysis_gets_the_generic_section(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _write_study(root, "mystery_study", "mystery", MYSTERY, bar=1.0)
    tables = tmp_path / "tables"
    with pytest.warns(UserWarning, match="no study analysis is registered as 'mystery'"):
        aggregate(root, tables, analyses={**registry(), "toy": ToyAnalysis(name="toy", title="Toy study")})
    v = read_table(tables / "mystery_verdict.csv").iloc[0]
    fast, slow = np.array(MYSTERY["fast"][1]), np.array(MYSTERY["slow"][1])
    assert v["ratio_of_means"] == pytest.approx(slow.mean() / fast.mean())
    assert v["ratio_lo"] < 1.0 <= v["ratio_hi"] and v["reaches_bar"] == "inconclusive"
    with pytest.warns(UserWarning, match="mystery"):
        text = write_report(tables, tmp_path / "figs", tmp_path / "r.md",
                            analyses={**registry(), "toy": ToyAnalysis(name="toy", title="Toy study")})
    generic = text.split("\n## mystery\n")[1]
    line = next(s for s in generic.splitlines() if s.startswith("- **mystery_study / toyset, depth 3**"))
    assert "fast reached" in line and "of slow's mean test_loss (lower is better" in line
    assert "Inconclusive at the 100% bar: the interval straddles it" in line and "paired seeds would decide it" in line
    assert "Reaches" not in line
    assert "### Selected learning rate per method and grid point" in generic and "#### mystery_study" in generic


def test_a_new_module_file_is_registered_by_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optlab.analysis.studies as studies

    (tmp_path / "toy_family.py").write_text(
        "from optlab.analysis.studies import BaseAnalysis\n\n"
        "ANALYSIS = BaseAnalysis(name='toy_family', title='Toy family')\n")
    try:
        with monkeypatch.context() as mp:
            mp.setattr(studies, "__path__", [*studies.__path__, str(tmp_path)])
            reg = registry()
            assert "toy_family" in reg and reg["toy_family"].title == "Toy family" and "sgd_sn" in reg
    finally:
        sys.modules.pop("optlab.analysis.studies.toy_family", None)
    assert "toy_family" not in registry()  # the file is gone from the package path: so is the analysis


def test_table_names_are_unique_across_analyses(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class Clash(BaseAnalysis):
        def tables(self, data):
            return {"verdict": (pd.DataFrame(), None)}

    root = _tree(tmp_path)
    with pytest.raises(ValueError, match="already written"):
        aggregate(root, tmp_path / "t", analyses={**registry(), "toy": Clash(name="toy")})
