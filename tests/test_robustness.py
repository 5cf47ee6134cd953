"""The robustness check: which verdicts hold across numeric paths."""

from __future__ import annotations

import pandas as pd

from optlab.config import load_params
from optlab.robustness import PATHS, compare, verdict_studies


def _table(tmp_path, name, answers):
    d = tmp_path / name
    d.mkdir()
    pd.DataFrame({"study": [t.split()[0] for t in answers], "dataset": "digits", "point": [t.split()[-1] for t in answers],
                  "task": "classification", "reaches_bar": "no", "answer": list(answers.values())}).to_csv(d / "verdict.csv", index=False)
    return d


def test_compare_marks_only_agreeing_tasks_as_held(tmp_path):
    a = _table(tmp_path, "default", {"mlp d2": "no", "mlp d8": "inconclusive", "resnet -": "yes"})
    b = _table(tmp_path, "avx2", {"mlp d8": "no", "mlp d2": "no", "resnet -": "yes"})  # another row order
    table, cols = compare({"default": a, "avx2": b})
    assert cols == ["reaches_bar", "answer"]
    held = dict(zip(table["verdict_task"], table["held"]))
    assert held == {"mlp / digits / d2 / classification": True, "mlp / digits / d8 / classification": False,
                    "resnet / digits / - / classification": True}
    assert list(table.columns) == ["verdict_task", "reaches_bar@default", "answer@default", "reaches_bar@avx2",
                                   "answer@avx2", "held"]


def test_paths_select_kernels_through_the_environment():
    assert PATHS["default"] == {}
    assert PATHS["avx2"] == {"ATEN_CPU_CAPABILITY": "avx2"}


def test_verdict_studies_are_the_analysis_verdict_studies():
    params = load_params("params.yaml")
    studies = verdict_studies(params, "sgd_sn")
    assert "mlp_depth" in studies and "gpt_context" not in studies  # a cost study has no verdict
