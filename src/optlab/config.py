"""Typed, nested run configuration (pydantic v2) and params.yaml resolution.

A run is described by a :class:`RunConfig` with nested sections: the model keys, the optimizer
(``optimizer`` + ``optimizer_options`` + the ``sn`` projection section), the training-step
method (``step_method`` + ``method_options``), the probes (name -> options) and the data keys.
Vocabularies (optimizers, step methods, probes, datasets, architectures) come from their
registries. Every bad key or value raises :class:`ConfigError` with one line naming the key
path and what is allowed (with a close match for a misspelling), before anything is written.

params.yaml resolves in layers, later wins:

- headline run (stage ``train``): defaults <- ``profiles[scale]`` <- top-level keys that are
  not null (``lr: null`` means ``default_lr[optimizer]``, so ``dvc exp run -S optimizer=adam``
  trains the headline configuration with Adam at its own learning rate);
- a study slice (stage ``<study>@<method>``): defaults <- the study's ``set`` (its common part,
  then its ``quick``/``full`` part) <- the grid point <- the method section ``methods.<name>``
  <- the study's ``sn`` <- (dataset, lr, seed). Only the engine keys (device, amp, compile,
  log_every, checkpoint_every, diverge_loss, phase) come from the top level, so a headline
  experiment never changes a study's runs, and a slice depends only on its study's and its
  method's params sections. A study section may set its own ``phase`` and ``frozen_commit``,
  which replace the top-level pair for that study's runs only.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .registry import UnknownName, unknown_message

ARCHS = ("mlp", "resnet18", "gpt", "gpt_modern", "vit", "cnn", "lq")
RESNET18_DEPTH = 18  # weighted layers of ResNet-18 (the run key `depth` for arch resnet18)
ARCH_TASK = {"mlp": "classification", "resnet18": "classification", "gpt": "lm", "gpt_modern": "lm", "vit": "classification",
             "cnn": "classification", "lq": "lq"}
ARCH_MODEL_KEYS = {
    "mlp": ("depth", "width", "activation", "init", "norm", "act_checkpoint", "reparam"),
    "resnet18": ("width", "residual", "batch_norm"),
    "gpt": ("depth", "width", "n_head", "block_size"),
    "gpt_modern": ("depth", "width", "n_head", "block_size"),
    "vit": ("depth", "width", "n_head"),
    "cnn": ("depth", "width", "batch_norm"),
    "lq": ("depth",),
}
"""The run keys each arch's model reads (engine.model_kwargs); the other model keys of a run
config do nothing for it and are left out of its tracked params."""
MODEL_KEYS = frozenset(k for keys in ARCH_MODEL_KEYS.values() for k in keys)
LM_KEYS = ("block_size", "eval_tokens")  # read by language-model tasks only
NORMS = ("none", "layer")  # mlp: normalization before each hidden activation
ACTIVATIONS = ("tanh", "relu", "gelu")
INITS = ("orthogonal", "kaiming")
SCALES = ("quick", "cpu", "full")  # quick: CPU minutes (make repro); cpu: CPU, about an hour, real data; full: GPU
PHASES = ("debug", "pilot", "frozen")
SN_MODES = ("clip_sv", "scale", "normalize")
SN_SIGMAS = ("power", "exact", "bound")
SN_CONV = ("operator", "operator_power", "matrix")
ROLES = ("input", "hidden", "output")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("none", "bf16")
LR_POLICIES = ("search", "fixed")
DIRECTIONS = ("up", "down")
_SHA = re.compile(r"[0-9a-fA-F]{7,40}")
DEFAULT_PROBES: dict[str, dict[str, Any]] = {"grad_norm": {"every": 25}, "sigma_max": {"every": 25}}


def optimizer_names() -> tuple[str, ...]:
    from .optim import optimizer_names as names

    return tuple(names())


def method_names() -> tuple[str, ...]:
    from .methods import method_names as names

    return names()


def probe_names() -> tuple[str, ...]:
    from .probes import probe_names as names

    return names()


def dataset_names(kind: str | None = None) -> tuple[str, ...]:
    from .tasks import dataset_names as names

    return names(kind)


class ConfigError(ValueError):
    """A bad key or value in the run configuration (one line, names key and allowed values)."""


def _one_line(exc: ValidationError, prefix: str, model: type[BaseModel]) -> ConfigError:
    """The first pydantic error as one line: key path, what is wrong, what is allowed."""
    err = exc.errors()[0]
    original = (err.get("ctx") or {}).get("error")
    if isinstance(original, ConfigError):
        return original
    if isinstance(original, UnknownName):
        return ConfigError(str(original))
    loc = [str(p) for p in err.get("loc", ())]
    key = ".".join([prefix] * bool(prefix) + loc) or prefix or model.__name__
    if err.get("type") == "extra_forbidden":
        allowed = tuple(_fields_of(model, loc[:-1]))
        hint = difflib.get_close_matches(loc[-1], allowed, n=1) if loc else []
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        return ConfigError(f"{key}: unknown key{extra}; allowed: {', '.join(allowed)}")
    words = {"int_type": "expected an integer", "int_from_float": "expected an integer", "int_parsing": "expected an integer",
             "float_type": "expected a number", "float_parsing": "expected a number", "bool_type": "expected true or false",
             "bool_parsing": "expected true or false", "string_type": "expected a string", "dict_type": "expected a mapping",
             "tuple_type": "expected a list", "list_type": "expected a list"}
    msg = words.get(str(err.get("type")), str(err.get("msg", "invalid value")).removeprefix("Value error, "))
    return ConfigError(f"{key}: {msg}, got {err.get('input')!r}")


def _fields_of(model: type[BaseModel], path: list[str]) -> list[str]:
    m: Any = model
    for p in path:
        f = getattr(m, "model_fields", {}).get(p)
        ann = getattr(f, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        m = ann
    return list(getattr(m, "model_fields", {}))


def pydantic_options(cls: type[BaseModel], options: dict[str, Any] | None, key: str) -> BaseModel:
    """Validate a plug-in's options mapping into its pydantic model; ConfigError (one line) if bad."""
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"{key}: expected a mapping, got {options!r}")
    try:
        return cls.model_validate(dict(options or {}))
    except ValidationError as exc:
        raise _one_line(exc, key, cls) from None


class _Section(BaseModel):
    """A frozen config section that refuses unknown keys and reports errors in one line."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _one_line(exc, type(self)._where(), type(self)) from None

    @classmethod
    def _where(cls) -> str:
        return ""


class SNConfig(_Section):
    """Spectral normalization applied after every optimizer step (``sgd_sn``)."""

    mode: str = "clip_sv"  # clip_sv: singular values above 1 set to 1 (the Euclidean projection); scale: W / max(1, sigma); normalize: W / sigma
    sigma: str = "exact"  # exact: batched eigensolver / SVD (strict); power: persistent power iteration (scale/normalize; not strict);
    #                       bound: divide by a certified upper bound, exact every `refresh` steps (scale only; strict)
    power_iters: int = 1  # power iterations per step
    refresh: int = 10  # sigma bound: projections between two exact sigmas
    conv: str = "operator"  # conv weights: operator norm at the layer's input size via an exact upper bound (strict) |
    #                         operator_power: the same norm by power iteration (not strict) | matrix: reshaped-kernel norm
    roles: tuple[str, ...] = ("input", "hidden", "output")  # which weight matrices are projected

    @classmethod
    def _where(cls) -> str:
        return "sn"

    @field_validator("roles", mode="before")
    @classmethod
    def _roles_tuple(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    def model_post_init(self, _ctx: Any) -> None:
        if self.mode == "clip":
            raise ConfigError(f"sn.mode: unknown 'clip'; allowed: {', '.join(SN_MODES)} ('clip' is now 'scale': W / max(1, sigma))")
        _choice("sn.mode", self.mode, SN_MODES)
        _choice("sn.sigma", self.sigma, SN_SIGMAS)
        if self.mode == "clip_sv" and self.sigma != "exact":
            raise ConfigError("sn.sigma: clip_sv computes an SVD (sigma is exact); allowed with clip_sv: exact "
                              "(power applies to sn.mode scale and normalize, bound to scale)")
        if self.mode == "normalize" and self.sigma == "bound":
            raise ConfigError("sn.sigma: bound divides by an upper bound, which cannot put a layer at norm exactly 1; "
                              "allowed with normalize: exact, power (bound applies to sn.mode scale)")
        _choice("sn.conv", self.conv, SN_CONV)
        if not self.roles:
            raise ConfigError(f"sn.roles: expected a non-empty list from {', '.join(ROLES)}, got {list(self.roles)!r}")
        for r in self.roles:
            _choice("sn.roles", r, ROLES)
        _int_at_least("sn.power_iters", self.power_iters, 1)
        _int_at_least("sn.refresh", self.refresh, 1)


class RunConfig(_Section):
    """Everything one training run needs; validated on construction (``validate()`` re-checks)."""

    # optimizer and training-step method
    optimizer: str = "sgd_sn"
    optimizer_options: dict[str, Any] = Field(default_factory=dict)
    lr: float = 0.1
    sn: SNConfig = Field(default_factory=SNConfig)
    step_method: str = "backprop"
    method_options: dict[str, Any] = Field(default_factory=dict)
    method: str = ""  # the study's name for this (optimizer, step method, options) bundle; "" = optimizer
    probes: dict[str, dict[str, Any]] = Field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_PROBES.items()})
    # model
    arch: str = "mlp"
    depth: int = 16
    width: int = 64
    activation: str = "tanh"
    init: str = "orthogonal"
    residual: bool = True  # resnet18: identity shortcuts
    batch_norm: bool = True  # resnet18, cnn: batch norm layers
    n_head: int = 4  # gpt, vit: attention heads (depth = blocks, width = embedding size)
    norm: str = "none"  # mlp only: none | layer (LayerNorm before each hidden activation)
    act_checkpoint: int = 0  # mlp: activation checkpointing in this many segments (0: off; ~sqrt(depth) saves most)
    reparam: str = "none"  # none | spectral_norm (forward reparametrization W / sigma, for the ablation)
    # data and schedule
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    block_size: int = 128  # gpt: context length
    steps_per_epoch: int = 0  # steps per epoch (0: one pass; lm: one pass worth of tokens; classification: the first
    # steps_per_epoch batches of each epoch's fresh permutation of the training set)
    lr_spike_step: int = 0  # from this step index on (steps counted from 0) every LR is x lr_spike_factor (0: off)
    lr_spike_factor: float = 1.0  # the spike's multiplier of every param group's base LR (> 0)
    augment: str = "none"  # classification on images: none | crop_flip (pad 4, random crop, horizontal flip; training batches only)
    max_steps: int = 0  # stop after this many steps (0: no cap; a smoke test of a full-size config)
    eval_tokens: int = 0  # lm: tokens evaluated per split (0: all)
    prepared_dir: str = "data/prepared"
    seed: int = 0
    # engine
    device: str = "auto"
    threads: int = 0  # torch intra-op threads for the run (0: torch's default, the machine's cores); part of the numerics
    amp: str = "none"
    compile: bool = False
    log_every: int = 10  # steps between host syncs (loss check, metric batch)
    checkpoint_every: int = 0  # steps between checkpoints (0: off)
    diverge_loss: float = 100.0  # a training loss above this ends the run as diverged
    # provenance
    study: str = "adhoc"
    scale: str = "quick"
    phase: str = "debug"
    frozen_commit: str | None = None
    run_id: str = "run"

    def model_post_init(self, _ctx: Any) -> None:
        self._check()

    def _check(self) -> None:
        from .tasks import task_kind

        _choice("optimizer", self.optimizer, optimizer_names())
        _choice("step_method", self.step_method, method_names())
        _choice("arch", self.arch, ARCHS)
        _choice("dataset", self.dataset, dataset_names())
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("init", self.init, INITS)
        _choice("scale", self.scale, SCALES)
        _choice("phase", self.phase, PHASES)
        _choice("device", self.device, DEVICES)
        _choice("amp", self.amp, AMP)
        _choice("reparam", self.reparam, ("none", "spectral_norm"))
        _choice("augment", self.augment, ("none", "crop_flip"))
        _choice("norm", self.norm, NORMS)
        if self.norm != "none" and self.arch != "mlp":
            raise ConfigError(f"norm: {self.norm!r} applies to arch mlp only; allowed with {self.arch}: none")
        task = ARCH_TASK[self.arch]
        if task_kind(self.dataset) != task:
            allowed = dataset_names(task)
            raise ConfigError(
                f"dataset: {self.dataset!r} does not fit arch {self.arch!r} ({task}); allowed with {self.arch}: {', '.join(allowed)}"
            )
        _positive("lr", self.lr)
        _positive("diverge_loss", self.diverge_loss)
        _positive("lr_spike_factor", self.lr_spike_factor)
        if self.lr_spike_factor != 1.0 and self.lr_spike_step == 0:
            raise ConfigError(f"lr_spike_factor: {self.lr_spike_factor:g} needs lr_spike_step >= 1 (the step the spike starts at; 0: no spike)")
        for key, low in (("depth", 1), ("width", 1), ("epochs", 1), ("batch_size", 1), ("seed", 0), ("log_every", 1),
                         ("checkpoint_every", 0), ("n_head", 1), ("block_size", 2), ("steps_per_epoch", 0),
                         ("max_steps", 0), ("act_checkpoint", 0), ("eval_tokens", 0), ("lr_spike_step", 0), ("threads", 0)):
            _int_at_least(key, getattr(self, key), low)
        if self.arch in ("gpt", "gpt_modern", "vit") and self.width % self.n_head:
            raise ConfigError(f"width: {self.width} must be divisible by n_head={self.n_head} for arch {self.arch}")
        from .methods import validate_options as method_options
        from .probes import validate_options as probe_options

        method_options(self.step_method, dict(self.method_options))
        from .optim import validate_options as optimizer_options

        try:
            optimizer_options(self.optimizer, dict(self.optimizer_options))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name, opts in self.probes.items():
            _choice("probes", name, probe_names())
            probe_options(name, opts)

    def validate(self) -> "RunConfig":
        self._check()
        return self

    @property
    def method_name(self) -> str:
        """The method's name in tables and stage names (the optimizer's when not set)."""
        return self.method or self.optimizer

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump()
        d["sn"]["roles"] = tuple(d["sn"]["roles"])
        return d

    def flat(self) -> dict[str, Any]:
        """The config as one flat mapping (``sn.mode`` becomes ``sn_mode``), for records."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if k == "sn":
                out.update({f"sn_{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        out["method"] = self.method_name
        return out

    def tracked_params(self) -> dict[str, Any]:
        """:meth:`flat` without the keys that do nothing for this run, for the tracking store: the
        model keys of other archs (:data:`ARCH_MODEL_KEYS`), language-model keys on other tasks,
        the ``sn_*`` keys unless the run projects or reparametrizes, empty optimizer and method
        options and the LR-spike keys when no spike is set.
        ``metrics.json`` keeps the whole config."""
        flat = self.flat()
        uses = set(ARCH_MODEL_KEYS[self.arch])
        lm = ARCH_TASK[self.arch] == "lm"
        drop = {k for k in MODEL_KEYS if k not in uses}
        drop |= set() if lm else {k for k in LM_KEYS if k not in uses}
        if self.optimizer != "sgd_sn" and self.reparam == "none":
            drop |= {k for k in flat if k.startswith("sn_")}
        if not self.optimizer_options:
            drop.add("optimizer_options")
        if not self.method_options:
            drop.add("method_options")
        if self.lr_spike_step == 0:
            drop |= {"lr_spike_step", "lr_spike_factor"}
        return {k: v for k, v in flat.items() if k not in drop}

    def replace(self, **kw: Any) -> "RunConfig":
        return RunConfig(**{**self.to_dict(), **kw})


# ---------------------------------------------------------------- validation helpers


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(unknown_message(key, value, allowed))


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


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _check_keys(where: str, mapping: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            name = f"{where}.{key}" if where != "params" else str(key)
            raise ConfigError(f"{name}: unknown key{extra}; allowed: {', '.join(allowed)}")


def make_run(values: dict[str, Any], where: str = "") -> RunConfig:
    """A RunConfig from plain values (YAML), lists turned into the tuples the model keeps."""
    values = dict(values)
    if isinstance(values.get("sn"), dict):
        sn = dict(values["sn"])
        if isinstance(sn.get("roles"), list):
            sn["roles"] = tuple(sn["roles"])
        values["sn"] = SNConfig(**sn)
    if isinstance(values.get("probes"), dict):
        values["probes"] = {k: dict(v or {}) for k, v in values["probes"].items()}
    try:
        return RunConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None


# ---------------------------------------------------------------- params.yaml

# Run keys settable from params (everything but the identity fields the pipeline sets).
RUN_KEYS = tuple(k for k in RunConfig.model_fields if k not in ("sn", "run_id", "prepared_dir", "method"))
# Keys a study slice takes from the top level of params.yaml (the engine, not the experiment).
ENGINE_KEYS = ("device", "threads", "amp", "compile", "log_every", "checkpoint_every", "diverge_loss", "phase", "frozen_commit", "scale")
PARAMS_KEYS = RUN_KEYS + ("workers", "sn", "data", "tracking", "default_lr", "profiles", "methods", "studies", "datasets")
SN_KEYS = tuple(SNConfig.model_fields)
DATA_KEYS = ("mirror", "val_fraction", "test_fraction", "prepared_dir")
TRACKING_KEYS = ("experiment", "upload")
TRACKING_UPLOADS = ("auto", "live", "deferred")
PROFILE_KEYS = RUN_KEYS + ("sn", "ablate", "studies")  # studies: the studies the profile runs (default: all)
ABLATE_KEYS = ("seeds", "base", "variants")
METHOD_KEYS = ("optimizer", "optimizer_options", "step_method", "method_options", "sn", "probes", "lr")
STUDY_SCALE_KEYS = ("skip", "requires", "datasets", "grid", "lrs", "lr_policy", "lr_extend", "search_seeds", "seeds", "set", "sn",
                    "select", "stop_on_failure", "probes")
REQUIRES = ("cuda",)  # a study scale's `requires`: what the machine must have, else its slices are skipped
LR_EXTEND_DEFAULT = 2  # half-decade steps a search may add past an edge of its grid, per side
STUDY_PHASE_KEYS = ("phase", "frozen_commit")  # a study's own phase, overriding the top-level pair for its runs
STUDY_KEYS = ("analysis", "arch", "methods", "verdict", "published") + STUDY_PHASE_KEYS + STUDY_SCALE_KEYS + SCALES
VERDICT_KEYS = ("method", "reference", "metric", "direction", "bar")
GRID_AXES = ("model", "arch", "depth", "width", "block_size", "batch_size", "residual", "batch_norm", "activation", "init",
             "norm", "lr_spike_step", "lr_spike_factor")


class StudySpec(BaseModel):
    """One study: its methods, each searched (or run at fixed LRs) over the datasets x grid.

    For each point of ``datasets`` x ``grid`` (in order; the first axis varies slowest), the
    learning rates are searched with ``search_seeds`` and the best one is selected on the
    validation split (``select``: the task's, val_acc or val_loss); the selected LR is then rerun
    on the remaining ``seeds``. When the selected LR is the largest or smallest tried, the search
    goes one half-decade step further out (1, 3, 10, ... x 10^k) with the search seeds, up to
    ``lr_extend`` steps per side, until the selection is interior (the summary records the LRs
    added and whether the limit left it at an edge). Where every search run at the best LR
    failed (no LR tried trains, so the best is noise among failures, interior or not), the search
    looks past both ends instead, the smaller LRs first, each up to ``lr_extend`` steps, until an
    LR trains (``untrained_search`` and ``trained`` in the summary). ``lr_policy: fixed`` runs every LR of ``lrs`` with every seed and
    selects nothing. With ``stop_on_failure`` a grid point whose selected run fails (diverged,
    vanishing signal, or accuracy near chance) ends the search along the first grid axis: the
    depth-to-failure search. ``verdict`` names the method, the reference, the metric (default:
    the task's primary) and the bar of "method reaches bar x reference"; ``verdict: false`` marks
    a cost study (memory and throughput): its runs are reported in their own table and left out
    of the verdict. ``analysis`` names the registered analysis that reports the study.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    analysis: str
    arch: str
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    grid: dict[str, list]
    lrs: tuple[float, ...]
    lr_policy: str
    lr_extend: int
    search_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    fixed: dict[str, Any]
    sn: dict[str, Any]
    select: str
    select_direction: str
    stop_on_failure: bool
    probes: dict[str, Any] | None
    verdict_spec: dict[str, Any] | None  # None: a cost study
    primary: tuple[str, str]
    skip: str | None = None  # the reason this study does not run at the selected scale (e.g. GPU only)
    requires: str | None = None  # "cuda": the sweep records the slice as skipped on a machine without a CUDA GPU
    published: dict[str, Any] = {}  # a labeled published reference (row -> value or text) the analysis prints beside ours
    phase: str | None = None  # the study's own phase (None: the top-level phase and frozen_commit apply)
    frozen_commit: str | None = None  # with `phase`: the study's frozen commit

    @property
    def verdict(self) -> bool:
        return self.verdict_spec is not None

    def points(self) -> list[dict[str, Any]]:
        """Grid points (dicts of RunConfig overrides), the first axis varying slowest."""
        out: list[dict[str, Any]] = [{}]
        for ax in self.grid:  # a `model` value is a mapping of run keys, merged into the point
            out = [dict(p, **(dict(v) if ax == "model" else {ax: v})) for p in out for v in self.grid[ax]]
        return out

    def seeds_per_config(self) -> int:
        """Distinct seeds of each reported configuration (LR x grid point): every seed at every LR
        under ``lr_policy: fixed``; the search seeds and the confirm seeds at the selected LR under
        ``search`` (the unselected LRs of a search are selection runs, not reported configurations)."""
        return len(set(self.seeds) | set(self.search_seeds))

    def confirm_seeds(self) -> list[int]:
        return [sd for sd in self.seeds if sd not in self.search_seeds]


PARAM_OVERRIDES: list[tuple[str, Any]] = []
"""``(dotted key, value)`` pairs every :func:`load_params` of this process applies over the files
(``python -m optlab.pipeline --set scale=cpu ...``: how the cpu profile's pipeline runs the same
params at another scale without a second copy of them)."""


def apply_overrides(params: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``params`` with each dotted key set to its value (mappings on the way are copied, missing
    ones created; the result is validated like the files)."""
    out = dict(params)
    for key, value in pairs:
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {key}: expected a dotted key such as scale or data.prepared_dir")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return out


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read ``params.yaml`` and the ``studies.yaml`` beside it (:mod:`optlab.paramfiles`), merged,
    then :data:`PARAM_OVERRIDES`, and validate the result structurally (unknown keys are errors)."""
    from optlab import paramfiles

    try:
        params = paramfiles.read(path)
    except paramfiles.ParamsFileError as exc:
        raise ConfigError(str(exc)) from None
    if PARAM_OVERRIDES:
        params = apply_overrides(params, PARAM_OVERRIDES)
    validate_params(params)
    return params


def validate_params(params: dict[str, Any]) -> None:
    if not isinstance(params, dict):
        raise ConfigError(f"params: expected a mapping of keys to values, got {type(params).__name__}")
    _check_keys("params", params, PARAMS_KEYS)
    _check_keys("sn", params.get("sn") or {}, SN_KEYS)
    _check_keys("data", params.get("data") or {}, DATA_KEYS)
    _check_keys("tracking", params.get("tracking") or {}, TRACKING_KEYS)
    upload = (params.get("tracking") or {}).get("upload", "auto")
    if upload not in TRACKING_UPLOADS:
        raise ConfigError(f"tracking.upload: unknown {upload!r}; allowed: {', '.join(TRACKING_UPLOADS)}")
    _check_keys("default_lr", params.get("default_lr") or {}, optimizer_names())
    profiles = params.get("profiles") or {}
    _check_keys("profiles", profiles, SCALES)
    for name, prof in profiles.items():
        _check_keys(f"profiles.{name}", prof or {}, PROFILE_KEYS)
        _check_keys(f"profiles.{name}.sn", (prof or {}).get("sn") or {}, SN_KEYS)
        listed = (prof or {}).get("studies")
        if listed is not None and not isinstance(listed, list):
            raise ConfigError(f"profiles.{name}.studies: expected a list of study names, got {listed!r}")
        if listed is not None and name == params.get("scale", "quick"):  # the profile in use names defined studies
            for st in listed:
                _choice(f"profiles.{name}.studies", st, tuple(params.get("studies") or {}))
    datasets = params.get("datasets") or {}
    _check_keys("datasets", datasets, SCALES)
    for scale, names in datasets.items():
        for ds in names or []:
            _choice(f"datasets.{scale}", ds, dataset_names())
    scale = params.get("scale", "quick")
    _choice("scale", scale, SCALES)
    workers = params.get("workers", "auto")
    if workers != "auto" and not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise ConfigError(f"workers: expected auto or an integer >= 1, got {workers!r}")
    for opt, lr in (params.get("default_lr") or {}).items():
        _positive(f"default_lr.{opt}", lr)
    for name in params.get("methods") or {}:
        resolve_method(params, name)
    for name in params.get("studies") or {}:
        resolve_study(params, name)
    study_phase_keys(params, "")
    resolve_ablation(params)


def profile(params: dict[str, Any]) -> dict[str, Any]:
    """The profile selected by ``scale``."""
    scale = params.get("scale", "quick")
    return dict((params.get("profiles") or {}).get(scale) or {})


def resolve_method(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The run overrides of method section ``methods.<name>`` (validated)."""
    methods = params.get("methods") or {}
    if name not in methods:
        raise ConfigError(unknown_message("method", name, tuple(methods)).replace("unknown value", "no section for"))
    where = f"methods.{name}"
    spec = dict(methods[name] or {})
    _check_keys(where, spec, METHOD_KEYS)
    if "optimizer" not in spec:
        raise ConfigError(f"{where}.optimizer: missing; allowed: {', '.join(optimizer_names())}")
    _choice(f"{where}.optimizer", spec["optimizer"], optimizer_names())
    _choice(f"{where}.step_method", spec.get("step_method", "backprop"), method_names())
    _check_keys(f"{where}.sn", spec.get("sn") or {}, SN_KEYS)
    if "lr" in spec and spec["lr"] is not None:
        _positive(f"{where}.lr", spec["lr"])
    return spec


def resolve_study(params: dict[str, Any], name: str) -> StudySpec:
    """The validated study ``name`` at the selected scale (its common keys, then its scale's)."""
    from .tasks import task_class

    scale = params.get("scale", "quick")
    studies = params.get("studies") or {}
    if name not in studies:
        raise ConfigError(f"study: {name!r} is not defined in studies; defined: {', '.join(studies) or 'none'}")
    where = f"studies.{name}"
    raw = dict(studies[name] or {})
    _check_keys(where, raw, STUDY_KEYS)
    for sc in SCALES:
        _check_keys(f"{where}.{sc}", raw.get(sc) or {}, STUDY_SCALE_KEYS)
    listed = profile(params).get("studies")
    if listed is not None and name not in listed:  # the profile runs other studies: this one's slices say so
        raw[scale] = {"skip": f"not one of profiles.{scale}.studies ({', '.join(listed) or 'none'})"}
    if not raw.get(scale):
        raise ConfigError(f"{where}.{scale}: the study has no section for scale {scale!r}")
    spec = {k: v for k, v in raw.items() if k not in SCALES}
    for k, v in (raw.get(scale) or {}).items():
        spec[k] = {**(spec.get(k) or {}), **v} if k in ("set", "sn") and isinstance(v, dict) else v
    wscale = f"{where}.{scale}"
    arch = spec.get("arch", "mlp")
    _choice(f"{where}.arch", arch, ARCHS)
    methods = tuple(spec.get("methods") or ())
    if not methods:
        raise ConfigError(f"{where}.methods: give at least one method; defined: {', '.join(params.get('methods') or {})}")
    for m in methods:
        if m not in (params.get("methods") or {}):
            raise ConfigError(unknown_message(f"{where}.methods", m, tuple(params.get("methods") or {})))
    published = spec.get("published") or {}
    if not isinstance(published, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                                  for k, v in published.items()):
        raise ConfigError(f"{where}.published: expected a mapping of labels to numbers or text, got {published!r}")
    phase, frozen_commit = study_phase_keys(raw, where)
    skip = spec.get("skip")
    if skip is not None:  # `<scale>: {skip: reason}`: the study does not run at this scale (its slices say why)
        if not isinstance(skip, str) or not skip.strip():
            raise ConfigError(f"{wscale}.skip: expected the reason the study does not run at scale {scale} (a string), got {skip!r}")
        from .tasks import TASKS

        prim = TASKS.get(ARCH_TASK[arch], key="task").primary
        return StudySpec(name=name, analysis=spec.get("analysis", name), arch=arch, methods=methods, datasets=(), grid={},
                         lrs=(), lr_policy="fixed", lr_extend=0, search_seeds=(), seeds=(), fixed={}, sn={}, select="val_acc",
                         select_direction="up", stop_on_failure=False, probes=None,
                         verdict_spec=None, primary=prim, skip=skip.strip(), published=published, phase=phase,
                         frozen_commit=frozen_commit)
    datasets = tuple(spec.get("datasets") or ())
    if not datasets:
        raise ConfigError(f"{wscale}.datasets: give at least one dataset; allowed: {', '.join(dataset_names(ARCH_TASK[arch]))}")
    prepared = tuple((params.get("datasets") or {}).get(scale) or ())
    for ds in datasets:
        _choice(f"{wscale}.datasets", ds, dataset_names(ARCH_TASK[arch]))
        if params.get("datasets") is not None and ds not in prepared:
            raise ConfigError(f"{wscale}.datasets: {ds!r} is not prepared at scale {scale}; add it to datasets.{scale}")
    grid = dict(spec.get("grid") or {})
    _check_keys(f"{wscale}.grid", grid, GRID_AXES)
    for ax, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{wscale}.grid.{ax}: expected a non-empty list, got {vals!r}")
    for i, m in enumerate(grid.get("model") or ()):  # a model axis: each value a mapping of run keys (arch, norm, ...)
        if not isinstance(m, dict) or not m:
            raise ConfigError(f"{wscale}.grid.model: each value is a mapping of run keys (e.g. {{arch: mlp, norm: layer}}), "
                              f"got {m!r}")
        _check_keys(f"{wscale}.grid.model[{i}]", m, RUN_KEYS)
    model_archs = [m["arch"] for m in grid.get("model") or () if "arch" in m]
    for a in [*(grid.get("arch") or ()), *model_archs]:  # every arch of the grid must fit the study's datasets
        _choice(f"{wscale}.grid.arch", a, ARCHS)
        if ARCH_TASK[a] != ARCH_TASK[arch]:
            fits = [x for x in ARCHS if ARCH_TASK[x] == ARCH_TASK[arch]]
            raise ConfigError(f"{wscale}.grid.arch: {a!r} does not fit the study's datasets ({ARCH_TASK[arch]}); "
                              f"allowed: {', '.join(fits)}")
    lrs = tuple(spec.get("lrs") or ())
    if not lrs:
        raise ConfigError(f"{wscale}.lrs: give a learning-rate grid (a non-empty list)")
    for lr in lrs:
        _positive(f"{wscale}.lrs", lr)
    policy = spec.get("lr_policy", "search")
    _choice(f"{wscale}.lr_policy", policy, LR_POLICIES)
    lr_extend = spec.get("lr_extend", LR_EXTEND_DEFAULT)
    _int_at_least(f"{wscale}.lr_extend", lr_extend, 0)
    seeds = tuple(spec.get("seeds") or (0,))
    search = tuple(spec.get("search_seeds") or seeds[:1]) if policy == "search" else ()
    for sd in seeds + search:
        _int_at_least(f"{wscale}.seeds", sd, 0)
    fixed = dict(spec.get("set") or {})
    _check_keys(f"{wscale}.set", fixed, RUN_KEYS)
    sn = dict(spec.get("sn") or {})
    _check_keys(f"{wscale}.sn", sn, SN_KEYS)
    task = task_class(datasets[0])
    select = spec.get("select", task.select)
    _choice(f"{wscale}.select", select, ("val_acc", "val_loss"))
    probes = spec.get("probes")
    if probes is not None:
        _check_keys(f"{where}.probes", probes, probe_names())
    verdict = spec.get("verdict", {})
    vspec: dict[str, Any] | None
    if verdict is False:
        vspec = None
    else:
        _check_keys(f"{where}.verdict", verdict or {}, VERDICT_KEYS)
        vspec = {"method": methods[-1], "reference": methods[0], "metric": task.primary[0], "bar": 0.95, **(verdict or {})}
        from .stats import metric_direction

        vspec.setdefault("direction", task.primary[1] if vspec["metric"] == task.primary[0] else metric_direction(vspec["metric"]))
        for role in ("method", "reference"):
            _choice(f"{where}.verdict.{role}", vspec[role], methods)
        _choice(f"{where}.verdict.direction", vspec["direction"], DIRECTIONS)
        _positive(f"{where}.verdict.bar", vspec["bar"])
    analysis = spec.get("analysis", name)
    if not isinstance(analysis, str) or not analysis:
        raise ConfigError(f"{where}.analysis: expected the name of a registered analysis, got {analysis!r}")
    requires = spec.get("requires")
    if requires is not None:
        _choice(f"{wscale}.requires", requires, REQUIRES)
    return StudySpec(
        requires=requires,
        name=name, analysis=analysis, arch=arch, methods=methods, datasets=datasets, grid=grid, lrs=lrs, lr_policy=policy,
        lr_extend=lr_extend if policy == "search" else 0, search_seeds=search, seeds=seeds, fixed=fixed, sn=sn, select=select,
        select_direction="up" if select == "val_acc" else "down",
        stop_on_failure=_flag(f"{wscale}.stop_on_failure", spec.get("stop_on_failure", False)),
        probes=probes, verdict_spec=vspec, primary=task.primary, published=published, phase=phase,
        frozen_commit=frozen_commit,
    )


def study_phase_keys(section: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """The (phase, frozen_commit) a params section sets (``where``: ``studies.<name>`` or ``""``
    for the top level), validated: phase one of :data:`PHASES`; frozen_commit null or a commit
    sha of 7 to 40 hex characters (quoted in YAML, or an all-digit sha parses as a number),
    required with phase frozen in a study section. A study's frozen_commit without its phase is
    an error: the two override the top-level pair together."""
    pre = f"{where}." if where else ""
    phase, commit = section.get("phase"), section.get("frozen_commit")
    if phase is not None:
        _choice(f"{pre}phase", phase, PHASES)
    elif where and commit is not None:
        raise ConfigError(f"{pre}frozen_commit: set {pre}phase too (a study's phase and frozen_commit override the "
                          "top-level pair together); allowed phases: " + ", ".join(PHASES))
    if commit is not None and not (isinstance(commit, str) and _SHA.fullmatch(commit)):
        raise ConfigError(f"{pre}frozen_commit: expected null or a commit sha (7 to 40 hex characters, quoted), got {commit!r}")
    if where and phase == "frozen" and commit is None:
        raise ConfigError(f"{pre}frozen_commit: required when {pre}phase is 'frozen' (the commit whose code and params "
                          "the study's runs must match)")
    return phase, commit


# keys that never determine a run's numbers: the phase policy's own, the worker count, tracking, the data mirror's location
_NOT_DETERMINING = ("phase", "frozen_commit", "workers", "tracking")


def determining_params(params: dict[str, Any], study: str | None = None) -> dict[str, Any]:
    """The params that determine the runs of ``study`` (our definition, for the frozen phase):
    its section ``studies.<study>`` (less its ``phase``/``frozen_commit``), the sections
    ``methods.<m>`` of the methods it lists, the engine keys (:data:`ENGINE_KEYS` less the phase
    pair) and the data keys the prepare stage reads (``data`` less ``mirror``, a location).
    ``study=None``: the headline and ablation runs, i.e. everything but ``studies``, ``methods``,
    the phase pair, ``workers``, ``tracking`` and ``data.mirror``. Read without validation, so a
    params file from an old commit works too."""
    params = dict(params or {})
    data = {k: v for k, v in dict(params.get("data") or {}).items() if k != "mirror"}
    if study is None:
        out = {k: v for k, v in params.items() if k not in _NOT_DETERMINING + ("studies", "methods", "data")}
        out["data"] = data
        return out
    section = (params.get("studies") or {}).get(study)
    section = {k: v for k, v in dict(section or {}).items() if k not in STUDY_PHASE_KEYS} if section is not None else None
    methods = (params.get("methods") or {})
    listed = list((section or {}).get("methods") or ())
    out = {k: params.get(k) for k in ENGINE_KEYS if k not in STUDY_PHASE_KEYS}
    out.update({"studies": {study: section}, "methods": {m: methods.get(m) for m in listed}, "data": data})
    return out


def study_run(params: dict[str, Any], spec: StudySpec, method: str, *, dataset: str, point: dict[str, Any],
              lr: float, seed: int, run_id: str) -> RunConfig:
    """The RunConfig of one run of a study slice (see the module docstring for the layers)."""
    if method not in spec.methods:
        raise ConfigError(unknown_message(f"studies.{spec.name}.methods", method, spec.methods))
    msec = resolve_method(params, method)
    values: dict[str, Any] = {k: params[k] for k in ENGINE_KEYS if params.get(k) is not None}
    if spec.phase is not None:  # the study's own phase keys override the top-level pair, for its runs only
        values["phase"], values["frozen_commit"] = spec.phase, spec.frozen_commit
    data = params.get("data") or {}
    if data.get("prepared_dir"):
        values["prepared_dir"] = data["prepared_dir"]
    values.update(spec.fixed)
    values.update(point)
    values.update({k: v for k, v in msec.items() if k not in ("sn", "lr")})
    sn = {**(msec.get("sn") or {}), **spec.sn}
    if spec.probes is not None:
        values["probes"] = spec.probes
    values.update(arch=point.get("arch", spec.arch), dataset=dataset, lr=lr, seed=seed, study=spec.name, run_id=run_id, method=method, sn=sn)
    if values["arch"] == "resnet18":
        values["depth"] = RESNET18_DEPTH
    return make_run(values)


def datasets_to_prepare(params: dict[str, Any]) -> list[str]:
    """Datasets the prepare stage builds: ``datasets[scale]`` (else every dataset that is used)."""
    scale = params.get("scale", "quick")
    listed = (params.get("datasets") or {}).get(scale)
    if listed is not None:
        names = list(listed)
    else:
        names = []
        for study in params.get("studies") or {}:
            names += list(resolve_study(params, study).datasets)
    used = [params.get("dataset") or profile(params).get("dataset")]
    used += [v.get("dataset") for v in resolve_ablation(params).values()]
    for ds in used:
        if ds and ds not in names:
            if listed is not None:
                raise ConfigError(f"datasets.{scale}: {ds!r} is used by the headline or ablation runs; add it to datasets.{scale}")
            names.append(ds)
    out: list[str] = []
    for ds in names:
        _choice("datasets", ds, dataset_names())
        if ds not in out:
            out.append(ds)
    return out


prepared_datasets = datasets_to_prepare


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


def resolve_run(params: dict[str, Any], **overrides: Any) -> RunConfig:
    """The headline (or an ablation variant's) RunConfig: defaults <- profile <- top-level <- overrides."""
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
        opt = values.get("optimizer", RunConfig.model_fields["optimizer"].default)
        _choice("optimizer", opt, optimizer_names())
        default_lr = params.get("default_lr") or {}
        if opt not in default_lr:
            raise ConfigError(f"lr: null needs default_lr.{opt}; set lr or default_lr.{opt}")
        values["lr"] = default_lr[opt]
    values = {k: v for k, v in values.items() if k in RunConfig.model_fields}
    if values.get("arch") == "resnet18":
        values["depth"] = RESNET18_DEPTH  # fixed by the architecture; recorded so tables do not show the MLP's depth
    values["sn"] = sn
    return make_run(values)


def with_overrides(cfg: RunConfig, **kw: Any) -> RunConfig:
    return cfg.replace(**kw)
