"""Conv spectral normalization costs (not a test): ``python -m benchmarks.conv_sn [--device cpu|cuda]``.

Times, for ResNet18 on digits-shaped inputs (1x8x8, batch 64) and optionally CIFAR-shaped ones
(3x32x32, ``--cifar``):

- one training step with ``sgd``, ``sgd_sn`` (operator form, 1 power iteration per step) and
  ``sgd_sn`` (matrix form, exact and power sigma), and the projection alone;
- building the ``sgd_sn`` optimizer (the operator form's Lanczos warm-up);
- measuring every conv's operator norm: the dense exact reference (8x8 only) vs the Lanczos
  check of ``layer_sigma_max(operator=True)``.

Medians of repeated runs; on a shared CPU the absolute numbers move with the load.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

from benchmarks.timing import median_time
import torch.nn.functional as F

from optlab import models, optim
from optlab.metrics.layers import LayerIndex, layer_sigma_max
from optlab.optim.conv_spectral import conv_operator_norm_dense


def _time(fn: Callable[[], object], device: torch.device, repeats: int = 7, warmup: int = 2) -> float:
    return median_time(fn, device, repeats, warmup)


def _model(device: torch.device, shape: tuple[int, int, int], width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("resnet18", input_dim=shape[0] * shape[1] * shape[2], n_classes=10, input_shape=shape,
                        width=width).to(device)


def run(device: torch.device, shape: tuple[int, int, int], width: int, batch: int, dense: bool) -> list[str]:
    x = torch.randn(batch, shape[0] * shape[1] * shape[2], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    variants = {
        "sgd": {},
        "sgd_sn operator (1 power iter/step)": {"sn_conv": "operator"},
        "sgd_sn matrix (exact sigma)": {"sn_conv": "matrix", "sn_sigma": "exact"},
        "sgd_sn matrix (power sigma, 1 iter)": {"sn_conv": "matrix", "sn_sigma": "power"},
    }
    rows = [f"ResNet18 width={width}, input {shape}, batch {batch}, device {device}, threads {torch.get_num_threads()}"]
    for name, kw in variants.items():
        m = _model(device, shape, width)
        t0 = time.perf_counter()
        opt = optim.build("sgd_sn" if kw else "sgd", m, lr=0.01, **kw)
        t_build = time.perf_counter() - t0

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

        t_step = _time(step, device)
        t_proj = _time(opt.project, device) if hasattr(opt, "project") else 0.0
        rows.append(f"  {name:40s} step {t_step * 1e3:8.1f} ms   projection {t_proj * 1e3:7.1f} ms   build {t_build:6.2f} s")
    m = _model(device, shape, width)
    optim.build("sgd_sn", m, lr=0.01)
    idx = LayerIndex.of(m)
    t0 = time.perf_counter()
    layer_sigma_max(idx, operator=True)
    t_first = time.perf_counter() - t0
    t_check = _time(lambda: layer_sigma_max(idx, operator=True), device, repeats=3, warmup=0)
    t_mat = _time(lambda: layer_sigma_max(idx), device, repeats=3)
    rows.append(f"  layer_sigma_max matrix form (exact)        {t_mat * 1e3:8.1f} ms")
    rows.append(f"  layer_sigma_max operator=True (Lanczos)    first {t_first * 1e3:8.1f} ms, then {t_check * 1e3:8.1f} ms")
    if dense:
        specs = m.conv_specs()
        convs = [(n, p) for n, p in m.named_parameters() if p.dim() == 4]

        def dense_all() -> None:
            for n, p in convs:
                conv_operator_norm_dense(p, specs[n])

        rows.append(f"  dense exact operator norms, {len(convs)} convs      {_time(dense_all, device, repeats=3) * 1e3:8.1f} ms")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cifar", type=int, nargs="*", metavar="WIDTH",
                    help="also 3x32x32 inputs, batch 128, at these widths (default 16 64)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"load average {os.getloadavg()}")
    for row in run(device, (1, 8, 8), 16, 64, dense=True):
        print(row)
    if args.cifar is not None:
        for width in args.cifar or (16, 64):
            for row in run(device, (3, 32, 32), width, 128, dense=False):
                print(row)


if __name__ == "__main__":
    main()
