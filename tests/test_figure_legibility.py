"""Figures people can read: distinct colour and marker per method, overlapping lines visible,
log-axis bands from quantiles, empty panels dropped (checked on the figures' data, not pixels)."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optlab.analysis import plots as P
from optlab.analysis.studies.sgd_sn import figures as SF
from tests.test_analysis_studies import make_tree


@pytest.fixture()
def fds(tmp_path: Path):
    root = make_tree(tmp_path / "runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core, per = P.figure_data(root)
    return core, per["sgd_sn"]


def test_colours_and_markers_tell_methods_apart():
    colours = [tuple(np.round(c, 6)) for c in P.COLORS]
    assert len(set(colours)) == len(colours) >= 27
    pairs = {(colours[i % len(colours)], P.MARKERS[i % len(P.MARKERS)]) for i in range(189)}
    assert len(pairs) == 189


def test_palette_gives_each_method_of_a_study_its_own_colour(fds):
    core, _ = fds
    methods = list(core.palette)
    cols = [tuple(core.palette[m]) for m in methods]
    assert len(set(cols)) == len(cols)  # the old tab10 cycle gave the 11th method the 1st's colour
    marks = [P.marker_of(core, m) for m in methods]
    assert len(set(zip(cols, marks))) == len(methods)


def test_loss_curves_are_geometric_means_with_quantile_bands_and_hollow_markers(fds):
    core, _ = fds
    fig = P._loss_curves(core, "mlp_depth")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = [ln for ln in ax.lines if len(ln.get_xdata()) > 1 and ln.get_marker() not in (None, "None", "")]
    assert lines and len({ln.get_marker() for ln in lines}) == len(lines)  # one marker shape per method
    assert all(ln.get_markerfacecolor() == "none" for ln in lines)  # hollow: coinciding lines both show
    point, sel = P.focus(core, "mlp_depth", "digits")
    cur = P.tag(core.curves[core.curves["run_dir"].isin(sel["run_dir"])], sel)
    d = cur[cur["metric"] == "epoch_train_loss"]
    first = d[d["label"] == sorted(d["label"].unique(), key=lambda s: core.method_order([s.split(" ")[0]]))[0]]
    want = first.groupby("epoch")["value"].apply(lambda x: float(np.exp(np.log(x).mean()))).to_numpy()
    assert any(np.allclose(ln.get_ydata(), want) for ln in lines)


def test_accuracy_vs_depth_dodges_methods_at_each_depth(fds):
    _, fd = fds
    fig = SF._accuracy_vs_depth(fd)
    ax = fig.axes[0]
    xs = [np.asarray(ln.get_xdata(), float) for ln in ax.lines
          if len(ln.get_xdata()) > 1 and ln.get_marker() not in (None, "None", "")]  # not the chance line
    assert len(xs) >= 2
    at2 = sorted(x[np.argmin(np.abs(np.log2(x) - 1))] for x in xs)  # each line's point nearest depth 2
    assert at2[0] < at2[-1] and all(abs(np.log2(v) - 1) < 0.1 for v in at2)  # apart, yet at depth 2
    assert [t.get_text() for t in ax.get_xticklabels()][:1] == ["2"]  # ticks stay on the true depths


def test_empty_panels_are_dropped_and_the_figure_shrinks():
    fig, axes = P.figure(2, 2)
    for ax in axes.ravel()[:3]:
        ax.plot([1, 2], [1, 2])
    P.empty(axes[1, 1])
    w, h = fig.get_size_inches()
    P.drop_empty(fig)
    assert len(fig.axes) == 3 and all(not getattr(ax, "_optlab_empty", False) for ax in fig.axes)
    assert tuple(fig.get_size_inches()) == pytest.approx((w, h))  # 3 panels still need 2 x 2
    fig, axes = P.figure(1, 3)
    w3, h3 = fig.get_size_inches()
    axes[0, 0].plot([1, 2], [1, 2])
    P.empty(axes[0, 1])
    P.empty(axes[0, 2])
    P.drop_empty(fig)
    assert len(fig.axes) == 1 and tuple(fig.get_size_inches()) == pytest.approx((w3 / 3, h3))
    fig, axes = P.figure(1, 2)  # every panel empty: left as it is (the figure says "no data")
    P.empty(axes[0, 0])
    P.empty(axes[0, 1])
    P.drop_empty(fig)
    assert len(fig.axes) == 2


def test_markers_thin_out_on_long_lines(fds):
    core, _ = fds
    frame = pd.DataFrame({"method": "sgd", "label": "sgd (lr 0.1)", "step": np.arange(500)})
    kw = P.hue(core, frame, "step")
    assert kw["markevery"] == 500 // P.MARKS_PER_LINE and kw["dashes"] is False
    assert "markevery" not in P.hue(core, frame.iloc[:20], "step")


def _headline_dir(tmp_path: Path, acc: bool) -> Path:
    import csv
    import json

    d = tmp_path / ("cls" if acc else "lm")
    d.mkdir()
    with (d / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "metric", "value"])
        for e in range(3):
            for s in range(e * 10 + 1, e * 10 + 11, 5):
                w.writerow([s, e, "train_loss", 2.0 / s])
            w.writerow([10 * (e + 1), e, "epoch_train_loss", 1.0 / (e + 1)])
            w.writerow([10 * (e + 1), e, "val_loss", 1.2 / (e + 1)])
            if acc:
                w.writerow([10 * (e + 1), e, "train_acc", 0.5 + 0.1 * e])
                w.writerow([10 * (e + 1), e, "val_acc", 0.45 + 0.1 * e])
    (d / "metrics.json").write_text(json.dumps({"status": "completed", "config": {"optimizer": "adam", "lr": 0.01}}))
    return d


def test_headline_figure_is_drawn_from_the_run_alone(tmp_path):
    from matplotlib.image import imread

    out = P.headline_figure(_headline_dir(tmp_path, acc=True))
    assert out.name == "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lm = P.headline_figure(_headline_dir(tmp_path, acc=False))  # no accuracy: the loss panel only
    assert imread(lm).shape[1] < imread(out).shape[1]
    first = out.read_bytes()
    P.headline_figure(out.parent)
    assert out.read_bytes() == first  # byte-stable for identical data
    with pytest.raises(P.NoData):
        P.headline_figure(tmp_path / "missing")


def test_classifier_loss_curves_mark_the_chance_loss_and_lm_curves_do_not(fds):
    core, _ = fds

    def flat_lines(fig):
        return [ln for ax in fig.axes for ln in ax.lines if len(set(np.asarray(ln.get_ydata(), float))) == 1]

    mlp = P._loss_curves(core, "mlp_depth")
    levels = {round(float(ln.get_ydata()[0]), 4) for ln in flat_lines(mlp)}
    assert round(float(np.log(10)), 4) in levels  # digits: 10 classes, uniform output loses ln 10 nats
    assert any("chance: uniform output, ln 10" in t.get_text() for ax in mlp.axes for t in ax.get_legend().get_texts())
    gpt = P._loss_curves(core, "gpt")
    assert not any("chance" in t.get_text() for ax in gpt.axes if ax.get_legend() for t in ax.get_legend().get_texts())
