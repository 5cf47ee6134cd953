"""Peak memory of one training step on any device, from the allocator's own events.

CUDA keeps a per-process allocator peak (``torch.cuda.max_memory_allocated``); the CPU keeps none,
and the process's peak RSS only grows across the runs of a sweep slice. So the engine measures
one training step (forward, backward, optimizer step) with the torch profiler's allocation
events: every allocation and free on the run's device, in order. The step's peak is

    bytes live when the step starts  +  max over the step of (allocated - freed so far)

where the first term is the training state (parameters, gradients, optimizer state, projection
vectors) and the second covers activations saved for backward, recomputed checkpoint segments,
gradient temporaries and optimizer scratch. The dataset resident on the device is excluded, so the
number is the memory training needs beyond holding its data; on CUDA the allocator peak
(``peak_mem_mb``) is the one to quote, and includes the data.

The profiler's and the allocator's log lines are written by C++ straight to file descriptor 2;
while a window is open fd 2 goes to a buffer, those lines are dropped and every other line is
passed on when the window closes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass
class AllocationWindow:
    """What a profiled block allocated on one device: ``peak_bytes`` (max of allocated - freed
    since the block started, >= 0), ``net_bytes`` (allocated - freed at the end), ``events``."""

    peak_bytes: int = 0
    net_bytes: int = 0
    events: int = 0
    overhead_s: float = 0.0  # the profiler's start, stop and event parsing


PROFILER_NOISE = ("SyncActivityProfilerHandler", "gpuGetDeviceCount", "Memory block of unknown size",
                  "profiler_start", "profiler_stop")
"""Fragments of the lines the profiler and the CPU allocator write to fd 2 around a window."""


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Drop the profiler's own log lines (C++ writes them to file descriptor 2, past sys.stderr);
    every other line written to fd 2 in the block (warnings included) is passed on afterwards."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (some embedded interpreters): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as buf:
        try:
            os.dup2(buf.fileno(), 2)
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            keep = [ln for ln in buf.read().splitlines(keepends=True)
                    if not any(n.encode() in ln for n in PROFILER_NOISE)]
            if keep:
                with contextlib.suppress(OSError):
                    os.write(2, b"".join(keep))


def _allocations(prof: Any, device: torch.device) -> list[Any]:
    """Every allocation/free event the profiler recorded on ``device``, in call order.

    Events are ordered by time; events with the same timestamp are put in the order in which
    the allocator's running total (``total_allocated``, updated under its lock) chains them:
    the total before an event is the total after the one preceding it.
    """
    from torch._C._profiler import _EventType

    found: list[tuple[int, Any]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation:
            f = ev.extra_fields
            if f.device.type == device.type and (device.index is None or f.device.index in (None, device.index)):
                found.append((int(ev.start_time_ns), f))
        stack.extend(ev.children)
    found.sort(key=lambda e: e[0])
    out: list[Any] = []
    i = 0
    while i < len(found):
        j = i
        while j < len(found) and found[j][0] == found[i][0]:
            j += 1
        prev = out[-1].total_allocated if out else None
        out += _chain([f for _, f in found[i:j]], prev) if j - i > 1 else [found[i][1]]
        i = j
    return out


def _chain(group: list[Any], prev_total: int | None = None) -> list[Any]:
    """Same-timestamp events in the order their running totals chain (see :func:`_allocations`);
    ``prev_total``: the total after the event before the group. Ambiguity (no chain): allocations
    first."""
    rest = sorted(group, key=lambda f: f.alloc_size < 0)
    afters = {f.total_allocated for f in rest}
    first = [f for f in rest if prev_total is not None and f.total_allocated - f.alloc_size == prev_total]
    first = first or [f for f in rest if f.total_allocated - f.alloc_size not in afters]
    out = [first[0] if first else rest[0]]
    rest.remove(out[0])
    while rest:
        nxt = [f for f in rest if f.total_allocated - f.alloc_size == out[-1].total_allocated]
        out.append(nxt[0] if nxt else rest[0])
        rest.remove(out[-1])
    return out


@contextlib.contextmanager
def allocation_window(device: torch.device) -> Iterator[AllocationWindow]:
    """Record the allocations the block makes on ``device``; the window's fields fill in on exit.

    The events are replayed in time order, counting an allocation when it happens and its free
    only if the block was allocated inside the window. Frees of older blocks are ignored: the
    allocator's own running total (``total_allocated``) cannot be used, because it subtracts
    blocks it sized in an earlier window even when their address has since been reused by a
    block allocated outside any window, so in a long sweep it drifts.
    """
    from torch.profiler import ProfilerActivity, profile

    win = AllocationWindow()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t = time.perf_counter()
    prof = profile(activities=acts, profile_memory=True)
    with _quiet_fd2():
        prof.start()
    win.overhead_s = time.perf_counter() - t
    try:
        # filtered too: the C++ allocator warns (on fd 2) about frees of blocks from before the window
        with _quiet_fd2():
            yield win
    finally:
        t = time.perf_counter()
        with _quiet_fd2():
            prof.stop()
    live: dict[int, int] = {}
    running = 0
    events = _allocations(prof, device)
    for f in events:
        if f.alloc_size > 0:
            live[f.ptr] = f.alloc_size
            running += f.alloc_size
            win.peak_bytes = max(win.peak_bytes, running)
        elif f.ptr in live:
            running -= live.pop(f.ptr)
    win.net_bytes, win.events = running, len(events)
    win.overhead_s += time.perf_counter() - t


def live_state_bytes(model: torch.nn.Module | list[torch.nn.Module], opt: Any, grads: bool = True) -> int:
    """Bytes of the training state now: parameters, their gradients (unless ``grads=False``),
    buffers, optimizer state and projection vectors (each storage counted once). ``model`` may be
    a list of modules (the model and a method's own modules), ``opt`` a list of optimizers."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()

    for mod in model if isinstance(model, (list, tuple)) else [model]:
        for p in mod.parameters():
            add(p)
            if grads:
                add(p.grad)
        for b in mod.buffers():
            add(b)
    for o in opt if isinstance(opt, (list, tuple)) else [opt]:
        for st in getattr(o, "state", {}).values():
            for v in st.values():
                add(v)
        for proj in getattr(o, "projections", []):
            for u in getattr(proj, "u", []):
                add(u)
    return total


def step_peak_bytes(step: Callable[[], T], model: torch.nn.Module | list[torch.nn.Module], opt: Any, device: torch.device) -> tuple[T, int, float]:
    """Run ``step()`` once under the allocation window: (its result, the step's peak bytes including
    the training state live at its start, the profiler's overhead in seconds).

    The profiler cannot size a free of a block allocated before it started, so the gradients
    left by the previous step (freed by the step's ``zero_grad``) are first re-homed inside the
    window (a copy, then the originals dropped): every byte the step frees is then one it saw
    allocated, and the base counts the state without them.
    """
    base = live_state_bytes(model, opt, grads=False)
    with allocation_window(device) as win:
        for mod in model if isinstance(model, (list, tuple)) else [model]:
            for p in mod.parameters():
                if p.grad is not None:
                    p.grad = p.grad.clone()
        out = step()
    return out, base + win.peak_bytes, win.overhead_s
