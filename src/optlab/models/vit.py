"""A small vision transformer for the image classification datasets (arch ``vit``).

    x [N, C*H*W] or [N, C, H, W] -> tokens [N, T, D]
      -> embed (Linear D -> width) + pos (learned, [1, T, width])
      -> depth x Block -> LayerNorm -> mean over tokens -> head -> logits [N, n_classes]
    Block:  h = h + attn(ln1(h));  h = h + mlp(ln2(h))              (pre-LN)
            attn: multi-head self-attention, n_head heads, no mask
            mlp:  Linear(width, 4 width) -> GELU -> Linear(4 width, width)

Tokens: by default (``patch=None``) each image **row** is a token: ``T = H`` tokens of
``D = C * W`` values (digits: 8 tokens of 8 pixels; MNIST: 28 of 28). With ``patch=p`` (``p``
divides H and W) the image is cut into ``p x p`` patches instead: ``T = (H/p)(W/p)``,
``D = C p^2``. There is no class token: the head reads the mean of the final tokens.

Attention is written out, ``softmax(q k^T / sqrt(head_dim)) v`` (:func:`attention`), always:
it has a forward-mode rule, so the model runs under ``torch.func.jvp`` (the rho controller's
derivative) without a special path, and at these sizes (8 or 28 tokens) it costs no more than
a fused kernel.

Roles (every parameter exactly one):

- ``embed.weight`` (the token embedding, a ``(width, D)`` matrix applied to the pixels) ->
  ``input``;
- attention ``qkv`` (one fused ``(3 width, width)`` matrix, as in :mod:`optlab.models.gpt`: a
  per-matrix method treats q, k and v as one matrix) and ``proj``, MLP ``fc`` and ``proj``
  weights -> ``hidden``;
- ``head.weight`` -> ``output``;
- every Linear bias, every LayerNorm weight and bias and the position embedding ``pos`` ->
  ``bias_norm``. The position embedding is an additive, input-independent offset of the token
  embeddings, i.e. a bias per token position, not a matrix that maps activations: it gets no
  spectral constraint, per-matrix update or per-layer metric (unlike the GPT's ``wpe``, an
  ``nn.Embedding`` indexed by position, labelled ``input`` there).

Init: the token embedding ~ N(0, 1/D) (LeCun normal: the embedded tokens start at unit scale
whatever the pixel count), the position embedding and every other Linear weight ~ N(0, 0.02),
the two residual projections ~ N(0, 0.02 / sqrt(2 depth)) (as in the GPT), biases zero,
LayerNorm (1, 0).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .vision import positive_int, resolve_image_shape

INIT_STD = 0.02


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims (no mask), written out."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(scores, dim=-1) @ v


class SelfAttention(nn.Module):
    def __init__(self, width: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(width, 3 * width)  # fused: one matrix
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v).transpose(1, 2).reshape(B, T, C)  # concatenate the heads
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, n_head)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """See the module docstring; ``forward(x) -> logits [N, n_classes]``, ``param_roles()``."""

    def __init__(
        self,
        input_dim: int | None = None,
        n_classes: int = 10,
        input_shape: tuple[int, int, int] | list[int] | None = None,
        width: int = 32,
        depth: int = 2,
        n_head: int = 4,
        patch: int | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        shape = resolve_image_shape(input_dim, input_shape, in_channels, "vit")
        for key, val in (("width", width), ("depth", depth), ("n_head", n_head), ("n_classes", n_classes)):
            positive_int("vit", key, val)
        if width % n_head:
            raise ValueError(f"vit: width={width} must be divisible by n_head={n_head}")
        c, h, w = shape
        if patch is None:
            n_tokens, token_dim = h, c * w
        else:
            positive_int("vit", "patch", patch)
            if h % patch or w % patch:
                raise ValueError(f"vit: patch={patch} must divide the image's height and width {h}x{w}")
            n_tokens, token_dim = (h // patch) * (w // patch), c * patch * patch
        self.input_shape, self.patch = shape, patch
        self.width, self.depth, self.n_head = width, depth, n_head
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.embed = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, width))
        self.blocks = nn.ModuleList(Block(width, n_head) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, mean=0.0, std=1.0 / math.sqrt(self.token_dim))
        nn.init.normal_(self.pos, mean=0.0, std=INIT_STD)
        for block in self.blocks:  # residual projections: the residual stream's variance stays O(1)
            for wt in (block.attn.proj.weight, block.mlp.proj.weight):
                nn.init.normal_(wt, mean=0.0, std=INIT_STD / math.sqrt(2 * self.depth))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C*H*W]`` or ``[N, C, H, W]`` -> ``[N, T, D]`` (rows, or ``patch x patch`` patches)."""
        c, h, w = self.input_shape
        x = x.reshape(x.shape[0], c, h, w)
        if self.patch is None:
            return x.permute(0, 2, 1, 3).reshape(x.shape[0], h, c * w)  # row r: (channel, column)
        p = self.patch
        x = x.reshape(x.shape[0], c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(x.shape[0], self.n_tokens, self.token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.tokens(x)) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h).mean(dim=1))

    def param_roles(self) -> dict[str, str]:
        """Token embedding -> input, block matrices -> hidden, head -> output, the rest -> bias_norm."""
        roles: dict[str, str] = {}
        for mname, m in self.named_modules():
            prefix = f"{mname}." if mname else ""
            if isinstance(m, nn.LayerNorm):
                for pname, _ in m.named_parameters(recurse=False):
                    roles[prefix + pname] = "bias_norm"
            elif isinstance(m, nn.Linear):
                roles[prefix + "weight"] = "input" if m is self.embed else "output" if m is self.head else "hidden"
                roles[prefix + "bias"] = "bias_norm"
        roles["pos"] = "bias_norm"
        return roles
