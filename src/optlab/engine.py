"""The training loop: steps, evaluation, per-layer probes, divergence, records.

``train(cfg, sinks=..., run_dir=...)`` runs one configuration end to end and returns a
:class:`RunResult`. The loop keeps the data on the device, batches by index, and syncs with
the host only every ``log_every`` steps (one transfer of the buffered losses), at epoch ends
and at the sigma/gradient checks. A run ends as

- ``completed``,
- ``diverged``: a non-finite training loss or one above ``diverge_loss``; the first bad step
  is recorded and the run stops there. This is a result, not an error.
- ``failed``: an exception (a bug); recorded, then re-raised.

Outputs in ``run_dir``: ``metrics.json``, ``curves.csv`` (step, epoch, metric, value) and
``layers.csv`` (step, epoch, layer, role, grad_norm, sigma_max).
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
import torch.nn.functional as F

from . import models, optim
from .config import RunConfig
from .tasks import build_task
from .metrics.layers import LayerIndex, layer_grad_norms, layer_sigma_max
from .metrics.memory import live_state_bytes, step_peak_bytes

SN_TOL = 1e-4  # a projected layer above 1 + SN_TOL counts as a violation
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
    layers: list[tuple[int, int, int, str, float, float]] = field(default_factory=list)
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but not available; allowed here: auto, cpu")
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


def state_memory_mb(model: torch.nn.Module, opt: Any) -> float:
    """Exact size of the training state: parameters, gradients, buffers and optimizer state (MB)."""
    return live_state_bytes(model, opt) / 2**20


def load_prepared(prepared_dir: str | Path, dataset: str, device: torch.device) -> Any:
    """A prepared dataset: classification splits, or a token stream for language models."""
    from .config import LM_DATASETS

    path = Path(prepared_dir) / f"{dataset}.pt"
    if dataset in LM_DATASETS:
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
        self.layers: list[tuple[int, int, int, str, float, float]] = []
        self._pending: list[tuple[str, float, int]] = []

    def metric(self, step: int, epoch: int, key: str, value: float) -> None:
        self.curves.append((step, epoch, key, value))
        if math.isfinite(value):
            self._pending.append((key, value, step))

    def layer_rows(self, step: int, epoch: int, roles: list[str], grad: list[float], sigma: list[float]) -> None:
        for i, (r, g, s) in enumerate(zip(roles, grad, sigma)):
            self.layers.append((step, epoch, i, r, g, s))

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
    sinks = [_Guarded(sk) for sk in sinks]
    device = resolve_device(cfg.device)
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
        "run_id": cfg.run_id,
    }
    base_tags.update(tags or {})
    if data is None:  # bad input (a missing file) fails here, before any record is written
        data = load_prepared(cfg.prepared_dir, cfg.dataset, device)
    ckpt = Checkpointer(Path(checkpoint_dir), cfg) if checkpoint_dir is not None and cfg.checkpoint_every > 0 else None
    if ckpt is not None and keep_done:
        done = ckpt.load_done()
        if done is not None:  # finished before the stage was interrupted: reuse, don't retrain or re-log
            if run_dir is not None:
                write_run(done, Path(run_dir))
            return done
    resume = ckpt.latest() if ckpt is not None else None
    if resume is not None:
        base_tags["resumed_from_step"] = str(resume["step"])
    for s in sinks:
        s.start(cfg.flat(), base_tags)

    result = RunResult(run_id=cfg.run_id, status="failed", config=cfg.flat(), final={}, sweep=sweep)
    result.provenance = {
        "git_commit": base_tags.get("git_commit"),
        "git_dirty": base_tags.get("git_dirty") == "true" if "git_dirty" in base_tags else None,
        "frozen": base_tags.get("frozen", str(cfg.phase == "frozen").lower()) == "true",
    }
    try:
        _Loop(cfg, data, device, rec, result, progress, ckpt).run(resume)
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

    def __init__(self, root: Path, cfg: RunConfig) -> None:
        digest = hashlib.sha256(json.dumps(cfg.flat(), sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.dir = root / f"{cfg.run_id}-{digest}"

    def paths(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:09d}.pt"
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
        for p in self.dir.glob("step-*.pt*") if self.dir.is_dir() else []:
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def save_done(self, result: RunResult) -> None:
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
            layers = [(int(a), int(b), int(c), str(d), float("nan") if f is None else float(f), float("nan") if g is None else float(g))
                      for a, b, c, d, f, g in doc.pop("layers")]
            final = {k: (math.nan if v is None and k not in ("sn_violations", "sn_active_frac", "epochs_to_90") else v) for k, v in doc["final"].items()}
            return RunResult(run_id=doc["run_id"], status=doc["status"], config=doc["config"], final=final,
                             diverged_step=doc["diverged_step"], diverge_reason=doc["diverge_reason"], error=doc["error"],
                             failure=doc.get("failure"), sweep=doc.get("sweep"), curves=curves, layers=layers,
                             provenance=doc.get("provenance") or {})
        except Exception as exc:  # unreadable: train again
            warnings.warn(f"{path} is unreadable ({type(exc).__name__}: {exc}); the run is trained again")
            return None


CHECKPOINT_FORMAT = 1


class _Loop:
    """The training loop for one run, with its state kept on the object so it can checkpoint."""

    def __init__(self, cfg: RunConfig, data: Any, device: torch.device, rec: _Recorder, result: RunResult, progress: bool, ckpt: Checkpointer | None) -> None:
        self.cfg, self.data, self.device, self.rec, self.result, self.ckpt = cfg, data, device, rec, result, ckpt
        self.task = build_task(cfg, data, device)
        self.model = models.build(cfg.arch, **model_kwargs(cfg, self.task)).to(device)
        if cfg.reparam == "spectral_norm":
            from .optim.reparam import apply_spectral_norm_reparam

            apply_spectral_norm_reparam(self.model, tuple(cfg.sn.roles))
        sn = {"sn_mode": cfg.sn.mode, "sn_sigma": cfg.sn.sigma, "sn_power_iters": cfg.sn.power_iters,
              "sn_roles": tuple(cfg.sn.roles), "seed": cfg.seed}
        if any(p.dim() == 4 for p in self.model.parameters()):
            sn["sn_conv"] = cfg.sn.conv
        self.opt = optim.build(cfg.optimizer, self.model, lr=cfg.lr, **(sn if cfg.optimizer == "sgd_sn" else {}))
        self.projected = cfg.optimizer == "sgd_sn"
        self.index = LayerIndex.of(self.model)
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.steps_per_epoch = self.task.steps_per_epoch
        self.total = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps > 0:
            self.total = min(self.total, cfg.max_steps)
        self.progress = progress
        # loop state (everything a checkpoint must carry)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.epoch_gen_state = self.gen.get_state()
        self.best_val = -math.inf
        self.epochs_to_90: int | None = None
        self.violations = 0
        self.sigma_max_max = math.nan
        self.loss_buf: list[torch.Tensor] = []
        self.epoch_loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.seen = 0
        self.wall_before = 0.0
        self.diverged = False
        self.step_mem_mb = math.nan  # CPU: peak of one profiled step (see metrics.memory)

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
            "optimizer": self.opt.state_dict(),
            "best_val": self.best_val,
            "epochs_to_90": -1 if self.epochs_to_90 is None else self.epochs_to_90,
            "violations": self.violations,
            "sigma_max_max": self.sigma_max_max,
            "loss_buf": [t.cpu() for t in self.loss_buf],
            "epoch_loss": self.epoch_loss.cpu(),
            "correct": self.correct.cpu(),
            "seen": self.seen,
            "wall": self.wall_before + (time.perf_counter() - self.t0),
            "curves": [list(c) for c in self.rec.curves],
            "layer_index": self.index.state_dict(),
            "layers": [list(r) for r in self.rec.layers],
        }

    def restore(self, st: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = int(st["step"]), int(st["epoch"]), int(st["batch_in_epoch"])
        self.epoch_gen_state = st["epoch_gen_state"]
        torch.set_rng_state(st["torch_rng"])
        if self.device.type == "cuda" and st["cuda_rng"]:
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.best_val, self.violations, self.sigma_max_max = st["best_val"], int(st["violations"]), st["sigma_max_max"]
        self.epochs_to_90 = None if int(st["epochs_to_90"]) < 0 else int(st["epochs_to_90"])
        self.loss_buf = [t.to(self.device) for t in st["loss_buf"]]
        self.epoch_loss = st["epoch_loss"].to(self.device)
        self.correct = st["correct"].to(self.device)
        self.seen = int(st["seen"])
        self.wall_before = float(st["wall"])
        # the records so far: re-sent to the sinks in one batch, so the resumed run is complete
        for s, e, k, v in st["curves"]:
            self.rec.metric(int(s), int(e), str(k), float(v))
        if st.get("layer_index") is not None:
            self.index.load_state_dict(st["layer_index"])
        self.rec.layers = [(int(a), int(b), int(c), str(d), float(f), float(g)) for a, b, c, d, f, g in st["layers"]]
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
        pending_grad: torch.Tensor | None = None
        start_epoch = self.epoch
        for epoch in range(start_epoch, cfg.epochs):
            if self.step >= self.total and epoch > start_epoch:
                break
            self.epoch = epoch
            if not (epoch == start_epoch and resume is not None):
                self.epoch_gen_state = self.gen.get_state()
                self.batch_in_epoch = 0
                self.correct.zero_()
                self.epoch_loss.zero_()
                self.seen = 0
            self.gen.set_state(self.epoch_gen_state)
            batches = self.task.epoch_batches(self.gen)
            t_epoch = time.perf_counter()
            self.model.train()
            for idx in batches[self.batch_in_epoch :]:
                if self.step >= self.total:
                    break
                xb, yb = self.task.batch(idx)
                check = (self.step + 1) % cfg.sn.check_every == 0
                if self.device.type == "cpu" and math.isnan(self.step_mem_mb) and (self.step >= 1 or self.total == 1):
                    # one step (the second: optimizer state exists) under the allocation profiler
                    (logits, loss, grad), peak, overhead = step_peak_bytes(
                        lambda: self._train_step(xb, yb, amp, check), self.model, self.opt, self.device)
                    self.step_mem_mb = peak / 2**20
                    self.t0 += overhead  # the profiler's own start/stop/parse time is not the run's
                    t_epoch += overhead
                else:
                    logits, loss, grad = self._train_step(xb, yb, amp, check)
                if check:
                    pending_grad = grad
                self.step += 1
                self.batch_in_epoch += 1
                det = loss.detach()
                self.loss_buf.append(det)
                n_items = self.task.n_items(yb)
                self.epoch_loss += det * n_items
                self.correct += self.task.n_correct(logits, yb)
                self.seen += n_items
                if check and pending_grad is not None:
                    self._layer_check(pending_grad)
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    bad = _flush_losses(self.loss_buf, self.step, epoch, cfg, rec, self.result)
                    self.loss_buf = []
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
                if _flush_losses(self.loss_buf, self.step, epoch, cfg, rec, self.result):
                    self.diverged = True
                    break
                self.loss_buf = []
            self._end_epoch(epoch, time.perf_counter() - t_epoch, len(batches))
            if bar is not None:
                bar.set_postfix(val_acc=f"{self.last_val_acc:.3f}")
        wall = self.wall_before + (time.perf_counter() - self.t0)
        if bar is not None:
            bar.close()
        if self.step % cfg.sn.check_every != 0 and self.step > 0:
            self._layer_check(layer_grad_norms(self.index))
        rec.flush()
        self._final(wall)

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor, amp: Any, check: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Forward, backward, (per-layer gradient norms on check steps), optimizer step."""
        with amp:
            logits = self.fwd(xb)
        loss = self.task.loss(logits, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = layer_grad_norms(self.index) if check else None
        self.opt.step()
        return logits, loss, grad

    def _layer_check(self, grad: torch.Tensor) -> None:
        # conv kernels: the operator norm where the projection bounds it, else the reshaped-matrix norm
        sig = layer_sigma_max(self.index, operator=self.projected and self.cfg.sn.conv == "operator")
        s_list = sig.tolist()
        self.rec.layer_rows(self.step, self.epoch, self.index.roles, grad.tolist(), s_list)
        self.sigma_max_max = max(s_list)
        self.rec.metric(self.step, self.epoch, "sigma_max", self.sigma_max_max)
        if self.projected and not self.sigma_max_max <= 1.0 + SN_TOL:
            self.violations += 1

    def _end_epoch(self, epoch: int, seconds: float, n_batches: int) -> None:
        """Epoch-end records: train loss/accuracy, validation metrics, throughput (one sync each)."""
        tr = torch.stack([self.epoch_loss / max(1, self.seen), self.correct / max(1, self.seen)]).tolist()
        val = self.task.evaluate(self.model, "val")
        self.best_val = max(self.best_val, val["acc"])
        self.last_val_acc = val["acc"]
        if self.epochs_to_90 is None and val["acc"] >= 0.9:
            self.epochs_to_90 = epoch + 1
        rows = [("epoch_train_loss", tr[0]), ("train_acc", tr[1])]
        rows += [(f"val_{k}", v) for k, v in val.items()]
        rows += [("lr", self.cfg.lr), ("epoch_time_s", seconds)]
        if seconds > 0 and n_batches > 0:
            rows.append((f"{self.task.unit}_per_s", n_batches * self.cfg.batch_size * (self.cfg.block_size if self.task.kind == "lm" else 1) / seconds))
        for key, val_ in rows:
            self.rec.metric(self.step, epoch, key, float(val_))
        self.rec.flush()

    def _final(self, wall: float) -> None:
        final: dict[str, Any] = {
            "steps": self.step,
            "epochs_completed": self.epoch + (0 if self.diverged else 1),
            "wall_time_s": wall,
            "peak_mem_mb": peak_memory_mb(self.device),
            "step_mem_mb": self.step_mem_mb,
            "peak_rss_mb": peak_rss_mb(),
            "state_mem_mb": state_memory_mb(self.model, self.opt),
            "best_val_acc": self.best_val if self.best_val > -math.inf else math.nan,
            "sigma_max_max": self.sigma_max_max,
            "sn_violations": self.violations if self.projected else None,
            # fraction of steps at which the projection changed some weight (0: it never bound)
            "sn_active_frac": (self.opt.active_steps / self.step if self.step else math.nan) if self.projected else None,
        }
        final["epochs_to_90"] = self.epochs_to_90
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
    if result.layers:
        last = max(r[0] for r in result.layers)
        rows = sorted((r for r in result.layers if r[0] == last), key=lambda r: r[2])
        g_first, g_last = rows[0][4], rows[-1][4]
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
                     "checkpoint_segments": cfg.act_checkpoint}
    if cfg.arch == "resnet18":
        return kw | {"width": cfg.width, "residual": cfg.residual, "batch_norm": cfg.batch_norm}
    if cfg.arch == "gpt":
        return kw | {"n_layer": cfg.depth, "n_embd": cfg.width, "n_head": cfg.n_head}
    raise ValueError(f"arch: unknown {cfg.arch!r}")


def _flush_losses(buf: list[torch.Tensor], step: int, epoch: int, cfg: RunConfig, rec: _Recorder, result: RunResult) -> bool:
    """Move buffered losses to the host in one transfer; detect divergence. True if diverged."""
    if not buf:
        return False
    losses = torch.stack(buf).float().cpu().tolist()
    first = step - len(losses) + 1
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
    _atomic_csv(run_dir / "layers.csv", ("step", "epoch", "layer", "role", "grad_norm", "sigma_max"), result.layers)
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
