"""optlab.screenshots: the MLflow UI and a logged figure, rendered by headless Chromium (slow; skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optlab import screenshots

pytestmark = pytest.mark.slow


def test_blank_tells_an_empty_page_from_a_drawn_one(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (40, 30), "white")
    im.save(tmp_path / "blank.png")
    ImageDraw.Draw(im).rectangle([5, 5, 20, 20], fill="navy")
    im.save(tmp_path / "drawn.png")
    assert screenshots.blank(tmp_path / "blank.png") and not screenshots.blank(tmp_path / "drawn.png")


@pytest.mark.skipif(screenshots.find_chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_the_mlflow_ui_renders_the_runs_a_parent_and_its_figure(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from PIL import Image, ImageDraw

    from optlab.tracking.mlflow_sink import ensure_experiment

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    client = MlflowClient(uri)
    exp = ensure_experiment(client, "optlab", uri)
    parent = client.create_run(exp, run_name="s@sgd", tags={"optlab.role": "parent"}).info.run_id
    fig = tmp_path / "loss_curves_s.png"
    im = Image.new("RGB", (200, 120), "white")
    ImageDraw.Draw(im).rectangle([20, 20, 180, 100], fill="navy")
    im.save(fig)
    client.log_artifact(parent, str(fig), "figures")
    client.create_run(exp, run_name="sgd-digits-d2-lr0.1-s0", tags={"mlflow.parentRunId": parent})
    # the link `make mlflow-ui` prints opens on the runs table in model-training mode, in a browser
    # that never chose a mode; the bare experiment route opens MLflow 3's GenAI overview
    from optlab.tracking.__main__ import experiment_url

    browser = screenshots.find_chromium()
    with screenshots.mlflow_ui(uri) as base:
        link = experiment_url(base, "optlab", uri)
        assert link.endswith(f"/#/experiments/{exp}?workflowType=machine_learning")
        ours = screenshots.rendered_dom(browser, link)
        bare = screenshots.rendered_dom(browser, f"{base}/#/experiments/{exp}")
    assert "s@sgd" in ours and "Model registry" in ours and "Detect Issues" not in ours
    assert "Detect Issues" in bare  # MLflow's default: if this fails, MLflow changed and the link may go
    out = tmp_path / "ui"
    written = screenshots.take_all(out, uri, dvc_plots=False)
    assert [p.name for p in written] == ["mlflow_runs.png", "mlflow_parent.png", "mlflow_figure.png"]
    assert all(not screenshots.blank(p) for p in written)
    # the figure view shows the logged figure: its navy rectangle is on the page
    with Image.open(out / "mlflow_figure.png") as shot:
        assert (0, 0, 128) in {c for _, c in shot.convert("RGB").getcolors(1 << 20)}


def test_no_store_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mlflow")
    if screenshots.find_chromium() is None:
        assert screenshots.main(["--store", f"sqlite:///{tmp_path}/x.db", "--no-dvc-plots"]) == 2
        assert "no Chromium" in capsys.readouterr().err
        return
    assert screenshots.main(["--store", f"sqlite:///{tmp_path}/x.db", "--no-dvc-plots", "--out", str(tmp_path)]) == 2
    assert "no experiment 'optlab'" in capsys.readouterr().err


@pytest.mark.skipif(screenshots.find_chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_dvc_plots_show_renders_the_headline_curves_offline(tmp_path: Path) -> None:
    """`dvc plots show` on this checkout: a page with no network resource, showing the committed
    runs/train/curves.png (train/val loss and accuracy)."""
    pytest.importorskip("dvc")
    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists() or not (root / "runs/train/curves.png").is_file():
        pytest.skip("needs the git checkout with its committed headline run")
    png = screenshots.dvc_plots_page(tmp_path / "dvc_plots.png", screenshots.find_chromium(), repo=root)
    assert not screenshots.blank(png)
    with Image.open(png) as shot, Image.open(root / "runs/train/curves.png") as curves:
        # the curves' own colours (not only the page's white and text) are on the screenshot
        page = {c for _, c in shot.convert("RGB").getcolors(1 << 22)}
        drawn = sorted(curves.convert("RGB").getcolors(1 << 22), reverse=True)
        saturated = [c for _, c in drawn if max(c) - min(c) > 100][:3]
    assert saturated and all(c in page for c in saturated)
