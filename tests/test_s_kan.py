"""S-KAN: basis families, the selectable KAN layer, its three-phase schedule and pruning (paper slug: s-kan)."""
import math

import pytest
import torch
from torch import nn

from gradkit.nn.kan import (DEFAULT_FAMILIES, KANLayer, PrunedKANLayer, SelectableKANLayer, ThreePhaseSchedule,
                            kan_coefficient_count, prune_model, three_phase_schedule)
from gradkit.nn.kan_bases import BASIS_FAMILIES, BSplineBasis, ChebyshevBasis, make_basis, register_basis


def _x(n=16, d=3, scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n, d, generator=g, dtype=dtype) * 2 - 1) * scale)


def _perturb_logits(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.logits.add_(torch.randn(layer.logits.shape, generator=g, dtype=layer.logits.dtype))


# ------------------------------------------------------------------------------------------ bases
def test_bspline_partition_of_unity_and_zero_outside():
    b = make_basis("bspline", 2, grid=5, order=3).double()
    t = torch.linspace(-1, 1, 101, dtype=torch.float64)[:-1].unsqueeze(-1).expand(-1, 2)
    vals = b(t)
    assert vals.shape == (100, 2, 8)
    assert torch.allclose(vals.sum(-1), torch.ones(100, 2, dtype=torch.float64), atol=1e-12)
    assert (vals >= -1e-12).all()
    far = b(torch.full((3, 2), 3.0, dtype=torch.float64))
    assert far.abs().max() == 0


def test_bspline_matches_scipy():
    from scipy.interpolate import BSpline

    b = BSplineBasis(1, grid=4, order=2).double()
    t = torch.linspace(-0.99, 0.99, 37, dtype=torch.float64)
    knots = b.knots.double().numpy()
    ref = torch.stack([torch.from_numpy(BSpline.basis_element(knots[r:r + 4], extrapolate=False)(t.numpy()))
                       for r in range(b.size)], -1).nan_to_num(0.0)
    assert torch.allclose(b(t[:, None])[:, 0], ref, atol=1e-10)


def test_chebyshev_closed_form():
    b = ChebyshevBasis(1, degree=6, squash=None).double()
    theta = torch.linspace(0, math.pi, 25, dtype=torch.float64)
    vals = b(torch.cos(theta)[:, None])[:, 0]
    n = torch.arange(7, dtype=torch.float64)
    assert torch.allclose(vals, torch.cos(n * theta[:, None]), atol=1e-10)


def test_fourier_rbf_wavelet_values():
    t = torch.tensor([[0.25]], dtype=torch.float64)
    f = make_basis("fourier", 1, harmonics=2).double()(t)[0, 0]
    assert torch.allclose(f, torch.tensor([math.cos(math.pi / 4), math.cos(math.pi / 2),
                                           math.sin(math.pi / 4), math.sin(math.pi / 2)], dtype=torch.float64))
    r = make_basis("rbf", 1, centers=5, domain=(-2, 2)).double()(t)[0, 0]
    c = torch.linspace(-2, 2, 5, dtype=torch.float64)
    assert torch.allclose(r, torch.exp(-((0.25 - c) / 1.0) ** 2))
    w = make_basis("wavelet", 1, wavelets=1, scale=0.5).double()
    s = torch.tensor(0.5, dtype=torch.float64)  # (0.25 - 0) / 0.5
    assert torch.allclose(w(t)[0, 0, 0], (1 - s * s) * torch.exp(-s * s / 2))
    assert {n for n, _ in w.named_parameters()} == {"translation", "log_scale"}


@pytest.mark.parametrize("family", DEFAULT_FAMILIES)
def test_every_family_finite_far_outside_domain(family):
    b = make_basis(family, 3).double()
    vals = b(torch.tensor([[-3.0, 0.0, 3.0]], dtype=torch.float64))
    assert vals.shape == (1, 3, b.size) and torch.isfinite(vals).all()
    assert vals.abs().max() < 10


def test_register_basis_and_duplicates():
    class Const(BSplineBasis):
        family = "test_const"

    register_basis("test_const_family", Const)
    try:
        layer = SelectableKANLayer(2, 3, families=("test_const_family", "rbf"))
        assert layer(torch.rand(4, 2)).shape == (4, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_basis("test_const_family", Const)
    finally:
        BASIS_FAMILIES.remove("test_const_family")


# ------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("family", DEFAULT_FAMILIES)
def test_single_family_selectable_equals_kan_layer(family):
    torch.manual_seed(0)
    kan = KANLayer(3, 4, family).double()
    sel = SelectableKANLayer(3, 4, families=(family,)).double()
    sel.load_state_dict({"bases.0." + k[len("basis."):] if k.startswith("basis.") else
                         ("coefs.0" if k == "coef" else k): v
                         for k, v in kan.state_dict().items()} | {"logits": sel.logits, "mask": sel.mask})
    x = _x(10, 3, scale=2.0)
    assert torch.allclose(sel(x), kan(x), atol=1e-12)


def test_kan_layer_closed_form_chebyshev():
    layer = KANLayer(1, 1, "chebyshev", base_activation=None, bias=False,
                     basis_options={"degree": 3, "squash": None}).double()
    with torch.no_grad():
        layer.coef.copy_(torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=torch.float64))  # T_3
    t = torch.linspace(-1, 1, 11, dtype=torch.float64)[:, None]
    assert torch.allclose(layer(t), 4 * t ** 3 - 3 * t, atol=1e-12)


def test_uniform_selection_at_init_and_entropy():
    layer = SelectableKANLayer(2, 3)
    a = layer.selection_weights()
    assert a.shape == (3, 5) and torch.allclose(a, torch.full((3, 5), 0.2))
    assert layer.entropy().item() == pytest.approx(3 * math.log(5), rel=1e-5)
    layer.select_topk(1)
    assert layer.entropy().item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("granularity", ["node", "edge", "layer"])
@pytest.mark.parametrize("normalize", ["softmax", "none"])
@pytest.mark.parametrize("k", [1, 2])
def test_topk_then_prune_keeps_outputs(granularity, normalize, k):
    torch.manual_seed(0)
    layer = SelectableKANLayer(3, 4, granularity=granularity, normalize=normalize).double()
    _perturb_logits(layer)
    x = _x(20, 3, scale=3.0)  # far outside [-1, 1] too
    weights = layer.selection_weights()
    layer.select_topk(k)
    kept = layer.selection_weights()
    assert ((kept != 0).sum(-1) == k).all()
    if normalize == "softmax":
        assert torch.allclose(kept.sum(-1), torch.ones_like(kept.sum(-1)))
        assert torch.equal(kept.argmax(-1), weights.argmax(-1))
    masked = layer(x)
    small = layer.prune()
    assert isinstance(small, PrunedKANLayer)
    assert torch.allclose(small(x), masked, atol=1e-10)
    assert small.coefficient_count() < layer.coefficient_count()


def test_prune_drops_coefficients_per_node():
    torch.manual_seed(0)
    layer = SelectableKANLayer(2, 6)
    _perturb_logits(layer)
    small = layer.select_topk(1).prune()
    sizes = {f: b.size for f, b in zip(layer.families, layer.bases)}
    chosen = layer.selected_families()
    assert small.coefficient_count() == sum(2 * sizes[f] for f in chosen)
    assert sum(layer.family_usage().values()) == 6
    assert set(small.families) == set(chosen)


def test_gradients_reach_every_family_and_logits():
    torch.manual_seed(0)
    layer = SelectableKANLayer(2, 3, granularity="edge").double()
    _perturb_logits(layer)
    layer(_x(8, 2)).pow(2).sum().backward()
    for c in layer.coefs:
        assert c.grad is not None and c.grad.abs().sum() > 0
    assert layer.logits.grad.abs().sum() > 0
    assert layer.bases[DEFAULT_FAMILIES.index("wavelet")].translation.grad.abs().sum() > 0


def test_gradcheck_selectable_layer():
    torch.manual_seed(0)
    layer = SelectableKANLayer(2, 2).double()
    _perturb_logits(layer)
    x = _x(4, 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, s: torch.func.functional_call(layer, {"logits": s}, (x,)),
                                    (x, layer.logits.detach().clone().requires_grad_(True)))


def test_three_phase_schedule_in_training_loop():
    torch.manual_seed(0)
    model = nn.Sequential(SelectableKANLayer(1, 4), SelectableKANLayer(4, 1))
    sched = three_phase_schedule(model, total_steps=10, fractions=(0.5, 0.3, 0.2), k=1)
    x = torch.rand(32, 1) * 2 - 1
    y = torch.sin(math.pi * x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    events = {}
    for step in range(10):
        event = sched(step)
        if event:
            events[event] = step
        if event == "prune":
            before = model(x)
            assert all(isinstance(m, PrunedKANLayer) for m in model)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        assert sched.phase(step) == (1 if step < 5 else 2 if step < 8 else 3)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert events == {"select": 5, "prune": 8}
    assert torch.isfinite(before).all()
    assert kan_coefficient_count(model) <= 4 * 8 + 4 * 8


def test_prune_model_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(SelectableKANLayer(2, 3), nn.Tanh(), SelectableKANLayer(3, 1)).double()
    for m in model:
        if isinstance(m, SelectableKANLayer):
            _perturb_logits(m)
            m.select_topk(2)
    x = _x(9, 2)
    before = model(x)
    prune_model(model)
    assert isinstance(model[0], PrunedKANLayer) and isinstance(model[2], PrunedKANLayer)
    assert torch.allclose(model(x), before, atol=1e-10)


def test_float32_and_no_grad():
    layer = SelectableKANLayer(3, 2)
    with torch.no_grad():
        y = layer(torch.rand(5, 7, 3))
    assert y.shape == (5, 7, 2) and y.dtype == torch.float32


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_family():
    with pytest.raises(ValueError, match=r"family must be one of .*'bspline'.*got 'spline'"):
        KANLayer(2, 3, family="spline")
    with pytest.raises(ValueError, match="got 'legendre'"):
        SelectableKANLayer(2, 3, families=("bspline", "legendre"))


def test_topk_larger_than_pool():
    layer = SelectableKANLayer(2, 3, families=("bspline", "rbf"))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 2\], got 3"):
        layer.select_topk(3)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 2\], got 3"):
        ThreePhaseSchedule(nn.Sequential(layer), total_steps=10, k=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"families": ()}, "families must be a non-empty sequence"),
    ({"families": "bspline"}, "families must be a non-empty sequence"),
    ({"families": ("rbf", "rbf")}, "must not repeat"),
    ({"granularity": "neuron"}, "granularity must be one of"),
    ({"normalize": "sigmoid"}, "normalize must be one of"),
    ({"tau": 0.0}, "tau must be finite and > 0, got 0.0"),
    ({"basis_options": {"chebychev": {}}}, "basis_options must be keyed"),
    ({"base_activation": "relu"}, "base_activation must be one of"),
])
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectableKANLayer(2, 3, **kwargs)


def test_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match="d_in must be a positive int, got 0"):
        KANLayer(0, 3)
    with pytest.raises(ValueError, match="grid must be a positive int, got 0"):
        KANLayer(2, 3, basis_options={"grid": 0})
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\), got \(4, 3\)"):
        SelectableKANLayer(2, 3)(torch.rand(4, 3))
    with pytest.raises(ValueError, match="domain must be a pair"):
        make_basis("rbf", 2, domain=(1.0, -1.0))


def test_bad_schedule_arguments():
    model = nn.Sequential(SelectableKANLayer(1, 2))
    with pytest.raises(ValueError, match="fractions must be three numbers"):
        three_phase_schedule(model, 10, fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        three_phase_schedule(model, 0)
    with pytest.raises(ValueError, match="at least one SelectableKANLayer"):
        three_phase_schedule(nn.Linear(2, 2), 10)
