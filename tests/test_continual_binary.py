"""continual-binary: field-binary layers, the exact binary KL, the variational continual objective,
the perceptron's -log H loss, the beta schedule and the metaplasticity baseline."""
import copy
import math

import pytest
import torch
from torch import nn

from gradkit.functional.field_kl import FieldKL, binary_field_kl, log_cosh
from gradkit.nn.binary import BinaryLinear
from gradkit.nn.field_binary import (FieldBinaryLinear, binary_perceptron_logH_loss, field_kl, field_mode,
                                     field_modules, field_thetas, set_field_beta)
from gradkit.optim.metaplastic import MetaplasticAdam, metaplastic_factor
from gradkit.optim.variational_continual import VariationalContinual
from gradkit.schedules.field_beta import field_beta


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ KL
def test_field_kl_function_gradcheck_float64():
    theta = torch.randn(5, 3, dtype=torch.float64, generator=_gen(), requires_grad=True)
    ref = torch.randn(5, 3, dtype=torch.float64, generator=_gen(1))
    assert torch.autograd.gradcheck(lambda t: FieldKL.apply(t, ref, 1.7), (theta,))
    assert torch.autograd.gradgradcheck(lambda t: FieldKL.apply(t, ref, 1.7), (theta,))


def test_field_kl_gradient_is_the_analytic_one():
    theta = torch.randn(200, dtype=torch.float64, generator=_gen(), requires_grad=True)
    ref = torch.randn(200, dtype=torch.float64, generator=_gen(1))
    beta = 2.3
    field_kl(theta, ref, beta=beta).backward()
    m = torch.tanh(beta * theta.detach())
    expected = beta ** 2 * (theta.detach() - ref) * (1 - m * m)
    torch.testing.assert_close(theta.grad, expected, rtol=1e-6, atol=1e-9)
    # the autograd of the plain formula agrees with the Function's closed-form backward
    t2 = theta.detach().clone().requires_grad_()
    bt, br = beta * t2, beta * ref
    ((bt - br) * torch.tanh(bt) - torch.log(torch.cosh(bt)) + torch.log(torch.cosh(br))).sum().backward()
    torch.testing.assert_close(theta.grad, t2.grad, rtol=1e-6, atol=1e-9)


def test_field_kl_equals_the_kl_of_the_two_distributions():
    """Closed form against KL = sum_w q(w) log(q(w) / q'(w)) over w in {-1, +1}, weight by weight."""
    theta = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
    ref = torch.tensor([-0.5, -1.0, 0.0, 0.7], dtype=torch.float64)
    beta = 1.5

    def probs(t):
        p_plus = torch.exp(beta * t) / (2 * torch.cosh(beta * t))
        return torch.stack([p_plus, 1 - p_plus])

    q, r = probs(theta), probs(ref)
    direct = (q * torch.log(q / r)).sum()
    torch.testing.assert_close(field_kl(theta, ref, beta=beta), direct, rtol=1e-10, atol=1e-12)


def test_field_kl_nonnegative_and_zero_only_at_the_reference():
    g = _gen(3)
    for _ in range(20):
        a = 3 * torch.randn(50, dtype=torch.float64, generator=g)
        b = 3 * torch.randn(50, dtype=torch.float64, generator=g)
        assert field_kl(a, b, beta=0.7) > 0
        assert field_kl(a, a.clone(), beta=0.7) == 0
    big = torch.tensor([60.0, -80.0])  # saturated fields: no overflow, KL still finite and >= 0
    kl = field_kl(big, torch.tensor([-60.0, 80.0]), beta=5.0)
    assert torch.isfinite(kl) and kl > 0


def test_log_cosh_is_stable_and_exact():
    x = torch.tensor([-1000.0, -3.0, 0.0, 0.5, 1000.0], dtype=torch.float64)
    out = log_cosh(x)
    torch.testing.assert_close(out[1:4], torch.log(torch.cosh(x[1:4])))
    torch.testing.assert_close(out[[0, 4]], torch.tensor([1000 - math.log(2)] * 2, dtype=torch.float64))


def test_field_kl_on_models_uses_each_layers_beta_and_snapshots():
    net = nn.Sequential(FieldBinaryLinear(6, 5), nn.ReLU(), FieldBinaryLinear(5, 3))
    net[0].beta, net[2].beta = 2.0, 0.5
    ref = [torch.zeros_like(m.theta) for m in field_modules(net)]
    expected = binary_field_kl(net[0].theta, ref[0], 2.0) + binary_field_kl(net[2].theta, ref[1], 0.5)
    torch.testing.assert_close(field_kl(net, ref), expected)
    snap = field_thetas(net)
    assert field_kl(net, snap) == 0
    assert not snap[0].requires_grad


def test_field_kl_errors():
    with pytest.raises(ValueError, match="reference\\[0\\] must have shape"):
        field_kl(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="reference must hold 2"):
        field_kl([torch.zeros(3), torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        field_kl(torch.zeros(3), torch.zeros(3), beta=0.0)
    with pytest.raises(ValueError, match="no FieldBinaryLinear"):
        field_kl(nn.Linear(2, 2), [torch.zeros(2, 2)])
    with pytest.raises(TypeError, match="current must be"):
        field_kl("theta", torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        binary_field_kl(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ layer
def test_gaussian_preactivation_matches_sampled_binary_weights():
    """Monte-Carlo mean/variance of sum_i w_i x_i with w ~ q match (mu, V) for N = 1000 to 2%."""
    torch.manual_seed(0)
    n, draws = 1000, 4000
    layer = FieldBinaryLinear(n, 1, beta=1.0, dtype=torch.float64)
    with torch.no_grad():
        layer.theta.normal_(0.4, 1.0, generator=_gen(1))
    x = torch.randn(n, dtype=torch.float64, generator=_gen(2)).abs()  # mu clearly away from 0
    m = layer.mean_weight().detach()[0]
    mu, var = float(m @ x), float((1 - m * m) @ (x * x))
    g = _gen(4)
    h = torch.stack([layer.sample_weight(g)[0] @ x for _ in range(draws)])
    assert abs(float(h.mean()) - mu) < 0.02 * abs(mu)
    assert abs(float(h.var()) - var) < 0.1 * var  # the variance of a variance estimate at 4000 draws is ~2.2%
    # the layer's Gaussian forward (fresh eps per row) has the same moments, scaled by 1/sqrt(N)
    with torch.no_grad():
        z = layer(x.expand(draws, n)).squeeze(1) * math.sqrt(n)
    assert abs(float(z.mean()) - mu) < 0.02 * abs(mu)
    assert abs(float(z.var()) - var) < 0.1 * var


def test_map_and_sample_modes():
    layer = FieldBinaryLinear(16, 4, mode="map")
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ torch.where(layer.theta >= 0, 1.0, -1.0).T / 4.0)
    layer.mode = "sample"
    w = layer.sample_weight(_gen())
    assert set(w.unique().tolist()) <= {-1.0, 1.0}
    assert not layer(x).requires_grad
    layer.mode = "gaussian"
    layer(x).sum().backward()
    assert layer.theta.grad is not None and torch.isfinite(layer.theta.grad).all()
    assert "beta=1" in repr(layer)


def test_saturated_fields_give_finite_gradients():
    layer = FieldBinaryLinear(8, 3, beta=50.0)
    with torch.no_grad():
        layer.theta.mul_(100.0)
    layer(torch.randn(5, 8)).square().sum().backward()
    assert torch.isfinite(layer.theta.grad).all()


def test_field_mode_restores_even_when_the_block_raises():
    net = nn.Sequential(FieldBinaryLinear(4, 4), nn.ReLU(), FieldBinaryLinear(4, 2, mode="sample"))
    with pytest.raises(RuntimeError, match="boom"):
        with field_mode(net, "map"):
            assert [m.mode for m in field_modules(net)] == ["map", "map"]
            raise RuntimeError("boom")
    assert [m.mode for m in field_modules(net)] == ["gaussian", "sample"]


def test_set_field_beta_and_layer_errors():
    net = nn.Sequential(FieldBinaryLinear(4, 4), nn.ReLU(), FieldBinaryLinear(4, 2))
    assert set_field_beta(net, 3.0) == 2 and net[2].beta == 3.0
    with pytest.raises(ValueError, match="beta must be finite and > 0, got -1"):
        set_field_beta(net, -1)
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        FieldBinaryLinear(0, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        FieldBinaryLinear(3, 3, mode="mean")
    with pytest.raises(ValueError, match="x must have 3 features"):
        FieldBinaryLinear(3, 2)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        field_modules("net")


# ------------------------------------------------------------------------------------------ perceptron
def test_perceptron_loss_is_minus_log_H():
    g = _gen(5)
    theta = torch.randn(30, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randint(0, 2, (40, 30), generator=g).double() * 2 - 1
    y = torch.randint(0, 2, (40,), generator=g).double() * 2 - 1
    beta = 1.3
    m = torch.tanh(beta * theta)
    u = -y * (x @ m) / torch.sqrt((x * x) @ (1 - m * m))
    naive = -torch.log(0.5 * torch.erfc(u / math.sqrt(2))).mean()  # H(u) = erfc(u / sqrt 2) / 2
    torch.testing.assert_close(binary_perceptron_logH_loss(theta, x, y, beta=beta), naive)
    assert torch.autograd.gradcheck(lambda t: binary_perceptron_logH_loss(t, x, y, beta=beta), (theta,))
    zero = torch.zeros(30, requires_grad=True)
    assert binary_perceptron_logH_loss(zero, x.float(), y.float()).item() == pytest.approx(math.log(2), rel=1e-6)


def test_perceptron_loss_stable_for_confident_mistakes():
    theta = torch.full((50,), 3.0, requires_grad=True)  # m ~ 1, V tiny: a huge negative margin
    x = torch.ones(2, 50)
    loss = binary_perceptron_logH_loss(theta, x, torch.tensor([-1.0, -1.0]), reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and loss > 100 and torch.isfinite(theta.grad).all()


def test_perceptron_loss_errors():
    theta, x = torch.zeros(4), torch.ones(3, 4)
    with pytest.raises(ValueError, match="y must hold labels in \\{-1, \\+1\\}, got 1 other value"):
        binary_perceptron_logH_loss(theta, x, torch.tensor([1.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="x must have shape \\(B, 4\\)"):
        binary_perceptron_logH_loss(theta, torch.ones(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match="y must have shape \\(3,\\)"):
        binary_perceptron_logH_loss(theta, x, torch.ones(2))
    with pytest.raises(ValueError, match="theta must be 1-D"):
        binary_perceptron_logH_loss(torch.zeros(2, 2), x, torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        binary_perceptron_logH_loss(theta, x, torch.ones(3), reduction="max")


# ------------------------------------------------------------------------------------------ objective
def test_variational_continual_task_reference():
    torch.manual_seed(0)
    net = nn.Sequential(FieldBinaryLinear(5, 4, beta=2.0))
    vc = VariationalContinual(net, reference="task", kl_weight=0.5)
    # first task: the uniform prior theta = 0
    torch.testing.assert_close(vc.penalty(), 0.5 * field_kl(net, [torch.zeros(4, 5)]))
    vc.end_task()
    assert vc.penalty().item() == 0.0 and vc.tasks_done == 1
    theta1 = net[0].theta.detach().clone()
    with torch.no_grad():
        net[0].theta.add_(0.3)
    vc.penalty().backward()
    m = torch.tanh(2.0 * net[0].theta.detach())
    torch.testing.assert_close(net[0].theta.grad, 0.5 * 4.0 * (net[0].theta.detach() - theta1) * (1 - m * m))
    vc.before_step()  # nothing for the task reference
    torch.testing.assert_close(vc.reference_thetas[0], theta1)
    assert "reference='task'" in repr(vc)


def test_variational_continual_step_reference_is_the_previous_step():
    torch.manual_seed(1)
    net = nn.Sequential(FieldBinaryLinear(6, 3))
    vc = VariationalContinual(net, reference="step", kl_weight=1.0)
    assert vc.penalty().item() == 0.0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = net[0].theta.detach().clone()
    net(torch.randn(4, 6)).sum().backward()
    vc.before_step()
    opt.step()
    opt.zero_grad()
    vc.penalty().backward()
    delta = net[0].theta.detach() - before
    m = torch.tanh(net[0].theta.detach())
    torch.testing.assert_close(net[0].theta.grad, delta * (1 - m * m))  # beta^2 sigma delta, as the official code


def test_variational_continual_errors():
    net = nn.Sequential(FieldBinaryLinear(2, 2))
    with pytest.raises(ValueError, match="reference must be one of \\('task', 'step'\\), got 'epoch'"):
        VariationalContinual(net, reference="epoch")
    with pytest.raises(ValueError, match="kl_weight must be finite and >= 0"):
        VariationalContinual(net, kl_weight=-1.0)
    with pytest.raises(ValueError, match="no FieldBinaryLinear"):
        VariationalContinual(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        VariationalContinual([net])


# ------------------------------------------------------------------------------------------ schedule
def test_field_beta_schedule():
    assert field_beta(1, 25) == pytest.approx(10 * math.tanh(0.1 + 2 / 25))
    values = [field_beta(s, 25) for s in range(1, 26)]
    assert all(b > a for a, b in zip(values, values[1:])) and values[-1] < 10
    with pytest.raises(ValueError, match="epoch must be a positive int, got 0"):
        field_beta(0, 25)
    with pytest.raises(ValueError, match="offset must make beta > 0"):
        field_beta(1, 25, offset=-1.0)


# ------------------------------------------------------------------------------------------ metaplasticity
def test_metaplastic_adam_without_meta_is_adam():
    torch.manual_seed(2)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.Adam(a.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=1e-3)
    ob = MetaplasticAdam(b.parameters(), lr=0.01, betas=(0.9, 0.99), m_meta=0.0, weight_decay=1e-3)
    x = torch.randn(8, 5)
    for _ in range(5):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_metaplastic_adam_scales_only_steps_towards_zero():
    m_meta = 1.3
    w = torch.tensor([2.0, 2.0, -1.0, -1.0], requires_grad=True)
    opt = MetaplasticAdam([w], lr=0.1, m_meta=m_meta)
    w.grad = torch.tensor([1.0, -1.0, -1.0, 1.0])  # towards 0, away, towards 0, away
    start = w.detach().clone()
    opt.step()
    # Adam's first step is -lr * sign(g) (up to eps); towards zero it is scaled by 1 - tanh^2(m |w|)
    f = metaplastic_factor(start, m_meta)
    expected = start - 0.1 * torch.sign(w.grad) * torch.tensor([f[0], 1.0, f[2], 1.0])
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


def test_metaplastic_adam_state_dict_round_trip_and_binary_layers():
    torch.manual_seed(3)
    layer = BinaryLinear(6, 2, estimator="ste", binarize_act=False, scale=None)
    opt = MetaplasticAdam(layer.parameters(), lr=0.05)
    x = torch.randn(4, 6)
    for _ in range(3):
        opt.zero_grad()
        layer(x).sum().backward()
        opt.step()
    twin = BinaryLinear(6, 2, estimator="ste", binarize_act=False, scale=None)
    twin.load_state_dict(layer.state_dict())
    opt2 = MetaplasticAdam(twin.parameters(), lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # the live dict shares opt's tensors
    for net, o in ((layer, opt), (twin, opt2)):
        o.zero_grad()
        net(x).sum().backward()
        o.step()
    torch.testing.assert_close(layer.weight, twin.weight)


def test_metaplastic_adam_errors():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="m_meta must be finite and >= 0, got -1"):
        MetaplasticAdam(p, m_meta=-1.0)
    with pytest.raises(ValueError, match="betas must be a pair of numbers in \\[0, 1\\)"):
        MetaplasticAdam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        MetaplasticAdam(p, lr=float("nan"))
