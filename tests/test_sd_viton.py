"""sd-viton: flow warps, erase warp, Jacobian determinant, gradient-conflict probe, cascaded flow and routing."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradkit._validate import ArgumentError
from gradkit.data.garments import garment_pairs
from gradkit.functional.flow_warp import (erase_z_loss, identity_grid, jacobian_det, normalize_flow, upsample_flow,
                                          warp2d, warp_with_erase)
from gradkit.nn.sequential_deformation import CascadedFlow, LossRouting, compose_flows
from gradkit.privacy.matching import total_variation
from gradkit.probes.gradient_conflict import GradientConflictProbe, gradient_cosine


def _img(n=2, c=3, h=8, w=9, dtype=torch.float64):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0), dtype=dtype)


# ------------------------------------------------------------------------------------------ warps
def test_zero_flow_is_identity_and_integer_shift_is_exact():
    x = _img()
    assert torch.allclose(warp2d(x, torch.zeros(2, 2, 8, 9, dtype=x.dtype)), x, atol=1e-12)
    flow = torch.zeros(2, 2, 8, 9, dtype=x.dtype)
    flow[:, 0] = 1.0  # out(p) = x(p + (1, 0))
    y = warp2d(x, flow)
    assert torch.allclose(y[..., :-1], x[..., 1:], atol=1e-12)
    assert torch.all(y[..., -1] == 0)


def test_erase_warp_dz0_equals_warp2d_and_dz2_erases():
    x = _img(dtype=torch.float32)
    xy = torch.randn(2, 2, 8, 9, generator=torch.Generator().manual_seed(1))
    keep = torch.cat((xy, torch.zeros(2, 1, 8, 9)), 1)
    assert torch.allclose(warp_with_erase(x, keep), warp2d(x, xy), atol=1e-6)
    erase = torch.cat((xy, torch.full((2, 1, 8, 9), 2.0)), 1)
    assert warp_with_erase(x, erase).abs().max() < 1e-6
    half = torch.cat((torch.zeros(2, 2, 8, 9), torch.ones(2, 1, 8, 9)), 1)
    assert torch.allclose(warp_with_erase(x, half), 0.5 * x, atol=1e-6)


def test_warps_gradcheck_float64():
    x = _img(1, 1, 5, 6).requires_grad_()
    flow = (0.3 * torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.25)
    flow3 = torch.cat((flow, torch.full((1, 1, 5, 6), 0.4, dtype=torch.float64)), 1).requires_grad_()
    flow.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, f: warp2d(a, f, padding_mode="border"), (x, flow))
    assert torch.autograd.gradcheck(lambda a, f: warp_with_erase(a, f, padding_mode="border"), (x, flow3))


def test_jacobian_det_closed_forms():
    assert torch.allclose(jacobian_det(torch.zeros(1, 2, 6, 7)), torch.ones(1, 6, 7))
    assert torch.allclose(jacobian_det(torch.full((1, 2, 6, 7), 3.5)), torch.ones(1, 6, 7))
    s = 1.3
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    flow = torch.stack(((s - 1) * xs, (s - 1) * ys)).unsqueeze(0)  # sampling map p -> s p
    assert torch.allclose(jacobian_det(flow), torch.full((1, 6, 7), s * s), atol=1e-5)


def test_normalize_and_upsample_flow():
    flow = torch.ones(1, 2, 5, 9)
    g = normalize_flow(flow)
    assert g.shape == (1, 5, 9, 2)
    assert torch.allclose(g[..., 0], torch.full((1, 5, 9), 2 / 8)) and torch.allclose(g[..., 1], torch.full((1, 5, 9), 0.5))
    assert torch.allclose(upsample_flow(torch.ones(1, 2, 4, 4), 2), torch.full((1, 2, 8, 8), 2.0))
    grid = identity_grid(2, 3, 4)
    assert grid.shape == (2, 3, 4, 2) and grid[0, 0, 0].tolist() == [-1.0, -1.0]


def test_erase_z_loss_targets():
    roi = torch.tensor([[[1.0, 0.0]]])
    assert float(erase_z_loss(torch.tensor([[[0.0, 2.0]]]), roi)) == pytest.approx(0.0)
    assert float(erase_z_loss(torch.tensor([[[1.0, 1.0]]]), roi)) == pytest.approx(1.0)


def test_flow_shape_errors_are_clear():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ArgumentError, match=r"flow_px must have shape \(N, 2, H, W\), got shape \(2, 3, 8, 8\)"):
        warp2d(x, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ArgumentError, match="flow_px must match x's batch and size"):
        warp2d(x, torch.zeros(2, 2, 4, 8))
    with pytest.raises(ArgumentError, match=r"flow3d must have shape \(N, 3, H, W\)"):
        warp_with_erase(x, torch.zeros(2, 2, 8, 8))
    with pytest.raises(ArgumentError, match=r"x must have shape \(N, C, H, W\)"):
        warp2d(torch.rand(3, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ArgumentError, match="padding_mode"):
        warp2d(x, torch.zeros(2, 2, 8, 8), padding_mode="wrap")
    with pytest.raises(ArgumentError, match="at least 2x2"):
        jacobian_det(torch.zeros(1, 2, 1, 5))
    with pytest.raises(ArgumentError, match="scale must be a positive int, got 0"):
        upsample_flow(torch.zeros(1, 2, 4, 4), 0)
    with pytest.raises(ArgumentError, match="roi must have dz's shape"):
        erase_z_loss(torch.zeros(1, 4, 4), torch.zeros(1, 1, 4, 4))


# ------------------------------------------------------------------------------------------ probe
def _two_losses():
    w = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    a, b = (w ** 2).sum(), (w * torch.arange(5.0, dtype=torch.float64)).sum()
    return w, a, b


def test_gradient_cosine_matches_manual_and_leaves_grad_alone():
    w, a, b = _two_losses()
    ga, = torch.autograd.grad(a, w, retain_graph=True)
    gb, = torch.autograd.grad(b, w, retain_graph=True)
    ref = float(ga @ gb / (ga.norm() * gb.norm()))
    cos = gradient_cosine({"a": a, "b": b, "neg": -a}, w)
    assert cos[("a", "b")] == pytest.approx(ref, abs=1e-12)
    assert cos[("a", "neg")] == pytest.approx(-1.0, abs=1e-12)
    assert all(-1.0 <= v <= 1.0 for v in cos.values())
    assert w.grad is None
    (a + b).backward()  # the graph is still there
    assert w.grad is not None


def test_gradient_cosine_unused_tensor_gives_nan():
    w, a, _ = _two_losses()
    other = torch.ones(3, requires_grad=True)
    c = (other * 2).sum()
    assert math.isnan(gradient_cosine({"a": a, "c": c}, w)[("a", "c")])
    # both w and other: both gradients non-zero on the concatenation, orthogonal supports
    assert gradient_cosine({"a": a, "c": c}, [w, other])[("a", "c")] == pytest.approx(0.0)


def test_gradient_cosine_errors():
    w, a, b = _two_losses()
    with pytest.raises(ArgumentError, match="at least two"):
        gradient_cosine({"a": a}, w)
    with pytest.raises(ArgumentError, match=r"losses\['b'\] must be a scalar tensor"):
        gradient_cosine({"a": a, "b": w}, w)
    with pytest.raises(ArgumentError, match="does not require grad"):
        gradient_cosine({"a": a, "b": torch.tensor(1.0)}, w)
    with pytest.raises(ArgumentError, match="wrt must be a tensor or a non-empty list"):
        gradient_cosine({"a": a, "b": b}, [])
    with pytest.raises(ArgumentError, match="names loss 'z'"):
        gradient_cosine({"a": a, "b": b}, w, pairs=[("a", "z")])


def test_probe_logs_and_hooks_removed_on_error():
    lin = nn.Linear(3, 2)
    model = nn.Sequential(lin, nn.Tanh())
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    probe = GradientConflictProbe(module=lin, every=2)
    with pytest.raises(RuntimeError, match="boom"):
        with probe:
            for step in range(4):
                out = model(x)
                probe.record({"p": out[:, 0].sum(), "n": -out[:, 0].sum()}, step=step)
            raise RuntimeError("boom")
    assert not lin._forward_hooks and probe.captured is None
    assert probe.steps == [0, 2]
    assert probe.series(("p", "n")) == pytest.approx([-1.0, -1.0])
    assert probe.mean(("p", "n")) == pytest.approx(-1.0)
    with pytest.raises(ArgumentError, match="was not recorded"):
        probe.series(("p", "q"))
    with pytest.raises(ArgumentError, match="every must be"):
        GradientConflictProbe(every=0)
    with pytest.raises(ArgumentError, match="wrt is required"):
        GradientConflictProbe().record({"p": out[:, 0].sum(), "n": out[:, 1].sum()})


# ------------------------------------------------------------------------------------------ cascade + routing
def test_cascaded_flow_starts_at_identity_and_shapes():
    torch.manual_seed(0)
    src, cond = torch.rand(2, 2, 16, 16), torch.rand(2, 1, 16, 16)
    for taco in (True, False):
        net = CascadedFlow(2, 1, levels=3, taco=taco, width=8)
        o = net(src, cond)
        assert [tuple(f.shape[-2:]) for f in o["flows_tvob"]] == ([(4, 4), (8, 8)] if taco else [(4, 4), (8, 8), (16, 16)])
        assert torch.allclose(o["warped"], src, atol=1e-5) and o["flow"].abs().max() < 1e-6
        assert (o["flow_taco"] is None) != taco
    with pytest.raises(ArgumentError, match="divisible by 2\\^\\(levels-1\\) = 4"):
        CascadedFlow(2, 1, levels=3)(torch.rand(1, 2, 10, 10), torch.rand(1, 1, 10, 10))
    with pytest.raises(ArgumentError, match=r"cond must have shape \(1, 1, 8, 8\)"):
        CascadedFlow(2, 1, levels=2)(torch.rand(1, 2, 8, 8), torch.rand(1, 1, 4, 4))
    with pytest.raises(ArgumentError, match="levels"):
        CascadedFlow(2, 1, levels=1, taco=True)


def test_compose_flows_matches_two_warps():
    x = _img(1, 1, 8, 8, dtype=torch.float32)
    a = torch.zeros(1, 2, 8, 8)
    a[:, 0] = 1.0
    b = torch.zeros(1, 2, 8, 8)
    b[:, 1] = 2.0
    two = warp2d(warp2d(x, a), b)
    one = warp2d(x, compose_flows(a, b))
    assert torch.allclose(two[..., :5, :7], one[..., :5, :7], atol=1e-6)


def test_loss_routing_applies_losses_only_where_routed():
    w = torch.tensor(2.0, requires_grad=True)
    called = []

    def adv():
        called.append(1)
        return w * 10

    routing = LossRouting({"l1": ["s0", "s1"], "adv": ["s1"]}, {"adv": 0.5})
    total = routing({"s0": {"l1": w, "adv": lambda: (_ for _ in ()).throw(AssertionError("not routed"))},
                     "s1": {"l1": 3 * w, "adv": adv}})
    assert float(total.detach()) == pytest.approx(2 + 6 + 10) and len(called) == 1
    with pytest.raises(ArgumentError, match="routed to stage 's2'"):
        LossRouting({"l1": ["s2"]})({"s0": {"l1": w}})
    with pytest.raises(ArgumentError, match="that stage has no 'l1'"):
        LossRouting({"l1": ["s0"]})({"s0": {"tv": w}})
    with pytest.raises(ArgumentError, match="weights names loss 'tv'"):
        LossRouting({"l1": ["s0"]}, {"tv": 1.0})
    with pytest.raises(ArgumentError, match=r"routes\['l1'\] must be a non-empty list"):
        LossRouting({"l1": "s0"})


def test_tv_of_flow_is_l1_total_variation():
    flow = torch.zeros(1, 2, 4, 4)
    flow[..., 2:] = 1.0  # one vertical edge of height 1 in both channels
    assert float(total_variation(flow)) == pytest.approx(8 / 24)


# ------------------------------------------------------------------------------------------ data
def test_garment_pairs_ground_truth_is_consistent():
    p = garment_pairs(8, size=32, seed=0)
    assert p.source.shape == (8, 2, 32, 32) and len(p) == 8
    torso = (-torch.nn.functional.max_pool2d(-p.torso.unsqueeze(1), 3, 1, 1)).squeeze(1).bool()
    assert (jacobian_det(p.flow_gt) - p.det_gt)[torso].abs().max() < 1e-4
    warped = warp2d(p.source, p.flow_gt)
    m = p.target[:, 1] > 0.5
    assert ((warped[:, 1] - 1).abs()[m]).mean() < 0.1
    assert torch.equal(garment_pairs(8, size=32, seed=0).target, p.target)
    with pytest.raises(ArgumentError, match="size"):
        garment_pairs(2, size=8)
    with pytest.raises(ArgumentError, match="blur must be a positive number, got 0"):
        garment_pairs(2, blur=0)
