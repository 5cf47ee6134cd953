"""Models. ``build(arch, **cfg)`` returns an ``nn.Module`` with ``param_roles()``.

Archs: ``mlp`` (:class:`DeepMLP`: input_dim, n_classes, depth, width, activation, init),
``resnet18`` (:class:`optlab.models.resnet.ResNet18`: input_dim, n_classes, input_shape, width,
residual, batch_norm), ``gpt`` (:class:`optlab.models.gpt.GPT`: vocab_size, block_size,
n_layer, n_head, n_embd, dropout, bias; anything else is refused), ``vit``
(:class:`optlab.models.vit.ViT`: input_dim, n_classes, input_shape, width, depth, n_head, patch;
image rows as tokens) and ``cnn`` (:class:`optlab.models.cnn.SmallCNN`: input_dim, n_classes,
input_shape, width, depth, batch_norm). The deep MLP takes ``norm`` (``none`` | ``layer``).
Models with convolutions (resnet18, cnn) also provide ``conv_specs()`` (conv weight name ->
stride, padding, dilation, groups, input_hw), which the conv spectral projection and the
operator-norm metrics use.

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
from .cnn import SmallCNN
from .vit import ViT
from .functional import jvp_outputs

ROLES = ("input", "hidden", "output", "bias_norm")
WEIGHT_ROLES = ("input", "hidden", "output")


def _resnet18(**cfg: Any) -> nn.Module:
    """ResNet18 (CIFAR variant); imported on use, so ``import optlab.models`` does not load torchvision."""
    from .resnet import ResNet18

    return ResNet18(**cfg)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {"mlp": DeepMLP, "resnet18": _resnet18, "gpt": build_gpt, "vit": ViT,
                                                  "cnn": SmallCNN}


def arch_names() -> list[str]:
    return list(_REGISTRY)


def build(arch: str, **cfg: Any) -> nn.Module:
    """Build a model by name; unknown names raise ValueError naming the allowed ones."""
    if arch not in _REGISTRY:
        raise ValueError(f"arch: unknown {arch!r}; allowed: {', '.join(_REGISTRY)}")
    model = _REGISTRY[arch](**cfg)
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


def params_by_role(model: nn.Module, roles: tuple[str, ...] | list[str]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs whose role is in ``roles``, in module order."""
    role_of = model.param_roles()  # type: ignore[operator]
    return [(n, p) for n, p in model.named_parameters() if role_of[canonical_name(n)] in roles]


def weight_layers(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """(name, role, param) for weight matrices, stacks and conv kernels.

    A 3-D stack holds several layers (one per slice); a 4-D conv kernel is one layer.
    """
    role_of = model.param_roles()  # type: ignore[operator]
    out = []
    for n, p in model.named_parameters():
        role = role_of[canonical_name(n)]
        if role in WEIGHT_ROLES and p.dim() >= 2:
            out.append((canonical_name(n), role, p))
    return out
