"""Typed run configuration and params.yaml resolution.

A run is described by a :class:`RunConfig`. ``params.yaml`` holds every knob; the values
for one run are resolved in three layers, later wins:

1. the dataclass defaults below,
2. the profile selected by ``scale`` (``profiles.quick`` or ``profiles.full``),
3. explicit top-level keys that are not ``null`` (``optimizer``, ``depth``, ...).

``lr: null`` means "the optimizer's default from ``default_lr``", so
``dvc exp run -S optimizer=adam`` trains the headline configuration with Adam at its own
learning rate. Every bad key or value raises :class:`ConfigError` with one line naming the
key and what is allowed, before anything is written.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "adamw", "sgd_sn")
ARCHS = ("mlp", "resnet18", "gpt")
CLASSIFICATION_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
LM_DATASETS = ("markov", "tinyshakespeare", "tinystories")
DATASETS = CLASSIFICATION_DATASETS + LM_DATASETS
RESNET18_DEPTH = 18  # weighted layers of ResNet-18 (the run key `depth` for arch resnet18)
ARCH_TASK = {"mlp": "classification", "resnet18": "classification", "gpt": "lm"}
ACTIVATIONS = ("tanh", "relu", "gelu")
INITS = ("orthogonal", "kaiming")
SCALES = ("quick", "full")
PHASES = ("debug", "pilot", "frozen")
SN_MODES = ("clip", "normalize")
SN_SIGMAS = ("power", "exact")
SN_CONV = ("operator", "matrix")
ROLES = ("input", "hidden", "output")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("none", "bf16")


class ConfigError(ValueError):
    """A bad key or value in the run configuration (one line, names key and allowed values)."""


@dataclass(frozen=True)
class SNConfig:
    """Spectral normalization applied after every optimizer step (``sgd_sn``)."""

    mode: str = "clip"  # clip: W / max(1, sigma); normalize: W / sigma
    sigma: str = "exact"  # exact: batched eigensolver (strict); power: persistent power iteration
    power_iters: int = 1  # power iterations per step
    check_every: int = 25  # exact sigma_max of every layer logged every K steps
    conv: str = "operator"  # conv weights: true operator norm at the layer's input size, or reshaped-kernel matrix norm
    roles: tuple[str, ...] = ("input", "hidden", "output")  # which weight matrices are projected


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs. Validated by :meth:`validate`."""

    optimizer: str = "sgd_sn"
    lr: float = 0.1
    arch: str = "mlp"
    dataset: str = "digits"
    depth: int = 16
    width: int = 64
    activation: str = "tanh"
    init: str = "orthogonal"
    epochs: int = 10
    batch_size: int = 64
    residual: bool = True  # resnet18: identity shortcuts
    batch_norm: bool = True  # resnet18: batch norm layers
    n_head: int = 4  # gpt: attention heads (depth = layers, width = embedding size)
    block_size: int = 128  # gpt: context length
    steps_per_epoch: int = 0  # lm: steps per epoch (0: one pass worth of tokens)
    act_checkpoint: int = 0  # mlp: activation checkpointing in this many segments (0: off; ~sqrt(depth) saves most)
    max_steps: int = 0  # stop after this many steps (0: no cap; a smoke test of a full-size config)
    eval_tokens: int = 0  # lm: tokens evaluated per split (0: all)
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    compile: bool = False
    reparam: str = "none"  # none | spectral_norm (forward reparametrization W / sigma, for the ablation)
    sn: SNConfig = field(default_factory=SNConfig)
    log_every: int = 10  # steps between host syncs (loss check, metric batch)
    checkpoint_every: int = 0  # steps between checkpoints (0: off)
    diverge_loss: float = 100.0  # a training loss above this ends the run as diverged
    prepared_dir: str = "data/prepared"
    study: str = "adhoc"
    scale: str = "quick"
    phase: str = "debug"
    frozen_commit: str | None = None
    run_id: str = "run"

    def validate(self) -> "RunConfig":
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("arch", self.arch, ARCHS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("init", self.init, INITS)
        _choice("scale", self.scale, SCALES)
        _choice("phase", self.phase, PHASES)
        _choice("device", self.device, DEVICES)
        _choice("amp", self.amp, AMP)
        _choice("reparam", self.reparam, ("none", "spectral_norm"))
        _choice("sn.mode", self.sn.mode, SN_MODES)
        _choice("sn.sigma", self.sn.sigma, SN_SIGMAS)
        _choice("sn.conv", self.sn.conv, SN_CONV)
        if not isinstance(self.sn.roles, (list, tuple)) or not self.sn.roles:
            raise ConfigError(f"sn.roles: expected a non-empty list from {', '.join(ROLES)}, got {self.sn.roles!r}")
        for r in self.sn.roles:
            _choice("sn.roles", r, ROLES)
        task = ARCH_TASK[self.arch]
        allowed = CLASSIFICATION_DATASETS if task == "classification" else LM_DATASETS
        if self.dataset not in allowed:
            raise ConfigError(
                f"dataset: {self.dataset!r} does not fit arch {self.arch!r} ({task}); allowed with {self.arch}: {', '.join(allowed)}"
            )
        _positive("lr", self.lr)
        _positive("diverge_loss", self.diverge_loss)
        _int_at_least("depth", self.depth, 1)
        _int_at_least("width", self.width, 1)
        _int_at_least("epochs", self.epochs, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("seed", self.seed, 0)
        _int_at_least("log_every", self.log_every, 1)
        _int_at_least("checkpoint_every", self.checkpoint_every, 0)
        _int_at_least("sn.power_iters", self.sn.power_iters, 1)
        _int_at_least("sn.check_every", self.sn.check_every, 1)
        _int_at_least("n_head", self.n_head, 1)
        _int_at_least("block_size", self.block_size, 2)
        _int_at_least("steps_per_epoch", self.steps_per_epoch, 0)
        _int_at_least("max_steps", self.max_steps, 0)
        _int_at_least("act_checkpoint", self.act_checkpoint, 0)
        _int_at_least("eval_tokens", self.eval_tokens, 0)
        for key in ("compile", "residual", "batch_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}: expected true or false, got {getattr(self, key)!r}")
        if self.arch == "gpt" and self.width % self.n_head:
            raise ConfigError(f"width: {self.width} must be divisible by n_head={self.n_head} for arch gpt")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """The config as one flat mapping (``sn.mode`` becomes ``sn_mode``), for records."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}_{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out


# ---------------------------------------------------------------- validation helpers


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}: unknown value {value!r}{extra}; allowed: {', '.join(allowed)}")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _positive(key: str, value: Any) -> None:
    v = _number(key, value)
    if not (v > 0 and math.isfinite(v)):
        raise ConfigError(f"{key}: must be a finite number > 0, got {value!r}")


def _int_at_least(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer >= {low}, got {value!r}")
    if value < low:
        raise ConfigError(f"{key}: must be an integer >= {low}, got {value!r}")


# ---------------------------------------------------------------- params.yaml

# Top-level keys of params.yaml and the profile keys that may override run fields.
RUN_KEYS = tuple(f.name for f in fields(RunConfig) if f.name not in ("sn", "run_id", "prepared_dir"))
PARAMS_KEYS = RUN_KEYS + ("sn", "data", "tracking", "default_lr", "profiles", "sweep")
SN_KEYS = tuple(f.name for f in fields(SNConfig))
DATA_KEYS = ("mirror", "val_fraction", "test_fraction", "prepared_dir")
TRACKING_KEYS = ("experiment",)
PROFILE_KEYS = RUN_KEYS + ("datasets", "studies", "sn", "ablate")
ABLATE_KEYS = ("seeds", "base", "variants")
SWEEP_KEYS = ("optimizers", "studies")
STUDY_KEYS = ("arch", "datasets", "grid", "lrs", "search_seeds", "seeds", "set", "sn", "select", "stop_on_failure",
              "verdict")
GRID_AXES = ("depth", "width", "block_size", "batch_size", "residual", "batch_norm", "activation", "init")


@dataclass(frozen=True)
class StudySpec:
    """One study of the sweep: a grid searched per optimizer.

    For each point of ``datasets`` x ``grid`` (in order; depth ascending), the learning rates
    are searched with ``search_seeds`` and the best one is selected on the validation split
    (``select``: val_acc, or val_loss for language models); the selected LR is then rerun on
    the remaining ``seeds``. With ``stop_on_failure`` a grid point whose selected run fails
    (diverged, vanishing signal, or accuracy near chance) ends the search along the first grid
    axis for that dataset: the depth-to-failure search. ``verdict: false`` marks a cost study
    (memory and throughput, e.g. the context-length sweep): its runs are reported in their own
    table and left out of the accuracy verdict.
    """

    name: str
    arch: str
    datasets: tuple[str, ...]
    grid: dict[str, list]
    lrs: tuple[float, ...]
    search_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    fixed: dict[str, Any]
    sn: dict[str, Any]
    select: str
    stop_on_failure: bool
    verdict: bool = True

    def points(self) -> list[dict[str, Any]]:
        """Grid points (dicts of RunConfig overrides), the first axis varying slowest."""
        axes = list(self.grid)
        out = [{}]
        for ax in axes:
            out = [dict(p, **{ax: v}) for p in out for v in self.grid[ax]]
        return out


def _check_keys(where: str, mapping: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            name = f"{where}.{key}" if where != "params" else str(key)
            raise ConfigError(f"{name}: unknown key{extra}; allowed: {', '.join(allowed)}")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and structurally validate params.yaml (unknown keys are errors)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"params file not found: {p}")
    try:
        params = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    validate_params(params)
    return params


def validate_params(params: dict[str, Any]) -> None:
    if not isinstance(params, dict):
        raise ConfigError(f"params: expected a mapping of keys to values, got {type(params).__name__}")
    _check_keys("params", params, PARAMS_KEYS)
    _check_keys("sn", params.get("sn") or {}, SN_KEYS)
    _check_keys("data", params.get("data") or {}, DATA_KEYS)
    _check_keys("tracking", params.get("tracking") or {}, TRACKING_KEYS)
    _check_keys("default_lr", params.get("default_lr") or {}, OPTIMIZERS)
    profiles = params.get("profiles") or {}
    _check_keys("profiles", profiles, SCALES)
    for name, prof in profiles.items():
        _check_keys(f"profiles.{name}", prof or {}, PROFILE_KEYS)
        for study, spec in ((prof or {}).get("studies") or {}).items():
            _check_keys(f"profiles.{name}.studies.{study}", spec or {}, STUDY_KEYS)
        _check_keys(f"profiles.{name}.sn", (prof or {}).get("sn") or {}, SN_KEYS)
    _check_keys("sweep", params.get("sweep") or {}, SWEEP_KEYS)
    scale = params.get("scale", "quick")
    _choice("scale", scale, SCALES)
    for opt, lr in (params.get("default_lr") or {}).items():
        _positive(f"default_lr.{opt}", lr)
    sweep = params.get("sweep") or {}
    for opt in sweep.get("optimizers") or []:
        _choice("sweep.optimizers", opt, OPTIMIZERS)
    studies = profile(params).get("studies") or {}
    for name in sweep.get("studies") or []:
        if name not in studies:
            raise ConfigError(f"sweep.studies: {name!r} is not defined in profiles.{scale}.studies; defined: {', '.join(studies) or 'none'}")
    for name in studies:
        resolve_study(params, name)
    resolve_ablation(params)


def profile(params: dict[str, Any]) -> dict[str, Any]:
    """The profile selected by ``scale``."""
    scale = params.get("scale", "quick")
    return dict((params.get("profiles") or {}).get(scale) or {})


def resolve_study(params: dict[str, Any], name: str) -> StudySpec:
    """The validated study ``name`` from the selected profile."""
    scale = params.get("scale", "quick")
    studies = profile(params).get("studies") or {}
    if name not in studies:
        raise ConfigError(f"study: {name!r} is not defined in profiles.{scale}.studies; defined: {', '.join(studies) or 'none'}")
    where = f"profiles.{scale}.studies.{name}"
    spec = studies[name] or {}
    _check_keys(where, spec, STUDY_KEYS)
    arch = spec.get("arch", "mlp")
    _choice(f"{where}.arch", arch, ARCHS)
    datasets = tuple(spec.get("datasets") or ())
    if not datasets:
        raise ConfigError(f"{where}.datasets: give at least one dataset; allowed: {', '.join(DATASETS)}")
    for ds in datasets:
        _choice(f"{where}.datasets", ds, DATASETS)
    grid = dict(spec.get("grid") or {})
    _check_keys(f"{where}.grid", grid, GRID_AXES)
    for ax, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{where}.grid.{ax}: expected a non-empty list, got {vals!r}")
    lrs = tuple(spec.get("lrs") or ())
    if not lrs:
        raise ConfigError(f"{where}.lrs: give a learning-rate grid (a non-empty list)")
    for lr in lrs:
        _positive(f"{where}.lrs", lr)
    seeds = tuple(spec.get("seeds") or (0,))
    search = tuple(spec.get("search_seeds") or seeds[:1])
    for sd in seeds + search:
        _int_at_least(f"{where}.seeds", sd, 0)
    fixed = dict(spec.get("set") or {})
    _check_keys(f"{where}.set", fixed, RUN_KEYS)
    sn = dict(spec.get("sn") or {})
    _check_keys(f"{where}.sn", sn, SN_KEYS)
    task = ARCH_TASK[arch]
    select = spec.get("select", "val_acc" if task == "classification" else "val_loss")
    _choice(f"{where}.select", select, ("val_acc", "val_loss"))
    return StudySpec(
        name=name, arch=arch, datasets=datasets, grid=grid, lrs=lrs, search_seeds=search, seeds=seeds,
        fixed=fixed, sn=sn, select=select, stop_on_failure=_flag(f"{where}.stop_on_failure", spec.get("stop_on_failure", False)),
        verdict=_flag(f"{where}.verdict", spec.get("verdict", True)),
    )


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def resolve_ablation(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ablation variants of the selected profile: name -> run overrides (base merged in)."""
    scale = params.get("scale", "quick")
    where = f"profiles.{scale}.ablate"
    spec = profile(params).get("ablate") or {}
    _check_keys(where, spec, ABLATE_KEYS)
    base = dict(spec.get("base") or {})
    _check_keys(f"{where}.base", base, RUN_KEYS + ("sn",))
    out: dict[str, dict[str, Any]] = {}
    for name, var in (spec.get("variants") or {}).items():
        _check_keys(f"{where}.variants.{name}", var or {}, RUN_KEYS + ("sn",))
        merged = {**base, **(var or {})}
        merged["sn"] = {**(base.get("sn") or {}), **((var or {}).get("sn") or {})}
        _check_keys(f"{where}.variants.{name}.sn", merged["sn"], SN_KEYS)
        out[name] = merged
    for sd in spec.get("seeds") or []:
        _int_at_least(f"{where}.seeds", sd, 0)
    return out


def ablation_seeds(params: dict[str, Any]) -> list[int]:
    return list((profile(params).get("ablate") or {}).get("seeds") or [0])


def sweep_optimizers(params: dict[str, Any]) -> list[str]:
    return list((params.get("sweep") or {}).get("optimizers") or ["sgd", "sgd_momentum", "adam", "sgd_sn"])


def prepared_datasets(params: dict[str, Any]) -> list[str]:
    """Datasets the prepare stage builds: the profile's ``datasets`` plus every dataset used."""
    prof = profile(params)
    names = list(prof.get("datasets") or [])
    used = [params.get("dataset") or prof.get("dataset")]
    used += [v.get("dataset") for v in resolve_ablation(params).values()]
    for study in (params.get("sweep") or {}).get("studies") or []:
        used += list(resolve_study(params, study).datasets)
    for ds in used:
        if ds and ds not in names:
            names.append(ds)
    for ds in names:
        _choice("datasets", ds, DATASETS)
    return names


def resolve_run(params: dict[str, Any], **overrides: Any) -> RunConfig:
    """Build the validated RunConfig for one run: defaults <- profile <- top-level <- overrides."""
    validate_params(params)
    prof = profile(params)
    values: dict[str, Any] = {}
    sn: dict[str, Any] = {}
    for key, val in prof.items():
        if key in RUN_KEYS:
            values[key] = val
    sn.update(prof.get("sn") or {})
    for key in RUN_KEYS:
        if params.get(key) is not None:
            values[key] = params[key]
    sn.update({k: v for k, v in (params.get("sn") or {}).items() if v is not None})
    data = params.get("data") or {}
    if data.get("prepared_dir"):
        values["prepared_dir"] = data["prepared_dir"]
    for key, val in overrides.items():
        if key == "sn":
            sn.update(val)
        elif val is not None:
            values[key] = val
    if values.get("lr") is None:
        opt = values.get("optimizer", RunConfig.optimizer)
        _choice("optimizer", opt, OPTIMIZERS)
        default_lr = params.get("default_lr") or {}
        if opt not in default_lr:
            raise ConfigError(f"lr: null needs default_lr.{opt}; set lr or default_lr.{opt}")
        values["lr"] = default_lr[opt]
    values = {k: v for k, v in values.items() if k in RunConfig.__dataclass_fields__}
    if values.get("arch") == "resnet18":
        values["depth"] = RESNET18_DEPTH  # fixed by the architecture; recorded so tables do not show the MLP's depth
    if "roles" in sn and isinstance(sn["roles"], list):
        sn["roles"] = tuple(sn["roles"])
    return RunConfig(**values, sn=SNConfig(**sn)).validate()


def with_overrides(cfg: RunConfig, **kw: Any) -> RunConfig:
    return replace(cfg, **kw).validate()
