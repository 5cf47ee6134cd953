"""The spectral-control study family: vanilla SGD + strict spectral normalization against plain
SGD, SGD+momentum and Adam.

Its verdict adds to the core's paired accuracy interval the question's advantages (wall time,
memory, depth tolerance); its tables are the README's historical ones (verdict, depth_to_failure,
ablation, depth_tolerance, context) and its section is "Vanilla SGD + Spectral Norm: back to
basics". It claims unlabelled runs: trees written before summaries named their analysis, the
ablation and the headline run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .. import AnalysisData, BaseAnalysis
from . import tables as _tables
from .report import HEADING, METHOD_ORDER

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ...aggregate import Table
    from ...plots import FigureData
    from ...report import ReportData


@dataclass(frozen=True)
class SgdSnAnalysis(BaseAnalysis):
    def tables(self, data: AnalysisData) -> dict[str, "Table"]:
        return _tables.tables(data)

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        from .figures import figures  # matplotlib only when drawing

        return figures(data)

    def section(self, report: "ReportData") -> str:
        from .report import section

        return section(report)


ANALYSIS = SgdSnAnalysis(name="sgd_sn", title=HEADING, order=0, claims_unlabelled=True, method_order=METHOD_ORDER)
