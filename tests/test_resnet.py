"""ResNet18 (CIFAR variant): structure against torchvision's resnet18, the switches, roles,
conv geometry, and a quick-profile sanity run with the conv spectral projection."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from optlab import models, optim
from optlab.metrics.layers import LayerIndex, layer_grad_norms, layer_sigma_max
from optlab.models.resnet import PlainBlock, ResNet18
from optlab.optim.conv_spectral import conv_operator_norm_dense


def _build(**kw):
    torch.manual_seed(0)
    cfg = dict(input_dim=64, n_classes=10, input_shape=(1, 8, 8), width=8)
    return models.build("resnet18", **(cfg | kw))


def _torchvision_cifar_resnet18(n_classes=10, in_channels=3):
    ref = torchvision.models.resnet18(num_classes=n_classes)
    ref.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    return ref


def test_width_64_is_torchvision_resnet18_with_cifar_stem():
    m = ResNet18(input_dim=3072, n_classes=10, input_shape=(3, 32, 32), width=64)
    ref = _torchvision_cifar_resnet18()
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters()) == 11_173_962
    ref.load_state_dict(m.state_dict())  # same names and shapes, strict
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        m.train(train)
        ref.train(train)
        assert torch.allclose(m(x.flatten(1)), ref(x), atol=1e-5)


def test_flat_and_image_inputs_agree_and_backward_runs():
    m = _build()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(m(x.flatten(1)), m(x))
    F.cross_entropy(m(x.flatten(1)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_switches(residual, batch_norm):
    m = _build(residual=residual, batch_norm=batch_norm)
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 8
    assert all(isinstance(b, PlainBlock) for b in blocks) == (not residual)
    n_down = sum(b.downsample is not None for b in blocks)
    assert n_down == (3 if residual else 0)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == (20 if residual else 17)
    assert all((c.bias is None) == batch_norm for c in convs)
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == batch_norm
    roles = m.param_roles()
    models.check_roles(m)
    assert roles["conv1.weight"] == "input" and roles["fc.weight"] == "output"
    for n, p in m.named_parameters():
        if p.dim() == 4 and n != "conv1.weight":
            assert roles[n] == "hidden", n
        if p.dim() == 1:
            assert roles[n] == "bias_norm", n


def test_no_residual_has_no_skip_path():
    """Zero every block's second conv: a plain net's output no longer depends on the input."""
    for residual in (True, False):
        m = _build(residual=residual, batch_norm=False)
        with torch.no_grad():
            for b in m.modules():
                if isinstance(b, BasicBlock):
                    b.conv2.weight.zero_()
                    b.conv2.bias.zero_()
        out = m(torch.randn(5, 64))
        if residual:
            assert (out - out[0]).abs().max() > 1e-4
        else:
            assert torch.equal(out, m.fc.bias.expand(5, -1))


def test_plain_block_is_basic_block_without_shortcut():
    torch.manual_seed(0)
    blk = PlainBlock(4, 4, stride=1).eval()
    x = torch.randn(2, 4, 6, 6)
    ref = F.relu(blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x))))))
    assert torch.allclose(blk(x), ref)


def _out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 20, 15)])
def test_conv_input_sizes_match_the_arithmetic(shape):
    m = ResNet18(n_classes=10, input_shape=shape, width=4)
    hw = m.conv_input_hw()
    specs = m.conv_specs()
    h, w = shape[1:]
    assert hw["conv1.weight"] == (h, w) and hw["layer1.0.conv1.weight"] == (h, w)
    for i, stride in zip(range(1, 5), (1, 2, 2, 2)):
        stage_in = hw[f"layer{i}.0.conv1.weight"]
        mid = (_out(stage_in[0], 3, stride, 1), _out(stage_in[1], 3, stride, 1))
        assert hw[f"layer{i}.0.conv2.weight"] == mid
        assert hw[f"layer{i}.1.conv1.weight"] == mid == hw[f"layer{i}.1.conv2.weight"]
        if stride == 2:
            assert hw[f"layer{i}.0.downsample.0.weight"] == stage_in
            assert specs[f"layer{i}.0.downsample.0.weight"]["stride"] == (2, 2)
            assert specs[f"layer{i}.0.downsample.0.weight"]["padding"] == (0, 0)
        if i < 4:
            assert hw[f"layer{i + 1}.0.conv1.weight"] == mid
    assert specs["layer2.0.conv1.weight"] == {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
                                              "input_hw": hw["layer2.0.conv1.weight"]}
    assert set(specs) == {n for n, p in m.named_parameters() if p.dim() == 4}


def test_bad_arguments():
    with pytest.raises(ValueError, match="input_dim=65 does not match"):
        ResNet18(input_dim=65, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        ResNet18(input_dim=64)
    assert ResNet18(input_dim=48, in_channels=3, width=2).input_shape == (3, 4, 4)
    with pytest.raises(ValueError, match="width"):
        ResNet18(input_shape=(1, 8, 8), width=0)
    with pytest.raises(ValueError, match="allowed: mlp, resnet18"):
        models.build("resnet")


def test_layer_metrics_treat_each_kernel_as_one_layer():
    m = _build(batch_norm=False)
    F.cross_entropy(m(torch.randn(6, 64)), torch.randint(0, 10, (6,))).backward()
    idx = LayerIndex.of(m)
    weights = [(n, p) for n, p in m.named_parameters() if p.dim() >= 2]
    assert len(idx) == len(weights) == 21
    assert idx.roles == ["input"] + ["hidden"] * 19 + ["output"]
    ref_g = torch.stack([p.grad.norm() for _, p in weights])
    ref_s = torch.stack([torch.linalg.svdvals(p.detach().reshape(p.shape[0], -1))[0] for _, p in weights])
    assert torch.allclose(layer_grad_norms(idx), ref_g, rtol=1e-5)
    assert torch.allclose(layer_sigma_max(idx), ref_s, rtol=1e-5)
    specs = m.conv_specs()
    ref_op = torch.stack([conv_operator_norm_dense(p, specs[n]).float() if p.dim() == 4 else ref_s[i]
                          for i, (n, p) in enumerate(weights)])
    assert torch.allclose(layer_sigma_max(idx, operator=True), ref_op, rtol=1e-4)
    assert torch.allclose(layer_sigma_max(idx, operator=True), ref_op, rtol=1e-4)  # warm vectors: still right


def _digits_images(n):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, torch.tensor(d.target[:n])


def _max_dense_operator_norm(m):
    specs = m.conv_specs()
    return max(conv_operator_norm_dense(p, specs[n]).item() for n, p in m.named_parameters() if p.dim() == 4)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("lr", [0.03, 0.3])
def test_quick_profile_sgd_sn_is_strict_against_dense_operators(residual, batch_norm, lr):
    """ResNet18(width=8) on digits as 1x8x8 images: sgd_sn (default: conv operator, strict) keeps
    every conv's exact dense operator norm at or below 1 + 1e-4 after every step, with batch norm
    too and at lr 0.3 (where the power-iteration form ends 16-20 of 20 convs above 1)."""
    x, y = _digits_images(256)
    m = _build(residual=residual, batch_norm=batch_norm)
    opt = optim.build("sgd_sn", m, lr=lr)
    assert opt.strict
    assert _max_dense_operator_norm(m) <= 1 + 1e-4
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = F.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert _max_dense_operator_norm(m) <= 1 + 1e-4


def test_power_form_with_batch_norm_at_large_lr_violates_and_the_probe_measures_it():
    """operator_power (not strict): with batch norm the conv weights are scale-invariant and move
    ~100% per step at lr 0.3; the carried power vector cannot follow and layers end above 1. The
    probe's Lanczos check measures them as the dense operator does."""
    x, y = _digits_images(256)
    m = _build(residual=True, batch_norm=True)
    opt = optim.build("sgd_sn", m, lr=0.3, sn_conv="operator_power")
    assert not opt.strict
    idx_layers = LayerIndex.of(m)
    specs = m.conv_specs()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
    dense = torch.stack([conv_operator_norm_dense(p, specs[n]) for n, p in m.named_parameters() if p.dim() == 4])
    measured = layer_sigma_max(idx_layers, operator=True)[:-1]  # the fc layer is last
    assert torch.allclose(measured.double(), dense, rtol=1e-3)
    assert (dense > 1 + 1e-4).sum() >= 3


def test_layer_index_operator_state_round_trip():
    m = _build(batch_norm=False)
    a = LayerIndex.of(m)
    layer_sigma_max(a, operator=True)
    b = LayerIndex.of(m)
    b.load_state_dict(a.state_dict())
    assert torch.equal(layer_sigma_max(a, operator=True), layer_sigma_max(b, operator=True))
    assert LayerIndex.of(m).state_dict() == {"operator": None}
    mlp = models.build("mlp", input_dim=5, n_classes=3, depth=2, width=4)
    assert LayerIndex.of(mlp).state_dict() == {"operator": None}
