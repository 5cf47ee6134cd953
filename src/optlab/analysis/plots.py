"""Figures for the studies, drawn with seaborn on matplotlib's Agg canvas.

A figure whose data is missing is skipped with a warning (and a stale file of that name is
removed); the others are still drawn. Panels are (study, dataset) pairs of the sweep; every
line is an optimizer at its validation-selected LR, mean ± sd over seeds unless a title says
otherwise. Figures:

- ``loss_curves_<study>.png``: train and validation loss per epoch, one row per dataset, at
  the deepest grid point where some optimizer's selected configuration trained;
- ``accuracy_vs_depth.png``: test accuracy vs depth (classification studies with a depth axis);
- ``grad_ratio_vs_depth.png``: first-layer / last-layer gradient norm at the end of training vs
  depth (the vanishing-signal picture);
- ``grad_norm_vs_layer.png``: the per-layer gradient norm profile at that point;
- ``sigma_max.png``: the largest singular value of the weights during training;
- ``ablation.png``: test accuracy per ablation variant, with one dot per seed;
- ``headline_curves.png``: the headline run;
- ``memory_vs_context.png``: memory and tokens/s vs context length (studies with a block_size axis).
"""

from __future__ import annotations

import re
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    _match,
    ablation_runs,
    best_lr_table,
    best_runs,
    chance_level,
    context_table,
    load_runs,
    parse_point,
    read_ablation_order,
    run_failure,
    sweep_runs,
)

DPI = 120
OPTIMIZER_ORDER = ("sgd", "sgd_momentum", "adam", "sgd_sn")
LOSS_PREFIX = "loss_curves_"
FIGURES = ("accuracy_vs_depth.png", "grad_ratio_vs_depth.png", "grad_norm_vs_layer.png", "sigma_max.png",
           "ablation.png", "headline_curves.png", "memory_vs_context.png")
"""The fixed figure names; ``loss_curves_<study>.png`` come in addition, one per study."""
VANISHING_RATIO = 1e-8  # engine.classify_failure: first-layer grad < 1e-8 x last-layer grad is "vanishing"
MARKER_MAX_POINTS = 40  # markers on a line only up to this many x values


class NoData(Exception):
    """A figure has nothing to draw."""


@dataclass
class _Study:
    runs: pd.DataFrame  # all runs, with a `label` column
    curves: pd.DataFrame  # curves of the selected-LR runs and the headline run
    last_layers: pd.DataFrame  # per run, the layer rows of its last check with finite gradient norms
    sigma_steps: pd.DataFrame  # per run and check step, the largest sigma_max over layers
    chosen: pd.DataFrame  # best-LR runs (every seed, any status), `label` with LR and failures
    best: pd.DataFrame
    panels: list[tuple[Any, Any]]  # (study, dataset) of the sweep
    palette: dict[str, tuple[float, float, float]]  # by optimizer
    variant_order: list[str] = field(default_factory=list)
    multi_study: bool = False


def plot_all(
    source: Path | str | tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    out_dir: Path | str,
    *,
    variant_order: list[str] | None = None,
) -> list[Path]:
    """Draw every figure that has data into ``out_dir``; return the written PNG paths.

    ``source`` is a runs root or its (runs, curves, layers) frames. From a root, only the
    selected-LR runs' and the headline run's curves and layers are read, and each layers file is
    reduced as it is read (the last finite check, the largest sigma per step), so that deep
    networks' per-layer logs need not fit in memory at once. ``variant_order`` orders the
    ablation bars (default: params.yaml beside the runs root, else by name).
    """
    if isinstance(source, (str, Path)):
        root = Path(source)
        runs, _, _ = load_runs(root, series=False)
        if variant_order is None:
            variant_order = read_ablation_order(root.resolve().parent / "params.yaml")
        st = _prepare(runs, None, None, root=root)
    else:
        runs, curves, layers = source
        st = _prepare(runs, curves, layers)
    st.variant_order = list(variant_order or [])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[], Figure]] = {}
    studies = list(dict.fromkeys(s for s, _ in st.panels))
    for study in studies:
        makers[f"{LOSS_PREFIX}{_slug(study)}.png"] = lambda s=study: _loss_curves(st, s)
    makers.update({
        "accuracy_vs_depth.png": lambda: _accuracy_vs_depth(st),
        "grad_ratio_vs_depth.png": lambda: _grad_ratio_vs_depth(st),
        "grad_norm_vs_layer.png": lambda: _grad_norm_vs_layer(st),
        "sigma_max.png": lambda: _sigma_max(st),
        "ablation.png": lambda: _ablation(st),
        "headline_curves.png": lambda: _headline_curves(st),
        "memory_vs_context.png": lambda: _memory_vs_context(st),
    })
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
            fig.savefig(path, dpi=DPI)
            written.append(path)
    return written


def _slug(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s)) if isinstance(s, str) and s else "study"


# ---------------------------------------------------------------- preparation


def _prepare(runs: pd.DataFrame, curves: pd.DataFrame | None, layers: pd.DataFrame | None,
             root: Path | None = None) -> _Study:
    runs = runs.copy()
    runs["label"] = [_label(o, lr) for o, lr in zip(runs["optimizer"], runs["lr"])]
    best = best_lr_table(runs)
    chosen = best_runs(runs, best) if len(best) else runs.iloc[0:0].copy()
    chosen = _config_labels(chosen)
    sw = sweep_runs(runs)
    keys = sw[["study", "dataset"]].drop_duplicates()
    panels = sorted(((s, d) for s, d in keys.itertuples(index=False, name=None)), key=lambda p: (str(p[0]), str(p[1])))
    multi = sw["study"].nunique(dropna=False) > 1
    # fixed colours for the study's optimizers (the same in every figure and report), others after them
    extra = [o for o in _order(runs["optimizer"].dropna().unique()) if o not in OPTIMIZER_ORDER]
    opts = [*OPTIMIZER_ORDER, *extra]
    colors = sns.color_palette("tab10", max(10, len(opts)))
    palette = {o: colors[i % len(colors)] for i, o in enumerate(opts)}
    head = runs[runs["kind"] == "headline"]
    needed = pd.concat([chosen, head], ignore_index=True)["run_dir"].dropna().unique().tolist()
    if root is not None:
        curves, last, sig = _read_series(root, runs[runs["run_dir"].isin(needed)])
    else:
        curves = curves if curves is not None else pd.DataFrame(columns=["run_dir", "step", "epoch", "metric", "value"])
        layers = layers if layers is not None else pd.DataFrame(columns=["run_dir", "step", "layer", "grad_norm", "sigma_max"])
        lay = layers[layers["run_dir"].isin(needed)]
        parts = [_reduce_layers(g) for _, g in lay.groupby("run_dir", sort=False)]
        last = pd.concat([p[0] for p in parts], ignore_index=True) if parts else _empty_layers()
        sig = pd.concat([p[1] for p in parts], ignore_index=True) if parts else _empty_sigma()
        curves = curves[curves["run_dir"].isin(needed)]
    return _Study(runs, curves, last, sig, chosen, best, panels, palette, multi_study=multi)


def _empty_layers() -> pd.DataFrame:
    return pd.DataFrame({"run_dir": pd.Series(dtype=object), "step": pd.Series(dtype=float),
                         "layer": pd.Series(dtype=float), "grad_norm": pd.Series(dtype=float)})


def _empty_sigma() -> pd.DataFrame:
    return pd.DataFrame({"run_dir": pd.Series(dtype=object), "step": pd.Series(dtype=float),
                         "sigma_max": pd.Series(dtype=float)})


def _reduce_layers(lay: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One run's layer rows -> (rows of its last check with every gradient norm finite, max sigma per step)."""
    lay = lay.copy()
    for c in ("step", "layer", "grad_norm", "sigma_max"):
        lay[c] = pd.to_numeric(lay[c], errors="coerce").astype(float)
    bad = set(lay.loc[~np.isfinite(lay["grad_norm"]), "step"])
    ok = lay[~lay["step"].isin(bad)]
    last = ok[ok["step"] == ok["step"].max()][["run_dir", "step", "layer", "grad_norm"]] if len(ok) else _empty_layers()
    sig = lay.groupby(["run_dir", "step"], as_index=False)["sigma_max"].max()
    return last, sig


def _read_series(root: Path, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    base = Path(root).resolve().parent
    curves, lasts, sigs = [], [], []
    for run_dir in runs["run_dir"]:
        d = base / run_dir
        for name in ("curves.csv", "layers.csv"):
            path = d / name
            if not path.is_file():
                continue
            try:
                frame = pd.read_csv(path)
            except pd.errors.EmptyDataError:
                continue
            except (OSError, ValueError, pd.errors.ParserError) as exc:
                warnings.warn(f"{path}: unreadable ({exc}); skipped", stacklevel=3)
                continue
            if frame.empty:
                continue
            frame.insert(0, "run_dir", run_dir)
            if name == "curves.csv":
                frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype(float)
                curves.append(frame)
            else:
                last, sig = _reduce_layers(frame)
                lasts.append(last)
                sigs.append(sig)
    cur = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["run_dir", "step", "epoch", "metric", "value"])
    last = pd.concat(lasts, ignore_index=True) if lasts else _empty_layers()
    sig = pd.concat(sigs, ignore_index=True) if sigs else _empty_sigma()
    return cur, last, sig


def _label(opt: object, lr: object) -> str:
    if pd.isna(lr):
        return str(opt)
    return f"{opt} (lr {float(lr):.3g})"


def _config_labels(chosen: pd.DataFrame) -> pd.DataFrame:
    """Label every selected configuration 'opt (lr x)' plus the failure kinds of its runs."""
    chosen = chosen.copy()
    chosen["_fail"] = [run_failure(r) or "" for r in chosen.to_dict("records")]
    labels = []
    for r in chosen.itertuples():
        labels.append(_label(r.optimizer, r.lr))
    chosen["label"] = labels
    keys = ["study", "dataset", "point", "optimizer"]
    for _, g in chosen.groupby(keys, dropna=False, sort=False):
        kinds = sorted({f for f in g["_fail"] if f})
        if kinds:
            n = int((g["_fail"] != "").sum())
            chosen.loc[g.index, "label"] = g["label"] + f" — {n}/{len(g)} failed: {', '.join(kinds)}"
    return chosen.drop(columns="_fail")


def _order(optimizers: np.ndarray | list) -> list[str]:
    known = [o for o in OPTIMIZER_ORDER if o in set(optimizers)]
    return known + sorted(str(o) for o in optimizers if o not in OPTIMIZER_ORDER)


def _panel_title(st: _Study, study: Any, dataset: Any) -> str:
    ds = str(dataset) if pd.notna(dataset) else "?"
    return f"{study} / {ds}" if st.multi_study and pd.notna(study) else ds


def _point_text(point: Any) -> str:
    pt = parse_point(point)
    return ", ".join(f"{k} {v}" for k, v in pt.items()) if pt else "single configuration"


def _focus(st: _Study, study: Any, dataset: Any) -> tuple[Any, pd.DataFrame]:
    """The deepest grid point of a panel where some optimizer's selected configuration trained
    (the deepest point when none did) and the selected-LR runs there."""
    sel = _match(st.chosen, study=study, dataset=dataset)
    if sel.empty:
        raise NoData(f"no selected runs for {study} / {dataset}")
    rows = []
    for point, g in sel.groupby("point", dropna=False, sort=False):
        pt = parse_point(point)
        value = tuple(float(v) if isinstance(v, (int, float)) else 0.0 for v in pt.values())
        trained = any((gg["status"] == "completed").all() and not any(run_failure(r) for r in gg.to_dict("records"))
                      for _, gg in g.groupby("optimizer"))
        rows.append((trained, value, point))
    pick = max(rows, key=lambda r: (r[0], r[1]))
    point = pick[2]
    return point, _match(sel, point=point)


def _hue(st: _Study, frame: pd.DataFrame) -> dict:
    """lineplot keywords for one line per optimizer (labelled with its LR), fixed colours."""
    pairs = frame[["optimizer", "label"]].drop_duplicates()
    order = _order(pairs["optimizer"].unique())
    labels = [lab for o in order for lab in sorted(pairs.loc[pairs["optimizer"] == o, "label"])]
    pal = {lab: st.palette[o] for o, lab in pairs.itertuples(index=False, name=None)}
    return {"hue": "label", "hue_order": labels, "palette": pal}


def _tag(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Attach optimizer/label/depth from ``runs`` to curve or layer rows (by run_dir)."""
    keep = runs[["run_dir", "optimizer", "label", "depth"]]
    frame = frame.drop(columns=[c for c in ("optimizer", "label", "depth") if c in frame])
    return frame.merge(keep, on="run_dir", how="inner")


def _positive(frame: pd.DataFrame, col: str) -> pd.DataFrame:
    v = frame[col].astype(float)
    return frame[np.isfinite(v) & (v > 0)]


def _legend(ax, extra: list[tuple[object, str]] = (), title: str | None = "optimizer (selected LR)") -> None:
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
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 300:  # up to two decades or so: label 2x and 5x as well
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    width = max(40, int(fig.get_figwidth() * 10))
    fig.suptitle("\n".join(textwrap.wrap(text, width)))


def _int_x(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _depth_x(ax, depths: list[float], label: str = "depth (hidden layers, log scale)") -> None:
    ax.set_xscale("log", base=2)
    if depths:
        ax.xaxis.set_major_locator(FixedLocator(depths))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(int(d)) for d in depths])
    ax.set_xlabel(label)


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _figure(nrows: int, ncols: int, w: float = 6.0, h: float = 4.2) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _grid(n: int, ncols: int = 3, w: float = 6.5, h: float = 4.4) -> tuple[Figure, list]:
    """n panels on a grid of at most ``ncols`` columns (unused axes hidden)."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = _figure(nrows, ncols, w, h)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _markers(frame: pd.DataFrame, col: str) -> dict:
    return {"marker": "o"} if frame[col].nunique() <= MARKER_MAX_POINTS else {}


def _depth_panels(st: _Study, classification_only: bool = False) -> list[tuple[Any, Any]]:
    """Panels whose selected runs span more than one depth."""
    out = []
    for study, dataset in st.panels:
        sel = _match(st.chosen, study=study, dataset=dataset)
        if classification_only and "task" in sel and (sel["task"] == "lm").any():
            continue
        if sel["depth"].dropna().nunique() > 1:
            out.append((study, dataset))
    return out


# ---------------------------------------------------------------- figures


def _loss_curves(st: _Study, study: Any) -> Figure:
    panels = [p for p in st.panels if p[0] == study]
    fig, axes = _figure(len(panels), 2)
    drawn = 0
    for row, (_, dataset) in enumerate(panels):
        point, sel = _focus(st, study, dataset)
        cur = _tag(st.curves[st.curves["run_dir"].isin(sel["run_dir"])], sel)
        for col, (metric, ylab) in enumerate((("epoch_train_loss", "train loss (epoch mean)"),
                                              ("val_loss", "validation loss"))):
            ax = axes[row, col]
            d = _positive(cur[cur["metric"] == metric], "value").assign(epoch_n=lambda f: f["epoch"] + 1)
            if d.empty:
                _empty(ax)
            else:
                sns.lineplot(data=d, x="epoch_n", y="value", errorbar="sd", ax=ax, **_markers(d, "epoch_n"), **_hue(st, d))
                _log_y(ax)
                _int_x(ax)
                _legend(ax)
                drawn += 1
            ax.set_title(f"{dataset}: {ylab}, {_point_text(point)}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylab)
    if not drawn:
        raise NoData(f"no per-epoch losses for study {study}")
    _suptitle(fig, f"{study}: loss curves at the deepest grid point some optimizer trained "
                   "(selected LR, mean ± sd over seeds)")
    return fig


def _accuracy_vs_depth(st: _Study) -> Figure:
    panels = _depth_panels(st, classification_only=True)
    if not panels:
        raise NoData("no classification study with more than one depth")
    fig, axes = _grid(len(panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, panels):
        sel = _match(st.chosen, study=study, dataset=dataset)
        chance = chance_level(_match(st.runs, study=study, dataset=dataset))
        ok = sel[(sel["status"] == "completed") & np.isfinite(sel["test_acc"].astype(float))].copy()
        ok["depth"] = ok["depth"].astype(float)
        depths = sorted(float(d) for d in sel["depth"].dropna().unique())
        extra: list[tuple[object, str]] = []
        if not ok.empty:
            sns.lineplot(
                data=ok, x="depth", y="test_acc", hue="optimizer", hue_order=_order(ok["optimizer"].unique()),
                palette=st.palette, errorbar="sd", err_style="bars", marker="o", ax=ax,
            )
            drawn += 1
        # selected configurations with a recorded failure: its kinds written beside the point
        for (opt, depth), g in sel.groupby(["optimizer", "depth"]):
            kinds = sorted({f for f in (run_failure(r) for r in g.to_dict("records")) if f})
            done = ok[(ok["optimizer"] == opt) & (ok["depth"] == float(depth))]
            if kinds and len(done):
                ax.annotate(", ".join(kinds), (float(depth), float(done["test_acc"].mean())), xytext=(6, 6),
                            textcoords="offset points", fontsize="small", color=st.palette[opt])
        # selected configurations in which no seed completed: an x at chance level
        dead = sel.groupby(["optimizer", "depth"]).filter(lambda g: (g["status"] != "completed").all())
        for opt in _order(dead["optimizer"].unique()):
            ds = sorted(float(d) for d in dead.loc[dead["optimizer"] == opt, "depth"].unique())
            ax.plot(ds, [chance] * len(ds), marker="x", ms=10, mew=2, ls="none", color=st.palette[opt])
            extra.append((Line2D([], [], marker="x", ls="none", color=st.palette[opt], mew=2), f"{opt}: no seed completed"))
            drawn += 1
        line = ax.axhline(chance, ls="--", color="0.4", lw=1)
        extra.append((line, f"chance ({100 * chance:.0f}%)"))
        _depth_x(ax, depths)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("test accuracy at selected LR (mean ± sd)")
        ax.set_title(f"{_panel_title(st, study, dataset)}: test accuracy vs depth")
        _legend(ax, extra, title="optimizer")
    if not drawn:
        raise NoData("no selected runs")
    _suptitle(fig, "Depth tolerance (LR selected on validation accuracy at each depth)")
    return fig


def _memory_vs_context(st: _Study) -> Figure:
    ctx = context_table(st.runs)
    ctx = ctx[ctx["mem_mb"].notna()]
    if ctx.empty:
        raise NoData("no study with a block_size axis")
    panels = list(ctx.groupby(["study", "dataset"], sort=True))
    fig, axes = _figure(len(panels), 2, w=5.5, h=4.0)
    for row, ((study, dataset), g) in zip(axes, panels):
        g = g.assign(block_size=g["block_size"].astype(float))
        hue = _order(g["optimizer"].unique())
        basis = sorted(set(g["mem_basis"].astype(str)))
        sns.lineplot(data=g, x="block_size", y="mem_mb", hue="optimizer", hue_order=hue, palette=st.palette,
                     marker="o", ax=row[0])
        row[0].set_ylabel(f"memory (MB, {'/'.join(basis)})")
        sns.lineplot(data=g[g["tokens_per_s"].notna()], x="block_size", y="tokens_per_s", hue="optimizer",
                     hue_order=hue, palette=st.palette, marker="o", ax=row[1])
        row[1].set_ylabel("training tokens / s")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(g["block_size"].unique()))
            ax.get_xaxis().set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("context length (tokens)")
            ax.set_title(f"{_panel_title(st, study, dataset)}")
            _legend(ax, title="optimizer")
    _suptitle(fig, "Context length: memory (peak CUDA / profiled step on CPU) and throughput")
    return fig


def _grad_ratio_vs_depth(st: _Study) -> Figure:
    panels = _depth_panels(st)
    if not panels:
        raise NoData("no study with more than one depth")
    fig, axes = _grid(len(panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, panels):
        sel = _match(st.chosen, study=study, dataset=dataset)
        lay = st.last_layers[st.last_layers["run_dir"].isin(sel["run_dir"])]
        rows = []
        for run_dir, g in lay.groupby("run_dir"):
            g = g.sort_values("layer")
            first, last = float(g["grad_norm"].iloc[0]), float(g["grad_norm"].iloc[-1])
            if np.isfinite(first) and np.isfinite(last) and last > 0:
                rows.append({"run_dir": run_dir, "ratio": first / last})
        d = _tag(pd.DataFrame(rows, columns=["run_dir", "ratio"]), sel)
        depths = sorted(float(x) for x in sel["depth"].dropna().unique())
        extra: list[tuple[object, str]] = []
        if d.empty:
            _empty(ax)
        else:
            d["depth"] = d["depth"].astype(float)
            pos = d["ratio"][d["ratio"] > 0]
            floor = float(pos.min()) / 10 if len(pos) else 1e-45
            zero = d["ratio"] <= 0
            d.loc[zero, "ratio"] = floor
            sns.lineplot(data=d, x="depth", y="ratio", hue="optimizer", hue_order=_order(d["optimizer"].unique()),
                         palette=st.palette, estimator=_geomean, errorbar=("pi", 100), marker="o", ax=ax)
            if zero.any():
                extra.append((Line2D([], [], ls="none"), f"ratio 0 (underflow) drawn at {floor:.0e}"))
            _log_y(ax)
            extra.append((ax.axhline(VANISHING_RATIO, ls="--", color="0.3", lw=1), "vanishing threshold (1e-8)"))
            ax.axhline(1.0, ls=":", color="0.5", lw=1)
            drawn += 1
        _depth_x(ax, depths)
        ax.set_ylabel("‖∇ first layer‖ / ‖∇ last layer‖ (last finite check)")
        ax.set_title(f"{_panel_title(st, study, dataset)}: gradient ratio vs depth")
        _legend(ax, extra, title="optimizer")
    if not drawn:
        raise NoData("no per-layer gradient norms")
    _suptitle(fig, "Signal reaching the first layer at the end of training "
                   "(selected LR; geometric mean over seeds, band = range)")
    return fig


def _geomean(x: pd.Series) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.exp(np.mean(np.log(x)))) if len(x) else float("nan")


def _grad_norm_vs_layer(st: _Study) -> Figure:
    if not st.panels:
        raise NoData("no sweep runs")
    fig, axes = _grid(len(st.panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, st.panels):
        point, sel = _focus(st, study, dataset)
        d = _positive(_tag(st.last_layers[st.last_layers["run_dir"].isin(sel["run_dir"])], sel), "grad_norm")
        if d.empty:
            _empty(ax)
        else:
            sns.lineplot(data=d, x="layer", y="grad_norm", estimator=_geomean, errorbar=("pi", 100), ax=ax,
                         **_markers(d, "layer"), **_hue(st, d))
            _log_y(ax)
            _int_x(ax)
            _legend(ax)
            drawn += 1
        ax.set_xlabel("layer (0 = input projection, last = output head)")
        ax.set_ylabel("gradient norm (Frobenius), last finite check")
        ax.set_title(f"{_panel_title(st, study, dataset)}: per-layer gradient norm, {_point_text(point)}")
    if not drawn:
        raise NoData("no per-layer gradient norms")
    _suptitle(fig, "Gradient norm by layer at the deepest grid point some optimizer trained "
                   "(selected LR; geometric mean over seeds, band = range)")
    return fig


def _sigma_max(st: _Study) -> Figure:
    if not st.panels:
        raise NoData("no sweep runs")
    fig, axes = _grid(len(st.panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, st.panels):
        point, sel = _focus(st, study, dataset)
        d = _positive(_tag(st.sigma_steps[st.sigma_steps["run_dir"].isin(sel["run_dir"])], sel), "sigma_max")
        extra: list[tuple[object, str]] = []
        if d.empty:
            _empty(ax)
        else:
            sns.lineplot(data=d, x="step", y="sigma_max", errorbar="sd", ax=ax, **_hue(st, d))
            _log_y(ax)
            drawn += 1
            extra = [(ax.axhline(1.0, ls="--", color="0.2", lw=1), "σ = 1")]
        _legend(ax, extra)
        ax.set_xlabel("step")
        ax.set_ylabel("max over layers of σ_max (exact)")
        ax.set_title(f"{_panel_title(st, study, dataset)}: largest singular value, {_point_text(point)}")
    if not drawn:
        raise NoData("no sigma_max values")
    _suptitle(fig, "Spectral norm of the weights during training (selected LR, mean ± sd over seeds)")
    return fig


def _ablation(st: _Study) -> Figure:
    ab = ablation_runs(st.runs)
    ab = ab[ab["variant"].notna()].copy()
    if ab.empty:
        raise NoData("no ablation runs")
    names = sorted(ab["variant"].unique())
    order = [v for v in st.variant_order if v in names] + [v for v in names if v not in st.variant_order]
    opts = _order(ab["optimizer"].dropna().unique())
    ok = ab[(ab["status"] == "completed") & np.isfinite(ab["test_acc"].astype(float))].copy()
    fig, axes = _figure(1, 1, w=10.0, h=0.55 * len(order) + 1.8)
    ax = axes[0, 0]
    colors = {v: st.palette.get(ab.loc[ab["variant"] == v, "optimizer"].iloc[0], "0.5") for v in order}
    if not ok.empty:
        sns.barplot(data=ok, y="variant", x="test_acc", order=order, hue="variant", hue_order=order, palette=colors,
                    errorbar="sd", capsize=0.2, alpha=0.55, legend=False, ax=ax)
        sns.stripplot(data=ok, y="variant", x="test_acc", order=order, color="0.15", size=5, jitter=0.15, ax=ax)
    means = ok.groupby("variant")["test_acc"].mean()
    for i, v in enumerate(order):
        if v in means.index:  # the mean, written inside the bar at its base
            ax.annotate(f"mean {100 * means[v]:.1f}%", (0, i), xytext=(14, 0), textcoords="offset points",
                        ha="left", va="center", fontsize="small", color="0.1")
    extra = []
    for i, v in enumerate(order):
        bad = ab[(ab["variant"] == v) & (ab["status"] != "completed")]
        if len(bad):
            ax.plot([0.0] * len(bad), [i] * len(bad), marker="x", ms=9, mew=2, ls="none", color="crimson", clip_on=False)
            extra = [(Line2D([], [], marker="x", ls="none", color="crimson", mew=2), "seed diverged / failed (at 0)")]
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("test accuracy (bar: mean over completed seeds ± sd; dots: seeds)")
    ax.set_ylabel("variant")
    handles = [(Line2D([], [], marker="s", ls="none", ms=10, color=st.palette[o], alpha=0.55), o) for o in opts]
    handles.append((Line2D([], [], marker="o", ls="none", color="0.15"), "one seed"))
    ax.legend([h for h, _ in handles + extra], [lab for _, lab in handles + extra], title="optimizer",
              fontsize="small", title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    what = ", ".join(str(x) for x in ab["dataset"].dropna().unique())
    ax.set_title(f"Ablation: test accuracy per variant ({what})")
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
    _suptitle(fig, f"Headline run {run['run_id']} ({what}; status {run['status']})")
    return fig
