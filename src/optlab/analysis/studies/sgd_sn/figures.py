"""The SGD + spectral-norm study's figures (see :func:`figures`).

- ``accuracy_vs_depth.png``: test accuracy vs depth (classification studies with a depth axis);
- ``grad_ratio_vs_depth.png``: first-layer / last-layer gradient norm at the end of training vs
  depth (the vanishing-signal picture);
- ``grad_norm_vs_layer.png``: the per-layer gradient norm profile at the focus point;
- ``sigma_max.png``: the largest singular value of the weights during training;
- ``ablation.png``: test accuracy per ablation variant, with one dot per seed;
- ``memory_vs_context.png``: memory and tokens/s vs context length (studies with a block_size axis).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, PercentFormatter

from ... import plots as P
from ...aggregate import ablation_runs, chance_level, long_layers, match, run_failure
from .tables import context_table

VANISHING_RATIO = 1e-8  # the engine's rule: first-layer grad < 1e-8 x last-layer grad is "vanishing"


def figures(fd: P.FigureData) -> dict[str, Callable[[], Figure]]:
    cache: dict[str, pd.DataFrame] = {}

    def reduced() -> dict[str, pd.DataFrame]:
        if not cache:
            got = fd.layers(reduce_layers)
            cache["last"] = got.get("last", _empty_last())
            cache["sigma"] = got.get("sigma", _empty_sigma())
        return cache

    return {
        "accuracy_vs_depth.png": lambda: _accuracy_vs_depth(fd),
        "grad_ratio_vs_depth.png": lambda: _grad_ratio_vs_depth(fd, reduced()["last"]),
        "grad_norm_vs_layer.png": lambda: _grad_norm_vs_layer(fd, reduced()["last"]),
        "sigma_max.png": lambda: _sigma_max(fd, reduced()["sigma"]),
        "ablation.png": lambda: _ablation(fd),
        "memory_vs_context.png": lambda: _memory_vs_context(fd),
    }


def _empty_last() -> pd.DataFrame:
    return pd.DataFrame({"run_dir": pd.Series(dtype=object), "step": pd.Series(dtype=float),
                         "layer": pd.Series(dtype=float), "grad_norm": pd.Series(dtype=float)})


def _empty_sigma() -> pd.DataFrame:
    return pd.DataFrame({"run_dir": pd.Series(dtype=object), "step": pd.Series(dtype=float),
                         "sigma_max": pd.Series(dtype=float)})


def reduce_layers(lay: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One run's long layer rows -> ``last``: the ``grad_norm`` rows of its last check at which
    every gradient norm is finite; ``sigma``: the largest ``sigma_max`` per check step."""
    lay = long_layers(lay)
    for c in ("step", "layer"):
        lay[c] = pd.to_numeric(lay[c], errors="coerce").astype(float)
    grad = lay[lay["metric"] == "grad_norm"]
    bad = set(grad.loc[~np.isfinite(grad["value"].to_numpy(dtype=float)), "step"])  # inf / nan: a diverging step
    ok = grad[~grad["step"].isin(bad)]
    if len(ok):
        last = ok[ok["step"] == ok["step"].max()].rename(columns={"value": "grad_norm"})
        last = last[["run_dir", "step", "layer", "grad_norm"]]
    else:
        last = _empty_last()
    sig = lay[(lay["metric"] == "sigma_max") & lay["value"].notna()]
    sig = sig.groupby(["run_dir", "step"], as_index=False)["value"].max().rename(columns={"value": "sigma_max"})
    return {"last": last, "sigma": sig if len(sig) else _empty_sigma()}


def _accuracy_vs_depth(fd: P.FigureData) -> Figure:
    panels = P.depth_panels(fd, classification_only=True)
    if not panels:
        raise P.NoData("no classification study with more than one depth")
    fig, axes = P.grid(len(panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, panels):
        sel = match(fd.chosen, study=study, dataset=dataset)
        chance = chance_level(match(fd.runs, study=study, dataset=dataset))
        ok = sel[(sel["status"] == "completed") & np.isfinite(sel["test_acc"].astype(float))].copy()
        ok["depth"] = ok["depth"].astype(float)
        depths = sorted(float(d) for d in sel["depth"].dropna().unique())
        extra: list[tuple[object, str]] = []
        if not ok.empty:
            order = fd.method_order(ok["method"].unique())
            ok["depth_drawn"] = P.dodge(fd, ok, "depth", order)  # side by side at each depth: none hidden
            sns.lineplot(
                data=ok, x="depth_drawn", y="test_acc", hue="method", hue_order=order,
                palette=fd.palette, errorbar="sd", err_style="bars", ax=ax, **P.method_style(fd, order),
            )
            drawn += 1
        # selected configurations with a recorded failure: its kinds written beside the point
        for (meth, depth), g in sel.groupby(["method", "depth"]):
            kinds = sorted({f for f in (run_failure(r) for r in g.to_dict("records")) if f})
            done = ok[(ok["method"] == meth) & (ok["depth"] == float(depth))]
            if kinds and len(done):
                ax.annotate(", ".join(kinds), (float(depth), float(done["test_acc"].mean())), xytext=(6, 6),
                            textcoords="offset points", fontsize="small", color=fd.palette[meth])
        # selected configurations in which no seed completed: an x at chance level
        dead = sel.groupby(["method", "depth"]).filter(lambda g: (g["status"] != "completed").all())
        for meth in fd.method_order(dead["method"].unique()):
            ds = sorted(float(d) for d in dead.loc[dead["method"] == meth, "depth"].unique())
            ax.plot(ds, [chance] * len(ds), marker="x", ms=10, mew=2, ls="none", color=fd.palette[meth])
            extra.append((Line2D([], [], marker="x", ls="none", color=fd.palette[meth], mew=2), f"{meth}: no seed completed"))
            drawn += 1
        line = ax.axhline(chance, ls="--", color="0.4", lw=1)
        extra.append((line, f"chance ({100 * chance:.0f}%)"))
        P.depth_x(ax, depths)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel("test accuracy at selected LR (mean ± sd)")
        ax.set_title(f"{P.panel_title(fd, study, dataset)}: test accuracy vs depth")
        P.legend(ax, extra, title="optimizer")
    if not drawn:
        raise P.NoData("no selected runs")
    P.suptitle(fig, "Depth tolerance (LR selected on validation accuracy at each depth)")
    return fig


def _memory_vs_context(fd: P.FigureData) -> Figure:
    ctx = context_table(fd.runs)
    ctx = ctx[ctx["mem_mb"].notna()]
    if ctx.empty:
        raise P.NoData("no study with a block_size axis")
    panels = list(ctx.groupby(["study", "dataset"], sort=True))
    fig, axes = P.figure(len(panels), 2, w=5.5, h=4.0)
    for row, ((study, dataset), g) in zip(axes, panels):
        g = g.assign(block_size=g["block_size"].astype(float))
        order = fd.method_order(g["method"].unique())
        basis = sorted(set(g["mem_basis"].astype(str)))
        sns.lineplot(data=g, x="block_size", y="mem_mb", hue="method", hue_order=order, palette=fd.palette,
                     ax=row[0], **P.method_style(fd, order))
        row[0].set_ylabel(f"memory (MB, {'/'.join(basis)})")
        tp = g[g["tokens_per_s"].notna()]
        if tp.empty:
            P.empty(row[1], "no steady throughput (runs of one epoch)")
        else:
            tp_order = [o for o in order if o in set(tp["method"])]
            sns.lineplot(data=tp, x="block_size", y="tokens_per_s", hue="method", hue_order=tp_order,
                         palette=fd.palette, ax=row[1], **P.method_style(fd, tp_order))
            for meth, gm in tp.groupby("method"):
                gm = gm.sort_values("block_size")
                mad = gm["tokens_per_s_mad"].fillna(0.0)
                row[1].fill_between(gm["block_size"], gm["tokens_per_s"] - mad, gm["tokens_per_s"] + mad,
                                    color=fd.palette.get(meth, (0.5, 0.5, 0.5)), alpha=0.2, linewidth=0)
        row[1].set_ylabel("training tokens / s (after warm-up, ± MAD)")
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(g["block_size"].unique()))
            ax.get_xaxis().set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("context length (tokens)")
            ax.set_title(f"{P.panel_title(fd, study, dataset)}")
            P.legend(ax, title="optimizer")
    P.suptitle(fig, "Context length: memory (peak CUDA / profiled step on CPU) and throughput")
    return fig


def _grad_ratio_vs_depth(fd: P.FigureData, last_layers: pd.DataFrame) -> Figure:
    panels = P.depth_panels(fd)
    if not panels:
        raise P.NoData("no study with more than one depth")
    fig, axes = P.grid(len(panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, panels):
        sel = match(fd.chosen, study=study, dataset=dataset)
        lay = last_layers[last_layers["run_dir"].isin(sel["run_dir"])]
        rows = []
        for run_dir, g in lay.groupby("run_dir"):
            g = g.sort_values("layer")
            first, last = float(g["grad_norm"].iloc[0]), float(g["grad_norm"].iloc[-1])
            if np.isfinite(first) and np.isfinite(last) and last > 0:
                rows.append({"run_dir": run_dir, "ratio": first / last})
        d = P.tag(pd.DataFrame(rows, columns=["run_dir", "ratio"]), sel)
        depths = sorted(float(x) for x in sel["depth"].dropna().unique())
        extra: list[tuple[object, str]] = []
        if d.empty:
            P.empty(ax)
        else:
            d["depth"] = d["depth"].astype(float)
            pos = d["ratio"][d["ratio"] > 0]
            floor = float(pos.min()) / 10 if len(pos) else 1e-45
            zero = d["ratio"] <= 0
            d.loc[zero, "ratio"] = floor
            order = fd.method_order(d["method"].unique())
            sns.lineplot(data=d, x="depth", y="ratio", hue="method", hue_order=order,
                         palette=fd.palette, estimator=P.geomean, errorbar=("pi", 100), ax=ax,
                         **P.method_style(fd, order))
            if zero.any():
                extra.append((Line2D([], [], ls="none"), f"ratio 0 (underflow) drawn at {floor:.0e}"))
            P.log_y(ax)
            extra.append((ax.axhline(VANISHING_RATIO, ls="--", color="0.3", lw=1), "vanishing threshold (1e-8)"))
            ax.axhline(1.0, ls=":", color="0.5", lw=1)
            drawn += 1
        P.depth_x(ax, depths)
        ax.set_ylabel("‖∇ first layer‖ / ‖∇ last layer‖ (last finite check)")
        ax.set_title(f"{P.panel_title(fd, study, dataset)}: gradient ratio vs depth")
        P.legend(ax, extra, title="optimizer")
    if not drawn:
        raise P.NoData("no per-layer gradient norms")
    P.suptitle(fig, "Signal reaching the first layer at the end of training "
                    "(selected LR; geometric mean over seeds, band = range)")
    return fig


def _grad_norm_vs_layer(fd: P.FigureData, last_layers: pd.DataFrame) -> Figure:
    if not fd.panels:
        raise P.NoData("no sweep runs")
    fig, axes = P.grid(len(fd.panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, fd.panels):
        point, sel = P.focus(fd, study, dataset)
        d = P.positive(P.tag(last_layers[last_layers["run_dir"].isin(sel["run_dir"])], sel), "grad_norm")
        if d.empty:
            P.empty(ax)
        else:
            sns.lineplot(data=d, x="layer", y="grad_norm", estimator=P.geomean, errorbar=("pi", 100), ax=ax,
                         **P.hue(fd, d, "layer"))
            P.log_y(ax)
            P.int_x(ax)
            P.legend(ax)
            drawn += 1
        ax.set_xlabel("layer (0 = input projection, last = output head)")
        ax.set_ylabel("gradient norm (Frobenius), last finite check")
        ax.set_title(f"{P.panel_title(fd, study, dataset)}: per-layer gradient norm, {P.point_text(point)}")
    if not drawn:
        raise P.NoData("no per-layer gradient norms")
    P.suptitle(fig, "Gradient norm by layer at the deepest grid point some optimizer trained "
                    "(selected LR; geometric mean over seeds, band = range)")
    return fig


def _sigma_max(fd: P.FigureData, sigma_steps: pd.DataFrame) -> Figure:
    if not fd.panels:
        raise P.NoData("no sweep runs")
    fig, axes = P.grid(len(fd.panels))
    drawn = 0
    for ax, (study, dataset) in zip(axes, fd.panels):
        point, sel = P.focus(fd, study, dataset)
        d = P.positive(P.tag(sigma_steps[sigma_steps["run_dir"].isin(sel["run_dir"])], sel), "sigma_max")
        extra: list[tuple[object, str]] = []
        if d.empty:
            P.empty(ax)
        else:
            sns.lineplot(data=d, x="step", y="sigma_max", estimator=P.geomean, errorbar=("pi", 50), ax=ax,
                         **P.hue(fd, d, "step"))
            P.log_y(ax)
            drawn += 1
            extra = [(ax.axhline(1.0, ls="--", color="0.2", lw=1), "σ = 1")]
        P.legend(ax, extra)
        ax.set_xlabel("step")
        ax.set_ylabel("max over layers of σ_max (exact)")
        ax.set_title(f"{P.panel_title(fd, study, dataset)}: largest singular value, {P.point_text(point)}")
    if not drawn:
        raise P.NoData("no sigma_max values")
    P.suptitle(fig, "Spectral norm of the weights during training (selected LR, geometric mean and IQR over seeds)")
    return fig


def _ablation(fd: P.FigureData) -> Figure:
    ab = ablation_runs(fd.runs)
    ab = ab[ab["variant"].notna()].copy()
    if ab.empty:
        raise P.NoData("no ablation runs")
    names = sorted(ab["variant"].unique())
    order = [v for v in fd.variant_order if v in names] + [v for v in names if v not in fd.variant_order]
    methods = fd.method_order(ab["method"].dropna().unique())
    ok = ab[(ab["status"] == "completed") & np.isfinite(ab["test_acc"].astype(float))].copy()
    fig, axes = P.figure(1, 1, w=10.0, h=0.55 * len(order) + 1.8)
    ax = axes[0, 0]
    colors = {v: fd.palette.get(ab.loc[ab["variant"] == v, "method"].iloc[0], "0.5") for v in order}
    if not ok.empty:
        sns.barplot(data=ok, y="variant", x="test_acc", order=order, hue="variant", hue_order=order, palette=colors,
                    errorbar="sd", capsize=0.2, alpha=0.55, legend=False, ax=ax)
        # the seeds' dots spread evenly across the bar (seaborn's jitter is random: the same data
        # would give a different image on every run)
        for i, v in enumerate(order):
            vals = ok.loc[ok["variant"] == v].sort_values("seed")["test_acc"].astype(float).to_numpy()
            if len(vals):
                ys = i + (np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else np.zeros(1))
                ax.scatter(vals, ys, s=25, color="0.15", zorder=3)
    means = ok.groupby("variant")["test_acc"].mean()
    for i, v in enumerate(order):
        if v in means.index:  # the mean, written inside the bar at its base
            ax.annotate(f"mean {100 * means[v]:.1f}%", (0, i), xytext=(14, 0), textcoords="offset points",
                        ha="left", va="center", fontsize="small", color="0.1")
    extra: list[tuple[Any, str]] = []
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
    handles = [(Line2D([], [], marker="s", ls="none", ms=10, color=fd.palette.get(o, "0.5"), alpha=0.55), o) for o in methods]
    handles.append((Line2D([], [], marker="o", ls="none", color="0.15"), "one seed"))
    ax.legend([h for h, _ in handles + extra], [lab for _, lab in handles + extra], title="optimizer",
              fontsize="small", title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    what = ", ".join(str(x) for x in ab["dataset"].dropna().unique())
    ax.set_title(f"Ablation: test accuracy per variant ({what})")
    return fig
