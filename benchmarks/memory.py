"""Peak memory of one deep-MLP training step, measured from the allocator's events.

    python -m benchmarks.memory [--depth 10000] [--width 256] [--batch 128] [--segments 0 100]
                                [--optimizers sgd_sn adam] [--peer] [--out benchmarks/results]

For each (optimizer, activation-checkpointing segments) it builds optlab's deep MLP (no
residuals), runs one warm-up step (so the optimizer state exists) and measures the next step
with ``optlab.metrics.memory.step_peak_bytes``: training state live at the step's start plus
the step's own allocation peak (activations, recomputed segments, gradients, optimizer scratch).
``--peer`` adds the same network as an ``nn.Sequential`` of Linear+Tanh layers trained by plain
SGD, the memory peer of the batched stack. The table is written as memory_<device>_depth<D>.md/json.

The numbers are device-independent in what they count (tensor bytes), so a CPU measurement
says whether a network fits a GPU, up to the CUDA caching allocator's rounding and library
workspaces.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from optlab import models, optim
from optlab.metrics.memory import live_state_bytes, step_peak_bytes

GIB = 2**30


def measure(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    def step() -> None:
        loss = F.cross_entropy(model(x), y)  # the engine's order: forward, then zero_grad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    step()  # warm-up: gradients and optimizer state exist from here on
    warm = time.perf_counter() - t
    _, peak, _ = step_peak_bytes(step, model, opt, x.device)
    return {"peak_gib": peak / GIB, "state_gib": live_state_bytes(model, opt) / GIB, "step_s": warm}


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for opt_name in args.optimizers:
        for seg in args.segments:
            torch.manual_seed(0)
            model = models.build("mlp", input_dim=784, n_classes=10, depth=args.depth, width=args.width,
                                 checkpoint_segments=seg).to(device)
            opt = optim.build(opt_name, model, lr=0.01)
            x = torch.randn(args.batch, 784, device=device)
            y = torch.randint(0, 10, (args.batch,), device=device)
            row = {"model": "optlab DeepMLP", "optimizer": opt_name, "segments": seg, **measure(model, opt, x, y)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model, opt
    if args.peer:
        torch.manual_seed(0)
        layers = [torch.nn.Linear(784, args.width), torch.nn.Tanh()]
        for _ in range(args.depth):
            layers += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
        seq = torch.nn.Sequential(*layers, torch.nn.Linear(args.width, 10)).to(device)
        x = torch.randn(args.batch, 784, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        row = {"model": "nn.Sequential (peer)", "optimizer": "sgd", "segments": 0,
               **measure(seq, torch.optim.SGD(seq.parameters(), lr=0.01), x, y)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    name = f"{platform.machine()}, {torch.get_num_threads()} threads" if dev == "cpu" else torch.cuda.get_device_name(0)
    lines = [f"# Peak memory of one training step: {args.depth} x {args.width} MLP, batch {args.batch} ({dev}: {name})", "",
             f"torch {torch.__version__}; `python -m benchmarks.memory --depth {args.depth} --width {args.width} "
             f"--batch {args.batch}`. Peak = training state at the step's start + the step's allocation peak "
             "(allocator events via the torch profiler). The input data is the batch only.", "",
             "Ratio: the peer's peak / this row's peak (> 1: less memory than nn.Sequential with plain SGD).", "",
             "| model | optimizer | checkpoint segments | peak (GiB) | state (GiB) | ratio | step (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    peer = next((r["peak_gib"] for r in rows if r["model"].startswith("nn.Sequential")), None)
    for r in rows:
        ratio = f"{peer / r['peak_gib']:.2f}" if peer else "n/a"
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['segments'] or 'off'} | {r['peak_gib']:.2f} | "
                     f"{r['state_gib']:.2f} | {ratio} | {r['step_s']:.1f} |")
    (out / f"memory_{dev}_depth{args.depth}.md").write_text("\n".join(lines) + "\n")
    (out / f"memory_{dev}_depth{args.depth}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=1000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--segments", type=int, nargs="+", default=[0, 100])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "sgd_sn", "adam"])
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    write(run(args), args, Path(args.out))


if __name__ == "__main__":
    main()
