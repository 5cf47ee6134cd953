"""Analysis of run directories: tables (pandas), figures (seaborn) and the results report.

pandas, seaborn and matplotlib are imported only inside this package, and only when used.
Entry points: ``aggregate.aggregate`` (tables: runs, best_lr, verdict, depth_to_failure,
ablation, depth_tolerance, divergence), ``plots.plot_all`` (figures), ``report.write_report``
(results.md and the README section "Vanilla SGD + Spectral Norm: back to basics").
``optlab.analysis.aggregate`` is the submodule; call ``optlab.analysis.aggregate.aggregate(...)``
for the tables.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["load_runs", "plot_all", "write_report"]

_LAZY = {"load_runs": "aggregate", "plot_all": "plots", "write_report": "report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("aggregate", "plots", "report"):
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
