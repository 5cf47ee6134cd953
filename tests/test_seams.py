"""The engine's seams: a new method, probe or task plugs in without touching the loop."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from optlab import engine, methods, probes, tasks
from optlab.config import ConfigError, RunConfig
from optlab.methods.base import Method, StepContext, StepOutput
from optlab.probes.base import Probe, ProbeOptions



class SignOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = 1.0


class SignSGD(Method):
    """Replaces backprop's optimizer step with its own update (sign of the gradient) and owns an
    extra module (a fixed random feedback matrix) and per-step statistics."""

    name = "sign_sgd"
    Options = SignOptions
    replaces_backprop = True

    def __init__(self, model, task, cfg, device, options) -> None:
        super().__init__(model, task, cfg, device, options)
        self.optimizer = None
        self.feedback = torch.nn.Linear(3, 3, bias=False)
        self.calls = 0

    def modules(self):
        return [self.feedback]

    def step(self, xb, yb, ctx: StepContext) -> StepOutput:
        out = ctx.forward(xb)
        loss = self.task.loss(out, yb)
        for p in self.model.parameters():
            p.grad = None
        loss.backward()
        ctx.after_backward()
        with torch.no_grad():
            for p in self.model.parameters():
                p -= self.cfg.lr * self.options.scale * p.grad.sign()
        self.calls += 1
        return StepOutput(loss=loss, outputs=out, stats={"update_size": torch.tensor(self.cfg.lr * self.options.scale),
                                                         "step_index": torch.tensor(float(self.calls))})


class CountProbe(Probe):
    """Counts its measurements at one point; a per-layer row of ones; a summary."""

    name = "count"
    point = "after_step"

    def __init__(self, options: ProbeOptions, env) -> None:
        super().__init__(options, env)
        self.n = 0

    def measure(self) -> None:
        self.n += 1

    def emit(self, step, epoch, rec) -> None:
        rec.layer_rows(step, epoch, "ones", self.env.index.roles, [1.0] * len(self.env.index.roles))

    def summary(self, steps: int) -> dict[str, Any]:
        return {"count_measurements": self.n}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, st):
        self.n = int(st["n"])


class EpochProbe(CountProbe):
    name = "epoch_count"
    point = "epoch_end"

    def summary(self, steps: int) -> dict[str, Any]:
        return {"epoch_measurements": self.n}


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.setitem(methods.METHODS._entries, "sign_sgd", SignSGD)
    monkeypatch.setitem(probes.PROBES._entries, "count", CountProbe)
    monkeypatch.setitem(probes.PROBES._entries, "epoch_count", EpochProbe)


def _cfg(**kw) -> RunConfig:
    base = dict(optimizer="sgd", lr=0.05, depth=2, width=8, epochs=2, batch_size=32, log_every=3, device="cpu")
    return RunConfig(**{**base, **kw})


def test_new_method_and_probes_run_through_the_engine(plugins, toy_splits):
    cfg = _cfg(step_method="sign_sgd", method_options={"scale": 0.5},
               probes={"count": {"every": 3}, "epoch_count": {"every": 1}, "grad_norm": {"every": 4}})
    res = engine.train(cfg, data=toy_splits, progress=False)
    assert res.status == "completed"
    steps = res.final["steps"]
    assert steps == 2 * math.ceil(256 / 32)
    # every third step, plus one at run end (16 is not a multiple of 3)
    assert res.final["count_measurements"] == steps // 3 + 1
    assert res.final["epoch_measurements"] == 2
    # the method's per-step statistics: one curve row per step and key
    idx = [v for (s, e, k, v) in res.curves if k == "step_index"]
    assert idx == [float(i) for i in range(1, steps + 1)]
    sizes = [v for (s, e, k, v) in res.curves if k == "update_size"]
    assert len(sizes) == steps and all(v == pytest.approx(0.025) for v in sizes)
    # long-format rows from a probe nobody in the engine knows about
    assert {r[4] for r in res.layers} == {"ones", "grad_norm"}
    # no sigma probe in this run: no SN metrics pretending to exist
    assert "sn_violations" not in res.final


def test_new_method_really_replaces_the_update(plugins, toy_splits):
    """The sign update differs from SGD's; with equal seeds the two runs diverge in loss."""
    a = engine.train(_cfg(step_method="sign_sgd"), data=toy_splits, progress=False)
    b = engine.train(_cfg(), data=toy_splits, progress=False)
    la = [v for (s, e, k, v) in a.curves if k == "train_loss"]
    lb = [v for (s, e, k, v) in b.curves if k == "train_loss"]
    assert la[0] != lb[0] or la[-1] != lb[-1]


def test_method_state_and_modules_are_counted_and_checkpointed(plugins, toy_splits, tmp_path):
    cfg = _cfg(step_method="sign_sgd", checkpoint_every=5, probes={"count": {"every": 2}})
    full = engine.train(cfg, data=toy_splits, progress=False)
    # memory counts the method's own module (a 3x3 float32 matrix, 36 bytes) on top of the model
    base = engine.train(_cfg(probes={}), data=toy_splits, progress=False)
    assert (full.final["state_mem_mb"] - base.final["state_mem_mb"]) * 2**20 == pytest.approx(36)
    # resume from a checkpoint: the probe's state and the records match an uninterrupted run
    ck = engine.Checkpointer(tmp_path, cfg)
    loop = engine._Loop(cfg, toy_splits, torch.device("cpu"), engine._Recorder([]), engine.RunResult("r", "failed", {}, {}),
                        False, ck)
    state_keys = set(loop.method.state_dict())
    assert state_keys == {"optimizers", "modules"} and len(loop.method.state_dict()["modules"]) == 1


def test_method_options_are_validated_in_one_line(plugins):
    with pytest.raises(ConfigError, match=r"method_options.scal: unknown key \(did you mean 'scale'\?\)") as info:
        _cfg(step_method="sign_sgd", method_options={"scal": 2})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"method_options.scale: expected a number"):
        _cfg(step_method="sign_sgd", method_options={"scale": "big"})
    with pytest.raises(ConfigError, match=r"probes.count.every: .*1"):
        _cfg(probes={"count": {"every": 0}})


def test_probe_batch_is_fixed_and_seed_independent(toy_splits):
    t1 = tasks.build(_cfg(seed=1), toy_splits, torch.device("cpu"))
    t2 = tasks.build(_cfg(seed=2, batch_size=8), toy_splits, torch.device("cpu"))
    x1, y1 = t1.probe_batch()
    x2, y2 = t2.probe_batch()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape[0] == min(t1.PROBE_SIZE, 256)


def test_tasks_declare_primary_metric_and_direction():
    assert tasks.task_class("digits").primary == ("test_acc", "up")
    assert tasks.task_class("markov").primary == ("test_loss", "down")
    assert tasks.task_class("markov").select == "val_loss"
    with pytest.raises(ValueError, match=r"dataset: unknown value 'digitz' \(did you mean 'digits'\?\)"):
        tasks.task_kind("digitz")


class Regression(tasks.base.Task):
    """A new task kind: least squares on the toy inputs (targets: the class index as a float)."""

    kind = "regression"
    unit = "examples"
    primary = ("test_loss", "down")
    select = "val_loss"
    select_direction = "down"
    EPOCH_KEYS = {"loss": "epoch_train_loss"}

    def __init__(self, data, cfg, device) -> None:
        self.data, self.bs, self.device = data, cfg.batch_size, device
        self.steps_per_epoch = math.ceil(data.train_x.shape[0] / self.bs)
        self.items_per_batch = self.bs

    def model_kwargs(self):
        return {"input_dim": self.data.train_x.shape[1], "n_classes": 1}

    def epoch_batches(self, gen):
        return list(torch.randperm(self.data.train_x.shape[0], generator=gen).split(self.bs))

    def batch(self, idx):
        return self.data.train_x[idx], self.data.train_y[idx].float()

    def loss(self, out, y):
        return ((out.squeeze(-1) - y) ** 2).mean()

    def step_sums(self, loss, out, y):
        return {"loss": loss * y.shape[0]}

    @torch.no_grad()
    def evaluate(self, model, split):
        was = model.training
        model.eval()
        x, y = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y").float()
        loss = float(((model(x).squeeze(-1) - y) ** 2).mean())
        model.train(was)
        return {"loss": loss}

    def probe_batch(self):
        return self.data.train_x[:16], self.data.train_y[:16].float()


def test_new_task_kind_is_a_new_file(monkeypatch, toy_splits):
    monkeypatch.setitem(tasks.TASKS._entries, "regression", Regression)
    monkeypatch.setitem(tasks._DATASET_KIND, "digits", "regression")  # route a dataset to the new task
    monkeypatch.setitem(__import__("optlab.config", fromlist=["ARCH_TASK"]).ARCH_TASK, "mlp", "regression")
    res = engine.train(_cfg(probes={"grad_norm": {"every": 4}}), data=toy_splits, progress=False)
    assert res.status == "completed"
    assert math.isfinite(res.final["test_loss"]) and "test_acc" not in res.final or math.isnan(res.final["test_acc"])
    assert "best_val_loss" in res.final and "epochs_to_90" not in res.final


def test_builtin_registries_list_their_names():
    assert "backprop" in methods.method_names()
    assert {"grad_norm", "sigma_max"} <= set(probes.probe_names())
    assert {"classification", "lm"} <= set(tasks.TASKS.names())
