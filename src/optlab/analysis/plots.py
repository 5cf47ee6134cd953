"""Figures, drawn with seaborn on matplotlib's Agg canvas: the core's and each study analysis's.

A figure whose data is missing is skipped with a warning (and a stale file of that name is
removed); the others are still drawn. Panels are (study, dataset) pairs of the sweep; every
line is a method at its validation-selected LR, mean ± sd over seeds unless a title says
otherwise. The core draws, for every study:

- ``loss_curves_<study>.png``: train and validation loss per epoch, one row per dataset, at
  the deepest grid point where some method's selected configuration trained;
- ``headline_curves.png``: the headline run.

Each study analysis adds its own (``StudyAnalysis.figures``), from a :class:`FigureData`: its
runs, the selected-LR runs with line labels, fixed colours per method, their curves, and
:meth:`FigureData.layers` to reduce each run's per-layer rows as they are read. The helpers
below (``figure``, ``grid``, ``hue``, ``legend``, ``log_y``, ``focus``, ...) are for them.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # seaborn imports pyplot: pick the file backend first
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
    PercentFormatter,
)

from .aggregate import (  # noqa: E402
    assign_analyses,
    best_lr_table,
    best_runs,
    chance_level,
    load_runs,
    load_slices,
    long_layers,
    match,
    method_order,
    parse_point,
    read_ablation_order,
    read_csv,
    run_failure,
    slug,
    sweep_runs,
)

if TYPE_CHECKING:  # pragma: no cover
    from .studies import StudyAnalysis

DPI = 120
LOSS_PREFIX = "loss_curves_"
HEADLINE = "headline_curves.png"
MANIFEST = "figures.json"  # {figure file: [the studies it shows]}, read by stage ``track`` (MLflow artifacts)
MARKER_MAX_POINTS = 40  # a marker at every x value up to this many; beyond, about MARKS_PER_LINE of them
MARKS_PER_LINE = 12
COLORS = [*sns.color_palette("tab10"), *sns.color_palette("Dark2"), *sns.color_palette("Set1")]
"""Distinct colours for the methods (27 before one repeats; with :data:`MARKERS` no two of the
first 189 methods share both colour and marker)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
"""One marker shape per method, so that lines drawn on top of each other stay told apart."""
HOLLOW = {"markerfacecolor": "none", "markersize": 7, "markeredgewidth": 1.4}
"""Hollow markers in the line's colour (:func:`hollow`): where lines coincide, each outline still shows."""

Reducer = Callable[[pd.DataFrame], Mapping[str, pd.DataFrame]]
"""One run's long layer rows (with ``run_dir``) -> named reduced frames (see FigureData.layers)."""


class NoData(Exception):
    """A figure has nothing to draw."""


@dataclass
class FigureData:
    """What a study analysis draws from (see the module docstring)."""

    name: str
    runs: pd.DataFrame  # the analysis's runs, with a `label` column
    best: pd.DataFrame
    chosen: pd.DataFrame  # best-LR runs (every seed, any status), `label` with LR and failures
    panels: list[tuple[Any, Any]]  # (study, dataset) of its sweep
    palette: dict[str, tuple[float, float, float]]  # by method
    curves: pd.DataFrame  # curves of the selected-LR runs and the headline run
    order: tuple[str, ...] = ()  # methods first in legends, in this order
    variant_order: list[str] = field(default_factory=list)
    multi_study: bool = False
    root: Path | None = None
    layer_rows: pd.DataFrame | None = None  # when drawn from frames, not a runs root

    def layers(self, reduce: Reducer, runs: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
        """Each run's long layer rows (default: the selected-LR runs), reduced by ``reduce`` as
        they are read (so deep networks' logs need not fit in memory at once), concatenated
        per name. Old wide layers files are read as long."""
        runs = self.chosen if runs is None else runs
        parts: dict[str, list[pd.DataFrame]] = {}
        for run_dir in runs["run_dir"].dropna().unique():
            if self.root is not None:
                frame = read_csv(self.root.resolve().parent / run_dir / "layers.csv")
                if frame is None or frame.empty:
                    continue
                frame = long_layers(frame)
                frame.insert(0, "run_dir", run_dir)
            else:
                rows = self.layer_rows if self.layer_rows is not None else pd.DataFrame(columns=["run_dir"])
                frame = rows[rows["run_dir"] == run_dir]
                if frame.empty:
                    continue
                frame = long_layers(frame)
            for key, out in reduce(frame).items():
                parts.setdefault(key, []).append(out)
        return {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}

    def method_order(self, methods: Any) -> list[str]:
        return method_order(methods, self.order)


def figure_data(
    source: Path | str | tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    *,
    analyses: Mapping[str, "StudyAnalysis"] | None = None,
    variant_order: list[str] | None = None,
    headline: bool = True,
) -> tuple[FigureData, dict[str, FigureData]]:
    """The core's :class:`FigureData` (every run) and one per present study analysis, from a runs
    root or its (runs, curves, layers) frames (``analyses`` replaces the registry)."""
    from .studies import AnalysisData, analysis_order, claiming_analysis, registry

    reg = registry() if analyses is None else dict(analyses)
    if isinstance(source, (str, Path)):
        root: Path | None = Path(source)
        runs, _, _ = load_runs(root, series=False)
        slices = load_slices(root)
        curves = layer_rows = None
        if variant_order is None:
            variant_order = read_ablation_order(root.resolve().parent / "params.yaml")
    else:
        root, slices = None, []
        runs, curves, layer_rows = source
    if not headline:
        runs = runs[runs["kind"] != "headline"]
    runs = assign_analyses(runs, slices, claiming_analysis(reg))
    names = analysis_order({*runs["analysis"].dropna().astype(str), *(s.analysis for s in slices if s.analysis)}, reg)
    order = tuple(dict.fromkeys(m for n in names if n in reg for m in getattr(reg[n], "method_order", ())))
    core = _prepare(runs, best_lr_table(runs, slices), curves, layer_rows, root, order)
    core.variant_order = list(variant_order or [])
    per = {n: _restrict(core, n, AnalysisData.build(n, runs, slices, core.best)) for n in names}
    return core, per


def plot_all(
    source: Path | str | tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    out_dir: Path | str,
    *,
    variant_order: list[str] | None = None,
    analyses: Mapping[str, "StudyAnalysis"] | None = None,
    headline: bool = True,
) -> list[Path]:
    """Draw every figure that has data into ``out_dir``; return the written PNG paths.

    ``headline=False`` leaves the headline run (``runs/train``) out: the pipeline's ``plot``
    stage does, so that a headline experiment reruns only its own figure (:func:`headline_figure`).

    ``source`` is a runs root or its (runs, curves, layers) frames. From a root, only the
    selected-LR runs' and the headline run's curves are read, and each layers file is reduced
    as it is read. ``variant_order`` orders the ablation bars (default: params.yaml beside the
    runs root, else by name). The core figures come first, then each present study analysis's
    (``analyses`` replaces the registry).
    """
    from .studies import registry, resolve

    reg = registry() if analyses is None else dict(analyses)
    core, per = figure_data(source, analyses=reg, variant_order=variant_order, headline=headline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[], Figure]] = {}
    shows: dict[str, list[str]] = {}
    studies = list(dict.fromkeys(s for s, _ in core.panels))
    for study in studies:
        makers[f"{LOSS_PREFIX}{slug(study)}.png"] = lambda s=study: _loss_curves(core, s)
        shows[f"{LOSS_PREFIX}{slug(study)}.png"] = [str(study)]
    if headline:
        makers[HEADLINE] = lambda: _headline_curves(core)
    else:
        (out_dir / HEADLINE).unlink(missing_ok=True)
    for name, fd in per.items():
        for fname, make in resolve(reg, name).figures(fd).items():
            if fname in makers:
                raise ValueError(f"study analysis {name!r}: figure {fname} is already drawn by another")
            makers[fname] = make
            shows[fname] = figure_studies(fname, [str(s) for s in dict.fromkeys(
                [*(s for s, _ in fd.panels), *fd.chosen.get("study", pd.Series(dtype=object)).dropna()])])
    for stale in out_dir.glob(f"{LOSS_PREFIX}*.png"):  # a study no longer in the runs
        if stale.name not in makers:
            stale.unlink()
    if not studies:
        warnings.warn(f"{LOSS_PREFIX}<study>.png skipped: no sweep runs", stacklevel=2)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        for name, make in makers.items():
            path = out_dir / name
            try:
                fig = make()
            except NoData as exc:
                warnings.warn(f"{name} skipped: {exc}", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            drop_empty(fig)
            fig.savefig(path, dpi=DPI)
            written.append(path)
    manifest = {p.name: shows[p.name] for p in written if shows.get(p.name)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return written


def figure_studies(fname: str, studies: Iterable[str]) -> list[str]:
    """The studies a study analysis's figure shows: those whose name is a ``_``-delimited part of
    the file name (the longest, so ``rho_cap_gpt_control.png`` is ``rho_cap_gpt``'s, not
    ``gpt``'s), else every study the analysis drew from."""
    studies = list(studies)
    stem = Path(fname).stem
    named = [s for s in studies if re.search(rf"(^|_){re.escape(slug(s))}(_|$)", stem)]
    named = [s for s in named if not any(s != o and slug(s) in slug(o) for o in named)]
    return named or studies


def _prepare(runs: pd.DataFrame, best: pd.DataFrame, curves: pd.DataFrame | None, layer_rows: pd.DataFrame | None,
             root: Path | None, order: tuple[str, ...]) -> FigureData:
    runs = runs.copy()
    runs["label"] = [label(o, lr) for o, lr in zip(runs["method"], runs["lr"])]
    chosen = best_runs(runs, best) if len(best) else runs.iloc[0:0].copy()
    chosen = config_labels(chosen)
    sw = sweep_runs(runs)
    keys = sw[["study", "dataset"]].drop_duplicates()
    panels = sorted(((s, d) for s, d in keys.itertuples(index=False, name=None)), key=lambda p: (str(p[0]), str(p[1])))
    multi = sw["study"].nunique(dropna=False) > 1
    # fixed colours for the analyses' methods (the same in every figure and report), others after them
    methods = [*order, *(m for m in method_order(runs["method"].dropna().unique(), order) if m not in order)]
    palette = {m: COLORS[i % len(COLORS)] for i, m in enumerate(methods)}
    head = runs[runs["kind"] == "headline"]
    needed = pd.concat([chosen, head], ignore_index=True)["run_dir"].dropna().unique().tolist()
    if root is not None:
        curves = _read_curves(root, needed)
    else:
        curves = curves if curves is not None else pd.DataFrame(columns=["run_dir", "step", "epoch", "metric", "value"])
        curves = curves[curves["run_dir"].isin(needed)]
    return FigureData("core", runs, best, chosen, panels, palette, curves, order, multi_study=multi, root=root,
                      layer_rows=layer_rows)


def _restrict(core: FigureData, name: str, data: Any) -> FigureData:
    runs = core.runs[core.runs["analysis"] == name]
    studies = set(data.studies)
    chosen = core.chosen[core.chosen["study"].isin(studies)]
    panels = [p for p in core.panels if p[0] in studies]
    return FigureData(name, runs, data.best, chosen, panels, core.palette, core.curves, core.order,
                      list(core.variant_order), len(studies) > 1, core.root, core.layer_rows)


def _read_curves(root: Path, run_dirs: list[str]) -> pd.DataFrame:
    base = Path(root).resolve().parent
    frames = []
    for run_dir in run_dirs:
        frame = read_csv(base / run_dir / "curves.csv")
        if frame is None or frame.empty:
            continue
        frame.insert(0, "run_dir", run_dir)
        frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype(float)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_dir", "step", "epoch", "metric", "value"])


def label(method: object, lr: object) -> str:
    if pd.isna(lr):
        return str(method)
    return f"{method} (lr {float(lr):.3g})"


def config_labels(chosen: pd.DataFrame) -> pd.DataFrame:
    """Label every selected configuration 'method (lr x)' plus the failure kinds of its runs."""
    chosen = chosen.copy()
    chosen["_fail"] = [run_failure(r) or "" for r in chosen.to_dict("records")]
    chosen["label"] = [label(m, lr) for m, lr in zip(chosen["method"], chosen["lr"])]
    keys = ["study", "dataset", "point", "method"]
    for _, g in chosen.groupby(keys, dropna=False, sort=False):
        kinds = sorted({f for f in g["_fail"] if f})
        if kinds:
            n = int((g["_fail"] != "").sum())
            chosen.loc[g.index, "label"] = g["label"] + f" — {n}/{len(g)} failed: {', '.join(kinds)}"
    return chosen.drop(columns="_fail")


def panel_title(fd: FigureData, study: Any, dataset: Any) -> str:
    ds = str(dataset) if pd.notna(dataset) else "?"
    return f"{study} / {ds}" if fd.multi_study and pd.notna(study) else ds


def point_text(point: Any) -> str:
    pt = parse_point(point)
    return ", ".join(f"{k} {v}" for k, v in pt.items()) if pt else "single configuration"


def focus(fd: FigureData, study: Any, dataset: Any) -> tuple[Any, pd.DataFrame]:
    """The deepest grid point of a panel where some method's selected configuration trained
    (the deepest point when none did) and the selected-LR runs there."""
    sel = match(fd.chosen, study=study, dataset=dataset)
    if sel.empty:
        raise NoData(f"no selected runs for {study} / {dataset}")
    rows = []
    for point, g in sel.groupby("point", dropna=False, sort=False):
        pt = parse_point(point)
        value = tuple(float(v) if isinstance(v, (int, float)) else 0.0 for v in pt.values())
        trained = any((gg["status"] == "completed").all() and not any(run_failure(r) for r in gg.to_dict("records"))
                      for _, gg in g.groupby("method"))
        rows.append((trained, value, point))
    pick = max(rows, key=lambda r: (r[0], r[1]))
    point = pick[2]
    return point, match(sel, point=point)


def marker_of(fd: FigureData, method: Any) -> str:
    """The method's fixed marker (its place among the palette's methods)."""
    keys = list(fd.palette)
    return MARKERS[keys.index(method) % len(MARKERS)] if method in fd.palette else MARKERS[0]


def hue(fd: FigureData, frame: pd.DataFrame, x: str | None = None) -> dict:
    """lineplot keywords for one line per method (labelled with its LR): fixed colours and a
    fixed marker per method, so that overlapping lines stay visible. With ``x``, a line of more
    than :data:`MARKER_MAX_POINTS` points gets about :data:`MARKS_PER_LINE` markers."""
    pairs = frame[["method", "label"]].drop_duplicates()
    order = fd.method_order(pairs["method"].unique())
    labels = [lab for o in order for lab in sorted(pairs.loc[pairs["method"] == o, "label"])]
    pal = {lab: fd.palette.get(o, (0.5, 0.5, 0.5)) for o, lab in pairs.itertuples(index=False, name=None)}
    marks = {lab: marker_of(fd, o) for o, lab in pairs.itertuples(index=False, name=None)}
    out = {"hue": "label", "hue_order": labels, "palette": pal, "style": "label", "style_order": labels,
           "markers": marks, "dashes": False}
    n = frame[x].nunique() if x is not None and x in frame else 0
    if n > MARKER_MAX_POINTS:
        out["markevery"] = max(1, n // MARKS_PER_LINE)
    return out


def method_style(fd: FigureData, methods: Any) -> dict:
    """lineplot keywords giving each method (a ``method`` hue) its fixed marker."""
    order = fd.method_order(list(methods))
    return {"style": "method", "style_order": order, "markers": {m: marker_of(fd, m) for m in order}, "dashes": False}


def dodge(fd: FigureData, frame: pd.DataFrame, x: str, methods: list[str], width: float = 0.05) -> pd.Series:
    """``x`` shifted a little per method on a log axis (factor 2**(±width·k)), so that equal
    values at one x do not hide each other's markers and error bars; ticks stay on the true x."""
    k = {m: i - (len(methods) - 1) / 2 for i, m in enumerate(methods)}
    return frame[x].astype(float) * np.exp2(frame["method"].map(k).fillna(0.0).astype(float) * width)


def mark_empty(ax) -> None:
    """Flag an axes as holding no data: :func:`drop_empty` removes it before the figure is saved."""
    ax._optlab_empty = True  # noqa: SLF001 - our own flag on our own axes


def drop_empty(fig: Figure) -> None:
    """Remove the panels flagged by :func:`empty` / :func:`mark_empty` and pack the rest onto a
    smaller grid (the figure shrinks with it). A figure whose every panel is empty, or with
    twin axes sharing a cell, is left as it is."""
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_subplotspec() is not None]
    hollow = [ax for ax in axes if getattr(ax, "_optlab_empty", False)]
    hidden = [ax for ax in fig.axes if not ax.get_visible()]
    if not hollow or len(hollow) == len(axes):
        return
    cells = [(ax.get_subplotspec().rowspan, ax.get_subplotspec().colspan) for ax in axes]
    if len(set(map(str, cells))) != len(cells):
        return  # twin axes (or overlays) share a cell: moving one would split them
    keep = [ax for ax in axes if ax not in hollow]
    nrows, ncols = keep[0].get_subplotspec().get_gridspec().get_geometry()
    new_cols = min(ncols, len(keep))
    new_rows = -(-len(keep) // new_cols)
    w, h = fig.get_size_inches()
    for ax in hollow + hidden:
        ax.remove()
    gs = fig.add_gridspec(new_rows, new_cols)
    for i, ax in enumerate(keep):
        ax.set_subplotspec(gs[i // new_cols, i % new_cols])
    fig.set_size_inches(w * new_cols / ncols, h * new_rows / nrows)


def tag(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Attach method/label/depth from ``runs`` to curve or layer rows (by run_dir)."""
    keep = runs[["run_dir", "method", "label", "depth"]]
    frame = frame.drop(columns=[c for c in ("method", "label", "depth") if c in frame])
    return frame.merge(keep, on="run_dir", how="inner")


def positive(frame: pd.DataFrame, col: str) -> pd.DataFrame:
    v = frame[col].astype(float)
    return frame[np.isfinite(v) & (v > 0)]


def hollow(lines: Iterable[Any]) -> None:
    """Draw the markers of these lines hollow, edged in the line's colour (:data:`HOLLOW`)."""
    for line in lines:
        if isinstance(line, Line2D) and line.get_marker() not in (None, "None", "", " ", "none"):
            line.set(markeredgecolor=line.get_color(), **HOLLOW)


def legend(ax, extra: list[tuple[object, str]] = (), title: str | None = "method (selected LR)") -> None:
    """Rebuild the axes legend: seaborn's hue entries plus extra (handle, label) pairs. Markers
    are drawn hollow first (:func:`hollow`), in the axes and in the legend."""
    hollow(ax.lines)
    leg = ax.get_legend()
    handles = list(leg.legend_handles) if leg is not None else []
    hollow(handles)
    labels = [t.get_text() for t in leg.get_texts()] if leg is not None else []
    for h, lab in extra:
        handles.append(h)
        labels.append(lab)
    if handles:
        ax.legend(handles, labels, title=title, fontsize="small", title_fontsize="small")


def log_y(ax) -> None:
    """Log y axis with plain tick labels (0.5, 2, 30); minor ticks labelled only on short ranges."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 300:  # up to two decades or so: label 2x and 5x as well
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    width = max(40, int(fig.get_figwidth() * 10))
    fig.suptitle("\n".join(textwrap.wrap(text, width)))


def int_x(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def depth_x(ax, depths: list[float], xlabel: str = "depth (hidden layers, log scale)") -> None:
    ax.set_xscale("log", base=2)
    if depths:
        ax.xaxis.set_major_locator(FixedLocator(depths))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(int(d)) for d in depths])
    ax.set_xlabel(xlabel)


def empty(ax, text: str = "no data") -> None:
    """A panel without data: says so, and is dropped when the figure has panels with data."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    mark_empty(ax)


def figure(nrows: int, ncols: int, w: float = 6.0, h: float = 4.2) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def grid(n: int, ncols: int = 3, w: float = 6.5, h: float = 4.4) -> tuple[Figure, list]:
    """n panels on a grid of at most ``ncols`` columns (unused axes hidden)."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = figure(nrows, ncols, w, h)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def geomean(x: pd.Series) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.exp(np.mean(np.log(x)))) if len(x) else float("nan")


def depth_panels(fd: FigureData, classification_only: bool = False) -> list[tuple[Any, Any]]:
    """Panels whose selected runs span more than one depth."""
    out = []
    for study, dataset in fd.panels:
        sel = match(fd.chosen, study=study, dataset=dataset)
        if classification_only and "task" in sel and (sel["task"] == "lm").any():
            continue
        if sel["depth"].dropna().nunique() > 1:
            out.append((study, dataset))
    return out


# ---------------------------------------------------------------- the core's figures


def _loss_curves(fd: FigureData, study: Any) -> Figure:
    panels = [p for p in fd.panels if p[0] == study]
    fig, axes = figure(len(panels), 2)
    drawn = 0
    for row, (_, dataset) in enumerate(panels):
        point, sel = focus(fd, study, dataset)
        cur = tag(fd.curves[fd.curves["run_dir"].isin(sel["run_dir"])], sel)
        for col, (metric, ylab) in enumerate((("epoch_train_loss", "train loss (epoch mean)"),
                                              ("val_loss", "validation loss"))):
            ax = axes[row, col]
            d = positive(cur[cur["metric"] == metric], "value").assign(epoch_n=lambda f: f["epoch"] + 1)
            if d.empty:
                empty(ax)
            else:
                # log axis: the geometric mean and the interquartile range over seeds (quantiles of the
                # log are the log of the quantiles; a mean ± sd band can cross zero and fill the axis)
                sns.lineplot(data=d, x="epoch_n", y="value", estimator=geomean, errorbar=("pi", 50), ax=ax,
                             **hue(fd, d, "epoch_n"))
                log_y(ax)
                int_x(ax)
                extra = []
                if (cur["metric"] == "val_acc").any() and not (sel.get("task", pd.Series(dtype=str)) == "lm").any():
                    # a classifier's loss at uniform output (LM and regression panels have no such line)
                    n = round(1.0 / chance_level(match(fd.runs, study=study, dataset=dataset)))
                    extra = [(ax.axhline(float(np.log(n)), ls="--", color="0.3", lw=1),
                              f"chance: uniform output, ln {n} = {np.log(n):.2f}")]
                legend(ax, extra)
                drawn += 1
            ax.set_title(f"{dataset}: {ylab}, {point_text(point)}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylab)
    if not drawn:
        raise NoData(f"no per-epoch losses for study {study}")
    suptitle(fig, f"{study}: loss curves at the deepest grid point some method trained "
                  "(selected LR, geometric mean and IQR over seeds)")
    return fig


HEADLINE_FILE = "curves.png"
"""The headline run's own figure, beside its outputs (``runs/train/curves.png``; a DVC image plot)."""


def headline_figure(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """The headline run's curves (:func:`headline_curves_figure`) as one PNG, default
    ``<run_dir>/curves.png``, drawn from its ``curves.csv`` and ``metrics.json`` alone, so the
    stage that draws it depends on the headline run and on nothing a study produces."""
    import json

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / HEADLINE_FILE
    cur = read_csv(run_dir / "curves.csv")
    if cur is None or cur.empty:
        raise NoData(f"no curves in {run_dir}")
    doc = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    cfg = doc.get("config") or {}
    what = ", ".join(f"{k} {cfg[k]}" for k in ("method", "optimizer", "arch", "dataset", "depth", "lr", "seed")
                     if cfg.get(k) not in (None, ""))
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = headline_curves_figure(cur, f"Headline run ({what}; status {doc.get('status', 'n/a')})")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI)
    return out


def headline_curves_figure(cur: pd.DataFrame, title: str) -> Figure:
    """One run's curves (``step, epoch, metric, value`` rows): loss (training loss per log
    interval and per epoch, validation loss per epoch; log axis) and accuracy (training and
    validation per epoch). A task without accuracy gets the loss panel only."""
    cur = cur.assign(value=pd.to_numeric(cur["value"], errors="coerce"))
    cur = cur[np.isfinite(cur["value"])]
    if cur.empty:
        raise NoData("no finite curves")
    last_step = cur.groupby("epoch")["step"].max()

    def per_epoch(metric: str) -> pd.DataFrame:
        d = cur[cur["metric"] == metric]
        return d.assign(step=d["epoch"].map(last_step)) if len(d) else d

    loss = [(cur[cur["metric"] == "train_loss"], "train loss (log-interval mean)", "-", None),
            (per_epoch("epoch_train_loss"), "train loss (epoch mean)", "-", "o"),
            (per_epoch("val_loss"), "validation loss", "--", "s")]
    acc = [(per_epoch("train_acc"), "train accuracy", "-", "o"), (per_epoch("val_acc"), "validation accuracy", "--", "s")]
    has_acc = any(len(d) for d, *_ in acc)
    fig, axes = figure(1, 2 if has_acc else 1)
    ax = axes[0, 0]
    for (d, lab, ls, mk), color in zip(loss, COLORS):
        d = d[d["value"] > 0]
        if len(d):
            ax.plot(d["step"], d["value"], ls=ls, marker=mk, color=color, label=lab, lw=1.2 if mk is None else 1.6,
                    alpha=0.6 if mk is None else 1.0)
    log_y(ax)
    ax.set(xlabel="step", ylabel="loss (nats)", title="loss")
    hollow(ax.lines)
    ax.legend(fontsize="small")
    if has_acc:
        ax = axes[0, 1]
        for (d, lab, ls, mk), color in zip(acc, COLORS[1:]):
            if len(d):
                ax.plot(d["step"], d["value"], ls=ls, marker=mk, color=color, label=lab)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set(xlabel="step (epoch ends)", ylabel="accuracy", title="accuracy")
        hollow(ax.lines)
        ax.legend(fontsize="small")
    suptitle(fig, title)
    return fig


def _headline_curves(fd: FigureData) -> Figure:
    head = fd.runs[fd.runs["kind"] == "headline"]
    if head.empty:
        raise NoData("no headline run (a run directory named 'train')")
    if len(head) > 1:
        warnings.warn(f"{len(head)} headline runs; drawing {head['run_dir'].iloc[0]}", stacklevel=3)
    run = head.iloc[0]
    cur = fd.curves[fd.curves["run_dir"] == run["run_dir"]]
    what = ", ".join(
        f"{k} {run[k]}" for k in ("method", "dataset", "depth", "lr", "seed") if k in run and pd.notna(run[k])
    )
    try:
        return headline_curves_figure(cur, f"Headline run {run['run_id']} ({what}; status {run['status']})")
    except NoData:
        raise NoData(f"no curves for the headline run {run['run_dir']}") from None
