"""The timers and the machine description the benchmarks share."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds per call, synchronizing CUDA around each call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                pace: str | None = None, min_calls: int = 1) -> tuple[dict[str, float], int]:
    """Median seconds per call of each of ``fns``, timed side by side: ``warmup`` untimed calls of
    each, then ``repeats`` rounds in which every function is timed once (so a slow spell of the
    machine hits all of them). Each timed sample runs ``n`` calls, enough that it lasts at least
    about 30 ms (and at least ``min_calls``), judged from ``fns[pace]`` (3 samples) or, without
    ``pace``, from the fastest function (1 sample each). Returns (medians, n)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    if pace is not None:
        base = median_time(fns[pace], device, repeats=3, warmup=0)
    else:
        base = min(median_time(f, device, repeats=1, warmup=0) for f in fns.values())
    n = max(min_calls, math.ceil(0.03 / max(base, 1e-6)))

    def many(f: Callable[[], object]) -> Callable[[], None]:
        def g() -> None:
            for _ in range(n):
                f()
        return g

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(median_time(many(f), device, repeats=1, warmup=0) / n)
    return {k: statistics.median(v) for k, v in times.items()}, n


def machine(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU model, cores and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
