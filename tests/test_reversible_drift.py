"""Drift check of reversible chains: long float32 chains are caught, gradients stay right."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.functional.reversible import DriftMonitor, MultiLevelReversibleFunction, ReversibleStep
from gradkit.nn.revcol import RevColNet
from gradkit.nn.reversible import ReversibleBlock, ReversibleSequential
from gradkit.testing import param_grads


def _net(columns, dtype, **kw):
    torch.manual_seed(0)
    return RevColNet(1, 10, channels=(4, 8), blocks=(1, 1), num_columns=columns, stem=2, strict=True,
                     alpha_init=kw.pop("alpha_init", 0.5), **kw).to(dtype)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _loss(x, y):
    return lambda m: F.cross_entropy(m(x), y)


def test_monitor_validates_tol():
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="tol"):
            DriftMonitor(bad)


def test_short_float64_chain_records_tiny_drift_and_keeps_reconstructing():
    net = _net(3, torch.float64)
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    net(x).sum().backward()
    mon = net.columns.drift
    assert mon.checks == 1 and mon.trips == 0 and mon.last < 1e-10


def test_drift_above_tol_warns_recomputes_exact_grads_and_falls_back():
    # tiny alphas make the inverse amplify round-off by 1/alpha per column: float32 drifts far
    net = _net(8, torch.float32, alpha_init=0.01)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    net.reversible = False
    ref = param_grads(net, _loss(x, y))
    net.reversible = True
    with pytest.warns(RuntimeWarning, match="drifted"):
        got = param_grads(net, _loss(x, y))
    mon = net.columns.drift
    assert mon.tripped and mon.last > mon.tol
    assert max(_rel(got[k], ref[k]) for k in ref if ref[k].abs().max() > 0) < 1e-4
    # the unchecked chain is really wrong here: the check is what keeps the gradient right
    bare = _net(8, torch.float32, alpha_init=0.01, drift_tol=None)
    bad = param_grads(bare, _loss(x, y))
    assert max(_rel(bad[k], ref[k]) for k in ref if ref[k].abs().max() > 0) > 1e-2
    # next calls store each column's outputs: one inversion per column, no new warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = param_grads(net, _loss(x, y))
    assert max(_rel(again[k], ref[k]) for k in ref if ref[k].abs().max() > 0) < 1e-2
    mon.reset()
    assert not mon.tripped and mon.checks == 0


def test_probe_drift_on_chains_without_a_first_step():
    torch.manual_seed(0)
    blocks = [ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4), split_dim=-1) for _ in range(3)]
    seq = ReversibleSequential(*blocks).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    seq(x).sum().backward()
    assert seq.drift.checks == 1 and seq.drift.last < 1e-12


def test_drift_probe_of_strided_views_and_the_drift_formula():
    from gradkit.functional.reversible import PROBE_SIZE, _probe, _rel_drift

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, 5, 7, generator=g)
    half = x.chunk(2, dim=1)[1]  # a strided view, as the halves of a coupling are
    _, ref = _probe(half)
    flat = half.contiguous().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, PROBE_SIZE).long()
    assert torch.equal(ref, flat[idx])
    x.mul_(2)  # the probe is a copy
    assert torch.equal(ref, flat[idx])
    got = ref + 1e-3 * torch.randn(ref.shape, generator=g)
    naive = float((got - ref).abs().max() / ref.abs().max())
    assert _rel_drift(got, ref) == pytest.approx(naive, rel=1e-6)
    assert math.isnan(_rel_drift(torch.full_like(ref, float("nan")), ref))
    assert math.isnan(_rel_drift(ref, torch.full_like(ref, float("nan"))))
    assert _rel_drift(torch.ones(3), torch.zeros(3)) > 1e30  # zero reference: floored denominator
    i0, r0 = _probe(torch.tensor(2.0))
    assert i0.tolist() == [0] and r0.tolist() == [2.0]


@pytest.mark.parametrize("sizes", [(64, 64), (300, 40)])  # probes of equal length measured together, or not
def test_probes_drift_native_and_torch_paths_agree(sizes):
    from gradkit import _native
    from gradkit.functional.reversible import _probe, _probes_drift, _rel_drift

    g = torch.Generator().manual_seed(1)
    states = [torch.randn(n, generator=g) for n in sizes]
    probes = [_probe(t) for t in states]
    rebuilt = [t + 1e-4 * (i + 1) * torch.randn(t.shape, generator=g) for i, t in enumerate(states)]
    want = max(_rel_drift(torch.take(t, idx), ref) for (idx, ref), t in zip(probes, rebuilt))
    got = _probes_drift(probes, rebuilt)
    with _native.disabled():
        got_torch = _probes_drift(probes, rebuilt)
    assert got == pytest.approx(want, rel=1e-5) and got_torch == pytest.approx(want, rel=1e-5)
    rebuilt[1][0] = float("nan")  # probed entry 0: the drift is NaN, and a NaN drift trips a monitor
    assert math.isnan(_probes_drift(probes, rebuilt))
    with _native.disabled():
        assert math.isnan(_probes_drift(probes, rebuilt))
    assert DriftMonitor(1e-3).record(float("nan"))


def test_inexact_chain_without_saved_input_warns_and_stores_activations_next():
    torch.manual_seed(0)

    class Big(nn.Module):  # float32 round-off alone exceeds a 1e-12 tolerance
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4) * 3)

        def forward(self, h):
            return torch.tanh(h @ self.w) * 50

    seq = ReversibleSequential(*[ReversibleBlock(Big(), Big(), split_dim=-1) for _ in range(12)], drift_tol=1e-12)
    x = torch.randn(3, 8, requires_grad=True) * 1e3
    with pytest.warns(RuntimeWarning, match="inexact"):
        seq(x).sum().backward()
    assert seq.drift.tripped
    x2 = torch.randn(3, 8, requires_grad=True)
    out = seq(x2)
    assert out.grad_fn is not None and "MultiLevelReversible" not in type(out.grad_fn).__name__


def test_run_rejects_a_monitor_of_the_wrong_type():
    step = ReversibleStep([nn.Identity()], None)
    with pytest.raises(TypeError, match="monitor"):
        MultiLevelReversibleFunction.run([step], torch.randn(2), [None], monitor=1e-3)
