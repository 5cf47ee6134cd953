"""Figures for a study, drawn with seaborn on matplotlib's Agg canvas.

A figure whose data is missing is skipped with a warning (and a stale file of that name is
removed); the others are still drawn. One subplot row (or panel) per (study, dataset).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # seaborn imports pyplot: pick the file backend first
    matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, LogFormatter, MaxNLocator, NullLocator, PercentFormatter  # noqa: E402

from .aggregate import best_lr_table, best_runs, chance_level, load_runs, sweep_runs  # noqa: E402

DPI = 120
OPTIMIZER_ORDER = ("sgd", "sgd_momentum", "adam", "sgd_sn")
FIGURES = ("loss_curves.png", "accuracy_vs_depth.png", "grad_norm_vs_layer.png", "sigma_max.png", "headline_curves.png")


class NoData(Exception):
    """A figure has nothing to draw."""


@dataclass
class _Study:
    runs: pd.DataFrame  # all runs, with `panel` and `label` columns
    curves: pd.DataFrame
    layers: pd.DataFrame
    chosen: pd.DataFrame  # best-LR runs (every seed, any status)
    best: pd.DataFrame
    panels: list[str]
    palette: dict[str, tuple[float, float, float]]  # by optimizer


def plot_all(
    source: Path | str | tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], out_dir: Path | str
) -> list[Path]:
    """Draw every figure that has data into ``out_dir``; return the written PNG paths.

    ``source`` is a runs root (read with ``load_runs``) or its (runs, curves, layers) frames.
    """
    runs, curves, layers = load_runs(source) if isinstance(source, (str, Path)) else source
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = _prepare(runs, curves, layers)
    makers: dict[str, Callable[[_Study], Figure]] = {
        "loss_curves.png": _loss_curves,
        "accuracy_vs_depth.png": _accuracy_vs_depth,
        "grad_norm_vs_layer.png": _grad_norm_vs_layer,
        "sigma_max.png": _sigma_max,
        "headline_curves.png": _headline_curves,
    }
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        for name, make in makers.items():
            path = out_dir / name
            try:
                fig = make(study)
            except NoData as exc:
                warnings.warn(f"{name} skipped: {exc}", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            fig.savefig(path, dpi=DPI)
            written.append(path)
    return written


# ---------------------------------------------------------------- preparation


def _prepare(runs: pd.DataFrame, curves: pd.DataFrame, layers: pd.DataFrame) -> _Study:
    runs = runs.copy()
    study_col = runs["study"].astype(object).where(runs["study"].notna(), "")
    data_col = runs["dataset"].astype(object).where(runs["dataset"].notna(), "?")
    multi = study_col[runs["kind"] != "headline"].nunique() > 1
    runs["panel"] = (study_col + " / " + data_col) if multi else data_col.astype(str)
    runs["label"] = [_label(o, lr) for o, lr in zip(runs["optimizer"], runs["lr"])]
    best = best_lr_table(runs)
    chosen = best_runs(runs, best) if len(best) else runs.iloc[0:0]
    sw = sweep_runs(runs)
    panels = sorted(sw["panel"].unique().tolist())
    opts = _order(runs["optimizer"].dropna().unique())
    colors = sns.color_palette("tab10", max(10, len(opts)))
    palette = {o: colors[i] for i, o in enumerate(opts)}
    return _Study(runs, curves, layers, chosen, best, panels, palette)


def _label(opt: object, lr: object) -> str:
    if pd.isna(lr):
        return str(opt)
    return f"{opt} (lr {float(lr):.3g})"


def _order(optimizers: np.ndarray | list) -> list[str]:
    known = [o for o in OPTIMIZER_ORDER if o in set(optimizers)]
    return known + sorted(str(o) for o in optimizers if o not in OPTIMIZER_ORDER)


def _deepest(st: _Study, panel: str) -> tuple[int, pd.DataFrame]:
    """The deepest depth run in ``panel`` and the best-LR runs at that depth."""
    sw = sweep_runs(st.runs)
    depths = sw.loc[sw["panel"] == panel, "depth"].dropna()
    if depths.empty:
        raise NoData(f"no depths recorded for {panel}")
    d = int(depths.max())
    sel = st.chosen[(st.chosen["panel"] == panel) & (st.chosen["depth"] == d)]
    return d, sel


def _hue(st: _Study, frame: pd.DataFrame) -> dict:
    """lineplot keywords for one line per optimizer (labelled with its LR), fixed colours."""
    pairs = frame[["optimizer", "label"]].drop_duplicates()
    order = _order(pairs["optimizer"].unique())
    labels = [lab for o in order for lab in sorted(pairs.loc[pairs["optimizer"] == o, "label"])]
    pal = {lab: st.palette[o] for o, lab in pairs.itertuples(index=False, name=None)}
    return {"hue": "label", "hue_order": labels, "palette": pal}


def _tag(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Attach optimizer/label from ``runs`` to curve or layer rows (by run_dir)."""
    keep = runs[["run_dir", "optimizer", "label"]]
    return frame.drop(columns=[c for c in ("optimizer", "label") if c in frame]).merge(keep, on="run_dir", how="inner")


def _positive(frame: pd.DataFrame, col: str) -> pd.DataFrame:
    v = frame[col]
    return frame[np.isfinite(v) & (v > 0)]


def _legend(ax, extra: list[tuple[object, str]] = (), title: str | None = "optimizer") -> None:
    """Rebuild the axes legend: seaborn's hue entries plus extra (handle, label) pairs."""
    leg = ax.get_legend()
    handles = list(leg.legend_handles) if leg is not None else []
    labels = [t.get_text() for t in leg.get_texts()] if leg is not None else []
    for h, lab in extra:
        handles.append(h)
        labels.append(lab)
    if handles:
        ax.legend(handles, labels, title=title, fontsize="small", title_fontsize="small")


def _log_y(ax) -> None:
    """Log y axis with plain tick labels (0.5, 2, 30); minor ticks labelled only on short ranges."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _int_x(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _figure(nrows: int, ncols: int, w: float = 6.0, h: float = 4.2) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


# ---------------------------------------------------------------- figures


def _loss_curves(st: _Study) -> Figure:
    if not st.panels:
        raise NoData("no sweep runs")
    fig, axes = _figure(len(st.panels), 2)
    drawn = 0
    for row, panel in enumerate(st.panels):
        depth, sel = _deepest(st, panel)
        cur = _tag(st.curves[st.curves["run_dir"].isin(sel["run_dir"])], sel)
        for col, (metric, ylab) in enumerate((("epoch_train_loss", "train loss (epoch mean)"), ("val_loss", "validation loss"))):
            ax = axes[row, col]
            d = _positive(cur[cur["metric"] == metric], "value").assign(epoch_n=lambda f: f["epoch"] + 1)
            if d.empty:
                _empty(ax)
            else:
                sns.lineplot(data=d, x="epoch_n", y="value", errorbar="sd", marker="o", ax=ax, **_hue(st, d))
                _log_y(ax)
                _int_x(ax)
                _legend(ax)
                drawn += 1
            ax.set_title(f"{panel}: {ylab}, depth {depth}, best LR (mean ± sd over seeds)")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylab)
    if not drawn:
        raise NoData("no per-epoch losses at the deepest depth")
    fig.suptitle("Loss curves at the deepest depth")
    return fig


def _accuracy_vs_depth(st: _Study) -> Figure:
    if not st.panels:
        raise NoData("no sweep runs")
    fig, axes = _figure(1, len(st.panels), w=6.5)
    drawn = 0
    for i, panel in enumerate(st.panels):
        ax = axes[0, i]
        sel = st.chosen[st.chosen["panel"] == panel]
        chance = chance_level(st.runs[st.runs["panel"] == panel])
        ok = sel[(sel["status"] == "completed") & np.isfinite(sel["test_acc"])].copy()
        ok["depth"] = ok["depth"].astype(float)
        depths = sorted(float(d) for d in sel["depth"].dropna().unique())
        extra: list[tuple[object, str]] = []
        if not ok.empty:
            sns.lineplot(
                data=ok, x="depth", y="test_acc", hue="optimizer", hue_order=_order(ok["optimizer"].unique()),
                palette=st.palette, errorbar="sd", err_style="bars", marker="o", ax=ax,
            )
            drawn += 1
        # best-LR configurations in which no seed completed: an x at chance level
        dead = sel.groupby(["optimizer", "depth"]).filter(lambda g: (g["status"] != "completed").all())
        for opt in _order(dead["optimizer"].unique()):
            ds = sorted(float(d) for d in dead.loc[dead["optimizer"] == opt, "depth"].unique())
            ax.plot(ds, [chance] * len(ds), marker="x", ms=10, mew=2, ls="none", color=st.palette[opt])
            extra.append((Line2D([], [], marker="x", ls="none", color=st.palette[opt], mew=2), f"{opt}: no seed completed"))
            drawn += 1
        line = ax.axhline(chance, ls="--", color="0.4", lw=1)
        extra.append((line, f"chance ({100 * chance:.0f}%)"))
        ax.set_xscale("log", base=2)
        if depths:
            ax.xaxis.set_major_locator(FixedLocator(depths))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(int(d)) for d in depths])
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("depth (hidden layers, log scale)")
        ax.set_ylabel("test accuracy at best LR (mean ± sd)")
        ax.set_title(f"{panel}: test accuracy vs depth")
        _legend(ax, extra)
    if not drawn:
        raise NoData("no best-LR runs")
    fig.suptitle("Depth tolerance (LR selected on validation accuracy)")
    return fig


def _last_layers(st: _Study, sel: pd.DataFrame) -> pd.DataFrame:
    """Per run, the rows of its last check at which every layer's gradient norm is finite."""
    lay = st.layers[st.layers["run_dir"].isin(sel["run_dir"])]
    if lay.empty:
        return lay
    finite = lay.assign(_ok=np.isfinite(lay["grad_norm"])).groupby(["run_dir", "step"])["_ok"].transform("all")
    lay = lay[finite]
    last = lay.groupby("run_dir")["step"].transform("max")
    return _tag(lay[lay["step"] == last], sel)


def _grad_norm_vs_layer(st: _Study) -> Figure:
    if not st.panels:
        raise NoData("no sweep runs")
    fig, axes = _figure(1, len(st.panels), w=6.5)
    drawn = 0
    for i, panel in enumerate(st.panels):
        ax = axes[0, i]
        depth, sel = _deepest(st, panel)
        d = _positive(_last_layers(st, sel), "grad_norm")
        if d.empty:
            _empty(ax)
        else:
            sns.lineplot(data=d, x="layer", y="grad_norm", errorbar="sd", marker="o", ax=ax, **_hue(st, d))
            _log_y(ax)
            _int_x(ax)
            _legend(ax)
            drawn += 1
        ax.set_xlabel(f"layer (0 = input projection, {depth + 1} = output head)")
        ax.set_ylabel("gradient norm (Frobenius), last finite check")
        ax.set_title(f"{panel}: per-layer gradient norm, depth {depth}, best LR")
    if not drawn:
        raise NoData("no per-layer gradient norms at the deepest depth")
    fig.suptitle("Gradient norm by layer (mean ± sd over seeds)")
    return fig


def _sigma_max(st: _Study) -> Figure:
    if not st.panels:
        raise NoData("no sweep runs")
    fig, axes = _figure(1, len(st.panels), w=6.5)
    drawn = 0
    for i, panel in enumerate(st.panels):
        ax = axes[0, i]
        depth, sel = _deepest(st, panel)
        lay = st.layers[st.layers["run_dir"].isin(sel["run_dir"])]
        d = lay.groupby(["run_dir", "step"], as_index=False)["sigma_max"].max()
        d = _positive(_tag(d, sel), "sigma_max")
        if d.empty:
            _empty(ax)
            extra = []
        else:
            sns.lineplot(data=d, x="step", y="sigma_max", errorbar="sd", ax=ax, **_hue(st, d))
            _log_y(ax)
            drawn += 1
            extra = [(ax.axhline(1.0, ls="--", color="0.2", lw=1), "σ = 1")]
        _legend(ax, extra)
        ax.set_xlabel("step")
        ax.set_ylabel("max over layers of σ_max (exact)")
        ax.set_title(f"{panel}: largest singular value, depth {depth}, best LR")
    if not drawn:
        raise NoData("no sigma_max values at the deepest depth")
    fig.suptitle("Spectral norm of the weights during training (mean ± sd over seeds)")
    return fig


def _headline_curves(st: _Study) -> Figure:
    head = st.runs[st.runs["kind"] == "headline"]
    if head.empty:
        raise NoData("no headline run (a run directory named 'train')")
    if len(head) > 1:
        warnings.warn(f"{len(head)} headline runs; drawing {head['run_dir'].iloc[0]}", stacklevel=3)
    run = head.iloc[0]
    cur = st.curves[st.curves["run_dir"] == run["run_dir"]]
    loss = cur[(cur["metric"] == "train_loss") & np.isfinite(cur["value"]) & (cur["value"] > 0)]
    acc = cur[(cur["metric"] == "val_acc") & np.isfinite(cur["value"])].assign(epoch_n=lambda f: f["epoch"] + 1)
    if loss.empty and acc.empty:
        raise NoData(f"no curves for the headline run {run['run_dir']}")
    fig, axes = _figure(1, 2)
    ax = axes[0, 0]
    if loss.empty:
        _empty(ax)
    else:
        sns.lineplot(data=loss, x="step", y="value", ax=ax, label="train loss (log-interval mean)")
        _log_y(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("train loss")
    ax = axes[0, 1]
    if acc.empty:
        _empty(ax)
    else:
        sns.lineplot(data=acc, x="epoch_n", y="value", marker="o", ax=ax, label="validation accuracy")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        _int_x(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("validation accuracy")
    what = ", ".join(
        f"{k} {run[k]}" for k in ("optimizer", "dataset", "depth", "lr", "seed") if k in run and pd.notna(run[k])
    )
    fig.suptitle(f"Headline run {run['run_id']} ({what}; status {run['status']})")
    return fig
