"""Helpers shared by the image models (:mod:`optlab.models.cnn`, :mod:`optlab.models.vit`).

The prepared datasets store images flattened (``[N, C*H*W]``) and record their shape in the
data's meta (``input_shape``: digits ``(1, 8, 8)``, MNIST ``(1, 28, 28)``, CIFAR-10
``(3, 32, 32)``); the classification task passes it to the model as ``input_shape``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def resolve_image_shape(
    input_dim: int | None, input_shape: tuple[int, ...] | list[int] | None, in_channels: int | None, who: str
) -> tuple[int, int, int]:
    """(C, H, W) from ``input_shape``, or from ``input_dim`` and ``in_channels`` for square images."""
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"{who}: input_shape: expected (C, H, W) with positive sizes, got {tuple(input_shape)}")
        if in_channels is not None and in_channels != shape[0]:
            raise ValueError(f"{who}: in_channels={in_channels} does not match input_shape {shape}")
    else:
        if input_dim is None or in_channels is None:
            raise ValueError(f"{who} needs input_shape (C, H, W), or input_dim and in_channels for square images")
        side = math.isqrt(input_dim // in_channels) if input_dim % in_channels == 0 else 0
        if side < 1 or in_channels * side * side != input_dim:
            raise ValueError(f"{who}: input_dim={input_dim} is not in_channels={in_channels} square images; give input_shape")
        shape = (in_channels, side, side)
    if input_dim is not None and input_dim != shape[0] * shape[1] * shape[2]:
        raise ValueError(f"{who}: input_dim={input_dim} does not match input_shape {shape}")
    return shape  # type: ignore[return-value]


def positive_int(who: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {key} must be an integer >= 1, got {value!r}")
    return value


def init_convs_and_bn(model: nn.Module) -> None:
    """torchvision's ResNet init, in module order: Kaiming normal (fan_out, relu) conv weights, zero
    conv biases, batch norm at (1, 0) (the image models' shared init; heads are initialised apart)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def trace_conv_specs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, dict[str, Any]]:
    """Conv weight name -> dict(stride, padding, dilation, groups, input_hw), from one zero input of
    ``input_shape`` run through ``model`` in eval mode (no batch-norm statistics update) with
    forward pre-hooks on every ``nn.Conv2d`` (what ResNet18's ``conv_specs()`` records)."""
    seen: dict[str, tuple[int, int]] = {}
    handles = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            def hook(m: nn.Module, args: tuple, _n: str = mod_name) -> None:
                seen[_n] = (int(args[0].shape[-2]), int(args[0].shape[-1]))
            handles.append(mod.register_forward_pre_hook(hook))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    except RuntimeError as e:
        raise ValueError(f"input_shape {input_shape} is too small for {type(model).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        for m, was in flags:
            m.training = was
    specs = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                raise ValueError(f"{mod_name}: only explicit zero padding is supported")
            specs[f"{mod_name}.weight"] = {
                "stride": tuple(mod.stride),
                "padding": tuple(mod.padding),
                "dilation": tuple(mod.dilation),
                "groups": int(mod.groups),
                "input_hw": seen[mod_name],
            }
    return specs
