"""SGD + spectral normalization: step cost, strictness and the deep MLP's FLOP rate (not a test).

    python -m benchmarks.sgd_sn [--device cpu|cuda] [--quick] [--depths 64 1000] [--repeats 7]
                                [--min-sample-ms 30] [--check-steps 12] [--check-steps-deep 3] [--threads N]
                                [--out benchmarks/results]

Issue #14, goal (a): one training step (zero_grad, forward, cross-entropy, backward, optimizer
step) of optlab's deep MLP (784 -> depth x width -> 10, tanh, orthogonal init, batch 128, width
256) under

- ``plain SGD``: ``optlab.optim.build("sgd")``, the reference every ratio is taken against;
- ``sgd_sn <mode> exact``: ``optlab.optim.build("sgd_sn")`` with each strict projection mode
  (``clip_sv``, ``scale``, ``normalize``; exact sigma, ``Projected.strict`` is true);
- ``sgd_sn scale power(1)``: the same with one power iteration per step (persistent vectors; not
  strict, so its violations are counted, not assumed away);
- ``torch spectral_norm``: the same network as an ``nn.Sequential`` of Linear+Tanh layers (same
  initial weights) with ``torch.nn.utils.parametrizations.spectral_norm`` on every Linear (the
  layers sgd_sn projects by default: input, hidden, output), trained by ``torch.optim.SGD``.

Every variant has its own copy of the model, built from the same seed. The variants are timed
side by side in one process: warm-up steps of each, then ``--repeats`` rounds in which every
variant is timed once (its position in the round rotating), each timed sample lasting at least
about 30 ms (several steps when one is shorter). Ratios are the medians over rounds of the
per-round ratios, so a slow spell of the shared machine hits both sides of a ratio.

Strictness is measured, not assumed: after the timed rounds, and then after each of
``--check-steps`` further steps of every variant (``--check-steps-deep`` for depths >= 500:
each check costs a float64 SVD of every layer, seconds at depth 1000), every projected layer's
exact sigma_max is computed in float64 (``torch.linalg.matrix_norm(ord=2)``) and each layer above
``1 + SN_TOL`` (1e-4, the ``sigma_max`` probe's tolerance) counts as one violation. The checked
steps are not timed, and the timed steps are not interrupted by checks: with a check after every
timed step (an earlier version of this benchmark) the ratios moved by more than the rounds'
spread (power(1) at depth 1000: 1.57x plain, against 1.24-1.28x without checks in between).
``--min-sample-ms`` lengthens the timed samples (several steps each) where the machine is noisy.
For the torch peer the layer checked is the weight its forward uses (``W / sigma_estimate`` in eval mode, so the check does not advance its power iteration).

The same checks measure one idea from the issue for free: a certified upper bound on a layer's
sigma after the step is ``sigma_prev + lr * ||G||_F`` (sigma_prev: the exact value after the
previous projection; ||G||_2 <= ||G||_F). Where that bound is <= 1 an exact sigma is not needed.
``gate skippable`` is the fraction of layer-steps where it was, i.e. the share of eigensolves a
bound-gated projection could skip on this trajectory.

The certified bound itself is an sgd_sn option, ``sn.sigma: bound`` (``optlab.optim.spectral``):
each layer is divided by max(1, b + lr ||G||_F) after the step, b the bound after the previous
projection, and the bound is replaced by the exact sigma every ``BOUND_REFRESH`` projections. It
is strict by construction and needs an eigensolve only every ``BOUND_REFRESH``-th step; its timed
samples cover whole periods, so its time per step is the amortized one. It is a different map
from ``scale`` with exact sigma (it shrinks more where the bound is loose); the mean sigma at the
last check shows by how much.

Goal (b): achieved FLOP/s of the plain training step, counting matrix-product FLOPs of forward and
backward (:func:`mlp_step_flops`: 6 x batch x width^2 per hidden layer, 4 x batch x in x width for
the input layer, whose input needs no gradient, 6 x batch x width x classes for the head; checked
against ``torch.utils.flop_counter`` in the tests), against the same machine's fp32 matmul peak
(the fastest of square products of sizes 512-2048, same thread count), timed interleaved with the
step. The rate of the step's own product shape (batch x width @ width x width) is listed beside it.

Targets (issue #14): strict SN step / plain <= 1.5; power iteration / plain <= 1.10; every SN
variant faster than torch's spectral_norm; FLOP fraction >= 0.5 at width 256, batch 128.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import machine, median_time
from optlab import models, optim
from optlab.optim.spectral import BOUND_REFRESH
from optlab.probes.spectral import SN_TOL, spectral_projections

INPUT_DIM, N_CLASSES, LR = 784, 10, 0.1
PLAIN, TORCH_SN = "plain SGD", "torch spectral_norm"
SN_VARIANTS: dict[str, dict[str, Any]] = {
    "sgd_sn clip_sv exact": {"sn_mode": "clip_sv", "sn_sigma": "exact"},
    "sgd_sn scale exact": {"sn_mode": "scale", "sn_sigma": "exact"},
    "sgd_sn normalize exact": {"sn_mode": "normalize", "sn_sigma": "exact"},
    "sgd_sn scale power(1)": {"sn_mode": "scale", "sn_sigma": "power", "sn_power_iters": 1},
    f"sgd_sn scale bound (exact every {BOUND_REFRESH})": {"sn_mode": "scale", "sn_sigma": "bound",
                                                           "sn_refresh": BOUND_REFRESH},
}
STRICT_TARGET, POWER_TARGET, FLOP_TARGET = 1.5, 1.10, 0.5
ISSUE = "#14"


# -- strictness -----------------------------------------------------------------------------------
def exact_sigmas(mats: list[torch.Tensor]) -> torch.Tensor:
    """Exact sigma_max of every layer in ``mats`` (2-D matrices or stacks), float64, one vector;
    ``inf`` for a layer with a non-finite entry (a diverged step: LAPACK would refuse it)."""
    out = []
    for m in mats:
        flat = m.detach().reshape(-1, *m.shape[-2:]).double()
        finite = torch.isfinite(flat).all(dim=-1).all(dim=-1)
        sig = torch.full((flat.shape[0],), torch.inf, dtype=torch.float64, device=flat.device)
        if bool(finite.any()):
            sig[finite] = torch.linalg.matrix_norm(flat[finite], ord=2)
        out.append(sig.cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def layer_grad_norms(grads: list[torch.Tensor | None], mats: list[torch.Tensor]) -> torch.Tensor | None:
    """Frobenius norm of each layer's gradient (same order as :func:`exact_sigmas`); None if one is missing."""
    out = []
    for g, m in zip(grads, mats):
        if g is None:
            return None
        out.append(torch.linalg.vector_norm(g.detach().reshape(-1, m.shape[-2] * m.shape[-1]).double(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class Strictness:
    """Violations of sigma_max <= 1 + tol over the checks of one variant, and the bound-gate count."""

    tol: float = SN_TOL
    checks: int = 0
    layer_checks: int = 0
    violations: int = 0  # layer-checks above 1 + tol (a non-finite sigma counts)
    violating_checks: int = 0  # checks with at least one violation
    sigma_max: float = -math.inf  # largest sigma of any layer at any check
    gate_layer_steps: int = 0  # layer-steps where the certified bound could be formed
    gate_skippable: int = 0  # ... and was <= 1 (no exact sigma needed)
    sigma_mean_last: float | None = None  # mean sigma over the layers at the last check
    prev: torch.Tensor | None = field(default=None, repr=False)

    def record(self, sigmas: torch.Tensor, grad_norms: torch.Tensor | None = None, lr: float = LR,
               consecutive: bool = True) -> int:
        """Count one check of ``sigmas`` (float64 exact sigma per layer, after a step whose gradients
        had Frobenius norms ``grad_norms``); returns its violations."""
        bad = int((~(sigmas <= 1.0 + self.tol)).sum())
        self.checks += 1
        self.layer_checks += sigmas.numel()
        self.violations += bad
        self.violating_checks += bool(bad)
        if sigmas.numel():
            top = float(sigmas.max()) if bool(torch.isfinite(sigmas).all()) else math.inf
            self.sigma_max = max(self.sigma_max, top)
            self.sigma_mean_last = float(sigmas.mean())
        if consecutive and grad_norms is not None and self.prev is not None and self.prev.shape == sigmas.shape:
            bound = self.prev + lr * grad_norms
            self.gate_layer_steps += bound.numel()
            self.gate_skippable += int((bound <= 1.0).sum())
        self.prev = sigmas.clone()
        return bad

    def to_json(self) -> dict[str, Any]:
        return {"tol": self.tol, "checks": self.checks, "layer_checks": self.layer_checks, "violations": self.violations,
                "violating_checks": self.violating_checks,
                "sigma_max": None if self.sigma_max == -math.inf else self.sigma_max,
                "sigma_mean_last": self.sigma_mean_last,
                "gate_layer_steps": self.gate_layer_steps,
                "gate_skippable_frac": self.gate_skippable / self.gate_layer_steps if self.gate_layer_steps else None}


# -- the variants ---------------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    step: Callable[[], None]
    layers: Callable[[], list[torch.Tensor]]  # the projected matrices (what the check measures)
    grads: Callable[[], list[torch.Tensor | None]]  # their gradients after the last step ([] if n/a)
    strict: bool | None  # None: no projection
    stats: Strictness = field(default_factory=Strictness)
    min_steps: int = 1  # steps per timed sample at least (a periodic variant: one whole period)

    def check(self, consecutive: bool = True) -> int:
        mats = self.layers()
        if not mats:
            return 0
        gn = layer_grad_norms(self.grads(), mats) if self.grads() else None
        return self.stats.record(exact_sigmas(mats), gn, consecutive=consecutive)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def build_mlp(depth: int, width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return models.build("mlp", input_dim=INPUT_DIM, n_classes=N_CLASSES, depth=depth, width=width).to(device)


def torch_sn_peer(src: nn.Module) -> tuple[nn.Sequential, list[nn.Linear]]:
    """``src`` (optlab's deep MLP) as an nn.Sequential of Linear+Tanh with the same weights, every Linear
    under ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration per training forward)."""
    depth, width = src.hidden.weight.shape[0], src.hidden.weight.shape[-1]
    dev = src.hidden.weight.device
    lins = [nn.Linear(src.input.in_features, width), *[nn.Linear(width, width) for _ in range(depth)],
            nn.Linear(width, src.head.out_features)]
    with torch.no_grad():
        lins[0].weight.copy_(src.input.weight), lins[0].bias.copy_(src.input.bias)
        for i in range(depth):
            lins[1 + i].weight.copy_(src.hidden.weight[i]), lins[1 + i].bias.copy_(src.hidden.bias[i])
        lins[-1].weight.copy_(src.head.weight), lins[-1].bias.copy_(src.head.bias)
    mods: list[nn.Module] = []
    for lin in lins[:-1]:
        mods += [lin, nn.Tanh()]
    seq = nn.Sequential(*mods, lins[-1]).to(dev)
    for lin in lins:
        torch.nn.utils.parametrizations.spectral_norm(lin)
    return seq, lins


def make_variants(depth: int, width: int, batch: int, device: torch.device) -> list[Variant]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, INPUT_DIM, generator=g).to(device)
    y = torch.randint(0, N_CLASSES, (batch,), generator=g).to(device)
    out: list[Variant] = []
    m = build_mlp(depth, width, device)
    o = optim.build("sgd", m, lr=LR)
    out.append(Variant(PLAIN, _train_step(m, o, x, y), lambda: [], lambda: [], None))
    for label, kw in SN_VARIANTS.items():
        m = build_mlp(depth, width, device)
        o = optim.build("sgd_sn", m, lr=LR, **kw)
        params = [p for proj in spectral_projections(o) for grp in proj.groups for p in grp]
        out.append(Variant(label, _train_step(m, o, x, y), lambda ps=params: list(ps),
                           lambda ps=params: [p.grad for p in ps], bool(o.strict),
                           min_steps=int(kw.get("sn_refresh", 1))))
    src = build_mlp(depth, width, device)
    seq, lins = torch_sn_peer(src)
    del src
    o = torch.optim.SGD(seq.parameters(), lr=LR)

    def peer_layers(seq: nn.Sequential = seq, lins: list[nn.Linear] = lins) -> list[torch.Tensor]:
        seq.eval()  # eval: the parametrization uses its current vectors, no power-iteration update
        with torch.no_grad():
            ws = [lin.weight.detach().clone() for lin in lins]
        seq.train()
        return ws

    out.append(Variant(TORCH_SN, _train_step(seq, o, x, y), peer_layers, lambda: [], False))
    return out


# -- timing ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rounds(variants: list[Variant], device: torch.device, repeats: int, warmup: int,
                 min_sample_s: float = 0.03) -> tuple[dict[str, list[float]], int]:
    """Seconds per step of every variant in each of ``repeats`` rounds, and the steps per sample.

    Warm-up: ``warmup`` untimed steps of each. Then each round times every variant once (the order
    rotates by one each round), each sample ``n`` steps (``n`` so that the plain step's sample
    lasts >= ``min_sample_s``; a periodic variant's sample is whole periods), no check in between."""
    for v in variants:
        for _ in range(warmup):
            v.step()
    plain = next(v for v in variants if v.strict is None)
    probe = []
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        plain.step()
        _sync(device)
        probe.append(time.perf_counter() - t)
    n = max(1, math.ceil(min_sample_s / max(statistics.median(probe), 1e-6)))
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            total, nv = 0.0, v.min_steps * math.ceil(n / v.min_steps)  # whole periods
            for _ in range(nv):
                _sync(device)
                t = time.perf_counter()
                v.step()
                _sync(device)
                total += time.perf_counter() - t
            times[v.label].append(total / nv)
    return times, n


def checked_steps(variants: list[Variant], steps: int) -> None:
    """The strictness checks: one of every projected variant's state after the timed steps, then
    ``steps`` more (untimed) steps of each, with a check after every one."""
    for v in variants:
        if v.strict is None:
            continue
        v.check(consecutive=False)
        for _ in range(steps):
            v.step()
            v.check()


def interleaved_each(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                     min_sample_s: float = 0.03) -> dict[str, float]:
    """Median seconds per call of each of ``fns`` over ``repeats`` rounds (every function once per
    round), each function's sample lasting >= ``min_sample_s`` with its own number of calls (unlike
    :func:`benchmarks.timing.interleaved`, whose single count suits functions of similar cost)."""
    counts = {}
    for k, f in fns.items():
        for _ in range(warmup):
            f()
        counts[k] = max(1, math.ceil(min_sample_s / max(median_time(f, device, repeats=1, warmup=0), 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(counts[k]):
                f()
            _sync(device)
            times[k].append((time.perf_counter() - t) / counts[k])
    return {k: statistics.median(v) for k, v in times.items()}


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r]."""
    return statistics.median(a / b for a, b in zip(num, den))


# -- goal (b): FLOPs --------------------------------------------------------------------------------
def mlp_step_flops(batch: int, input_dim: int, width: int, depth: int, n_classes: int) -> int:
    """Matrix-product FLOPs of one forward + backward of the deep MLP (2 per multiply-add): forward,
    input gradient and weight gradient for every hidden layer and the head; forward and weight
    gradient for the input layer (the data needs no gradient). Bias adds and activations excluded."""
    return 6 * batch * width * width * depth + 4 * batch * input_dim * width + 6 * batch * width * n_classes


def bench_flops(depth: int, width: int, batch: int, device: torch.device, repeats: int, warmup: int,
                sizes: tuple[int, ...] = (512, 1024, 2048)) -> dict[str, Any]:
    """The plain training step's achieved FLOP/s against the fp32 matmul peak, timed interleaved."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, INPUT_DIM, generator=g).to(device)
    y = torch.randint(0, N_CLASSES, (batch,), generator=g).to(device)
    m = build_mlp(depth, width, device)
    fns: dict[str, Callable[[], object]] = {"train step": _train_step(m, optim.build("sgd", m, lr=LR), x, y)}
    flops: dict[str, float] = {"train step": float(mlp_step_flops(batch, INPUT_DIM, width, depth, N_CLASSES))}
    for s in sizes:
        a = torch.randn(s, s, generator=g).to(device)
        b = torch.randn(s, s, generator=g).to(device)
        fns[f"mm {s}x{s}x{s}"] = lambda a=a, b=b: a @ b
        flops[f"mm {s}x{s}x{s}"] = 2.0 * s**3
    h = torch.randn(batch, width, generator=g).to(device)
    w = torch.randn(width, width, generator=g).to(device)
    shape = f"mm {batch}x{width}x{width} (the step's shape)"
    fns[shape] = lambda: h @ w.t()
    flops[shape] = 2.0 * batch * width * width
    med = interleaved_each(fns, device, repeats, warmup)
    gflops = {k: flops[k] / med[k] / 1e9 for k in fns}
    peak_key = max((k for k in fns if k.startswith("mm ") and "step" not in k), key=lambda k: gflops[k])
    return {"depth": depth, "width": width, "batch": batch, "dtype": "float32", "step_flops": flops["train step"],
            "ms": {k: 1e3 * v for k, v in med.items()}, "gflops": gflops, "peak_key": peak_key,
            "peak_gflops": gflops[peak_key], "fraction_of_peak": gflops["train step"] / gflops[peak_key],
            "fraction_of_step_shape": gflops["train step"] / gflops[shape]}


# -- one depth --------------------------------------------------------------------------------------
def _goal(goal: str, measured: float | int | None, target: str, met: bool | None, fmt: str = ".2f") -> dict[str, Any]:
    text = "n/a" if measured is None else (str(measured) if isinstance(measured, int) else format(measured, fmt))
    return {"goal": goal, "issue": ISSUE, "measured": measured, "measured_text": text, "target": target,
            "met": None if met is None else bool(met)}


def bench_depth(depth: int, width: int, batch: int, device: torch.device, repeats: int, warmup: int,
                check_steps: int, min_sample_s: float = 0.03) -> dict[str, Any]:
    t0 = time.perf_counter()
    variants = make_variants(depth, width, batch, device)
    times, n = timed_rounds(variants, device, repeats, warmup, min_sample_s)
    t_timed = time.perf_counter() - t0
    checked_steps(variants, check_steps)
    plain, peer = times[PLAIN], times[TORCH_SN]
    row: dict[str, Any] = {
        "case": f"deep MLP {INPUT_DIM}-({depth}x{width})-{N_CLASSES} tanh, batch {batch}, lr {LR}",
        "depth": depth, "width": width, "batch": batch, "repeats": repeats, "warmup": warmup, "check_steps": check_steps,
        "steps_per_sample": n,
        "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "over_plain": {k: median_ratio(v, plain) for k, v in times.items()},
        "torch_over": {k: median_ratio(peer, v) for k, v in times.items()},
        "strict": {v.label: v.strict for v in variants},
        "strictness": {v.label: v.stats.to_json() for v in variants if v.strict is not None},
    }
    goals = []
    for label in SN_VARIANTS:
        r, st = row["over_plain"][label], row["strictness"][label]
        if row["strict"][label]:
            goals.append(_goal(f"(a) depth {depth}: {label} step / plain SGD step", r, f"<= {STRICT_TARGET}",
                               r <= STRICT_TARGET))
            goals.append(_goal(f"(a) depth {depth}: {label}, layer-checks with sigma_max > 1 + {SN_TOL:g} "
                               f"({st['checks']} checks)", st["violations"], "0", st["violations"] == 0))
        else:
            goals.append(_goal(f"(a) depth {depth}: {label} (not strict) step / plain SGD step", r,
                               f"<= {POWER_TARGET}", r <= POWER_TARGET))
            goals.append(_goal(f"(a) depth {depth}: {label}, layer-checks with sigma_max > 1 + {SN_TOL:g} "
                               f"({st['checks']} checks; reported, not a target)", st["violations"], "reported", None))
        tr = row["torch_over"][label]
        goals.append(_goal(f"(a) depth {depth}: torch spectral_norm step / {label} step", tr, "> 1 (faster)", tr > 1))
    row["goals"] = goals
    row["wall_s"], row["timed_s"] = time.perf_counter() - t0, t_timed
    return row


# -- output -----------------------------------------------------------------------------------------
def _met(v: bool | None) -> str:
    return "—" if v is None else ("met" if v else "**not met**")


def write(rows: list[dict[str, Any]], flops: list[dict[str, Any]], args: argparse.Namespace, device: torch.device,
          out: Path, wall_s: float) -> Path:
    name = machine(device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cmd = (f"python -m benchmarks.sgd_sn --device {device.type}{' --quick' if args.quick else ''} "
           f"--depths {' '.join(map(str, args.depths))} --width {args.width} --batch {args.batch} --repeats {args.repeats} "
           f"--warmup {args.warmup} --min-sample-ms {args.min_sample_ms:g} --check-steps {args.check_steps} --check-steps-deep {args.check_steps_deep}"
           f"{f' --repeats-deep {args.repeats_deep}' if args.repeats_deep else ''}"
           f"{f' --threads {args.threads}' if args.threads else ''}")
    lines = [f"# SGD + spectral normalization step cost and strictness on {name}", "",
             f"torch {torch.__version__}; `{cmd}`; {wall_s:.0f} s"
             + (f"; load average at the end {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}" if load else "") + ".", "",
             "One training step (zero_grad, forward, backward, step) per variant, each on its own copy of the same",
             "model, timed in interleaved rounds; `x plain` and `torch / this` are medians of the per-round ratios.",
             "Strictness: every projected layer's exact sigma_max (float64 SVD) after the timed steps and after every one",
             "of the checked steps that follow them (untimed; the timed steps run without checks in between);",
             f"a violation is one layer above 1 + {SN_TOL:g} at one check. `gate skippable`: share of layer-steps whose",
             "certified bound sigma_prev + lr ||G||_F was <= 1 (an exact sigma a bound-gated projection could skip).",
             f"Targets (issue {ISSUE}): strict <= {STRICT_TARGET}x plain, power iteration <= {POWER_TARGET}x plain, "
             "faster than torch's spectral_norm.", ""]
    for r in rows:
        lines += [f"## {r['case']}", "", f"{r['repeats']} rounds after {r['warmup']} warm-up steps, {r['steps_per_sample']} "
                  f"step(s) per timed sample ({BOUND_REFRESH * math.ceil(r['steps_per_sample'] / BOUND_REFRESH)} for the "
                  f"bound: whole refresh periods), {r['timed_s']:.0f} s; then {r['check_steps']} checked steps of each variant "
                  f"({r['wall_s']:.0f} s in all).", "",
                  "| variant | strict | ms per step | x plain | torch / this | checks | violations | checks with one "
                  "| max sigma_max | mean sigma_max, last check | gate skippable |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, ms in r["ms"].items():
            st = r["strictness"].get(k)
            s = r["strict"][k]
            strict = "—" if s is None else ("yes" if s else "no")
            if st is None:
                tail = "| — | — | — | — | — | — |"
            else:
                gate = st["gate_skippable_frac"]
                tail = (f"| {st['checks']} | {st['violations']} | {st['violating_checks']} | "
                        f"{st['sigma_max']:.6f} | {st['sigma_mean_last']:.4f} | "
                        f"{'n/a' if gate is None else f'{100 * gate:.1f} %'} |")
            lines.append(f"| {k} | {strict} | {ms:.2f} | {r['over_plain'][k]:.2f} | {r['torch_over'][k]:.2f} " + tail)
        lines += ["", "| goal | measured | target | |", "| --- | --- | --- | --- |"]
        for gl in r["goals"]:
            lines.append(f"| {gl['goal']} | {gl['measured_text']} | {gl['target']} | {_met(gl['met'])} |")
        lines.append("")
    if flops:
        lines += ["## Goal (b): FLOP rate of the deep MLP training step (plain SGD)", "",
                  "Matrix-product FLOPs of forward + backward (6 x batch x width^2 per hidden layer, 4 x batch x 784 x width "
                  "for the input layer, 6 x batch x width x 10 for the head) per second, against the fastest fp32 square "
                  "matmul measured interleaved with it (same threads).", "",
                  "| case | step FLOPs | step (ms) | step GFLOP/s | peak GFLOP/s (which) | fraction of peak | "
                  "step-shape mm GFLOP/s | fraction of step-shape rate | goal |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for f in flops:
            shape = next(k for k in f["gflops"] if "step" in k and k.startswith("mm"))
            lines.append(f"| depth {f['depth']}, width {f['width']}, batch {f['batch']} | {f['step_flops']:.3g} | "
                         f"{f['ms']['train step']:.2f} | {f['gflops']['train step']:.1f} | {f['peak_gflops']:.1f} "
                         f"({f['peak_key']}) | {f['fraction_of_peak']:.2f} | {f['gflops'][shape]:.1f} | "
                         f"{f['fraction_of_step_shape']:.2f} | {_met(f['fraction_of_peak'] >= FLOP_TARGET)} (>= {FLOP_TARGET}) |")
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sgd_sn_{device.type}.md"
    path.write_text("\n".join(lines))
    goals = [gl for r in rows for gl in r["goals"]]
    for f in flops:
        goals.append(_goal(f"(b) deep MLP training step (depth {f['depth']}, width {f['width']}, batch {f['batch']}): "
                           "FLOP/s / fp32 matmul peak", f["fraction_of_peak"], f">= {FLOP_TARGET}",
                           f["fraction_of_peak"] >= FLOP_TARGET))
    (out / f"sgd_sn_{device.type}.json").write_text(json.dumps(
        {"benchmark": "sgd_sn", "device": name, "torch": torch.__version__, "args": vars(args), "wall_s": wall_s,
         "load_avg": list(load) if load else None, "rows": rows, "flops": flops, "goals": goals}, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sgd_sn", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (depths 4 and 16, width 32, batch 16)")
    ap.add_argument("--depths", type=int, nargs="+", default=None, help="default 64 1000 (quick: 4 16)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per depth")
    ap.add_argument("--repeats-deep", type=int, default=0, help="rounds for depths >= 500 (0: --repeats)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-sample-ms", type=float, default=30.0, help="each timed sample lasts at least this long")
    ap.add_argument("--check-steps", type=int, default=12, help="untimed steps with a strictness check after each")
    ap.add_argument("--check-steps-deep", type=int, default=3, help="the same for depths >= 500")
    ap.add_argument("--no-flops", action="store_true", help="skip goal (b)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.depths = args.depths or ([4, 16] if args.quick else [64, 1000])
    args.width = args.width or (32 if args.quick else 256)
    args.batch = args.batch or (16 if args.quick else 128)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    rows, flops = [], []
    for d in args.depths:
        reps = args.repeats_deep if (args.repeats_deep and d >= 500) else args.repeats
        deep = d >= 500
        rows.append(bench_depth(d, args.width, args.batch, device, reps, args.warmup,
                                args.check_steps_deep if deep else args.check_steps, args.min_sample_ms / 1e3))
        print(json.dumps({k: rows[-1][k] for k in ("case", "ms", "over_plain", "torch_over", "strictness")}), flush=True)
        if not args.no_flops:
            flops.append(bench_flops(d, args.width, args.batch, device, max(3, reps), args.warmup,
                                     (64, 128) if args.quick else (512, 1024, 2048)))
            print(json.dumps(flops[-1]), flush=True)
    print(write(rows, flops, args, device, Path(args.out), time.perf_counter() - t0).read_text())


if __name__ == "__main__":
    main()
