"""Per-layer diagnostics, batched over layers of the same shape."""

from .layers import LayerIndex, layer_grad_norms, layer_sigma_max

__all__ = ["LayerIndex", "layer_grad_norms", "layer_sigma_max"]
