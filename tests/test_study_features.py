"""Study-level features the rho studies use: a study skipped at a scale (with its reason and a
labeled published reference in the slice summary), crop-and-flip augmentation, weight decay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from optlab import paramfiles
from optlab import optim, pipeline
from optlab.config import ConfigError, RunConfig, load_params, resolve_study
from optlab.tasks.classification import crop_flip
from tests.conftest import make_splits, one_thread_fixture

ROOT = Path(__file__).resolve().parents[1]
one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def test_skipped_study_writes_an_empty_slice_with_its_reason(tmp_path, monkeypatch):
    params = paramfiles.read(ROOT / "params.yaml")
    params["studies"] = {"g": {"analysis": "rho", "arch": "mlp", "methods": ["sgd"], "verdict": False,
                               "published": {"best fixed": "82.6%"},
                               "quick": {"skip": "GPU only"},
                               "full": {"datasets": ["mnist"], "lrs": [0.1]}}}
    paramfiles.write(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTLAB_TRACKING", "0")
    spec = resolve_study(load_params(), "g")
    assert spec.skip == "GPU only" and spec.published == {"best fixed": "82.6%"} and spec.points() == [{}]
    assert pipeline.sweep("g", "sgd") == []
    doc = json.loads((tmp_path / "runs/sweep/g/sgd/summary.json").read_text())
    assert doc["skipped"] == "GPU only" and doc["points"] == [] and doc["published"] == {"best fixed": "82.6%"}
    from optlab.analysis.aggregate import load_slices
    from optlab.analysis.studies.rho.tables import references

    sl = load_slices(tmp_path / "runs")
    assert sl[0].skipped == "GPU only" and dict(sl[0].published) == {"best fixed": "82.6%"}
    refs = references(sl)
    assert refs[["study", "skipped", "label", "value"]].values.tolist() == [["g", "GPU only", "best fixed", "82.6%"]]
    params["studies"]["g"]["quick"] = {"skip": ""}
    paramfiles.write(params, tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="quick.skip: expected the reason"):
        load_params()
    params["studies"]["g"]["quick"] = {"skip": "x"}
    params["studies"]["g"]["published"] = ["82.6"]
    paramfiles.write(params, tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="published: expected a mapping"):
        load_params()


def test_a_study_that_requires_cuda_is_skipped_without_one(tmp_path, monkeypatch):
    params = paramfiles.read(ROOT / "params.yaml")
    params["studies"] = {"g": {"analysis": "modular", "arch": "mlp", "methods": ["sgd"], "verdict": False,
                               "quick": {"requires": "cuda", "datasets": ["digits"], "lrs": [0.1]},
                               "full": {"skip": "x"}}}
    paramfiles.write(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTLAB_TRACKING", "0")
    assert resolve_study(load_params(), "g").requires == "cuda"
    monkeypatch.setattr(pipeline, "_cuda_available", lambda: False)
    assert pipeline.sweep("g", "sgd") == []
    doc = json.loads((tmp_path / "runs/sweep/g/sgd/summary.json").read_text())
    assert doc["skipped"].startswith("needs a CUDA GPU") and "studies.g.quick.requires" in doc["skipped"]
    params["studies"]["g"]["quick"]["requires"] = "tpu"
    paramfiles.write(params, tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="quick.requires.*allowed: cuda"):
        load_params()


def test_crop_flip_is_a_padded_crop_then_a_flip():
    torch.manual_seed(3)
    x = torch.randn(64, 2 * 5 * 6)
    torch.manual_seed(11)
    y = crop_flip(x, (2, 5, 6), pad=2)
    torch.manual_seed(11)  # the same draws, by hand
    dy, dx = torch.randint(0, 5, (64,)), torch.randint(0, 5, (64,))
    flip = torch.rand(64) < 0.5
    img = torch.nn.functional.pad(x.reshape(64, 2, 5, 6), (2, 2, 2, 2))
    for i in range(64):
        want = img[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 6]
        if flip[i]:
            want = want.flip(-1)
        assert torch.equal(y[i].reshape(2, 5, 6), want)
    assert 0 < int(flip.sum()) < 64


def test_augment_applies_to_training_batches_only_and_needs_images():
    from optlab.tasks.classification import ClassificationTask

    s = make_splits(dim=64, n_classes=10)
    s.meta["input_shape"] = [1, 8, 8]
    cfg = RunConfig(arch="mlp", dataset="digits", augment="crop_flip", epochs=1)
    task = ClassificationTask(s, cfg, torch.device("cpu"))
    idx = torch.arange(16)
    xb, yb = task.batch(idx)
    assert xb.shape == (16, 64) and torch.equal(yb, s.train_y[:16]) and not torch.equal(xb, s.train_x[:16])
    assert torch.equal(ClassificationTask(s, RunConfig(arch="mlp", dataset="digits"), torch.device("cpu")).batch(idx)[0],
                       s.train_x[:16])
    s.meta.pop("input_shape")
    with pytest.raises(ValueError, match="augment: 'crop_flip' needs an image dataset"):
        ClassificationTask(s, cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="augment"):
        RunConfig(augment="mixup")


def test_weight_decay_option_reaches_torch():
    m = torch.nn.Linear(3, 2)
    for name in ("sgd", "sgd_momentum", "adam", "adamw"):
        o = optim.build(name, m, lr=0.1, weight_decay=5e-4)
        assert o.param_groups[0]["weight_decay"] == 5e-4
    assert optim.build("sgd_momentum", m, lr=0.1).param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="weight_decay: expected a number >= 0"):
        optim.build("sgd", m, lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="unexpected options \\['nesterov'\\]; allowed: weight_decay"):
        optim.build("sgd", m, lr=0.1, nesterov=True)
    # the rho controller's direction includes torch's L2 term (its step at LR 1 equals torch's)
    from optlab.optim.rho import proposed_step

    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    o = optim.build("sgd_momentum", m, lr=1.0, weight_decay=0.1)
    m(torch.randn(4, 3)).pow(2).sum().backward()
    u = proposed_step(o).u
    before = [p.detach().clone() for p in m.parameters()]
    o.step()
    for b, p, ui in zip(before, m.parameters(), u):
        assert torch.allclose(b - p.detach(), ui, atol=1e-7)


def test_the_rho_studies_resolve():
    params = load_params()
    for name in ("rho_lr_scan", "rho_momentum", "rho_adam", "rho_cap_mlp", "rho_cap_gpt", "rho_spike", "rho_phase",
                 "rho_resnet_cifar"):
        spec = resolve_study(params, name)
        assert spec.name == name
    assert resolve_study(params, "rho_resnet_cifar").skip
