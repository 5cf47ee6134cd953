"""What the DVC stages do: prepare data, the headline run, one sweep slice, the reports.

Each function reads params.yaml, checks the phase policy, opens the tracking sinks and calls
the engine. The stage scripts in ``stages/`` only parse their arguments and call these, so
the same work runs without DVC (``python -m optlab.pipeline train``), e.g. on a GPU machine
that has torch but neither DVC nor MLflow: tracking is then skipped with a warning, and the
DVC outs (metrics.json, curves.csv, layers.csv) are still written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from . import distributed, engine, paramfiles
from .codeset import TRAINING_CODE_EXCLUDE  # what no training run executes (the fingerprint skips it)
from .config import (
    RUN_KEYS,
    SCALES,
    ConfigError,
    RunConfig,
    ablation_seeds,
    load_params,
    prepared_datasets,
    resolve_ablation,
    resolve_run,
    resolve_method,
    resolve_study,
    study_run,
)


def _tracking_enabled() -> bool:
    return os.environ.get("OPTLAB_TRACKING", "1").lower() not in ("0", "false", "no", "off")


def _provenance(cfg: RunConfig, seeds_per_config: int, stage: str, *, params: dict[str, Any] | None = None,
                params_path: str = "params.yaml", study: str | None = None, where: str = "",
                seeds_key: str = "seeds_per_config") -> tuple[dict[str, str], dict[str, Any]]:
    """Phase check (raises PhaseError before anything is written) and the run tags.

    ``params`` (parsed ``params_path``) and ``study`` (None: headline/ablation) are what a frozen
    run compares with the frozen commit; ``where`` prefixes the phase keys in messages
    (``studies.<name>.`` when the study sets its own phase)."""
    from .tracking.policy import check_phase
    from .tracking.policy import WATCHED
    from .tracking.provenance import dvc_stage, find_work_tree, git_info

    root = find_work_tree(Path.cwd())  # the tree being run (a DVC temp workspace is its own checkout)
    params_file = Path(params_path)
    if root is not None:
        with contextlib.suppress(ValueError):
            params_file = params_file.resolve().relative_to(root)
    prov = check_phase(cfg.phase, frozen_commit=cfg.frozen_commit, seeds_per_config=seeds_per_config, root=root,
                       params=params, study=study, params_file=params_file.as_posix(), where=where, seeds_key=seeds_key)
    # dirty means code or params changed; dvc.lock and outs change during every repro
    info = git_info(root, WATCHED) if root is not None else {"git_commit": None, "git_dirty": None, "diff": None}
    tags = {
        "phase": cfg.phase,
        "git_commit": str(info.get("git_commit") or "unknown"),
        "git_dirty": "unknown" if info.get("git_dirty") is None else str(bool(info["git_dirty"])).lower(),
        "study": cfg.study,
        "dvc_stage": dvc_stage() or stage,
        "scale": cfg.scale,
        "frozen_commit": str(prov.get("frozen_commit") or "none"),  # the full sha a frozen run matched
    }
    if info.get("git_dirty") and info.get("diff"):
        tags["_diff"] = info["diff"]
    return tags, prov


def _checkpoint_dir() -> Path:
    """Checkpoints live outside the DVC outs, at the (original) repository root."""
    from .tracking.provenance import find_repo_root

    root = find_repo_root() or Path.cwd()
    return Path(os.environ.get("OPTLAB_CHECKPOINT_DIR", root / ".optlab" / "checkpoints"))


def tracking_deferred(params: dict[str, Any]) -> bool:
    """Whether runs go to the tracking spool for one upload later instead of to the store live.

    ``tracking.upload``: ``live`` (each run logs to the store as it trains), ``deferred`` (each
    run writes its MLflow record to the local spool, a file append; the ``track`` stage, or
    ``python -m optlab.tracking sync``, uploads them all in one process), ``auto`` (the default:
    deferred when the runs train on the CPU, where a quick run takes seconds and opening the
    store took longer than training; live on a GPU, where a run is worth watching)."""
    mode = (params.get("tracking") or {}).get("upload", "auto")
    if mode == "auto":
        return engine.resolve_device(params.get("device") or "auto").type == "cpu"
    return mode == "deferred"


def _sink(params: dict[str, Any], run_name: str, parent_run_id: str | None = None) -> list[Any]:
    if not _tracking_enabled():
        return []
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:  # torch-only machine
        warnings.warn("MLflow tracking skipped (mlflow is not installed); DVC outs are still written")
        return []
    from .tracking import MlflowSink, try_sync

    deferred = tracking_deferred(params)
    if not deferred:
        try_sync()  # best effort, seconds at most: upload runs spooled during an earlier outage
    experiment = (params.get("tracking") or {}).get("experiment", "optlab")
    return [MlflowSink(experiment=experiment, run_name=run_name, parent_run_id=parent_run_id, deferred=deferred)]


@contextlib.contextmanager
def _parent(params: dict[str, Any], name: str, tags: dict[str, str]) -> Iterator[Any]:
    """A parent MLflow run for a sweep slice, or None without tracking."""
    if not _tracking_enabled():
        yield None
        return
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        warnings.warn("MLflow tracking skipped (mlflow is not installed)")
        yield None
        return
    from .tracking import parent_run

    experiment = (params.get("tracking") or {}).get("experiment", "optlab")
    with parent_run(tags.get("study", "adhoc"), experiment=experiment, tags=tags, run_name=name,
                    deferred=tracking_deferred(params)) as parent:
        yield parent


def training_code_fingerprint(root: Path | None = None) -> str:
    """sha256 over the path and bytes of every .py file under src/optlab that training runs
    (everything but :data:`TRAINING_CODE_EXCLUDE`), in path order."""
    import hashlib

    base = root or Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(base.rglob("*.py")):
        rel = f.relative_to(base).as_posix()
        if any(rel == x or rel.startswith(x) for x in TRAINING_CODE_EXCLUDE):
            continue
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


SLICE_ENGINE_KEYS = ("scale", "phase", "frozen_commit", "device", "threads", "amp", "compile", "log_every",
                     "checkpoint_every", "diverge_loss", "tracking")
"""The top-level keys every study slice and the ablation read (besides their own sections)."""


def _json_text(doc: Any) -> str:
    return json.dumps(doc, indent=1, sort_keys=True, default=_json_default) + "\n"


def slice_configs(params: dict[str, Any], fingerprint: str) -> dict[str, dict[str, Any]]:
    """What each training stage's results depend on, one JSON document per stage: ``<study>/<method>.json``
    for every study slice, ``ablate.json`` for the ablation, ``train.json`` for the headline run
    (its resolved configuration: what it takes from ``profiles`` in studies.yaml).

    A slice's file holds the training code's fingerprint, the engine keys, the study's section
    (its common keys and the selected scale's; not its list of methods, so adding a method to a
    study reruns only the new slice; not the other scales' sections), the method's section, and
    the resolved configuration of one run per dataset x grid point (which also captures anything
    a run inherits from profiles or default_lr). DVC tracks each file as the stage's one
    dependency, so dvc.lock holds one hash per stage instead of every value of its params (DVC
    rewrites the whole lock after every stage; at 80 stages that cost seconds per stage)."""
    scale = params.get("scale", "quick")
    engine_keys = {k: params.get(k) for k in SLICE_ENGINE_KEYS}
    out: dict[str, dict[str, Any]] = {}
    for study, raw in (params.get("studies") or {}).items():
        spec = resolve_study(params, study)
        section = {k: v for k, v in (raw or {}).items() if k != "methods" and (k not in SCALES or k == scale)}
        for method in spec.methods:
            resolved = []
            if spec.skip is None:
                mlr = resolve_method(params, method).get("lr")
                lr = float(mlr) if mlr is not None else spec.lrs[0]
                resolved = [study_run(params, spec, method, dataset=ds, point=pt, lr=lr, seed=spec.seeds[0],
                                      run_id="validate").model_dump()
                            for ds in spec.datasets for pt in spec.points()]
            out[f"{study}/{method}.json"] = {
                "training_code": fingerprint, "engine": engine_keys, "study": section,
                "method": (params.get("methods") or {}).get(method), "runs": resolved}
    seeds = ablation_seeds(params)
    variants = {name: resolve_run(params, **var, seed=seeds[0], study="ablate", run_id=name).model_dump()
                for name, var in resolve_ablation(params).items()} if seeds else {}
    out["ablate.json"] = {"training_code": fingerprint, "engine": engine_keys, "seeds": seeds, "variants": variants}
    out["train.json"] = {"training_code": fingerprint, "run": resolve_run(params, run_id="train").model_dump()}
    return out


def validate(params_path: str = "params.yaml", out: str | None = "runs/validated.txt",
             config_dir: str | None = "runs/config") -> int:
    """Stage ``validate``: check the whole params file before any stage runs, and fingerprint the
    training code.

    Checked: every key (a misspelled one, or one added with ``dvc exp run -S +key=val``,
    included), the headline run's resolved config, every study slice's configurations (each
    method x dataset x grid point, at its first LR and seed, as ``sweep`` does before it writes
    anything) and the ablation variants. A bad params file stops ``dvc repro`` / ``dvc exp run``
    here, with one line naming the key and the allowed values, before DVC removes any earlier
    output. The outs: ``runs/validated.txt`` holds :func:`training_code_fingerprint` (the
    headline stage depends on it and on its params), and ``runs/config/`` one file per study
    slice and one for the ablation (:func:`slice_configs`), each that stage's only dependency
    besides its script and the data. So a params edit reruns only the stages whose file it
    changes, a change to any code a run executes reruns every training stage, an edit of the
    analysis code none, and each stage's lock entry stays a few lines (DVC rewrites the whole
    dvc.lock after every stage, so its size costs every stage time). Returns the number of
    configurations checked."""
    params = load_params(params_path)
    fingerprint = training_code_fingerprint()
    docs = slice_configs(params, fingerprint)  # resolves every slice's and variant's configurations
    n = 1 + sum(len(d.get("runs", d.get("variants", ()))) for d in docs.values())
    if config_dir is not None:
        texts = {rel: _json_text(doc) for rel, doc in docs.items()}
        root = Path(config_dir)
        if root.exists():
            shutil.rmtree(root)
        for rel, text in texts.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(f"training code sha256 {fingerprint}\n")
    print(f"validate: {params_path} and {paramfiles.STUDIES_FILE} are valid ({n} run configurations checked)")
    return n


def track(params_path: str = "params.yaml", runs_root: str = "runs", figures_dir: str = "reports/figures") -> int:
    """Stage ``track``: upload every spooled run (deferred runs, and runs spooled during a store
    outage) to its tracking store, in one process. Returns 0, or 1 when some upload failed (they
    stay in the spool for the next sync)."""
    load_params(params_path)  # validates tracking.*
    if not _tracking_enabled():
        print("track: tracking is off (OPTLAB_TRACKING); nothing uploaded")
        return 0
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        print("track: mlflow is not installed; spooled runs wait in the spool")
        return 0
    from .tracking.spool import default_spool_dir, sync

    summary = sync()
    lines = summary.lines()
    print("track: " + lines[-1] + ("" if summary.uploaded else f" ({default_spool_dir()})"))
    for line in lines[:-1]:
        if not line.startswith("uploaded"):
            print(f"track: {line}")
    if summary.ok:
        from .tracking.annotate import annotate

        params = load_params(params_path)
        experiment = (params.get("tracking") or {}).get("experiment", "optlab")
        n = annotate(str(Path(runs_root) / "sweep"), experiment=experiment, figures_dir=figures_dir)
        print(f"track: marked {n['selected_runs']} selected-LR runs and filled {n['parents']} parent runs "
              f"of {n['slices']} slices (filter: tags.optlab.selected = \"true\"); {n['figures']} figures logged")
        _track_headline(experiment, str(Path(runs_root) / "train"))
    return 0 if summary.ok else 1


def _track_headline(experiment: str, run_dir: str = "runs/train") -> None:
    """The headline figure as an artifact of the headline run (found by its name and commit)."""
    from types import SimpleNamespace

    from .tracking.annotate import annotate_headline

    try:
        doc = json.loads((Path(run_dir) / "metrics.json").read_text())
        name = headline_run_name(SimpleNamespace(**{k: doc["config"].get(k) for k in
                                                    ("method", "optimizer", "arch", "dataset", "depth", "lr", "seed")}))
    except (OSError, ValueError, KeyError, TypeError):
        return
    commit = (doc.get("provenance") or {}).get("git_commit")
    if annotate_headline(name, commit, Path(run_dir) / HEADLINE_FIGURE, experiment=experiment):
        print(f"track: {run_dir}/{HEADLINE_FIGURE} logged to the headline run {name!r}")


def prepare(params_path: str = "params.yaml", raw_dir: str = "data/raw", out_dir: str | None = None) -> list[Path]:
    """Build data/prepared/<dataset>.pt for every dataset the profile and sweep use."""
    from .data import prepare as prepare_one
    from .data import resolve_mirror

    params = load_params(params_path)
    data = params.get("data") or {}
    out = Path(out_dir or data.get("prepared_dir") or "data/prepared")
    mirror = resolve_mirror(data.get("mirror"))
    offline = os.environ.get("OPTLAB_OFFLINE", "0").lower() in ("1", "true", "yes")
    written = []
    for name in prepared_datasets(params):
        path = out / f"{name}.pt"
        if name == "markov":
            from .data.synthetic import prepare_markov

            prepare_markov(path, val_fraction=float(data.get("val_fraction", 0.1)), seed=0)
        elif name == "lq":  # issue #13's linear-quadratic toy (synthetic, seeded)
            from .data.lq import prepare_lq

            prepare_lq(path, seed=0)
        elif name in ("tinyshakespeare", "tinystories"):
            from .data.text import prepare_text

            prepare_text(name, Path(raw_dir), path, mirror=mirror, download=not offline)
        else:
            prepare_one(
                name,
                Path(raw_dir),
                path,
                mirror=mirror,
                val_fraction=float(data.get("val_fraction", 0.1)),
                test_fraction=float(data.get("test_fraction", 0.2)),
                seed=0,
                download=not offline,
            )
        written.append(path)
        print(f"prepared {name} -> {path}")
    return written


# ---------------------------------------------------------------- headline overrides (train --key value)

# policy and provenance keys stay in params.yaml: a phase is a claim about the committed tree
_NOT_FLAGS = ("phase", "frozen_commit", "study")
_FLAG_TYPES = {str: "a name", int: "an integer", float: "a number", bool: "true or false"}


def headline_flags() -> tuple[str, ...]:
    """The headline's top-level run keys ``train`` accepts as ``--key value``: every scalar run key
    (optimizer, lr, arch, dataset, depth, width, epochs, batch_size, seed, ...) but the phase
    policy's."""
    return tuple(k for k in RUN_KEYS if k not in _NOT_FLAGS and RunConfig.model_fields[k].annotation in _FLAG_TYPES)


def _allowed_values(key: str) -> tuple[str, ...] | None:
    from . import config as c

    table = {"optimizer": c.optimizer_names, "step_method": c.method_names, "dataset": c.dataset_names,
             "arch": lambda: c.ARCHS, "activation": lambda: c.ACTIVATIONS, "init": lambda: c.INITS,
             "device": lambda: c.DEVICES, "amp": lambda: c.AMP, "scale": lambda: c.SCALES, "norm": lambda: c.NORMS,
             "reparam": lambda: ("none", "spectral_norm"), "augment": lambda: ("none", "crop_flip")}
    return tuple(table[key]()) if key in table else None


def parse_override(text: str) -> Any:
    """A command-line value read as params.yaml would read it (``0.01`` a float, ``64`` an int,
    ``true`` a bool, ``null`` unset, anything else a string), except that ``1e-3`` is a number too
    (YAML 1.1 reads it as a string). Validation is params.yaml's: the run config's one-line errors."""
    value = _yaml_value(text)
    return value if value is None or isinstance(value, (bool, int, float)) else text


def _yaml_value(text: str) -> Any:
    """``text`` read as YAML (the text itself when it is not YAML), ``1e-3`` a float too."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


HEADLINE_FIGURE = "curves.png"  # analysis.plots.HEADLINE_FILE, without importing matplotlib into stage track


def headline_run_name(cfg: Any) -> str:
    """The headline run's MLflow name: what it trains, after the DVC experiment's name under
    ``dvc exp run`` (``DVC_EXP_NAME``), else after ``headline``."""
    what = f"{cfg.method or cfg.optimizer} {cfg.arch} {cfg.dataset} d{cfg.depth} lr{cfg.lr:g} s{cfg.seed}"
    return f"{os.environ.get('DVC_EXP_NAME') or 'headline'}: {what}"


def train_headline(params_path: str = "params.yaml", out_dir: str = "runs/train",
                   overrides: dict[str, Any] | None = None) -> engine.RunResult:
    """The headline run from the top-level params (stage ``train``).

    ``overrides`` (``train --optimizer adam --lr 0.01``) replace top-level keys of the params
    before they are resolved and validated, exactly as if typed into params.yaml, for this run
    only (the file is not changed); debug phase only, and recorded in the run's ``cli_overrides`` tag."""
    params = load_params(params_path)
    overrides = dict(overrides or {})
    if overrides:
        bad = sorted(set(overrides) - set(headline_flags()))
        if bad:
            raise ConfigError(f"train: {bad[0]}: not a headline override; allowed: {', '.join(headline_flags())}")
        params = {**params, **overrides}
    cfg = resolve_run(params, run_id="train")
    if overrides and cfg.phase != "debug":
        flags = " ".join(f"--{k}" for k in overrides)
        raise ConfigError(f"phase: {cfg.phase!r} records the committed params; command-line overrides ({flags}) are for "
                          "phase debug only: set them in params.yaml (or dvc exp run -S) instead")
    # the single-seed headline is exempt from the frozen seed rule and never counts as frozen
    tags, prov = _provenance(cfg, seeds_per_config=3, stage="train", params=params, params_path=params_path)
    tags["frozen"] = "false"
    if overrides:
        tags["cli_overrides"] = " ".join(f"{k}={v}" for k, v in overrides.items())
    world = distributed.env_world()  # torchrun: every rank trains, rank 0 alone writes (optlab.distributed)
    sinks = _sink(params, headline_run_name(cfg)) if world.is_main else []
    result = engine.train(cfg, sinks=sinks, run_dir=out_dir, tags=tags, checkpoint_dir=_checkpoint_dir())
    if world.is_main:
        write_final_metrics(result, Path(out_dir) / "final.json")
        print(_summary_line(result))
    return result


FINAL_METRICS = ("test_acc", "test_loss", "val_acc", "val_loss", "train_loss", "best_val_acc", "test_bpb",
                 "epochs_completed", "steps", "wall_time_s", "seconds_per_epoch", "step_mem_mb", "peak_mem_mb")


def write_final_metrics(result: engine.RunResult, path: Path) -> None:
    """The headline run's DVC metrics file: its final numbers only (metrics.json beside it also
    holds the config, provenance and sweep labels), so ``dvc metrics show`` and ``dvc exp show``
    show metrics, not config strings. ``diverged`` is 1 for a diverged run."""
    final = result.final or {}
    doc: dict[str, Any] = {"diverged": int(result.status == "diverged")}
    for key in FINAL_METRICS:
        v = final.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            doc[key] = v
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _point_id(point: dict[str, Any]) -> str:
    short = {"depth": "d", "width": "w", "block_size": "b", "batch_size": "bs", "residual": "res", "batch_norm": "bn"}
    return "-".join(f"{short.get(k, k)}{int(v) if isinstance(v, bool) else v}" for k, v in point.items()) or "base"


def _score(results: list[engine.RunResult], select: str) -> float:
    """Mean validation score over seeds; a diverged or failed seed counts as the worst value."""
    vals = []
    for r in results:
        v = r.final.get(select) if r.status == "completed" else None
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        if select == "val_acc":
            vals.append(v if ok else 0.0)
        else:  # val_loss: lower is better, scored negated
            vals.append(-v if ok else -math.inf)
    return sum(vals) / len(vals) if vals else -math.inf


# ---------------------------------------------------------------- runs in worker processes

_WORKER: dict[str, Any] = {}


def sweep_workers(params: dict[str, Any], n_jobs: int, device: Any) -> int:
    """How many processes run a slice's runs: ``OPTLAB_WORKERS``, else params ``workers`` (``auto``:
    one per ``threads`` cores on CPU, at most 8; one on a GPU), never more than there are runs.
    The worker count never changes a result: each run's numerics are fixed by its own ``threads``."""
    raw: Any = os.environ.get("OPTLAB_WORKERS") or params.get("workers", "auto")
    if raw == "auto":
        if getattr(device, "type", str(device)) != "cpu":
            n = 1
        else:
            threads = int(params.get("threads") or 0)
            n = (os.cpu_count() or 1) // threads if threads > 0 else 1
            n = min(max(n, 1), 8)
    else:
        try:
            n = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"workers: expected auto or an integer >= 1, got {raw!r}") from None
        if n < 1:
            raise ConfigError(f"workers: expected auto or an integer >= 1, got {raw!r}")
    return max(1, min(n, n_jobs))


def _can_fork(device: str) -> bool:
    import multiprocessing as mp

    return (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            and engine.resolve_device(device).type == "cpu")


def _noop() -> None:
    return None


def _preload_for_workers(live_tracking: bool) -> None:
    """Import in this process what every worker would import at its first run (torch's optimizer
    machinery pulls in torch._dynamo; a live MLflow sink its SQL store), so forked workers share
    it. With deferred tracking the workers only append to the spool: MLflow (3 s of imports) is
    not loaded at all."""
    import torch._dynamo  # noqa: F401

    if live_tracking and _tracking_enabled():
        with contextlib.suppress(ImportError):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
            import mlflow.tracking.client  # noqa: F401


def _worker_init(prepared_dir: str, datasets: list[str], device: str) -> None:
    dev = engine.resolve_device(device)
    _WORKER.clear()
    _WORKER.update({ds: engine.load_prepared(prepared_dir, ds, dev) for ds in datasets})


def _worker_run(job: dict[str, Any]) -> tuple[engine.RunResult | None, str | None]:
    """One run in a worker process: (result, None) or (None, error) for a bug the engine raised."""
    cfg = job["cfg"]
    try:
        res = engine.train(
            cfg, sinks=_sink(job["params"], cfg.run_id, parent_run_id=job["parent"]), run_dir=job["run_dir"],
            data=_WORKER[cfg.dataset], tags=job["tags"], progress=False, checkpoint_dir=job["checkpoint_dir"],
            sweep=job["sweep"], keep_done=job["keep_done"],
        )
    except Exception as exc:
        return None, f"{cfg.run_id}: {type(exc).__name__}: {exc}"
    return res, None


class _Runner:
    """Runs a batch of independent runs, in this process (``workers == 1``) or in a pool of
    worker processes, and returns the results in the batch's order.

    On a CPU under Linux the workers are forked from this process, once, before any tracking
    store is opened: they inherit the imported modules (torch, torch._dynamo, MLflow's store
    code) and the loaded datasets, so a worker starts in milliseconds instead of repeating
    seconds of imports (most of a quick slice's fixed cost). Elsewhere (CUDA, macOS, Windows)
    they are spawned and load the data themselves. Each run's numerics are fixed by its own
    ``threads`` either way, so the start method never changes a result."""

    def __init__(self, workers: int, prepared_dir: str, datasets: list[str], device: str,
                 data: dict[str, Any] | None = None, live_tracking: bool = True) -> None:
        self.workers = workers
        self.pool = None
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            if _can_fork(device):
                _preload_for_workers(live_tracking)
                _WORKER.clear()
                _WORKER.update(data if data is not None else
                               {ds: engine.load_prepared(prepared_dir, ds, engine.resolve_device(device)) for ds in datasets})
                self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
                # a fork pool starts all its workers at the first submit: do it now, before this
                # process opens a tracking store connection the children must not share
                self.pool.submit(_noop).result()
            else:
                self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                                initargs=(prepared_dir, list(datasets), device))

    def map(self, jobs: list[dict[str, Any]], local: Any, done: Any) -> list[tuple[engine.RunResult | None, str | None]]:
        if self.pool is None:
            out = []
            for job in jobs:
                out.append(local(job))
                done(*out[-1])
            return out
        from concurrent.futures import as_completed

        futures = {self.pool.submit(_worker_run, job): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            done(*results[futures[fut]])
        return results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def sweep(study: str, method: str, params_path: str = "params.yaml", out_root: str = "runs/sweep") -> list[engine.RunResult]:
    """One slice of a study: ``method`` over the study's datasets x grid, LR search then seeds.

    For each grid point the learning rates are tried with the search seeds, the best is
    selected on the validation split (the task's select metric), and the selected LR is rerun
    with the other seeds (stage ``<study>@<method>``); ``lr_policy: fixed`` runs every LR with
    every seed. With ``stop_on_failure``, the first grid point whose selected configuration
    fails (named in metrics.json: nonfinite, exploding, vanishing, chance) ends the search along
    the first grid axis: the depth-to-failure search. ``summary.json`` records, per point, the
    selected LR, whether it sits at an edge of the LR grid, and the study's verdict spec, so the
    analysis reads everything from run directories.
    """
    if distributed.env_world().active:
        raise ConfigError("sweep: a study slice runs many runs and fans them out itself (sweep_workers, or one SLURM task "
                          "per slice: python -m optlab.launch); torchrun trains one run: torchrun ... -m optlab.pipeline "
                          "train")
    params = load_params(params_path)
    spec = resolve_study(params, study)
    if method not in spec.methods:
        raise ConfigError(f"{study}: method {method!r} is not in studies.{study}.methods; allowed: {', '.join(spec.methods)}")
    skip = spec.skip
    if skip is None and spec.requires == "cuda" and not _cuda_available():
        skip = "needs a CUDA GPU (studies.{}.{}.requires: cuda); this machine has none".format(study, params.get("scale", "quick"))
    if skip is not None:  # not at this scale (or not on this machine): an empty slice that says why
        out = Path(out_root) / study / method
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        doc = {"study": study, "method": method, "optimizer": resolve_method(params, method).get("optimizer"),
               "analysis": spec.analysis, "verdict": False, "skipped": skip, "scale": params.get("scale", "quick"),
               "lrs": [], "search_seeds": [], "seeds": [], "points": [], "published": spec.published}
        (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(f"{study}@{method}: skipped at scale {doc['scale']}: {skip}")
        return []

    def cfg_for(dataset: str, point: dict[str, Any], lr: float, seed: int, run_id: str) -> RunConfig:
        return study_run(params, spec, method, dataset=dataset, point=point, lr=lr, seed=seed, run_id=run_id)

    points = spec.points()
    lrs = (float(msec_lr),) if (msec_lr := resolve_method(params, method).get("lr")) is not None else spec.lrs
    # validate every configuration before anything is written
    for ds in spec.datasets:
        for pt in points:
            cfg_for(ds, pt, lrs[0], spec.seeds[0], "check")
    stage = f"{study}@{method}"
    first = cfg_for(spec.datasets[0], points[0], lrs[0], spec.seeds[0], stage)
    searching = spec.lr_policy == "search"
    where = f"studies.{study}." if spec.phase is not None else ""
    tags, prov = _provenance(first, seeds_per_config=spec.seeds_per_config(), stage=stage, params=params,
                             params_path=params_path, study=study, where=where,
                             seeds_key=f"studies.{study}.{params.get('scale', 'quick')}.seeds")
    tags["frozen"] = str(bool(prov.get("frozen"))).lower()
    device = engine.resolve_device(first.device)
    cache = {ds: engine.load_prepared(first.prepared_dir, ds, device) for ds in spec.datasets}
    out = Path(out_root) / study / method
    out.mkdir(parents=True, exist_ok=True)
    results: list[engine.RunResult] = []
    errors: list[str] = []
    summary: list[dict[str, Any]] = []
    confirm_seeds = spec.confirm_seeds() if searching else list(spec.seeds)
    per_point = len(lrs) * len(spec.search_seeds) + len(confirm_seeds) if searching else len(lrs) * len(spec.seeds)
    bar = _outer_bar(len(spec.datasets) * len(points) * per_point, stage)
    first_axis = next(iter(spec.grid), None)
    slice_ckpt = _checkpoint_dir() / "sweep" / str(params.get("scale", "quick")) / study / method
    prefix = method

    workers = sweep_workers(params, per_point, device)
    runner = _Runner(workers, first.prepared_dir, list(spec.datasets), first.device, data=cache,
                     live_tracking=not tracking_deferred(params))

    def job(dataset: str, point: dict[str, Any], lr: float, seed: int, role: str, parent: Any) -> dict[str, Any]:
        run_id = f"{prefix}-{dataset}-{_point_id(point)}-lr{lr:g}-s{seed}"
        meta = {"study": study, "method": method, "role": role, "point": point, "select": spec.select,
                "verdict": spec.verdict, "analysis": spec.analysis}
        return {"cfg": cfg_for(dataset, point, lr, seed, run_id), "params": params, "parent": parent,
                "run_dir": out / run_id, "tags": {**tags, "sweep_role": role}, "checkpoint_dir": slice_ckpt,
                "sweep": meta, "keep_done": True}

    def local(j: dict[str, Any]) -> tuple[engine.RunResult | None, str | None]:
        cfg = j["cfg"]
        try:
            res = engine.train(
                cfg, sinks=_sink(params, cfg.run_id, parent_run_id=j["parent"]), run_dir=j["run_dir"],
                data=cache[cfg.dataset], tags=j["tags"], progress=sys.stderr.isatty(), checkpoint_dir=slice_ckpt,
                sweep=j["sweep"], keep_done=True,
            )
        except Exception as exc:  # recorded as failed by the engine; the slice goes on
            return None, f"{cfg.run_id}: {type(exc).__name__}: {exc}"
        return res, None

    def done(res: engine.RunResult | None, err: str | None) -> None:
        if err is not None:
            errors.append(err)
        if bar is not None:
            bar.update(1)
            if res is not None:
                bar.set_postfix_str(_summary_line(res))

    def run_all(jobs: list[dict[str, Any]]) -> list[engine.RunResult | None]:
        out_ = [res for res, _ in runner.map(jobs, local, done)]
        results.extend(r for r in out_ if r is not None)
        return out_

    try:
        with _parent(params, stage, {**tags, "method": method, "seed": ",".join(map(str, spec.seeds))}) as parent:
            for dataset in spec.datasets:
                stopped_at: Any = None
                for point in points:
                    if stopped_at is not None and first_axis in point and point[first_axis] > stopped_at:
                        summary.append({"dataset": dataset, "point": point, "skipped": f"{first_axis} beyond failure at {stopped_at}"})
                        continue
                    role = "search" if searching else "confirm"
                    seeds = spec.search_seeds if searching else spec.seeds
                    by_lr: dict[float, list[engine.RunResult]] = {}

                    def try_lrs(new: list[float]) -> None:
                        grid = [(lr, sd) for lr in new for sd in seeds]
                        got = run_all([job(dataset, point, lr, sd, role, parent) for lr, sd in grid])
                        for lr in new:
                            by_lr[lr] = []
                        for (lr, _), r in zip(grid, got):
                            if r is not None:
                                by_lr[lr].append(r)

                    def pick() -> float:
                        return max(by_lr, key=lambda lr: (_score(by_lr[lr], spec.select), -lr))

                    try_lrs(list(lrs))
                    best_lr = pick()
                    added: list[float] = []
                    steps = {"high": 0, "low": 0}
                    untrained_search = False
                    # an edge choice: go one half-decade further out, until interior or the limit; where
                    # no LR tried trains (every search run failed), the best of them is noise among
                    # failures, so look past both ends (the smaller LRs first) until one trains
                    while searching:
                        edge, base = lr_edge(best_lr, list(by_lr)), best_lr
                        if all_failed(by_lr[best_lr]):
                            untrained_search = True
                            edge = next((e for e in ("low", "high") if steps[e] < spec.lr_extend), None)
                            base = (min if edge == "low" else max)(by_lr)
                        if edge is None or steps[edge] >= spec.lr_extend:
                            break
                        steps[edge] += 1
                        nxt = half_decade_step(base, edge)
                        if bar is not None:
                            bar.total += len(seeds)
                            bar.refresh()
                        try_lrs([nxt])
                        added.append(nxt)
                        best_lr = pick()
                    tried = sorted(by_lr, reverse=True)
                    chosen = by_lr[best_lr]
                    if searching:
                        more = run_all([job(dataset, point, best_lr, sd, "confirm", parent) for sd in confirm_seeds])
                        chosen = chosen + [r for r in more if r is not None]
                    failures = sorted({r.failure for r in chosen if r.failure})
                    summary.append({"dataset": dataset, "point": point, "selected_lr": best_lr, "select": spec.select,
                                    "score": _score(by_lr[best_lr], spec.select), "failures": failures,
                                    "lr_edge": lr_edge(best_lr, tried), "lrs_added": added,
                                    "untrained_search": untrained_search,
                                    "selected_runs": [r.run_id for r in chosen],
                                    "trained": not all_failed(by_lr[best_lr]),
                                    "lr_edge_limit": bool(searching and lr_edge(best_lr, tried)),
                                    "search_scores": {f"{lr:g}": _finite(_score(by_lr[lr], spec.select)) for lr in tried}})
                    if spec.stop_on_failure and failures and first_axis in point and stopped_at is None:
                        stopped_at = point[first_axis]
    finally:
        runner.close()
    if bar is not None:
        bar.close()
    doc = {"study": study, "method": method, "optimizer": first.optimizer, "step_method": first.step_method,
           "analysis": spec.analysis, "verdict": spec.verdict_spec if spec.verdict else False,
           "primary": {"metric": spec.primary[0], "direction": spec.primary[1]}, "select": spec.select,
           "lr_policy": spec.lr_policy, "lrs": list(lrs), "search_seeds": list(spec.search_seeds),
           "seeds": list(spec.seeds), "points": summary, "published": spec.published,
           "phase": first.phase, "frozen": bool(prov.get("frozen")), "frozen_commit": prov.get("frozen_commit"),
           "git_commit": prov.get("git_commit")}
    (out / "summary.json").write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    if not errors:  # the slice is complete: its finished-run records are no longer needed
        shutil.rmtree(slice_ckpt, ignore_errors=True)
    for r in results:
        print(_summary_line(r))
    if errors:
        raise RuntimeError("failed runs (bugs, see metrics.json): " + "; ".join(errors))
    return results


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return str(v)


def all_failed(results: list[engine.RunResult]) -> bool:
    """Every run diverged, failed or ended with a recorded failure (chance, vanishing, ...): the LR did not train."""
    return bool(results) and all(r.status != "completed" or r.failure for r in results)


def lr_edge(lr: float, lrs: tuple[float, ...] | list[float]) -> str | None:
    """``"high"`` / ``"low"`` when ``lr`` is the largest / smallest of a grid of 2+ values, else None:
    a selected LR at an edge means the grid may not contain the best one."""
    if len(set(lrs)) < 2:
        return None
    if lr == max(lrs):
        return "high"
    if lr == min(lrs):
        return "low"
    return None


def half_decade_step(lr: float, direction: str) -> float:
    """The next learning rate past ``lr`` on the half-decade ladder ..., 0.1, 0.3, 1, 3, 10, ...
    (``direction`` "high": the smallest ladder value above ``lr``; "low": the largest below)."""
    if direction not in ("high", "low"):
        raise ValueError(f"direction: unknown {direction!r}; allowed: high, low")
    k = math.floor(math.log10(lr))
    ladder = [float(f"{m}e{e}") for e in range(k - 2, k + 3) for m in (1, 3)]
    if direction == "high":
        return min(v for v in ladder if v > lr * (1 + 1e-9))
    return max(v for v in ladder if v < lr * (1 - 1e-9))


def ablate(params_path: str = "params.yaml", out_root: str = "runs/ablate") -> list[engine.RunResult]:
    """The ablation (stage ``ablate``): every variant of ``profiles.<scale>.ablate`` x its seeds."""
    params = load_params(params_path)
    variants = resolve_ablation(params)
    seeds = ablation_seeds(params)
    if not variants:
        print("ablate: no variants in this profile")
        Path(out_root).mkdir(parents=True, exist_ok=True)
        return []
    cfgs = {
        (name, sd): resolve_run(params, **var, seed=sd, study="ablate", run_id=f"{name}-s{sd}")
        for name, var in variants.items()
        for sd in seeds
    }
    first = next(iter(cfgs.values()))
    tags, prov = _provenance(first, seeds_per_config=len(set(seeds)), stage="ablate", params=params,
                             params_path=params_path, seeds_key=f"profiles.{params.get('scale', 'quick')}.ablate.seeds")
    tags["frozen"] = str(bool(prov.get("frozen"))).lower()
    device = engine.resolve_device(first.device)
    cache = {ds: engine.load_prepared(first.prepared_dir, ds, device) for ds in {c.dataset for c in cfgs.values()}}
    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    results, errors = [], []
    bar = _outer_bar(len(cfgs), "ablate")
    with _parent(params, "ablate", {**tags, "study": "ablate", "seed": ",".join(map(str, seeds))}) as parent:
        for (name, sd), cfg in cfgs.items():
            try:
                res = engine.train(
                    cfg, sinks=_sink(params, cfg.run_id, parent_run_id=parent), run_dir=out / name / cfg.run_id,
                    data=cache[cfg.dataset], tags={**tags, "study": "ablate", "variant": name}, progress=sys.stderr.isatty(),
                    checkpoint_dir=_checkpoint_dir() / "ablate", sweep={"study": "ablate", "role": "ablation", "variant": name},
                )
                results.append(res)
            except Exception as exc:
                errors.append(f"{cfg.run_id}: {type(exc).__name__}: {exc}")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for r in results:
        print(_summary_line(r))
    if errors:
        raise RuntimeError("failed runs (bugs, see metrics.json): " + "; ".join(errors))
    return results


def _outer_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True)


def _summary_line(r: engine.RunResult) -> str:
    f = r.final
    if r.status == "diverged":
        return f"{r.run_id}: diverged at step {r.diverged_step} ({r.diverge_reason})"
    if r.status == "failed":
        return f"{r.run_id}: failed ({r.error})"
    shown = [k for k in ("val_acc", "test_acc") if _finite(f.get(k, float("nan"))) is not None] or \
            [k for k in ("val_loss", "test_loss") if _finite(f.get(k, float("nan"))) is not None]
    values = " ".join(f"{k} {f[k]:.4f}" for k in shown)  # tasks without an accuracy (LM, LQ) show losses
    return f"{r.run_id}: {values} in {f.get('wall_time_s', float('nan')):.1f}s"


def aggregate(runs_root: str = "runs", out_dir: str = "reports/tables") -> None:
    """Stage ``aggregate``: the studies' tables (the headline run is not in them: a headline
    experiment, ``dvc exp run -S optimizer=adam``, reruns only its own stages)."""
    from .analysis.aggregate import aggregate as agg

    agg(Path(runs_root), Path(out_dir), headline=False)


def plot(runs_root: str = "runs", out_dir: str = "reports/figures") -> None:
    """Stage ``plot``: the studies' figures (the headline run's is :func:`headline_plot`'s)."""
    from .analysis.plots import plot_all

    plot_all(Path(runs_root), Path(out_dir), headline=False)


def headline_plot(run_dir: str = "runs/train") -> Path:
    """Stage ``headline_plot``: the headline run's loss and accuracy curves, ``runs/train/curves.png``
    (the pipeline's DVC plot: ``dvc plots show`` renders it without a network)."""
    from .analysis.plots import headline_figure

    return headline_figure(Path(run_dir))


def report(
    tables: str = "reports/tables", figures: str = "reports/figures", out_md: str = "reports/results.md", readme: str = "README.md",
    marker: str = "results", heading: str | None = None,
) -> None:
    from .analysis.report import write_report

    write_report(Path(tables), Path(figures), Path(out_md), Path(readme) if readme else None, marker=marker, heading=heading)


_COMMANDS = {
    "prepare": ("build data/prepared/<dataset>.pt for every dataset of the scale (stage prepare)",
                "Download (or copy from the data mirror), checksum and prepare every dataset that datasets.<scale> "
                "lists into data/prepared/. OPTLAB_OFFLINE=1 refuses downloads."),
    "train": ("the headline run from params.yaml's top-level keys (stage train); --key value overrides one",
              "The headline run: params.yaml's top-level run keys (over the profile of its scale) -> runs/train/ "
              "(metrics.json, epochs.csv) and one MLflow run. --key value overrides a top-level key for this run "
              "only (params.yaml is not changed), validated exactly like params.yaml; debug phase only."),
    "sweep": ("one study slice: a method over the study's grid, LR search then confirmation seeds (stage <study>@<method>)",
              "One slice of a study: --method over studies.<study>'s datasets x grid; the learning rates are searched "
              "on validation, the selected LR rerun with the confirmation seeds; runs/sweep/<study>/<method>/."),
    "ablate": ("the ablation variants of profiles.<scale>.ablate x its seeds (stage ablate)",
               "Every variant of profiles.<scale>.ablate with each of its seeds -> runs/ablate/."),
    "validate": ("check every key and every run configuration of the params file (stage validate)",
                 "Validate params.yaml as a whole: unknown keys, the headline run, every study slice's configurations "
                 "and the ablation variants; writes runs/validated.txt (the training code's fingerprint). Every training "
                 "stage depends on it, so a bad params file stops dvc repro before any earlier output is removed."),
    "track": ("upload the spooled MLflow runs to the tracking store (stage track)",
              "Upload every run waiting in the tracking spool (runs with tracking.upload deferred, the default on a "
              "CPU, and runs spooled while the store was down) in one process; same as `python -m optlab.tracking sync`."),
    "aggregate": ("tables from the run directories -> reports/tables (stage aggregate)",
                  "Read runs/ (run directories only) into the per-study tables under reports/tables/."),
    "plot": ("figures from the run directories -> reports/figures (stage plot)",
             "Draw the per-study figures from runs/ into reports/figures/."),
    "headline_plot": ("the headline run's loss and accuracy curves -> runs/train/curves.png (stage headline_plot)",
                      "Draw runs/train/curves.png from the headline run's curves.csv: the pipeline's DVC plot "
                      "(dvc plots show renders it offline)."),
    "report": ("the results page and README sections from tables and figures (stage report)",
               "Write reports/results.md and the results sections of README.md between their markers."),
}


def _unknown_flags(parser: argparse.ArgumentParser, extra: list[str], allowed: list[str]) -> None:
    import difflib

    flags = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
    hint = difflib.get_close_matches(flags[0], allowed, n=1) if flags else []
    more = f" (did you mean {hint[0]}?)" if hint else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{more}; allowed: {', '.join(allowed)}")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line: one subcommand per stage (``--help`` describes each)."""
    ap = argparse.ArgumentParser(
        prog="python -m optlab.pipeline", description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="`python -m optlab.pipeline COMMAND --help` describes a command's options.")
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params key for this command (dotted: data.prepared_dir=...; read as YAML; "
                         "validated like the file; may follow the command; repeatable)")
    sub = ap.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=short, description=long, allow_abbrev=False)
               for name, (short, long) in _COMMANDS.items()}
    tp = parsers["train"]
    tp.usage = "%(prog)s [-h] [--out-dir DIR] [--KEY VALUE ...]"
    tp.add_argument("--out-dir", default="runs/train", metavar="DIR",
                    help="where the run directory goes (default: runs/train, the DVC out)")
    keys = tp.add_argument_group(
        "headline overrides", "--KEY VALUE sets the top-level run key KEY of params.yaml for this run, read as YAML "
        "(null: as if unset there) and validated like params.yaml; --batch-size is --batch_size")
    for key in headline_flags():
        allowed = _allowed_values(key)
        kind = ", ".join(allowed) if allowed else _FLAG_TYPES[RunConfig.model_fields[key].annotation]
        names = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        keys.add_argument(*names, dest=f"set_{key}", metavar="VALUE", default=argparse.SUPPRESS,
                          help=kind)
    vp = parsers["validate"]
    vp.add_argument("--out", default="runs/validated.txt", help="the fingerprint file (default: runs/validated.txt)")
    vp.add_argument("--config-dir", default="runs/config", help="the slices' config files (default: runs/config)")
    for name in ("aggregate", "plot", "track"):
        parsers[name].add_argument("--runs-root", default="runs", help="the run directories' root (default: runs)")
    parsers["aggregate"].add_argument("--out-dir", default="reports/tables", help="default: reports/tables")
    parsers["plot"].add_argument("--out-dir", default="reports/figures", help="default: reports/figures")
    parsers["track"].add_argument("--figures", default="reports/figures", help="the figures logged to parent runs")
    rp = parsers["report"]
    rp.add_argument("--tables", default="reports/tables", help="default: reports/tables")
    rp.add_argument("--figures", default="reports/figures", help="default: reports/figures")
    rp.add_argument("--out", default="reports/results.md", help="the results page (default: reports/results.md)")
    rp.add_argument("--readme", default="README.md", help="the README whose marked section is rewritten ('' for none)")
    rp.add_argument("--marker", default="results", help="the README's markers: <!-- MARKER:start --> ... <!-- MARKER:end -->")
    rp.add_argument("--heading", default=None, help="the first section's heading (default: its analysis's title)")
    sp = parsers["sweep"]
    sp.add_argument("--study", required=True, help="the study (a section of params.yaml's studies)")
    sp.add_argument("--method", required=True, help="the method (one of the study's methods)")
    sp.add_argument("--out-root", default="runs/sweep", help="root of the slice's run directories (default: runs/sweep)")
    return ap, parsers


def _pop_sets(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` without its ``--set KEY=VALUE`` options (anywhere, so a stage script can append
    them after the command), and their values."""
    rest, sets, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--set" and i + 1 < len(argv):
            sets.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--set="):
            sets.append(a[len("--set="):])
        else:
            rest.append(a)
        i += 1
    return rest, sets


def parse_sets(texts: list[str]) -> list[tuple[str, Any]]:
    """``KEY=VALUE`` texts as (key, value) pairs, values read as YAML (``1e-3`` a number)."""
    pairs = []
    for text in texts:
        key, eq, raw = text.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. --set scale=cpu)")
        pairs.append((key.strip(), _yaml_value(raw)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    from . import config as _config

    ap, parsers = build_parser()
    argv, sets = _pop_sets(list(sys.argv[1:] if argv is None else argv))
    try:
        _config.PARAM_OVERRIDES[:] = parse_sets(sets)
    except ValueError as exc:
        print(f"optlab: error: {exc}", file=sys.stderr)
        return 2
    args, extra = ap.parse_known_args(argv)
    if extra:
        sub = parsers.get(args.cmd, ap)
        allowed = [a.option_strings[-1] if a.option_strings[0] == "-h" else a.option_strings[0]
                   for a in sub._actions if a.option_strings]  # noqa: SLF001
        _unknown_flags(sub, extra, allowed)
    overrides = {k[len("set_"):]: parse_override(v) for k, v in vars(args).items() if k.startswith("set_")}
    try:
        if args.cmd == "prepare":
            prepare(args.params)
        elif args.cmd == "train":
            train_headline(args.params, out_dir=args.out_dir, overrides=overrides)
        elif args.cmd == "sweep":
            sweep(args.study, args.method, args.params, out_root=args.out_root)
        elif args.cmd == "ablate":
            ablate(args.params)
        elif args.cmd == "validate":
            validate(args.params, out=args.out, config_dir=args.config_dir)
        elif args.cmd == "track":
            return track(args.params, runs_root=args.runs_root, figures_dir=args.figures)
        elif args.cmd == "aggregate":
            aggregate(args.runs_root, args.out_dir)
        elif args.cmd == "plot":
            plot(args.runs_root, args.out_dir)
        elif args.cmd == "headline_plot":
            headline_plot()
        elif args.cmd == "report":
            report(args.tables, args.figures, args.out, args.readme, marker=args.marker, heading=args.heading)
    except ValueError as exc:  # ConfigError, PhaseError, ChecksumError: one clear line
        print(f"optlab: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"optlab: error: {exc}", file=sys.stderr)
        return 2
    return 0


def stage_main(argv: list[str]) -> None:
    """Entry point of the DVC stage scripts: :func:`main`, then end the process at once.

    Python's teardown after a stage (collecting torch's, dynamo's and MLflow's modules) takes 2
    to 3 s, about as long as a quick slice trains, and DVC waits for it 80 times per repro.
    Every file a stage writes is closed when ``main`` returns, so after the exit handlers and a
    flush of stdout/stderr the process leaves with ``os._exit`` and the same exit status."""
    import atexit
    import traceback

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's --help and usage errors
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report it as Python would, then exit 1
        traceback.print_exc()
        rc = 1
    atexit._run_exitfuncs()  # noqa: SLF001 - logging and multiprocessing clean up here
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
