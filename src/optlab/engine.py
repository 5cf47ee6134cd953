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

import csv
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
import torch.nn.functional as F

from . import models, optim
from .config import RunConfig
from .metrics.layers import LayerIndex, layer_grad_norms, layer_sigma_max

SN_TOL = 1e-4  # a projected layer above 1 + SN_TOL counts as a violation


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
    """Peak GPU memory allocated by torch, or the process's peak RSS on CPU (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole split, one host sync."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], chunk):
        logits = model(x[i : i + chunk]).float()
        loss_sum += F.cross_entropy(logits, y[i : i + chunk], reduction="sum")
        correct += (logits.argmax(-1) == y[i : i + chunk]).sum()
    model.train(was_training)
    n = max(1, x.shape[0])
    vals = torch.stack([loss_sum / n, correct / n]).tolist()
    return float(vals[0]), float(vals[1])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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
) -> RunResult:
    """Train one configuration. See the module docstring for the outcome and outputs."""
    from .data import batch_indices, load

    cfg.validate()
    sinks = list(sinks)
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
    for s in sinks:
        s.start(cfg.flat(), base_tags)

    result = RunResult(run_id=cfg.run_id, status="failed", config=cfg.flat(), final={})
    result.provenance = {
        "git_commit": base_tags.get("git_commit"),
        "git_dirty": base_tags.get("git_dirty") == "true" if "git_dirty" in base_tags else None,
        "frozen": cfg.phase == "frozen",
    }
    try:
        if data is None:
            data = load(Path(cfg.prepared_dir) / f"{cfg.dataset}.pt", device=device)
        _run(cfg, data, device, rec, result, progress, batch_indices)
    except Exception as exc:  # a bug: record it, then re-raise
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        _finish(result, rec, sinks, run_dir)
        raise
    _finish(result, rec, sinks, run_dir)
    return result


def _run(cfg: RunConfig, data: Any, device: torch.device, rec: _Recorder, result: RunResult, progress: bool, batch_indices) -> None:
    meta = data.meta
    x_tr, y_tr = data.train_x.to(device), data.train_y.to(device)
    model = models.build(
        cfg.arch,
        input_dim=int(meta["input_dim"]),
        n_classes=int(meta["n_classes"]),
        depth=cfg.depth,
        width=cfg.width,
        activation=cfg.activation,
        init=cfg.init,
    ).to(device)
    opt = optim.build(
        cfg.optimizer,
        model,
        lr=cfg.lr,
        **(
            {"sn_mode": cfg.sn.mode, "sn_sigma": cfg.sn.sigma, "sn_power_iters": cfg.sn.power_iters, "seed": cfg.seed}
            if cfg.optimizer == "sgd_sn"
            else {}
        ),
    )
    projected = cfg.optimizer == "sgd_sn"
    index = LayerIndex.of(model)
    fwd = torch.compile(model) if cfg.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n = x_tr.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    bar = _progress(total, f"{cfg.run_id}", progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step = 0
    best_val = -math.inf
    violations = 0
    sigma_max_max = math.nan
    loss_buf: list[torch.Tensor] = []
    correct = torch.zeros((), device=device)
    seen = 0
    epoch_loss = torch.zeros((), device=device)
    diverged = False
    pending_grad: torch.Tensor | None = None
    t0 = time.perf_counter()
    epoch = 0
    for epoch in range(cfg.epochs):
        model.train()
        correct.zero_()
        epoch_loss.zero_()
        seen = 0
        for idx in batch_indices(n, cfg.batch_size, gen, device):
            xb, yb = x_tr[idx], y_tr[idx]
            with amp:
                logits = fwd(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            check = (step + 1) % cfg.sn.check_every == 0
            if check:
                pending_grad = layer_grad_norms(index)
            opt.step()
            step += 1
            det = loss.detach()
            loss_buf.append(det)
            epoch_loss += det * yb.shape[0]
            correct += (logits.detach().argmax(-1) == yb).sum()
            seen += yb.shape[0]
            if check and pending_grad is not None:
                sig = layer_sigma_max(index)
                g_list, s_list = pending_grad.tolist(), sig.tolist()
                rec.layer_rows(step, epoch, index.roles, g_list, s_list)
                sigma_max_max = max(s_list)
                rec.metric(step, epoch, "sigma_max", sigma_max_max)
                if projected and sigma_max_max > 1.0 + SN_TOL:
                    violations += 1
            if step % cfg.log_every == 0 or step == total:
                bad = _flush_losses(loss_buf, step, epoch, cfg, rec, result)
                loss_buf = []
                if bar is not None:
                    bar.update(step - bar.n)
                if bad:
                    diverged = True
                    break
        if diverged:
            break
        if loss_buf:
            if _flush_losses(loss_buf, step, epoch, cfg, rec, result):
                diverged = True
                break
            loss_buf = []
        # epoch end: evaluation (one sync each)
        tr = torch.stack([epoch_loss / max(1, seen), correct / max(1, seen)]).tolist()
        val_loss, val_acc = evaluate(model, data.val_x.to(device), data.val_y.to(device))
        best_val = max(best_val, val_acc)
        for key, val in (("epoch_train_loss", tr[0]), ("train_acc", tr[1]), ("val_loss", val_loss), ("val_acc", val_acc), ("lr", cfg.lr)):
            rec.metric(step, epoch, key, float(val))
        rec.flush()
        if bar is not None:
            bar.set_postfix(val_acc=f"{val_acc:.3f}", loss=f"{tr[0]:.3f}")
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    # final exact sigma and gradient norms (last step's gradients)
    if step % cfg.sn.check_every != 0 and step > 0:
        sig = layer_sigma_max(index)
        s_list = sig.tolist()
        g_list = layer_grad_norms(index).tolist()
        rec.layer_rows(step, epoch, index.roles, g_list, s_list)
        sigma_max_max = max(s_list)
        rec.metric(step, epoch, "sigma_max", sigma_max_max)
        if projected and math.isfinite(sigma_max_max) and sigma_max_max > 1.0 + SN_TOL:
            violations += 1
    rec.flush()

    final: dict[str, Any] = {
        "steps": step,
        "epochs_completed": epoch + (0 if diverged else 1),
        "wall_time_s": wall,
        "peak_mem_mb": peak_memory_mb(device),
        "best_val_acc": best_val if best_val > -math.inf else math.nan,
        "sigma_max_max": sigma_max_max,
        "sn_violations": violations if projected else None,
    }
    if diverged:
        result.status = "diverged"
        final.update(train_loss=math.nan, val_loss=math.nan, val_acc=math.nan, test_loss=math.nan, test_acc=math.nan)
    else:
        result.status = "completed"
        last = {k: v for (_, _, k, v) in rec.curves}
        test_loss, test_acc = evaluate(model, data.test_x.to(device), data.test_y.to(device))
        final.update(
            train_loss=last.get("epoch_train_loss", math.nan),
            train_acc=last.get("train_acc", math.nan),
            val_loss=last.get("val_loss", math.nan),
            val_acc=last.get("val_acc", math.nan),
            test_loss=test_loss,
            test_acc=test_acc,
        )
    result.final = final
    result.curves, result.layers = rec.curves, rec.layers


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
