"""Analysis of run directories: tables (pandas), figures (seaborn) and the results report.

pandas, seaborn and matplotlib are imported only inside this package, and only when used.
A generic core and one study analysis per study family (:mod:`.studies`, selected by the
``analysis`` field of each slice's summary.json):

- ``aggregate.aggregate(runs_root, out_dir)``: the core tables (runs, best_lr with median/IQR and
  the LR-at-grid-edge flag, divergence), each study analysis's tables and ``analyses.json``;
- ``plots.plot_all(runs_root, out_dir)``: the core figures (loss curves per study, the headline
  run) and each study analysis's;
- ``report.write_report(tables, figures, out_md, readme)``: each study analysis's section, in
  order, into results.md and between the README's results markers.

Statistics (medians, IQRs, paired bootstrap verdicts) come from :mod:`optlab.stats`.
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
