"""Models. ``build(arch, **cfg)`` returns an ``nn.Module`` with ``param_roles()``.

Archs: ``mlp`` (:class:`DeepMLP`: input_dim, n_classes, depth, width, activation, init),
``resnet18`` (:class:`optlab.models.resnet.ResNet18`: input_dim, n_classes, input_shape, width,
residual, batch_norm), ``gpt`` (:class:`optlab.models.gpt.GPT`: vocab_size, block_size,
n_layer, n_head, n_embd, dropout, bias; anything else is refused), ``gpt_modern``
(:class:`optlab.models.gpt_modern.GPTModern`: RMSNorm, SwiGLU, no biases, fused qkv, rotary
positions, tied embedding with role ``input``; vocab_size, block_size, n_layer, n_head, n_embd,
ffn_hidden), ``vit``
(:class:`optlab.models.vit.ViT`: input_dim, n_classes, input_shape, width, depth, n_head, patch;
image rows as tokens) and ``cnn`` (:class:`optlab.models.cnn.SmallCNN`: input_dim, n_classes,
input_shape, width, depth, batch_norm). The deep MLP takes ``norm`` (``none`` | ``layer``).
Models with convolutions (resnet18, cnn) also provide ``conv_specs()`` (conv weight name ->
stride, padding, dilation, groups, input_hw), which the conv spectral projection and the
operator-norm metrics use.

Defaults (for a user's own loop; the engine passes every argument): ``build("mlp")`` is a 784-in,
10-class MLP with 16 hidden layers of width 64; ``build("resnet18")`` is the CIFAR-10 variant
(``input_shape (3, 32, 32)``, 10 classes, width 64), and ``cnn`` and ``vit`` default to CIFAR-10
images too; ``gpt`` needs ``vocab_size`` and ``block_size``. A module without ``param_roles()``
gets roles by :func:`infer_roles` (every parameter of 2+ dimensions is a weight matrix).

Every model runs under ``torch.func.jvp`` + ``functional_call`` in eval mode;
:func:`optlab.models.functional.jvp_outputs` gives a model's outputs and their derivative along a
parameter direction without touching its buffers.

Roles: ``input``, ``hidden``, ``output`` (weight matrices, or stacks of them) and
``bias_norm`` (biases and normalization parameters). Optimizers, constraints and
per-layer metrics select parameters by role, never by name.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .mlp import DeepMLP
from .gpt import GPT, GPTConfig, build_gpt
from .gpt_modern import GPTModern, GPTModernConfig, build_gpt_modern
from .cnn import SmallCNN
from .vit import ViT
from .lq import LinearSystem
from .functional import jvp_outputs

ROLES = ("input", "hidden", "output", "bias_norm")
WEIGHT_ROLES = ("input", "hidden", "output")


def _resnet18(**cfg: Any) -> nn.Module:
    """ResNet18 (CIFAR variant); imported on use, so ``import optlab.models`` does not load torchvision."""
    from .resnet import ResNet18

    return ResNet18(**cfg)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {"mlp": DeepMLP, "resnet18": _resnet18, "gpt": build_gpt, "gpt_modern": build_gpt_modern, "vit": ViT,
                                                  "cnn": SmallCNN, "lq": LinearSystem}


def arch_names() -> list[str]:
    return list(_REGISTRY)


MLP_DEFAULTS: dict[str, Any] = {"input_dim": 784, "n_classes": 10, "depth": 16, "width": 64}
"""``build("mlp")`` without arguments: MNIST-shaped (784 inputs, 10 classes), 16 hidden layers of width 64
(the run config's default depth and width)."""
IMAGE_DEFAULT_SHAPE = (3, 32, 32)
"""``build("resnet18" | "cnn" | "vit")`` given none of input_shape, input_dim, in_channels: CIFAR-10 images
(their n_classes already defaults to 10; resnet18's width to 64)."""


def _with_defaults(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with the documented defaults for the keys it leaves out. The engine passes every key
    explicitly, so its models never see these."""
    if arch == "mlp":
        return {**MLP_DEFAULTS, **cfg}
    if arch in ("resnet18", "cnn", "vit") and all(cfg.get(k) is None for k in ("input_shape", "input_dim", "in_channels")):
        return {**cfg, "input_shape": IMAGE_DEFAULT_SHAPE}
    return cfg  # gpt: vocab_size and block_size come from the data and stay required


def build(arch: str, **cfg: Any) -> nn.Module:
    """Build a model by name; unknown names raise ValueError naming the allowed ones.

    Defaults for a user's own loop: ``build("mlp")`` is a 784-in, 10-class MLP of 16 hidden layers of
    width 64 (:data:`MLP_DEFAULTS`); ``build("resnet18")``, ``build("cnn")`` and ``build("vit")`` take
    CIFAR-10 images (``input_shape (3, 32, 32)``, 10 classes; resnet18 width 64) unless given a shape;
    ``build("gpt")`` needs ``vocab_size`` and ``block_size`` (they depend on the tokenized data)."""
    if arch not in _REGISTRY:
        raise ValueError(f"arch: unknown {arch!r}; allowed: {', '.join(_REGISTRY)}")
    model = _REGISTRY[arch](**_with_defaults(arch, cfg))
    check_roles(model)
    return model


def canonical_name(name: str) -> str:
    """Parameter name with parametrization wrappers removed (``a.parametrizations.w.original`` -> ``a.w``)."""
    if "parametrizations." in name:
        name = name.replace("parametrizations.", "")
        if name.endswith(".original"):
            name = name[: -len(".original")]
    return name


def check_roles(model: nn.Module) -> None:
    """Every parameter has exactly one valid role."""
    roles = model.param_roles()  # type: ignore[operator]
    names = {n for n, _ in model.named_parameters()}
    missing = names - set(roles)
    unknown = set(roles) - names
    bad = {n: r for n, r in roles.items() if r not in ROLES}
    if missing or unknown or bad:
        raise ValueError(f"param_roles mismatch: missing={sorted(missing)} unknown={sorted(unknown)} bad={bad}")


def infer_roles(model: nn.Module) -> dict[str, str]:
    """Roles for a module without ``param_roles()`` (a user's own ``nn.Sequential``, say), by a
    simple rule: every parameter of 2 or more dimensions is a weight matrix (the first one in
    module order ``input``, the last ``output``, the others ``hidden``; a single one is
    ``input``); 1-D and 0-D parameters (biases, norm scales) are ``bias_norm``. Keys are
    canonical names (parametrization wrappers removed)."""
    named = [(canonical_name(n), p) for n, p in model.named_parameters()]
    mats = [n for n, p in named if p.dim() >= 2]
    roles = {}
    for n, p in named:
        if p.dim() < 2:
            roles[n] = "bias_norm"
        else:
            roles[n] = "input" if n == mats[0] else "output" if n == mats[-1] else "hidden"
    return roles


def roles_of(model: nn.Module) -> dict[str, str]:
    """``model.param_roles()``, or :func:`infer_roles` for a module without it."""
    fn = getattr(model, "param_roles", None)
    return dict(fn()) if callable(fn) else infer_roles(model)


def params_by_role(model: nn.Module, roles: tuple[str, ...] | list[str]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs whose role is in ``roles``, in module order (roles by :func:`roles_of`)."""
    role_of = roles_of(model)
    return [(n, p) for n, p in model.named_parameters() if role_of[canonical_name(n)] in roles]


def weight_layers(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(name, role, param) for weight matrices, stacks and conv kernels.

    A 3-D stack holds several layers (one per slice); a 4-D conv kernel is one layer.
    """
    role_of = roles_of(model)
    out = []
    for n, p in model.named_parameters():
        role = role_of[canonical_name(n)]
        if role in WEIGHT_ROLES and p.dim() >= 2:
            out.append((canonical_name(n), role, p))
    return out
