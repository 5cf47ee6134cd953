"""The rho step-length controller's study family (issue #11): ``rho_digits`` (item 2) and any
later study whose summaries name ``analysis: rho``.

Tables per study (:mod:`.tables`): the single-seed table (seed 7, the seed setup's) and the
multi-seed version (the other seeds: median and IQR of each column), one row per (method, LR),
diverged runs kept as rows; plus the core's paired verdict at the validation-selected LR
(``rho_verdict``, from the study's verdict spec). Figures (:mod:`.figures`): per-epoch training
loss and validation accuracy, and per-epoch eta_eff and max r with the r_target line, one panel
column per LR. Section (:mod:`.report`): "Step-length control from the softmax convergence radius
(rho)": the tables, the figures and whether the runs agree with the seed's claim that capping
makes every LR safe, from the tables only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .. import AnalysisData, BaseAnalysis
from . import tables as _tables
from .report import HEADING
from .tables import METHOD_ORDER, SINGLE_SEED

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ...aggregate import Table
    from ...plots import FigureData
    from ...report import ReportData


@dataclass(frozen=True)
class RhoAnalysis(BaseAnalysis):
    single_seed: int = SINGLE_SEED
    seeds: tuple[int, ...] | None = None  # the multi-seed table's seeds; None: every seed but single_seed

    def tables(self, data: AnalysisData) -> dict[str, "Table"]:
        ran = {s.study for s in data.slices if s.skipped is None} | set(_tables.sweep_runs(data.runs)["study"].dropna()) \
            if len(data.runs) else {s.study for s in data.slices if s.skipped is None}
        out = dict(_tables.tables(data, self.single_seed, self.seeds, studies=sorted(ran)))
        out.update(super().tables(data))  # rho_verdict: the core's paired verdict at the selected LRs
        out[f"{self.name}_references"] = (_tables.references(data.slices), None)
        return out

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        from .figures import figures  # matplotlib only when drawing

        return figures(data, self.single_seed, self.seeds)

    def section(self, report: "ReportData") -> str:
        from .report import section

        return section(report, self.single_seed)


ANALYSIS = RhoAnalysis(name="rho", title=HEADING, order=10, method_order=METHOD_ORDER)
