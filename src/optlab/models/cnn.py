"""A small plain CNN with batch norm for the image classification datasets (arch ``cnn``).

    x [N, C*H*W] or [N, C, H, W]
      -> conv3x3(C -> width, stride 1)          -> BN -> ReLU      (layer 0)
      -> conv3x3(width -> 2 width, stride 2)    -> BN -> ReLU      (layer 1)
      -> conv3x3(2 width -> 2 width, stride 1)  -> BN -> ReLU      (layers 2 .. depth-1)
      -> global average pool -> linear head -> logits [N, n_classes]

``depth`` is the number of convolution layers (>= 1; the run key ``depth``): layer 0 keeps the
resolution, layer 1 halves it (stride 2) and doubles the channels, every further layer keeps
both. ``depth=3`` is the three-layer network conv(w)-conv(2w, /2)-conv(2w). There are no
shortcuts. ``batch_norm=False`` (the run key ``batch_norm``) makes every normalization an
``nn.Identity`` and gives every convolution a (zero-initialized) bias, as in
:mod:`optlab.models.resnet`.

Init (as torchvision's ResNet): Kaiming normal (fan_out, relu) convolutions, batch norm at
(1, 0), the head at ``nn.Linear``'s default.

Roles: the first convolution -> ``input``; the other convolutions -> ``hidden``; the head weight
-> ``output``; batch-norm weights/biases, conv biases and the head bias -> ``bias_norm``.
``conv_specs()`` gives each convolution's geometry and input size at ``input_shape`` (what the
operator-norm spectral projection of ``sgd_sn`` and the ``sigma_max`` probe need).

Under ``torch.func.jvp`` (:func:`optlab.models.functional.jvp_outputs`, eval mode) batch norm
uses its running statistics and nothing is written; ReLU is not in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .vision import init_convs_and_bn, positive_int, resolve_image_shape, trace_conv_specs


class SmallCNN(nn.Module):
    """See the module docstring; ``forward(x) -> logits``, ``param_roles()``, ``conv_specs()``."""

    def __init__(
        self,
        input_dim: int | None = None,
        n_classes: int = 10,
        input_shape: tuple[int, int, int] | list[int] | None = None,
        width: int = 32,
        depth: int = 3,
        batch_norm: bool = True,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        shape = resolve_image_shape(input_dim, input_shape, in_channels, "cnn")
        positive_int("cnn", "width", width)
        positive_int("cnn", "depth", depth)
        positive_int("cnn", "n_classes", n_classes)
        self.input_shape = shape
        self.width, self.depth, self.batch_norm = width, depth, bool(batch_norm)
        convs, norms = [], []
        c_in = shape[0]
        for i in range(depth):
            c_out = width if i == 0 else 2 * width
            stride = 2 if i == 1 else 1
            convs.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=not self.batch_norm))
            norms.append(nn.BatchNorm2d(c_out) if self.batch_norm else nn.Identity())
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.head = nn.Linear(c_in, n_classes)
        self.reset_parameters()
        self._conv_specs = trace_conv_specs(self, shape)

    def reset_parameters(self) -> None:
        init_convs_and_bn(self)
        self.head.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], *self.input_shape)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.head(x.mean(dim=(-2, -1)))

    def param_roles(self) -> dict[str, str]:
        """First conv -> input, other convs -> hidden, head weight -> output, the rest -> bias_norm."""
        roles = {}
        for name, p in self.named_parameters():
            if name == "convs.0.weight":
                roles[name] = "input"
            elif name == "head.weight":
                roles[name] = "output"
            elif name.startswith("convs.") and name.endswith(".weight"):
                roles[name] = "hidden"
            else:
                roles[name] = "bias_norm"
        return roles

    def conv_input_hw(self) -> dict[str, tuple[int, int]]:
        """Conv weight parameter name -> (H, W) of that convolution's input at ``input_shape``."""
        return {n: s["input_hw"] for n, s in self._conv_specs.items()}

    def conv_specs(self) -> dict[str, dict[str, Any]]:
        """Conv weight parameter name -> dict(stride, padding, dilation, groups, input_hw)."""
        return {n: dict(s) for n, s in self._conv_specs.items()}
