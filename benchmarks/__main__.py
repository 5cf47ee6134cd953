"""Side-by-side performance measurements (not tests): ``make bench`` / ``python -m benchmarks``.

Each benchmark times optlab's way of doing something against a peer doing the same work in
the same process, and reports the ratio (peer time / optlab time; above 1 means optlab is
faster). Absolute times depend on the machine; ratios are what the targets are stated in.

    python -m benchmarks [--device cpu|cuda] [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Callable

import torch

from benchmarks.timing import median_time

from optlab import models, optim
from optlab.data.loading import batch_indices
from optlab.optim.spectral import SpectralProjection, spectral_norm_exact


def _time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    return median_time(fn, device, repeats, warmup)


def bench_projection(device: torch.device, depth: int, width: int) -> dict:
    """Batched ``scale`` projection (W / max(1, sigma)) over the hidden stack vs a per-layer loop doing the same math."""
    w = torch.nn.Parameter(torch.randn(depth, width, width, device=device) / width**0.5)
    proj = SpectralProjection([w], mode="scale", sigma="exact")

    def per_layer() -> None:
        with torch.no_grad():
            for i in range(depth):
                s = torch.linalg.matrix_norm(w[i], ord=2)
                w[i].div_(torch.clamp(s, min=1.0))

    return {"name": f"spectral scale, exact sigma, {depth}x{width}x{width}", "optlab": _time(proj.project, device),
            "peer": _time(per_layer, device), "peer_name": "per-layer loop with matrix_norm(ord=2)"}


def bench_clip_sv(device: torch.device, depth: int, width: int) -> dict:
    """Batched ``clip_sv`` (singular values above 1 set to 1: one batched SVD) vs a per-layer SVD loop."""
    w = torch.nn.Parameter(2.0 * torch.randn(depth, width, width, device=device) / width**0.5)
    proj = SpectralProjection([w], mode="clip_sv", sigma="exact")
    w0 = w.detach().clone()

    def per_layer() -> None:
        with torch.no_grad():
            for i in range(depth):
                u, s, vh = torch.linalg.svd(w0[i], full_matrices=False)
                w0[i] = (u * s.clamp_max(1.0)) @ vh

    return {"name": f"spectral clip_sv, {depth}x{width}x{width}", "optlab": _time(proj.project, device),
            "peer": _time(per_layer, device), "peer_name": "per-layer loop with torch.linalg.svd"}


def bench_mode_cost(device: torch.device, depth: int, width: int, mode: str) -> dict:
    """What a projection mode costs against ``scale`` with exact sigma on the same stack (ratio < 1: dearer)."""
    w = torch.nn.Parameter(2.0 * torch.randn(depth, width, width, device=device) / width**0.5)
    p_mode = SpectralProjection([w], mode=mode, sigma="exact")
    p_scale = SpectralProjection([w], mode="scale", sigma="exact")
    return {"name": f"projection mode {mode} vs scale, exact sigma, {depth}x{width}x{width}",
            "optlab": _time(p_mode.project, device), "peer": _time(p_scale.project, device),
            "peer_name": "scale (W / max(1, sigma))"}


def bench_sigma(device: torch.device, depth: int, width: int) -> dict:
    """Exact sigma_max: batched Gram eigensolver vs batched SVD (matrix_norm ord=2)."""
    w = torch.randn(depth, width, width, device=device)
    return {"name": f"exact sigma_max, {depth}x{width}x{width}", "optlab": _time(lambda: spectral_norm_exact(w), device),
            "peer": _time(lambda: torch.linalg.matrix_norm(w, ord=2), device), "peer_name": "torch.linalg.matrix_norm(ord=2)"}


def bench_power(device: torch.device, depth: int, width: int) -> dict:
    """``scale`` with a power-iteration sigma (1 iteration; not strict) vs with the exact sigma."""
    w = torch.nn.Parameter(torch.randn(depth, width, width, device=device) / width**0.5)
    p_pow = SpectralProjection([w], mode="scale", sigma="power", power_iters=1)
    p_ex = SpectralProjection([w], mode="scale", sigma="exact")
    return {"name": f"projection power(1) vs exact, {depth}x{width}x{width}", "optlab": _time(p_pow.project, device),
            "peer": _time(p_ex.project, device), "peer_name": "exact sigma projection"}


def bench_train_step(device: torch.device, depth: int, width: int, batch: int) -> dict:
    """One training step of the deep MLP: batched hidden stack vs an nn.Sequential of Linear layers."""
    torch.manual_seed(0)
    m = models.build("mlp", input_dim=64, n_classes=10, depth=depth, width=width).to(device)
    seq = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Tanh(),
                              *[mod for _ in range(depth) for mod in (torch.nn.Linear(width, width), torch.nn.Tanh())],
                              torch.nn.Linear(width, 10)).to(device)
    x = torch.randn(batch, 64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    o1 = optim.build("sgd", m, lr=0.01)
    o2 = torch.optim.SGD(seq.parameters(), lr=0.01)

    def step(model, opt):
        def f():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return f

    return {"name": f"MLP train step, depth {depth}, width {width}, batch {batch}", "optlab": _time(step(m, o1), device),
            "peer": _time(step(seq, o2), device), "peer_name": "nn.Sequential of Linear+Tanh"}


def bench_batching(device: torch.device, n: int, dim: int, batch: int) -> dict:
    """One epoch of batches: on-device index batching vs a DataLoader over a TensorDataset."""
    x = torch.randn(n, dim, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    g = torch.Generator().manual_seed(0)

    def ours():
        for idx in batch_indices(n, batch, g, device):
            x[idx], y[idx]

    xc, yc = x.cpu(), y.cpu()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xc, yc), batch_size=batch, shuffle=True)

    def peer():
        for xb, yb in dl:
            xb.to(device), yb.to(device)

    return {"name": f"epoch of batches, {n}x{dim}, batch {batch}", "optlab": _time(ours, device, repeats=3),
            "peer": _time(peer, device, repeats=3), "peer_name": "DataLoader(TensorDataset, shuffle=True)"}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    big = not args.quick
    rows = [
        bench_projection(device, 64 if big else 16, 128 if big else 64),
        bench_clip_sv(device, 64 if big else 16, 128 if big else 64),
        bench_mode_cost(device, 64 if big else 16, 128 if big else 64, "clip_sv"),
        bench_mode_cost(device, 64 if big else 16, 128 if big else 64, "normalize"),
        bench_sigma(device, 64 if big else 16, 256 if big else 64),
        bench_power(device, 64 if big else 16, 256 if big else 64),
        bench_train_step(device, 64 if big else 16, 128 if big else 64, 128),
        bench_batching(device, 60000 if big else 6000, 784, 128),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [f"# optlab benchmarks on {name}", "", f"torch {torch.__version__}; ratio = peer time / optlab time (> 1: optlab faster)", "",
             "| benchmark | optlab (ms) | peer | peer (ms) | ratio |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        r["ratio"] = r["peer"] / r["optlab"]
        lines.append(f"| {r['name']} | {1e3 * r['optlab']:.2f} | {r['peer_name']} | {1e3 * r['peer']:.2f} | {r['ratio']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (out / f"{tag}.md").write_text(text)
    (out / f"{tag}.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
