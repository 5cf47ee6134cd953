import math

import pytest
import torch

from optlab import models
from optlab.metrics.layers import LayerIndex, layer_grad_norms, layer_sigma_max


def test_roles_cover_every_parameter():
    m = models.build("mlp", input_dim=5, n_classes=3, depth=4, width=8)
    roles = m.param_roles()
    assert set(roles) == {n for n, _ in m.named_parameters()}
    assert roles["hidden.weight"] == "hidden" and roles["input.weight"] == "input" and roles["head.weight"] == "output"


def test_hidden_stack_is_batched_and_orthogonal_init_is_orthogonal():
    m = models.build("mlp", input_dim=5, n_classes=3, depth=7, width=8, init="orthogonal")
    assert m.hidden.weight.shape == (7, 8, 8)
    eye = torch.eye(8).expand(7, 8, 8)
    assert torch.allclose(m.hidden.weight @ m.hidden.weight.transpose(1, 2), eye, atol=1e-5)
    # rectangular input projection (8x5): orthonormal columns
    w = m.input.weight
    assert torch.allclose(w.T @ w, torch.eye(5), atol=1e-5)


def test_forward_matches_explicit_layer_loop():
    torch.manual_seed(0)
    m = models.build("mlp", input_dim=5, n_classes=3, depth=3, width=6, activation="relu", init="kaiming")
    x = torch.randn(4, 5)
    h = torch.relu(x @ m.input.weight.T + m.input.bias)
    for i in range(3):
        h = torch.relu(h @ m.hidden.weight[i].T + m.hidden.bias[i])
    assert torch.allclose(m(x), h @ m.head.weight.T + m.head.bias, atol=1e-6)


def test_kaiming_std():
    torch.manual_seed(0)
    m = models.build("mlp", input_dim=5, n_classes=3, depth=20, width=128, activation="relu", init="kaiming")
    assert m.hidden.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.02)


def test_layer_metrics_match_per_layer_reference():
    torch.manual_seed(0)
    m = models.build("mlp", input_dim=5, n_classes=3, depth=4, width=6, init="kaiming")
    torch.nn.functional.cross_entropy(m(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    idx = LayerIndex.of(m)
    assert len(idx) == 6 and idx.roles == ["input"] + ["hidden"] * 4 + ["output"]
    mats = [m.input.weight] + list(m.hidden.weight) + [m.head.weight]
    grads = [m.input.weight.grad] + list(m.hidden.weight.grad) + [m.head.weight.grad]
    ref_g = torch.tensor([g.norm().item() for g in grads])
    ref_s = torch.tensor([torch.linalg.svdvals(w.detach())[0].item() for w in mats])
    assert torch.allclose(layer_grad_norms(idx), ref_g, rtol=1e-5)
    assert torch.allclose(layer_sigma_max(idx), ref_s, rtol=1e-5)


def test_unknown_arch():
    with pytest.raises(ValueError, match="arch: unknown 'resnet'; allowed: mlp"):
        models.build("resnet")


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = models.build("mlp", input_dim=5, n_classes=3, depth=10, width=8, init="kaiming")
    b = models.build("mlp", input_dim=5, n_classes=3, depth=10, width=8, init="kaiming", checkpoint_segments=3)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    ga = torch.autograd.grad(torch.nn.functional.cross_entropy(a(x), y), list(a.parameters()))
    gb = torch.autograd.grad(torch.nn.functional.cross_entropy(b(x), y), list(b.parameters()))
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-6)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
@pytest.mark.parametrize("segments", [0, 1, 3, 10])
def test_stack_backward_equals_autograd_through_unbind(activation, segments):
    """The in-place-gradient stack function against the autograd reference, in float64: outputs,
    every parameter gradient and the input gradient agree to rounding."""
    torch.manual_seed(1)
    m = models.build("mlp", input_dim=7, n_classes=3, depth=10, width=6, activation=activation, init="kaiming",
                     checkpoint_segments=segments).double()
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (5,))
    got, want = [], []
    for fwd, out in ((m.forward, got), (m.forward_autograd, want)):
        logits = fwd(x)
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), [x, *m.parameters()])
        out += [logits.detach(), *grads]
    for u, v in zip(got, want):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-14)


def test_stack_function_passes_gradcheck():
    from optlab.models.mlp import _HiddenStackFn

    torch.manual_seed(2)
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(5, 4, 4, dtype=torch.float64)).requires_grad_()
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for act in ("tanh", "relu", "gelu"):
        for seg in (0, 2):
            assert torch.autograd.gradcheck(lambda h, w, b: _HiddenStackFn.apply(h, w, b, act, seg), (h, w, b))


def test_stack_gradient_flows_through_a_parametrization():
    """With the forward spectral-norm reparametrization the stack function sees a computed weight."""
    from optlab.optim.reparam import apply_spectral_norm_reparam

    torch.manual_seed(3)
    m = models.build("mlp", input_dim=5, n_classes=3, depth=4, width=8)
    apply_spectral_norm_reparam(m)
    m.double().eval()  # eval: no power-iteration update between the two forwards
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    g1 = torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), list(m.parameters()))
    g2 = torch.autograd.grad(torch.nn.functional.cross_entropy(m.forward_autograd(x), y), list(m.parameters()))
    for u, v in zip(g1, g2):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-12)
