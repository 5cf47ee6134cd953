"""The one-step phase-transition probe (issue #11 item 5) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optlab import engine
from optlab.config import ConfigError, RunConfig, load_params, resolve_study, study_run
from optlab.probes import validate_options
from optlab.probes.base import ProbeEnv
from optlab.probes.one_step import OneStep, first_rise, r_grid
from tests.conftest import make_splits, one_thread_fixture

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


class _Task:
    """A fixed probe batch and cross-entropy."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def probe_batch(self):
        return self.x, self.y

    @staticmethod
    def loss(logits, y):
        return F.cross_entropy(logits, y)


class _Rec:
    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[str, float]]] = {}

    def layer_rows(self, step, epoch, metric, roles, values):
        self.rows[metric] = list(zip(roles, values))


def _probe(model, task, **opts):
    o = validate_options("one_step", opts)
    return OneStep(o, ProbeEnv(model=model, index=None, method=None, task=task, cfg=None, device=torch.device("cpu")))


def test_grid_and_first_rise():
    g = r_grid(0.01, 100.0, 4)
    assert len(g) == 17 and g[0] == pytest.approx(0.01) and g[-1] == pytest.approx(100.0) and g[8] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(g, g[1:]))
    assert first_rise([1.0, 1.05, 1.11, 0.9], [0.1, 1, 10, 100], 0.1) == 10
    assert first_rise([1.0, math.nan], [0.1, 1], 0.1) == 1  # a non-finite loss is a rise
    assert first_rise([0.5, 0.9], [0.1, 1], 0.1) == math.inf
    with pytest.raises(ValueError):
        r_grid(1.0, 0.1, 4)


def test_linear_model_matches_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    task = _Task(x, y)
    p = _probe(model, task, directions=3, r_min=0.1, r_max=10.0, per_decade=2)
    p.measure()
    rec = _Rec()
    p.emit(0, 0, rec)
    # direction 0: the negative gradient, unit norm; a linear model's logit slopes are dW x + db
    loss = F.cross_entropy(model(x), y)
    gw, gb = torch.autograd.grad(loss, [model.weight, model.bias])
    n = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())
    dw, db = -gw / n, -gb / n
    a = x @ dw.T + db
    spread = (a.max(dim=1).values - a.min(dim=1).values).max()
    rho = math.pi / float(spread)
    roles = [r for r, _ in rec.rows["one_step_rho"]]
    assert roles == ["grad", "random", "random", "random"]
    assert rec.rows["one_step_rho"][0][1] == pytest.approx(rho, rel=1e-5)
    for r in p.grid:
        with torch.no_grad():
            moved = F.linear(x, model.weight + r * rho * dw, model.bias + r * rho * db)
            want = float(F.cross_entropy(moved, y) / loss)
        assert rec.rows[f"one_step_ratio@r={r:g}"][0][1] == pytest.approx(want, rel=1e-5)
    ratios = [rec.rows[f"one_step_ratio@r={r:g}"][0][1] for r in p.grid]
    assert rec.rows["one_step_r_rise"][0][1] == first_rise(ratios, p.grid, 0.1)
    # the random directions are unit, seeded, and differ from each other
    rhos = [v for _, v in rec.rows["one_step_rho"][1:]]
    assert len(set(rhos)) == 3
    q = _probe(model, task, directions=3, r_min=0.1, r_max=10.0, per_decade=2)
    q.measure()
    rec2 = _Rec()
    q.emit(0, 0, rec2)
    assert rec2.rows == rec.rows
    s = p.summary(1)
    assert s["one_step_r_rise_grad"] == rec.rows["one_step_r_rise"][0][1]
    assert s["one_step_collapse_below_1"] == sum(1 for _, v in rec.rows["one_step_r_rise"] if v < 1)


def test_small_gradient_step_lowers_the_loss_and_buffers_are_untouched():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    model.train()
    model(torch.randn(32, 6))  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = _Task(torch.randn(24, 6), torch.randint(0, 4, (24,)))
    p = _probe(model, task, directions=2)
    p.measure()
    rec = _Rec()
    p.emit(0, 0, rec)
    assert model.training  # flags restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert rec.rows["one_step_ratio@r=0.01"][0][1] < 1.0  # downhill along the negative gradient
    assert rec.rows["one_step_ratio@r=100"][0][1] > 1.1  # far outside the radius the loss rises


def test_probe_runs_at_run_end_in_the_engine(tmp_path):
    cfg = RunConfig(arch="mlp", dataset="digits", optimizer="adam", lr=0.01, depth=1, width=16, epochs=2, batch_size=64,
                    probes={"one_step": {"directions": 2, "per_decade": 1}})
    res = engine.train(cfg, data=make_splits(), run_dir=tmp_path / "run")
    assert res.status == "completed"
    rows = [r for r in res.layers if r[4] == "one_step_r_rise"]
    assert [r[3] for r in rows] == ["grad", "random", "random"] and all(r[0] == res.final["steps"] for r in rows)
    assert "one_step_r_rise_grad" in res.final and res.final["one_step_collapse_below_1"] >= 0


def test_grid_over_arch_in_a_study():
    params = load_params()
    params["studies"]["tmp_arch"] = {"arch": "mlp", "methods": ["sgd"], "quick": {
        "datasets": ["digits"], "grid": {"arch": ["mlp", "resnet18"]}, "lrs": [0.1], "set": {"width": 8}}}
    spec = resolve_study(params, "tmp_arch")
    cfgs = [study_run(params, spec, "sgd", dataset="digits", point=pt, lr=0.1, seed=0, run_id="x") for pt in spec.points()]
    assert [c.arch for c in cfgs] == ["mlp", "resnet18"] and cfgs[1].depth == 18
    params["studies"]["tmp_arch"]["quick"]["grid"]["arch"] = ["mlp", "gpt"]
    with pytest.raises(ConfigError, match="grid.arch: 'gpt' does not fit"):
        resolve_study(params, "tmp_arch")


def test_grid_model_axis_merges_run_keys():
    params = load_params()
    params["studies"]["tmp_model"] = {"arch": "mlp", "methods": ["sgd"], "quick": {
        "datasets": ["digits"], "grid": {"model": [{"arch": "mlp", "depth": 3}, {"arch": "resnet18"}]}, "lrs": [0.1],
        "set": {"width": 8}}}
    spec = resolve_study(params, "tmp_model")
    assert spec.points() == [{"arch": "mlp", "depth": 3}, {"arch": "resnet18"}]
    cfgs = [study_run(params, spec, "sgd", dataset="digits", point=pt, lr=0.1, seed=0, run_id="x") for pt in spec.points()]
    assert (cfgs[0].arch, cfgs[0].depth, cfgs[1].arch, cfgs[1].width) == ("mlp", 3, "resnet18", 8)
    params["studies"]["tmp_model"]["quick"]["grid"]["model"] = [{"arch": "mlp", "dpeth": 3}]
    with pytest.raises(ConfigError, match="dpeth"):
        resolve_study(params, "tmp_model")
    params["studies"]["tmp_model"]["quick"]["grid"]["model"] = ["mlp"]
    with pytest.raises(ConfigError, match="grid.model: each value is a mapping"):
        resolve_study(params, "tmp_model")
