"""Step-peak memory from allocator events: exact on known allocation patterns, closed-form
bounds on the deep MLP, and recorded by the engine on CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optlab import models, optim
from optlab.metrics.memory import allocation_window, live_state_bytes, step_peak_bytes

CPU = torch.device("cpu")
F32 = 4


def test_window_peak_is_exact_on_a_known_pattern():
    n = 1 << 18
    with allocation_window(CPU) as win:
        a = torch.empty(n)
        b = torch.empty(2 * n)
        del a
        c = torch.empty(n)  # live: b + c = 3n, the same as a + b
        d = torch.empty(n)  # live: 4n, the peak
        del b, c, d
    assert win.peak_bytes == 4 * n * F32
    assert win.net_bytes == 0
    assert win.events == 8


def test_window_ignores_memory_from_before_it():
    big = torch.empty(1 << 20)
    with allocation_window(CPU) as win:
        small = torch.empty(1 << 10)
    assert win.peak_bytes == (1 << 10) * F32
    del big, small


def test_live_state_counts_params_grads_and_optimizer_state_once():
    lin = torch.nn.Linear(100, 50)
    opt = torch.optim.Adam(lin.parameters())
    n = 100 * 50 + 50
    assert live_state_bytes(lin, opt) == n * F32
    F.mse_loss(lin(torch.randn(8, 100)), torch.zeros(8, 50)).backward()
    opt.step()
    assert live_state_bytes(lin, opt) == 4 * n * F32 + 2 * F32  # + two scalar step counters
    assert live_state_bytes(lin, opt, grads=False) == 3 * n * F32 + 2 * F32


def _mlp_step(depth: int, width: int, batch: int, segments: int, opt_name: str = "sgd"):
    torch.manual_seed(0)
    model = models.build("mlp", input_dim=width, n_classes=10, depth=depth, width=width, checkpoint_segments=segments)
    opt = optim.build(opt_name, model, lr=0.01)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)  # the engine's order: forward first, then zero_grad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _, peak, _ = step_peak_bytes(step, model, opt, CPU)
    params = sum(p.numel() for p in model.parameters()) * F32
    return peak, params


def test_mlp_step_peak_against_closed_form_bounds():
    depth, width, batch = 40, 64, 1024  # activations (10 MB) dominate the weights (0.7 MB)
    peak, params = _mlp_step(depth, width, batch, 0)
    acts = depth * batch * width * F32  # one saved tanh output per hidden layer, all live at the end of forward
    # lower bound: weights + last step's gradients + every saved activation coexist after the forward
    assert peak >= 2 * params + acts
    # upper bound: that, plus one pre-activation per layer in flight and the new gradients twice
    assert peak <= 4 * params + 1.5 * acts


def test_activation_checkpointing_lowers_the_measured_peak():
    depth, width, batch = 40, 64, 1024
    full, _ = _mlp_step(depth, width, batch, 0)
    ckpt, params = _mlp_step(depth, width, batch, 8)
    acts = depth * batch * width * F32
    # 8 segments keep ~8 boundaries plus one recomputed segment (~5 layers) instead of 40 layers
    assert ckpt < full - 0.5 * acts
    assert ckpt >= 2 * params + (8 + 5) * batch * width * F32 * 0.5


def test_adam_step_peak_exceeds_sgd_by_its_two_moments():
    sgd, params = _mlp_step(8, 64, 16, 0, "sgd")
    adam, _ = _mlp_step(8, 64, 16, 0, "adam")
    assert adam - sgd >= 2 * params * 0.99


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_sn", "adam"])
def test_engine_records_step_memory_on_cpu(toy_splits, opt_name):
    from optlab.config import RunConfig
    from optlab.engine import train

    cfg = RunConfig(optimizer=opt_name, lr=0.01, arch="mlp", dataset="digits", depth=3, width=16, epochs=1,
                    batch_size=16, device="cpu", checkpoint_every=0)
    res = train(cfg, data=toy_splits, progress=False)
    step, state = res.final["step_mem_mb"], res.final["state_mem_mb"]
    assert math.isfinite(step) and step >= state * 0.99
    assert math.isnan(res.final["peak_mem_mb"])


def test_window_drops_profiler_noise_but_passes_other_stderr_lines(capfd):
    import os
    import sys

    with allocation_window(CPU):
        os.write(2, b"a line written to fd 2 directly\n")
        sys.stderr.write("a plain line\n")
        torch.empty(10)
    err = capfd.readouterr().err
    assert "a line written to fd 2 directly" in err and "a plain line" in err
    assert "profiler_start" not in err and "SyncActivityProfilerHandler" not in err


def test_stack_gradient_is_written_in_place_without_a_second_copy():
    """Weights dominate (batch 8): the step peaks at weights + one gradient, not the ~3x that
    autograd through unbind reaches (every layer's gradient, then their stacked copy)."""
    peak, params = _mlp_step(200, 64, 8, 0)
    assert peak <= 2.15 * params
    torch.manual_seed(0)
    model = models.build("mlp", input_dim=64, n_classes=10, depth=200, width=64)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))

    def reference() -> None:
        F.cross_entropy(model.forward_autograd(x), y).backward()

    _, ref_peak, _ = step_peak_bytes(reference, model, optim.build("sgd", model, lr=0.01), CPU)
    assert ref_peak >= 2.8 * params  # the copy this layout avoids, measured


def test_same_timestamp_events_are_chained_by_the_running_total():
    from types import SimpleNamespace as E

    from optlab.metrics.memory import _chain

    free_old = E(ptr=1, alloc_size=-64, total_allocated=100)   # 164 -> 100
    alloc_new = E(ptr=1, alloc_size=32, total_allocated=132)   # 100 -> 132, the address reused
    assert _chain([alloc_new, free_old]) == [free_old, alloc_new]
    a = E(ptr=2, alloc_size=8, total_allocated=108)  # 100 -> 108 -> 100: a cycle, told apart by
    b = E(ptr=2, alloc_size=-8, total_allocated=100)  # the total before the group
    assert _chain([b, a], prev_total=100) == [a, b]
    assert _chain([a, b], prev_total=108) == [b, a]
    assert _chain([b, a]) == [a, b]  # no context: allocations first


def test_a_sweep_of_windows_does_not_drift():
    """Many windows in one process (a sweep): blocks sized in one window and freed outside any
    must not be subtracted in a later one; the same step measures the same every time."""
    peaks = []
    for _ in range(4):
        peak, params = _mlp_step(50, 64, 16, 5)
        peaks.append(peak)
    assert max(peaks) == min(peaks)
    assert peaks[0] >= 2 * params
