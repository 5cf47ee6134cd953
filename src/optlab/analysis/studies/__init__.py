"""Study analyses: one per study family, chosen by the ``analysis`` field of a slice's summary.json.

The generic core (:mod:`..aggregate`, :mod:`..plots`, :mod:`..report`) loads runs, selects LRs and
writes the tables, figures and README text every study shares; a *study analysis* adds what is
particular to one family (its verdict's extra criteria, its own tables and figures, the words of
its README section). Its interface (:class:`StudyAnalysis`):

- ``name``: the value of ``analysis`` in summary.json / the runs' ``sweep`` key;
- ``title``: the heading of its README section; ``order``: sections are sorted by (order, name);
- ``claims_unlabelled``: whether runs without an ``analysis`` label (older trees, ablations, the
  headline run) belong to it (at most one analysis should);
- ``method_order``: methods drawn first, with fixed colours, in every figure;
- ``tables(data: AnalysisData) -> {name: (frame, markdown columns | None)}``: written as
  ``<name>.csv`` / ``<name>.md`` (names are unique across analyses; prefix them with the
  analysis name unless they are the README's historical ones);
- ``figures(data: plots.FigureData) -> {file name: () -> Figure}``: a maker raises
  :class:`..plots.NoData` to skip its figure;
- ``section(report: report.ReportData) -> str``: its README section, from its tables only;
- optionally ``pages(report: report.ReportData) -> {file name: text}``: its own pages (e.g. the
  credit study's experiment notes), written beside ``results.md`` by the report stage.

**Adding a study family is adding a file**: a module (or package) in this package that defines
``ANALYSIS`` is registered under ``ANALYSIS.name`` by :func:`registry`, which imports the package's
modules afresh each time it is asked (there is no global registration state). Subclass
:class:`BaseAnalysis` to start from the generic paired verdict (``<name>_verdict``), the best-LR
and divergence tables, and a plain section. An ``analysis`` name with no module still gets that
generic treatment, with a warning. The entry points take ``analyses=`` to replace the registry
(tests register a dummy analysis that way).
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

import pandas as pd

from ..aggregate import (
    SliceSummary,
    Table,
    VerdictSpec,
    cost_studies,
    load_summaries,
    paired_verdict_table,
    sweep_runs,
    verdict_specs,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..plots import FigureData
    from ..report import ReportData


class StudyAnalysis(Protocol):
    """What the core calls on a study analysis (see the module docstring)."""

    name: str
    title: str
    order: int
    claims_unlabelled: bool
    method_order: tuple[str, ...]

    def tables(self, data: "AnalysisData") -> dict[str, Table]: ...

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]: ...

    def section(self, report: "ReportData") -> str: ...


@dataclass(frozen=True)
class AnalysisData:
    """One analysis's share of the runs root: its runs, slice summaries and best-LR rows."""

    name: str
    runs: pd.DataFrame  # every run whose ``analysis`` is this one (sweep, ablation, headline)
    slices: tuple[SliceSummary, ...]
    best: pd.DataFrame  # best-LR rows of its sweep runs
    params: Path | None = None

    @classmethod
    def build(cls, name: str, runs: pd.DataFrame, slices: Iterable[SliceSummary], best: pd.DataFrame,
              *, params: Path | str | None = None) -> "AnalysisData":
        mine = runs[runs["analysis"] == name] if len(runs) else runs
        studies = set(sweep_runs(mine)["study"].dropna())
        own = tuple(s for s in slices if s.analysis == name or (s.analysis is None and s.study in studies))
        studies |= {s.study for s in own}
        b = best[best["study"].isin(studies)].reset_index(drop=True) if len(best) else best
        return cls(name, mine, own, b, Path(params) if params is not None else None)

    @property
    def studies(self) -> tuple[str, ...]:
        names = set(sweep_runs(self.runs)["study"].dropna().astype(str)) | {s.study for s in self.slices}
        return tuple(sorted(names))

    @property
    def summaries(self) -> pd.DataFrame:
        return load_summaries(slices=list(self.slices))

    @property
    def cost_studies(self) -> set[str]:
        return cost_studies(self.runs, self.slices)

    def specs(self, default: VerdictSpec | None = None) -> dict[str, VerdictSpec]:
        """study -> verdict spec for every verdict (non-cost) study: its summaries' spec, else
        ``default`` (studies with neither are left out)."""
        given = verdict_specs(self.slices)
        out = {}
        for study in self.studies:
            if study in self.cost_studies:
                continue
            spec = given.get(study, default)
            if spec is not None:
                out[study] = spec
        return out


def group_by_spec(specs: Mapping[str, VerdictSpec]) -> list[tuple[VerdictSpec, list[str]]]:
    """The distinct specs with the studies of each, in study order."""
    groups: dict[VerdictSpec, list[str]] = {}
    for study, spec in sorted(specs.items()):
        groups.setdefault(spec, []).append(study)
    return list(groups.items())


@dataclass(frozen=True)
class BaseAnalysis:
    """The generic study analysis: a paired verdict per task from the summaries' verdict specs
    (``<name>_verdict``), and a section with the verdict, the best LRs and the failed runs.
    Subclass it and override what the family needs."""

    name: str
    title: str = ""
    order: int = 100
    claims_unlabelled: bool = False
    method_order: tuple[str, ...] = ()

    def verdict(self, data: AnalysisData) -> pd.DataFrame:
        frames = [paired_verdict_table(data.runs, data.best, spec, studies=studies)
                  for spec, studies in group_by_spec(data.specs())]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=["study", "dataset", "depth", "point", "method", "reference", "metric"])
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def tables(self, data: AnalysisData) -> dict[str, Table]:
        return {f"{self.name}_verdict": (self.verdict(data), None)}

    def figures(self, data: "FigureData") -> dict[str, Callable[[], "Figure"]]:
        return {}

    def section(self, report: "ReportData") -> str:
        from ..report import generic_section

        return generic_section(report, verdict_table=f"{self.name}_verdict")


def registry() -> dict[str, StudyAnalysis]:
    """name -> study analysis, for every module of this package that defines ``ANALYSIS``,
    sorted by (order, name). Built afresh on each call."""
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        analysis = getattr(module, "ANALYSIS", None)
        if analysis is None:
            continue
        if analysis.name in found:
            raise ValueError(f"study analysis {analysis.name!r} is defined twice ({info.name})")
        found[analysis.name] = analysis
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def resolve(analyses: Mapping[str, StudyAnalysis], name: str) -> StudyAnalysis:
    """The registered analysis, else the generic one (with a warning)."""
    if name in analyses:
        return analyses[name]
    known = ", ".join(analyses) or "none"
    warnings.warn(f"no study analysis is registered as {name!r} (registered: {known}); its runs get the generic "
                  "verdict and section (optlab.analysis.studies.BaseAnalysis)", stacklevel=3)
    return BaseAnalysis(name=name, title=name)


def claiming_analysis(analyses: Mapping[str, StudyAnalysis]) -> str | None:
    """The analysis that unlabelled runs belong to (the first that claims them), else None."""
    return next((n for n, a in analyses.items() if getattr(a, "claims_unlabelled", False)), None)


def analysis_order(names: Iterable[str], analyses: Mapping[str, StudyAnalysis]) -> list[str]:
    """``names`` in registry order, unregistered ones after them by name."""
    names = set(names)
    return [n for n in analyses if n in names] + sorted(n for n in names if n not in analyses)
