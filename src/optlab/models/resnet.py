"""ResNet-18, CIFAR variant, built from torchvision's ``BasicBlock``.

3x3 stem convolution at stride 1 (no max-pool) -> four stages of two basic blocks
(``width``, 2, 4, 8 x ``width`` channels; strides 1, 2, 2, 2) -> global average pool -> linear
head. ``width=64`` is the usual ResNet-18 (11.2M parameters at 10 classes).

Two switches turn it into the controls of the study:

- ``residual=False``: every block is a :class:`PlainBlock`, torchvision's block whose
  forward has no shortcut at all (no identity, no 1x1 downsample convolution): a plain
  17-convolution network.
- ``batch_norm=False``: every normalization layer is ``nn.Identity`` and every convolution
  gets a bias (zero-initialized).

The prepared datasets store images flattened (``[N, C*H*W]``); ``forward`` accepts that or
``[N, C, H, W]``. The model knows, for its ``input_shape``, the spatial size of every
convolution's input (``conv_input_hw``) and the full geometry of each convolution
(``conv_specs``), which the operator-norm spectral projection needs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from .vision import init_convs_and_bn, resolve_image_shape, trace_conv_specs

STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


class PlainBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with the shortcut removed: relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__(inplanes, planes, stride, downsample=None, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out)


def _identity_norm(_: int) -> nn.Module:
    return nn.Identity()


def _add_bias(conv: nn.Conv2d) -> None:
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (see the module docstring); ``param_roles()`` labels every parameter."""

    def __init__(
        self,
        input_dim: int | None = None,
        n_classes: int = 10,
        input_shape: tuple[int, int, int] | list[int] | None = None,
        width: int = 64,
        residual: bool = True,
        batch_norm: bool = True,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        shape = resolve_image_shape(input_dim, input_shape, in_channels, "ResNet18")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width: must be an integer >= 1, got {width!r}")
        if n_classes < 1:
            raise ValueError(f"n_classes: must be >= 1, got {n_classes}")
        self.input_shape = shape
        self.width, self.residual, self.batch_norm = width, bool(residual), bool(batch_norm)
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d if batch_norm else _identity_norm

        self.conv1 = nn.Conv2d(shape[0], width, kernel_size=3, stride=1, padding=1, bias=not batch_norm)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        stages = []
        for i, stride in enumerate(STAGE_STRIDES):
            planes = width * 2**i
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                s = stride if b == 0 else 1
                blocks.append(self._block(inplanes, planes, s, norm))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, n_classes)
        self.reset_parameters()
        self._conv_specs = trace_conv_specs(self, self.input_shape)

    def _block(self, inplanes: int, planes: int, stride: int, norm: Callable[[int], nn.Module]) -> BasicBlock:
        if not self.residual:
            block: BasicBlock = PlainBlock(inplanes, planes, stride, norm_layer=norm)
        else:
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=not self.batch_norm), norm(planes)
                )
            block = BasicBlock(inplanes, planes, stride, downsample=down, norm_layer=norm)
        if not self.batch_norm:
            _add_bias(block.conv1)
            _add_bias(block.conv2)
        return block

    def reset_parameters(self) -> None:
        """torchvision's ResNet init: Kaiming normal (fan_out, relu) convs, BN at (1, 0), zero conv biases."""
        init_convs_and_bn(self)
        self.fc.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], *self.input_shape)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def param_roles(self) -> dict[str, str]:
        """Stem conv -> input, block and downsample convs -> hidden, fc weight -> output, the rest -> bias_norm."""
        roles = {}
        for name, p in self.named_parameters():
            if name == "conv1.weight":
                roles[name] = "input"
            elif name == "fc.weight":
                roles[name] = "output"
            elif p.dim() == 4:
                roles[name] = "hidden"
            else:
                roles[name] = "bias_norm"
        return roles

    # -- convolution geometry (for the operator-norm projection and metrics)
    @torch.no_grad()
    def conv_input_hw(self) -> dict[str, tuple[int, int]]:
        """Conv weight parameter name -> (H, W) of that convolution's input at ``input_shape``."""
        return {n: s["input_hw"] for n, s in self._conv_specs.items()}

    def conv_specs(self) -> dict[str, dict[str, Any]]:
        """Conv weight parameter name -> dict(stride, padding, dilation, groups, input_hw)."""
        return {n: dict(s) for n, s in self._conv_specs.items()}
