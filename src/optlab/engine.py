"""The training loop: steps, evaluation, per-layer probes, divergence, records.

``train(cfg, sinks=..., run_dir=...)`` runs one configuration end to end and returns a
:class:`RunResult`. The loop keeps the data on the device, batches by index, and syncs with
the host only every ``log_every`` steps (one transfer of the buffered losses), at epoch ends
and at the sigma/gradient checks. A run ends as

- ``completed``,
- ``diverged``: a non-finite training loss or one above ``diverge_loss``; the first bad step
  is recorded and the run stops there. This is a result, not an error.
- ``failed``: an exception (a bug); recorded, then re-raised.

What one step does is the run's training-step method (:mod:`optlab.methods`; backprop by
default); diagnostics are probes (:mod:`optlab.probes`) with their own cadence and point in the
step; batching, loss and evaluation are the task's (:mod:`optlab.tasks`). The loop has no
branch for any method, optimizer or probe. A learning-rate schedule (:mod:`optlab.schedule`, the
LR spike) reaches the method's optimizers through ``Method.set_lr_scale`` before each step; without
one the call is skipped.

Outputs in ``run_dir``: ``metrics.json``, ``curves.csv`` (step, epoch, metric, value: losses,
epoch metrics, the method's per-step statistics, whole-model probe values) and ``layers.csv``
(step, epoch, layer, role, metric, value: one row per layer and probe metric). The sinks
(MLflow) get the same curves, except that the method's per-step statistics arrive as one point
per ``log_every`` interval (the interval's mean, like ``train_loss``); every step's value is in
curves.csv.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from . import distributed as dist_
from . import gpus
from . import methods as methods_
from . import models
from . import probes as probes_
from . import schedule as schedule_
from . import tasks as tasks_
from .config import RunConfig
from .metrics.layers import LayerIndex
from .metrics.memory import live_state_bytes, step_peak_bytes
from .numerics import machine_numerics
from .probes.spectral import SN_TOL  # noqa: F401  (re-exported: a projected layer above 1 + SN_TOL is a violation)

LAYER_COLUMNS = ("step", "epoch", "layer", "role", "metric", "value")
# measurements of the machine, not of the optimization: excluded from determinism checks
TIMING_KEYS = frozenset({"wall_time_s", "peak_mem_mb", "step_mem_mb", "peak_rss_mb", "seconds_per_epoch", "epoch_time_s",
                         "examples_per_s", "tokens_per_s"})


class Sink(Protocol):
    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None: ...
    def log_metrics(self, batch: list[tuple[str, float, int]]) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def finish(self, status: str, summary: dict[str, float | None]) -> None: ...


@dataclass
class RunResult:
    run_id: str
    status: str
    config: dict[str, Any]
    final: dict[str, Any]
    diverged_step: int | None = None
    diverge_reason: str | None = None
    error: str | None = None
    failure: str | None = None  # nonfinite | exploding | vanishing | chance (see classify_failure)
    sweep: dict[str, Any] | None = None  # study, role (search|confirm), grid point
    curves: list[tuple[int, int, str, float]] = field(default_factory=list)
    layers: list[tuple[int, int, int, str, str, float]] = field(default_factory=list)  # LAYER_COLUMNS
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "diverged_step": self.diverged_step,
            "diverge_reason": self.diverge_reason,
            "error": self.error,
            "failure": self.failure,
            "sweep": self.sweep,
            "config": self.config,
            "final": {k: _json_num(v) for k, v in self.final.items()},
            "provenance": self.provenance,
        }


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def resolve_device(name: str) -> torch.device:
    """The run's device. ``cuda``/``auto`` on a machine with several GPUs and no
    ``CUDA_VISIBLE_DEVICES`` takes a GPU no other optlab process holds (:mod:`optlab.gpus`: one
    GPU per ``dvc queue`` worker); under torchrun each rank takes GPU ``LOCAL_RANK`` instead."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but not available; allowed here: auto, cpu")
    if name == "cuda" and not dist_.env_world().active:
        index = gpus.claim()
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch during the run (MB); NaN on CPU.

    On CPU there is no per-run allocator peak: the process's peak RSS only grows across the
    runs of a sweep slice, so it is recorded separately as ``peak_rss_mb`` and never compared.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return math.nan


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def state_memory_mb(model: torch.nn.Module | list[torch.nn.Module], opt: Any) -> float:
    """Exact size of the training state: parameters, gradients, buffers and optimizer state (MB)."""
    return live_state_bytes(model, opt) / 2**20


def load_prepared(prepared_dir: str | Path, dataset: str, device: torch.device) -> Any:
    """A prepared dataset: classification splits, or a token stream for language models."""
    path = Path(prepared_dir) / f"{dataset}.pt"
    if tasks_.task_kind(dataset) == "lm":
        from .data.text import load_text

        return load_text(path, device=device)
    from .data import load

    return load(path, device=device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class _Guarded:
    """A sink whose errors never stop training: the first one is reported and the sink is dropped.

    (The MLflow sink spools through store outages itself; this covers any other sink.)
    """

    def __init__(self, sink: Sink) -> None:
        self.sink, self.broken = sink, False

    def _call(self, name: str, *args: Any) -> None:
        if self.broken:
            return
        try:
            getattr(self.sink, name)(*args)
        except Exception as exc:
            self.broken = True
            warnings.warn(f"sink {type(self.sink).__name__}.{name} failed ({type(exc).__name__}: {exc}); "
                          "it gets nothing more from this run, training goes on")

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._call("start", params, tags)

    def log_metrics(self, batch: list[tuple[str, float, int]]) -> None:
        self._call("log_metrics", batch)

    def log_artifact(self, path: str | Path) -> None:
        self._call("log_artifact", path)

    def finish(self, status: str, summary: dict[str, float | None]) -> None:
        self._call("finish", status, summary)


class _Recorder:
    """Collects curve and layer rows and forwards metric batches to the sinks."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        self.curves: list[tuple[int, int, str, float]] = []
        self.layers: list[tuple[int, int, int, str, str, float]] = []
        self._pending: list[tuple[str, float, int]] = []

    def metric(self, step: int, epoch: int, key: str, value: float, sinks: bool = True) -> None:
        """A curve row (curves.csv); also sent to the sinks unless ``sinks`` is False."""
        self.curves.append((step, epoch, key, value))
        if sinks and math.isfinite(value):
            self._pending.append((key, value, step))

    def to_sinks(self, step: int, key: str, value: float) -> None:
        """A point for the sinks only (not a curve row)."""
        if math.isfinite(value):
            self._pending.append((key, value, step))

    def layer_rows(self, step: int, epoch: int, metric: str, roles: list[str], values: list[float],
                   layers: list[int] | None = None) -> None:
        """One long-format row per layer: (step, epoch, layer, role, metric, value). ``layers``: the
        layer numbers of the values when they are a subset (default 0, 1, ... in order)."""
        ids = range(len(values)) if layers is None else layers
        for i, r, v in zip(ids, roles, values):
            self.layers.append((step, epoch, int(i), r, metric, float(v)))

    def flush(self) -> None:
        if self._pending:
            for s in self.sinks:
                s.log_metrics(self._pending)
            self._pending = []


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)


def train(
    cfg: RunConfig,
    *,
    sinks: Iterable[Sink] = (),
    run_dir: str | Path | None = None,
    data: Any = None,
    tags: dict[str, str] | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    sweep: dict[str, Any] | None = None,
    keep_done: bool = False,
) -> RunResult:
    """Train one configuration. See the module docstring for the outcome and outputs.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every > 0`` the run saves its whole state
    (model, optimizer, RNG and data-order state, records so far) every N steps and, when
    started again with the same config, resumes from the newest readable checkpoint; the
    final metrics on CPU are identical to an uninterrupted run. With ``keep_done`` a finished
    run leaves its result behind, and a later call with the same config returns it without
    training (a sweep slice killed half-way redoes only the unfinished runs; the slice clears
    these records when it completes).
    """
    cfg.validate()
    if cfg.threads <= 0 or cfg.threads == torch.get_num_threads():
        return _train(cfg, sinks=sinks, run_dir=run_dir, data=data, tags=tags, progress=progress,
                      checkpoint_dir=checkpoint_dir, sweep=sweep, keep_done=keep_done)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # part of the numerics: a run's bits depend on its intra-op threads
    try:
        return _train(cfg, sinks=sinks, run_dir=run_dir, data=data, tags=tags, progress=progress,
                      checkpoint_dir=checkpoint_dir, sweep=sweep, keep_done=keep_done)
    finally:
        torch.set_num_threads(before)


def _train(
    cfg: RunConfig,
    *,
    sinks: Iterable[Sink],
    run_dir: str | Path | None,
    data: Any,
    tags: dict[str, str] | None,
    progress: bool,
    checkpoint_dir: str | Path | None,
    sweep: dict[str, Any] | None,
    keep_done: bool,
) -> RunResult:
    device = resolve_device(cfg.device)
    world = dist_.setup(device)
    device = dist_.rank_device(device, world)
    if not world.is_main:  # rank 0 alone logs and writes (see optlab.distributed)
        sinks, run_dir, progress = [], None, False
    sinks = [_Guarded(sk) for sk in sinks]
    seed_everything(cfg.seed)
    rec = _Recorder(sinks)
    base_tags = {
        "seed": str(cfg.seed),
        "scale": cfg.scale,
        "study": cfg.study,
        "phase": cfg.phase,
        "device": str(device),
        "torch_version": torch.__version__,
        "optimizer": cfg.optimizer,
        "method": cfg.method_name,
        "step_method": cfg.step_method,
        "run_id": cfg.run_id,
    }
    numerics = machine_numerics(device)
    base_tags.update({f"numerics.{k}": v for k, v in numerics.items()})
    base_tags.update(tags or {})
    if data is None:  # bad input (a missing file) fails here, before any record is written
        data = load_prepared(cfg.prepared_dir, cfg.dataset, device)
    ckpt = (Checkpointer(Path(checkpoint_dir), cfg, writer=world.is_main)
            if checkpoint_dir is not None and cfg.checkpoint_every > 0 else None)
    if ckpt is not None and keep_done:
        done = ckpt.load_done()
        if done is not None:  # finished before the stage was interrupted: reuse, don't retrain or re-log
            if run_dir is not None:
                write_run(done, Path(run_dir))
            return done
    resume = ckpt.latest() if ckpt is not None else None
    if resume is not None:
        base_tags["resumed_from_step"] = str(resume["step"])
    if world.active:
        base_tags["world_size"] = str(world.size)
    for s in sinks:
        s.start(cfg.tracked_params(), base_tags)

    result = RunResult(run_id=cfg.run_id, status="failed", config=cfg.flat(), final={}, sweep=sweep)
    result.provenance = {
        "git_commit": base_tags.get("git_commit"),
        "git_dirty": base_tags.get("git_dirty") == "true" if "git_dirty" in base_tags else None,
        "frozen": base_tags.get("frozen", str(cfg.phase == "frozen").lower()) == "true",
        "phase": base_tags.get("phase", cfg.phase),
        "frozen_commit": None if base_tags.get("frozen_commit", "none") == "none" else base_tags["frozen_commit"],
        "numerics": numerics,
    }
    try:
        _Loop(cfg, data, device, rec, result, progress, ckpt, world).run(resume)
    except Exception as exc:  # a bug: record it, then re-raise
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        _finish(result, rec, sinks, run_dir)
        raise
    result.curves, result.layers = rec.curves, rec.layers
    result.failure = classify_failure(result, data)
    _finish(result, rec, sinks, run_dir)
    if ckpt is not None:
        ckpt.clear()
        if keep_done:
            ckpt.save_done(result)
    return result


class Checkpointer:
    """Atomic checkpoints of one run under ``<dir>/<run_id>-<config hash>/``, newest two kept.

    Checkpoints live outside the DVC outs (which DVC deletes before re-running a stage), and
    the directory name carries a hash of the full config so a changed config never resumes
    from an incompatible state. Loading uses ``torch.load(weights_only=True)``.
    """

    keep = 2

    def __init__(self, root: Path, cfg: RunConfig, writer: bool = True) -> None:
        digest = hashlib.sha256(json.dumps(cfg.flat(), sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.dir = root / f"{cfg.run_id}-{digest}"
        self.writer = writer  # False on data-parallel ranks above 0: they read checkpoints, rank 0 writes them

    def paths(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.dir / f"step-{step:09d}.pt"
        if not self.writer:
            return path
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in self.paths()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint; unreadable ones are reported and skipped."""
        for path in self.paths():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                    raise ValueError("not an optlab checkpoint")
                return state
            except Exception as exc:  # truncated, corrupt, foreign
                warnings.warn(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); falling back to the previous one")
        return None

    def clear(self) -> None:
        if not self.writer:
            return
        for p in self.dir.glob("step-*.pt*") if self.dir.is_dir() else []:
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def save_done(self, result: RunResult) -> None:
        if not self.writer:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {**result.to_json(), "curves": result.curves, "layers": result.layers}
        _atomic_text(self.dir / "done.json", json.dumps(doc, default=_json_num))

    def load_done(self) -> RunResult | None:
        path = self.dir / "done.json"
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            curves = [(int(a), int(b), str(c), float("nan") if d is None else float(d)) for a, b, c, d in doc.pop("curves")]
            layers = [(int(a), int(b), int(c), str(d), str(m), float("nan") if v is None else float(v))
                      for a, b, c, d, m, v in doc.pop("layers")]
            final = {k: (math.nan if v is None and k not in ("sn_violations", "sn_violating_checks", "sn_strict", "sn_active_frac", "epochs_to_90") else v) for k, v in doc["final"].items()}
            return RunResult(run_id=doc["run_id"], status=doc["status"], config=doc["config"], final=final,
                             diverged_step=doc["diverged_step"], diverge_reason=doc["diverge_reason"], error=doc["error"],
                             failure=doc.get("failure"), sweep=doc.get("sweep"), curves=curves, layers=layers,
                             provenance=doc.get("provenance") or {})
        except Exception as exc:  # unreadable: train again
            warnings.warn(f"{path} is unreadable ({type(exc).__name__}: {exc}); the run is trained again")
            return None


CHECKPOINT_FORMAT = 2


class _Loop:
    """The training loop for one run, with its state kept on the object so it can checkpoint."""

    def __init__(self, cfg: RunConfig, data: Any, device: torch.device, rec: _Recorder, result: RunResult, progress: bool,
                 ckpt: Checkpointer | None, world: dist_.World = dist_.SINGLE) -> None:
        self.cfg, self.data, self.device, self.rec, self.result, self.ckpt = cfg, data, device, rec, result, ckpt
        self.world = world
        self.task = tasks_.build(cfg, data, device)
        self.task.world = world  # evaluation: each rank its slice of the split, sums reduced
        self.model = models.build(cfg.arch, **model_kwargs(cfg, self.task)).to(device)
        if cfg.reparam == "spectral_norm":
            from .optim.reparam import apply_spectral_norm_reparam

            apply_spectral_norm_reparam(self.model, tuple(cfg.sn.roles))
        self.method = methods_.build(cfg, self.model, self.task, device)
        self.lr_schedule = schedule_.active(cfg)  # False: the per-step LR call is skipped entirely
        self.index = LayerIndex.of(self.model)
        env = probes_.ProbeEnv(model=self.model, index=self.index, method=self.method, task=self.task, cfg=cfg, device=device)
        self.probes = probes_.build(cfg.probes, env)
        self.at: dict[str, list[Any]] = {p: [pr for pr in self.probes if pr.point == p] for p in probes_.POINTS}
        train_fwd: Any = self.model
        if world.active:
            if not getattr(self.method, "distributed", False):
                able = ", ".join(sorted(n for n in methods_.METHODS if getattr(methods_.METHODS.get(n), "distributed", False)))
                raise ValueError(f"step_method: {cfg.step_method!r} cannot train data-parallel (WORLD_SIZE={world.size}); "
                                 f"allowed under torchrun: {able}")
            from torch.nn.parallel import DistributedDataParallel

            train_fwd = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            dist_.reseed_rank(cfg.seed, world)
        self.fwd = torch.compile(train_fwd) if cfg.compile else train_fwd
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.steps_per_epoch = self.task.steps_per_epoch
        self.total = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps > 0:
            self.total = min(self.total, cfg.max_steps)
        self.progress = progress
        sel_metric, sel_dir = self.task.select.removeprefix("val_"), self.task.select_direction
        self.best_key, self.best_sign = f"best_val_{sel_metric}", (1.0 if sel_dir == "up" else -1.0)
        # loop state (everything a checkpoint must carry)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.epoch_gen_state = self.gen.get_state()
        self.best_val = -math.inf  # best validation select-metric, signed so that larger is better
        self.best_acc = -math.inf  # best validation accuracy (tasks that report one)
        self.milestone_epoch: int | None = None
        self.loss_buf: list[torch.Tensor] = []
        self.stat_buf: list[dict[str, torch.Tensor]] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.wall_before = 0.0
        self.diverged = False
        self.step_mem_mb = math.nan  # CPU: peak of one profiled step (see metrics.memory)

    def state_modules(self) -> list[torch.nn.Module]:
        return [self.model, *self.method.modules()]

    # -- checkpoint state
    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_gen_state": self.epoch_gen_state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "probes": {p.name: p.state_dict() for p in self.probes},
            "best_val": self.best_val,
            "best_acc": self.best_acc,
            "milestone_epoch": -1 if self.milestone_epoch is None else self.milestone_epoch,
            "loss_buf": [t.cpu() for t in self.loss_buf],
            "stat_buf": [{k: v.cpu() for k, v in d.items()} for d in self.stat_buf],
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "seen": self.seen,
            "wall": self.wall_before + (time.perf_counter() - self.t0),
            "curves": [list(c) for c in self.rec.curves],
            "layers": [list(r) for r in self.rec.layers],
        }

    def restore(self, st: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"])
        self.epoch_gen_state = st["epoch_gen_state"]
        torch.set_rng_state(st["torch_rng"])
        if self.device.type == "cuda" and st["cuda_rng"]:
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.model.load_state_dict(st["model"])
        self.method.load_state_dict(st["method"])
        for p in self.probes:
            if p.name in st["probes"]:
                p.load_state_dict(st["probes"][p.name])
        self.best_val, self.best_acc = st["best_val"], st["best_acc"]
        self.milestone_epoch = None if int(st["milestone_epoch"]) < 0 else int(st["milestone_epoch"])
        self.loss_buf = [t.to(self.device) for t in st["loss_buf"]]
        self.stat_buf = [{k: v.to(self.device) for k, v in d.items()} for d in st["stat_buf"]]
        self.sums = {k: v.to(self.device) for k, v in st["sums"].items()}
        self.seen = int(st["seen"])
        self.wall_before = float(st["wall"])
        # the records so far: re-sent to the sinks in one batch, so the resumed run is complete
        for s, e, k, v in st["curves"]:
            self.rec.metric(int(s), int(e), str(k), float(v))
        self.rec.layers = [(int(a), int(b), int(c), str(d), str(m), float(v)) for a, b, c, d, m, v in st["layers"]]
        self.rec.flush()

    # -- the loop
    def run(self, resume: dict[str, Any] | None) -> None:
        cfg, rec = self.cfg, self.rec
        self.t0 = time.perf_counter()
        if resume is not None:
            self.restore(resume)
        bar = _progress(self.total, cfg.run_id, self.progress)
        if bar is not None and self.step:
            bar.update(self.step)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
        start_epoch = self.epoch
        for epoch in range(start_epoch, cfg.epochs):
            if self.step >= self.total and epoch > start_epoch:
                break
            self.epoch = epoch
            if not (epoch == start_epoch and resume is not None):
                self.epoch_gen_state = self.gen.get_state()
                self.batch_in_epoch = 0
                self.sums = {}
                self.seen = 0
            self.gen.set_state(self.epoch_gen_state)
            batches = self.task.epoch_batches(self.gen)
            t_epoch = time.perf_counter()
            self.model.train()
            for idx in batches[self.batch_in_epoch :]:
                if self.step >= self.total:
                    break
                xb, yb = self.task.batch(dist_.shard(idx, self.world))
                if self.lr_schedule:
                    self.method.set_lr_scale(schedule_.lr_scale(cfg, self.step))
                due = [p for p in self.probes if p.point in ("after_backward", "after_step") and p.due(self.step)]
                ctx = methods_.StepContext(forward=self.fwd, amp=amp, step=self.step, epoch=epoch,
                                           after_backward=lambda due=due: _measure(due, "after_backward"))
                if self.device.type == "cpu" and math.isnan(self.step_mem_mb) and (self.step >= 1 or self.total == 1):
                    # one step (the second: optimizer state exists) under the allocation profiler
                    out, peak, overhead = step_peak_bytes(
                        lambda: self.method.step(xb, yb, ctx), self.state_modules(), self.method.optimizers(), self.device)
                    self.step_mem_mb = peak / 2**20
                    self.t0 += overhead  # the profiler's own start/stop/parse time is not the run's
                    t_epoch += overhead
                else:
                    out = self.method.step(xb, yb, ctx)
                _measure(due, "after_step")
                self.step += 1
                self.batch_in_epoch += 1
                det = out.loss.detach()
                self.loss_buf.append(det)
                if out.stats:
                    self.stat_buf.append({k: v.detach() for k, v in out.stats.items()})
                for k, v in self.task.step_sums(det, out.outputs, yb).items():
                    self.sums[k] = self.sums[k] + v if k in self.sums else torch.zeros((), device=self.device) + v
                self.seen += self.task.n_items(yb)
                for p in due:
                    p.emit(self.step, epoch, rec)
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    bad = self._flush(epoch)
                    if bar is not None:
                        bar.update(self.step - bar.n)
                    if bad:
                        self.diverged = True
                        break
                if self.ckpt is not None and self.step % cfg.checkpoint_every == 0 and self.step < self.total:
                    self.ckpt.save(self.state(), self.step)
            if self.diverged:
                break
            if self.loss_buf:
                if self._flush(epoch):
                    self.diverged = True
                    break
            self._end_epoch(epoch, time.perf_counter() - t_epoch, len(batches))
            if bar is not None:
                bar.set_postfix({self.task.select: f"{self.last_val:.3f}"})
        wall = self.wall_before + (time.perf_counter() - self.t0)
        if bar is not None:
            bar.close()
        if self.step > 0:  # a last measurement where the final step was not a probe step
            for p in self.probes:
                if p.point in ("after_backward", "after_step") and p.options.at_end and self.step % p.every != 0:
                    p.measure()
                    p.emit(self.step, self.epoch, rec)
        for p in self.at["run_end"]:
            p.measure()
            p.emit(self.step, self.epoch, rec)
        rec.flush()
        self._final(wall)

    def _flush(self, epoch: int) -> bool:
        """Losses and the method's per-step statistics to the host in one transfer each; True if diverged."""
        stats, self.stat_buf = self.stat_buf, []
        bad = _flush_losses(self.loss_buf, self.step, epoch, self.cfg, self.rec, self.result, stats, self.world)
        self.loss_buf = []
        return bad

    def _end_epoch(self, epoch: int, seconds: float, n_batches: int) -> None:
        """Epoch-end records: train sums, validation metrics, throughput (one sync each)."""
        keys = [k for k in self.task.EPOCH_KEYS if k in self.sums]
        sums, seen = self.sums, self.seen
        if self.world.active:  # the ranks' sums and counts, added (one all-reduce)
            tot = dist_.all_sum(torch.stack([*(sums[k].float() for k in keys),
                                             torch.tensor(float(seen), device=self.device)]), self.world)
            sums, seen = dict(zip(keys, tot[:-1])), int(tot[-1].item())
        tr = torch.stack([sums[k] / max(1, seen) for k in keys]).tolist() if keys else []
        val = self.task.evaluate(self.model, "val")
        sel = val.get(self.task.select.removeprefix("val_"), math.nan)
        self.best_val = max(self.best_val, self.best_sign * sel)
        if "acc" in val:
            self.best_acc = max(self.best_acc, val["acc"])
        self.last_val = sel
        if self.task.milestone is not None and self.milestone_epoch is None:
            m, thr = self.task.milestone
            if val.get(m, -math.inf) >= thr:
                self.milestone_epoch = epoch + 1
        rows = [(self.task.EPOCH_KEYS[k], v) for k, v in zip(keys, tr)]
        rows += [(f"val_{k}", v) for k, v in val.items()]
        rows += [("lr", self.cfg.lr), ("epoch_time_s", seconds)]
        if seconds > 0 and n_batches > 0:
            rows.append((f"{self.task.unit}_per_s", n_batches * self.task.items_per_batch / seconds))
        for key, val_ in rows:
            self.rec.metric(self.step, epoch, key, float(val_))
        for p in self.at["epoch_end"]:
            if (epoch + 1) % p.every == 0:
                p.measure()
                p.emit(self.step, epoch, self.rec)
        self.rec.flush()

    def _final(self, wall: float) -> None:
        final: dict[str, Any] = {
            "steps": self.step,
            "epochs_completed": self.epoch + (0 if self.diverged else 1),
            "wall_time_s": wall,
            "peak_mem_mb": peak_memory_mb(self.device),
            "step_mem_mb": self.step_mem_mb,
            "peak_rss_mb": peak_rss_mb(),
            "state_mem_mb": state_memory_mb(self.state_modules(), self.method.optimizers()),
            "best_val_acc": self.best_acc if self.best_acc > -math.inf else math.nan,
        }
        if self.best_key != "best_val_acc":
            final[self.best_key] = self.best_sign * self.best_val if self.best_val > -math.inf else math.nan
        for p in self.probes:
            final.update(p.summary(self.step))
        final.update(self.method.summary())
        if self.task.milestone is not None:
            m, thr = self.task.milestone
            final[f"epochs_to_{round(thr * 100)}"] = self.milestone_epoch
        # has the selection metric flattened? its last epoch's change (nan: fewer than 2 epochs or diverged)
        sel = [v for (_, _, k, v) in self.rec.curves if k == self.task.select]
        final["val_last_change"] = sel[-1] - sel[-2] if len(sel) >= 2 and not self.diverged else math.nan
        final.update(self.task.summary())
        epoch_times = [v for (_, _, k, v) in self.rec.curves if k == "epoch_time_s"]
        final["seconds_per_epoch"] = sum(epoch_times) / len(epoch_times) if epoch_times else math.nan
        rates = [v for (_, _, k, v) in self.rec.curves if k == f"{self.task.unit}_per_s"]
        final[f"{self.task.unit}_per_s"] = sum(rates) / len(rates) if rates else math.nan
        if self.diverged:
            self.result.status = "diverged"
            final.update(train_loss=math.nan, val_loss=math.nan, val_acc=math.nan, test_loss=math.nan, test_acc=math.nan)
        else:
            self.result.status = "completed"
            last = {k: v for (_, _, k, v) in self.rec.curves}
            final.update(train_loss=last.get("epoch_train_loss", math.nan), train_acc=last.get("train_acc", math.nan))
            for key in [k for k in last if k.startswith("val_")]:
                final[key] = last[key]
            test = self.task.evaluate(self.model, "test")
            final.update({f"test_{k}": v for k, v in test.items()})
        self.result.final = final


def _measure(probes: list[Any], point: str) -> None:
    for p in probes:
        if p.point == point:
            p.measure()


VANISHING_RATIO = 1e-8
CHANCE_MARGIN = 0.02


def classify_failure(result: RunResult, data: Any) -> str | None:
    """Name how a finished run failed to train, or None.

    ``nonfinite`` / ``exploding``: the divergence reason. ``vanishing``: at the last check the
    first layer's gradient norm is below 1e-8 of the last layer's. ``chance``: (classification)
    final test accuracy within 2 points of chance (1 / classes).
    """
    if result.status == "diverged":
        return result.diverge_reason
    if result.status != "completed":
        return None
    grads = [r for r in result.layers if r[4] == "grad_norm"]
    if grads:
        last = max(r[0] for r in grads)
        rows = sorted((r for r in grads if r[0] == last), key=lambda r: r[2])
        g_first, g_last = rows[0][5], rows[-1][5]
        if math.isfinite(g_first) and math.isfinite(g_last) and g_last > 0 and g_first < VANISHING_RATIO * g_last:
            return "vanishing"
    n_classes = getattr(data, "meta", {}).get("n_classes")
    acc = result.final.get("test_acc")
    if n_classes and isinstance(acc, float) and math.isfinite(acc) and acc < 1.0 / int(n_classes) + CHANCE_MARGIN:
        return "chance"
    return None


def model_kwargs(cfg: RunConfig, task: Any) -> dict[str, Any]:
    """Model constructor arguments from the run config and the data."""
    kw = task.model_kwargs()
    if cfg.arch == "mlp":
        kw.pop("input_shape", None)
        return kw | {"depth": cfg.depth, "width": cfg.width, "activation": cfg.activation, "init": cfg.init,
                     "checkpoint_segments": cfg.act_checkpoint, "norm": cfg.norm}
    if cfg.arch == "resnet18":
        return kw | {"width": cfg.width, "residual": cfg.residual, "batch_norm": cfg.batch_norm}
    if cfg.arch in ("gpt", "gpt_modern"):
        return kw | {"n_layer": cfg.depth, "n_embd": cfg.width, "n_head": cfg.n_head}
    if cfg.arch == "vit":
        return kw | {"width": cfg.width, "depth": cfg.depth, "n_head": cfg.n_head}
    if cfg.arch == "cnn":
        return kw | {"width": cfg.width, "depth": cfg.depth, "batch_norm": cfg.batch_norm}
    if cfg.arch == "lq":  # the toy linear system: depth layers of the data's width
        return kw | {"depth": cfg.depth}
    raise ValueError(f"arch: unknown {cfg.arch!r}")


def _flush_losses(buf: list[torch.Tensor], step: int, epoch: int, cfg: RunConfig, rec: _Recorder, result: RunResult,
                  stats: list[dict[str, torch.Tensor]] | None = None, world: dist_.World = dist_.SINGLE) -> bool:
    """Move buffered losses (and the method's per-step statistics, one row per step and key) to
    the host in one transfer each; detect divergence. True if diverged. Data-parallel: the losses
    and statistics are the ranks' means (one all-reduce each), so every rank records the same
    values and takes the same divergence decision at the same flush."""
    if not buf:
        return False
    losses = dist_.all_mean(torch.stack(buf).float(), world).cpu().tolist()
    first = step - len(losses) + 1
    if stats:
        keys = sorted({k for d in stats for k in d})
        nan = torch.tensor(float("nan"), device=buf[0].device)
        table = dist_.all_mean(torch.stack([torch.stack([d.get(k, nan).float().reshape(()) for k in keys]) for d in stats]),
                               world).cpu().tolist()
        s0 = step - len(table) + 1
        # every step's row goes to curves.csv; the sinks (MLflow) get one point per flush, the
        # interval's mean over its finite values, as for train_loss: per-step rows into a SQL
        # store were most of a quick sweep's tracking time (a rho run logs 6 keys per step)
        for i, row in enumerate(table):
            for k, v in zip(keys, row):
                rec.metric(s0 + i, epoch, k, v, sinks=False)
        for j, k in enumerate(keys):
            vals = [row[j] for row in table if math.isfinite(row[j])]
            if vals:
                rec.to_sinks(step, k, sum(vals) / len(vals))
    for i, v in enumerate(losses):
        s = first + i
        if not math.isfinite(v) or v > cfg.diverge_loss:
            result.diverged_step = s
            result.diverge_reason = "nonfinite" if not math.isfinite(v) else "exploding"
            rec.metric(s, epoch, "train_loss", v)
            rec.flush()
            return True
    # one point per flush keeps curves small: the mean loss over the interval
    rec.metric(step, epoch, "train_loss", sum(losses) / len(losses))
    rec.flush()
    return False


def _finish(result: RunResult, rec: _Recorder, sinks: list[Sink], run_dir: str | Path | None) -> None:
    result.curves, result.layers = rec.curves, rec.layers
    if run_dir is not None:
        write_run(result, Path(run_dir))
    summary = {k: (float(v) if isinstance(v, (int, float)) and v is not None else None) for k, v in result.final.items()}
    if result.diverged_step is not None:
        summary["diverged_step"] = float(result.diverged_step)
    for s in sinks:
        if run_dir is not None:
            for name in ("metrics.json", "curves.csv", "layers.csv", "epochs.csv"):
                s.log_artifact(Path(run_dir) / name)
        s.finish(result.status, summary)


def write_run(result: RunResult, run_dir: Path) -> None:
    """Write metrics.json, curves.csv and layers.csv (each atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_text(run_dir / "metrics.json", json.dumps(result.to_json(), indent=2, allow_nan=False) + "\n")
    _atomic_csv(run_dir / "curves.csv", ("step", "epoch", "metric", "value"), result.curves)
    _atomic_csv(run_dir / "layers.csv", LAYER_COLUMNS, result.layers)
    _atomic_csv(run_dir / "epochs.csv", ("epoch", "step") + EPOCH_METRICS, epoch_table(result.curves))


EPOCH_METRICS = ("epoch_train_loss", "train_acc", "val_loss", "val_acc")


def epoch_table(curves: list[tuple[int, int, str, float]]) -> list[tuple]:
    """One row per completed epoch (wide), for ``dvc plots``."""
    rows: dict[int, dict[str, Any]] = {}
    for step, epoch, key, value in curves:
        if key in EPOCH_METRICS:
            rows.setdefault(epoch, {"step": step})[key] = value
    return [(e, r["step"], *(r.get(k, math.nan) for k in EPOCH_METRICS)) for e, r in sorted(rows.items())]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([_csv_val(v) for v in row])
    os.replace(tmp, path)


def _csv_val(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return v
