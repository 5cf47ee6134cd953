"""The spectral projection's shared buffer: a same-shape group of parameters is moved into one
contiguous buffer so the projection reads and scales it as one batch with no copy.

Checked: the parameters really become views of one buffer (same objects, same values); every mode
and sigma source gives the same weights through that view as through the concatenate-and-write-back
path it replaces (forced by moving the parameters out of the buffer, as ``module.to`` would); and
after such a move the projection still projects (it notices and falls back to copying).
"""

import pytest
import torch

from conftest import one_thread_fixture
from optlab.optim.projected import Projected
from optlab.optim.spectral import SpectralProjection, _shared_view

one_thread = pytest.fixture(autouse=True)(one_thread_fixture)


def _model(seed=0):
    """Separate same-shape Linear layers (optlab's deep MLP already keeps its hidden stack in one tensor)."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(10, 24)]
    for _ in range(5):
        layers += [torch.nn.Tanh(), torch.nn.Linear(24, 24)]
    layers += [torch.nn.Tanh(), torch.nn.Linear(24, 4)]
    with torch.no_grad():
        for lin in layers[::2]:
            lin.weight.mul_(3.0)  # start above sigma 1, so the projection acts
    return torch.nn.Sequential(*layers)


def _mats(model):
    return [m.weight for m in model if isinstance(m, torch.nn.Linear)]


def test_group_becomes_views_of_one_buffer_with_the_same_values():
    model = _model()
    mats = _mats(model)
    before = [p.detach().clone() for p in mats]
    ids = [id(p) for p in mats]
    proj = SpectralProjection(mats, mode="scale", sigma="exact")
    assert [id(p) for p in mats] == ids  # same Parameter objects: an optimizer built earlier still holds them
    assert all(torch.equal(p, b) for p, b in zip(mats, before))
    big = max(proj.groups, key=len)
    assert len(big) >= 4
    w, view = SpectralProjection._batch(big)
    assert view and w.shape[0] == len(big)
    assert all(p.untyped_storage().data_ptr() == big[0].untyped_storage().data_ptr() for p in big)
    w[2].mul_(0.5)  # writing the batch writes the parameter
    assert torch.equal(big[2].detach(), before[next(i for i, p in enumerate(mats) if p is big[2])] * 0.5)


def _unshare(params):
    for p in params:
        p.data = p.data.clone()  # what module.to(other device) does to each parameter


@pytest.mark.parametrize("mode,sigma,inner", [("clip_sv", "exact", "sgd"), ("scale", "exact", "sgd"),
                                              ("normalize", "power", "sgd"), ("scale", "power", "sgd"),
                                              ("scale", "bound", "sgd"), ("scale", "bound", "adam")])
def test_view_path_equals_the_copy_path(mode, sigma, inner):
    runs = []
    for shared in (True, False):
        model = _model(seed=4)
        mats = _mats(model)
        proj = SpectralProjection(mats, mode=mode, sigma=sigma, refresh=3)
        if not shared:
            _unshare(mats)
            assert all(_shared_view(g) is None for g in proj.groups if len(g) > 1)
        make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.4), "adam": lambda ps: torch.optim.Adam(ps, lr=0.05)}[inner]
        opt = Projected(make(list(model.parameters())), [proj])
        opt.project()
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            x, y = torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in mats])
        top = max(float(torch.linalg.svdvals(p.detach().double())[0]) for p in mats)
        if proj.strict:
            assert top <= 1 + 1e-5
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_projection_still_projects_after_the_parameters_move():
    model = _model(seed=2)
    mats = _mats(model)
    proj = SpectralProjection(mats, mode="scale", sigma="exact")
    _unshare(mats)
    with torch.no_grad():
        for p in mats:
            p.mul_(3.0)
    proj.project()
    assert max(float(torch.linalg.svdvals(p.detach().double())[0]) for p in mats) <= 1 + 1e-5
