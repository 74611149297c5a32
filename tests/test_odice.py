"""odice: orthogonal_combine, OrthogonalGradient, DICE losses, gridworld, claim, benchmark, docs."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.data.offline_rl import (GridWorld, dice_fstar, dice_true_loss, dice_weight, evaluate_greedy,
                                     feature_cosine, make_gridworld_dataset, odice_value_losses,
                                     value_rank_correlation)
from gradkit.optim.orthogonal import OrthogonalGradient, orthogonal_combine

REPO = Path(__file__).resolve().parents[1]
D = torch.float64


def _vecs(n=50, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)


def _naive(gm: np.ndarray, ga: np.ndarray, eta: float, eps: float = 1e-10) -> np.ndarray:
    c = float(gm @ ga) / max(float(gm @ gm), eps)
    return gm + eta * (ga - c * gm)


def _value_net(seed=0, dtype=D, n_in=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _batch(n=32, seed=1, dtype=D, n_in=3):
    g = torch.Generator().manual_seed(seed)
    s, s2 = torch.randn(n, n_in, generator=g, dtype=dtype), torch.randn(n, n_in, generator=g, dtype=dtype)
    r = torch.randn(n, generator=g, dtype=dtype)
    done = (torch.rand(n, generator=g) < 0.2).to(dtype)
    return s, torch.zeros(n, dtype=torch.int64), r, s2, done


# ----------------------------------------------------------------------------- orthogonal_combine
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0, 2.5])
def test_combine_matches_naive_and_is_orthogonal(eta):
    gm, ga = _vecs()
    out = orthogonal_combine(gm, ga, eta=eta)
    np.testing.assert_allclose(out.numpy(), _naive(gm.numpy(), ga.numpy(), eta), rtol=1e-12, atol=1e-12)
    delta = out - gm
    if eta > 0:
        cos = torch.dot(delta, gm) / (delta.norm() * gm.norm())
        assert abs(cos.item()) < 1e-6
    else:
        assert torch.equal(out, gm)


def test_combine_invariants_parallel_perpendicular_opposite():
    gm = torch.tensor([3.0, -1.0, 2.0], dtype=D)
    # parallel aux (either sign): its contribution vanishes
    for k in (2.0, -0.5):
        torch.testing.assert_close(orthogonal_combine(gm, k * gm, eta=0.7), gm, rtol=0, atol=1e-12)
    # perpendicular aux: added whole, scaled by eta
    ga = torch.tensor([1.0, 1.0, -1.0], dtype=D)
    assert torch.dot(gm, ga) == 0
    torch.testing.assert_close(orthogonal_combine(gm, ga, eta=0.7), gm + 0.7 * ga, rtol=0, atol=1e-12)
    # g_aux = -g_main: the plain (true-gradient) sum is 0, the orthogonal update keeps g_main
    assert torch.equal(gm + (-gm), torch.zeros(3, dtype=D))
    torch.testing.assert_close(orthogonal_combine(gm, -gm), gm, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.4])
def test_combine_equals_official_algebra(eta):
    # official code: L_b carries eta; g = (1 - c) g_f + g_b with c = <g_f, g_b> / ||g_f||^2
    gf, gb = _vecs(seed=3)
    gb_eta = eta * gb
    c = torch.dot(gf, gb_eta) / torch.dot(gf, gf)
    official = (1 - c) * gf + gb_eta
    torch.testing.assert_close(orthogonal_combine(gf, gb, eta=eta), official, rtol=1e-12, atol=1e-12)


def test_combine_zero_main_gives_no_nan():
    ga = torch.tensor([1.0, -2.0])
    out = orthogonal_combine(torch.zeros(2), ga, eta=0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.5 * ga)
    assert torch.equal(orthogonal_combine(torch.zeros(2), torch.zeros(2)), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_combine_keeps_shape_and_dtype(dtype):
    gm, ga = _vecs(24, dtype=dtype)
    out = orthogonal_combine(gm.view(4, 6), ga.view(4, 6))
    assert out.shape == (4, 6) and out.dtype == dtype
    ref = _naive(gm.double().numpy(), ga.double().numpy(), 1.0).reshape(4, 6)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 3e-2)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol)


def test_combine_bad_inputs():
    gm, ga = _vecs(5)
    with pytest.raises(ValueError, match="eta must be finite and >= 0, got -0.5"):
        orthogonal_combine(gm, ga, eta=-0.5)
    with pytest.raises(ValueError, match="eta must be finite"):
        orthogonal_combine(gm, ga, eta=float("nan"))
    with pytest.raises(TypeError, match="eta must be a real number"):
        orthogonal_combine(gm, ga, eta=True)
    with pytest.raises(ValueError, match="eps must be finite and > 0, got 0"):
        orthogonal_combine(gm, ga, eps=0)
    with pytest.raises(ValueError, match=r"same shape, got \(5,\) and \(4,\)"):
        orthogonal_combine(gm, ga[:4])
    with pytest.raises(TypeError, match="g_aux must be a torch.Tensor, got list"):
        orthogonal_combine(gm, [1.0] * 5)
    with pytest.raises(TypeError, match="g_main must be a floating-point tensor"):
        orthogonal_combine(torch.arange(5), ga)
    bad = gm.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="g_main is not finite"):
        orthogonal_combine(bad, ga)
    bad[2] = float("inf")
    with pytest.raises(ValueError, match="g_aux is not finite"):
        orthogonal_combine(gm, bad)
    with pytest.raises(ValueError, match="g_aux is not finite"):
        orthogonal_combine(torch.zeros(5, dtype=D), bad)


# ----------------------------------------------------------------------------- OrthogonalGradient
def _flat_grad(loss, params):
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)])


def _set_grads(params, flat):
    out, i = [], 0
    for p in params:
        out.append(flat[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_backward_matches_naive_reference(eta):
    v = _value_net()
    vt = _value_net(seed=5)  # a different target network
    b = _batch()
    params = list(v.parameters())
    L = odice_value_losses(v, vt, b, lam=0.6, gamma=0.99)
    gf, gb, gi = _flat_grad(L.forward, params), _flat_grad(L.backward, params), _flat_grad(L.init, params)
    ref = torch.as_tensor(_naive(gf.numpy(), gb.numpy(), eta)) + gi
    og = OrthogonalGradient(v.parameters(), eta=eta)
    value = og.backward(L.forward, L.backward, extra_loss=L.init)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(value, (L.forward + eta * L.backward + L.init).detach())
    # the statistics describe the projection actually applied
    assert abs(og.last["perp_cos"]) < 1e-10
    assert og.last["cos"] == pytest.approx(float(gf @ gb / (gf.norm() * gb.norm())), rel=1e-10)
    assert og.last["coef"] == pytest.approx(float(gf @ gb / (gf @ gf)), rel=1e-10)


def test_equivalence_with_official_two_backward_procedure():
    """The official code: backward(L_f), then backward(L_b) and a difference of accumulated .grad,
    g = (1 - c) g_f + g_b, then the (1 - lambda) V term; in float64 it equals our update."""
    lam, eta = 0.6, 0.7
    v, b = _value_net(), _batch()
    vt = copy.deepcopy(v).requires_grad_(False)
    with torch.no_grad():
        for p in vt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    v2 = copy.deepcopy(v)
    # official (odice.py, orthogonal_true_g_update), with eta folded into L_b
    L = odice_value_losses(v, vt, b, lam)
    L.forward.backward(retain_graph=True)
    fwd = [p.grad.clone().reshape(-1) for p in v.parameters()]
    (eta * L.backward).backward()
    bwd = [p.grad.clone().reshape(-1) - f for p, f in zip(v.parameters(), fwd)]
    fg, bg = torch.cat(fwd), torch.cat(bwd)
    c = (fg @ bg / max(fg @ fg, 1e-10)).item()
    comb = (1 - c) * fg + bg
    v.zero_grad(set_to_none=True)
    L.init.backward()
    for p, g in zip(v.parameters(), _set_grads(list(v.parameters()), comb)):
        p.grad += g
    # ours
    L2 = odice_value_losses(v2, vt, b, lam)
    OrthogonalGradient(v2.parameters(), eta=eta).backward(L2.forward, L2.backward, extra_loss=L2.init)
    for p, q in zip(v.parameters(), v2.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_true_gradient_is_forward_plus_backward_when_target_equals_online():
    v, b = _value_net(), _batch()
    vt = copy.deepcopy(v).requires_grad_(False)
    params = list(v.parameters())
    L = odice_value_losses(v, vt, b, lam=0.6)
    true_loss, res = dice_true_loss(v, b, lam=0.6)
    torch.testing.assert_close(_flat_grad(L.forward + L.backward + L.init, params), _flat_grad(true_loss, params),
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(res, L.residual)
    # the semi-gradient (forward + init) differs: it ignores the path through V(s')
    assert not torch.allclose(_flat_grad(L.forward + L.init, params), _flat_grad(true_loss, params))


def test_surrogate_value_and_gradient_exact():
    v, b = _value_net(), _batch()
    vt = _value_net(seed=2)
    og = OrthogonalGradient(v.parameters(), eta=0.5)
    L = odice_value_losses(v, vt, b, lam=0.3)
    s = og.surrogate(L.forward, L.backward, extra_loss=L.init)
    assert s.shape == () and s.requires_grad
    assert s.item() == pytest.approx((L.forward + 0.5 * L.backward + L.init).item(), rel=1e-14)
    g = og.combine(og.gradients(L.forward), og.gradients(L.backward))
    gi = og.gradients(L.init)
    s.backward()
    for p, a, e in zip(v.parameters(), g, gi):
        assert torch.equal(p.grad, a + e)


def test_accumulates_into_existing_grad_and_apply_by_hand():
    v, b = _value_net(), _batch()
    vt = _value_net(seed=2)
    og = OrthogonalGradient(v.parameters())
    for p in v.parameters():
        p.grad = torch.ones_like(p)
    L = odice_value_losses(v, vt, b, lam=0.6)
    gm, ga = og.gradients(L.forward), og.gradients(L.backward)
    comb = og.combine(gm, ga)
    og.apply(gm, ga)
    for p, c in zip(v.parameters(), comb):
        torch.testing.assert_close(p.grad, 1 + c, rtol=0, atol=0)
    # None entries: a part that does not reach a parameter counts as zero
    gm2 = [None] + gm[1:]
    out = og.combine(gm2, ga)
    flat_m = torch.cat([torch.zeros_like(gm[0]).reshape(-1)] + [g.reshape(-1) for g in gm[1:]])
    flat_a = torch.cat([g.reshape(-1) for g in ga])
    ref = torch.as_tensor(_naive(flat_m.numpy(), flat_a.numpy(), 1.0))
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in out]), ref, rtol=1e-12, atol=1e-13)
    assert og.combine([None] * len(gm), [None] * len(gm)) == [None] * len(gm)


def test_global_projection_vs_per_tensor():
    v, b = _value_net(), _batch()
    vt = _value_net(seed=2)
    L = odice_value_losses(v, vt, b, lam=0.6)
    glob, per = OrthogonalGradient(v.parameters()), OrthogonalGradient(v.parameters(), per_tensor=True)
    gm, ga = glob.gradients(L.forward), glob.gradients(L.backward)
    out_g, out_p = glob.combine(gm, ga), per.combine(gm, ga)
    # per tensor: each tensor's added part is orthogonal to that tensor's main gradient
    for m, o in zip(gm, out_p):
        d = (o - m).reshape(-1)
        assert abs(float(d @ m.reshape(-1))) <= 1e-10 * float(d.norm() * m.norm()) + 1e-15
    # global: orthogonal only over the concatenation, so it differs from per-tensor
    dg = torch.cat([(o - m).reshape(-1) for o, m in zip(out_g, gm)])
    fm = torch.cat([m.reshape(-1) for m in gm])
    assert abs(float(dg @ fm)) < 1e-10 * float(dg.norm() * fm.norm())
    assert any(not torch.allclose(a, c) for a, c in zip(out_g, out_p))
    assert "coef" in glob.last and "coef" not in per.last


def test_param_groups_unused_params_and_repr():
    v = _value_net()
    extra = nn.Parameter(torch.zeros(3, dtype=D))  # reached by neither loss
    opt = torch.optim.Adam([{"params": v[0].parameters()}, {"params": list(v[2:].parameters()) + [extra],
                                                             "lr": 1e-2}])
    og = OrthogonalGradient(opt.param_groups, eta=0.5)
    assert len(og.params) == 7
    L = odice_value_losses(v, _value_net(seed=3), _batch(), lam=0.6)
    og.backward(L.forward, L.backward)
    assert extra.grad is None and all(p.grad is not None for p in v.parameters())
    assert repr(og) == "OrthogonalGradient(eta=0.5, eps=1e-10, per_tensor=False, params=7)"
    opt.step()


def test_float32_model_runs_and_stays_orthogonal():
    v, b = _value_net(dtype=torch.float32), _batch(dtype=torch.float32)
    og = OrthogonalGradient(v.parameters())
    L = odice_value_losses(v, _value_net(seed=4, dtype=torch.float32), b, lam=0.6)
    og.backward(L.forward, L.backward, extra_loss=L.init)
    assert all(p.grad.dtype == torch.float32 for p in v.parameters())
    assert abs(og.last["perp_cos"]) < 1e-4


def test_transform_bad_inputs():
    v = _value_net()
    with pytest.raises(ValueError, match="params is empty"):
        OrthogonalGradient([])
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(2,\)\) does not require grad"):
        OrthogonalGradient([torch.zeros(2)])
    with pytest.raises(TypeError, match=r"params\[0\] must be floating-point"):
        OrthogonalGradient([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor, got str"):
        OrthogonalGradient([v[0].weight, "w"])
    with pytest.raises(ValueError, match="dict without a 'params' key"):
        OrthogonalGradient([{"lr": 0.1}])
    with pytest.raises(ValueError, match="eta must be finite and >= 0, got -1"):
        OrthogonalGradient(v.parameters(), eta=-1)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        OrthogonalGradient(v.parameters(), eps=-1e-3)
    with pytest.raises(TypeError, match="per_tensor must be a bool"):
        OrthogonalGradient(v.parameters(), per_tensor=1)
    og = OrthogonalGradient(v.parameters())
    n = len(og.params)
    L = odice_value_losses(v, _value_net(seed=1), _batch(), lam=0.6)
    gm = og.gradients(L.forward)
    with pytest.raises(ValueError, match=f"main_grads has {n - 1} entries, expected {n} \\(one per parameter\\)"):
        og.combine(gm[:-1], gm)
    with pytest.raises(ValueError, match=r"aux_grads\[0\] has shape \(8,\), expected the parameter's \(8, 3\)"):
        og.combine(gm, [torch.zeros(8, dtype=D)] + gm[1:])
    with pytest.raises(TypeError, match="single tensor"):
        og.combine(torch.zeros(3), gm)
    with pytest.raises(TypeError, match=r"aux_grads\[1\] must be a torch.Tensor or None, got float"):
        og.combine(gm, [gm[0], 1.0] + gm[2:])
    bad = [g.clone() for g in gm]
    bad[3][0] = float("nan")
    with pytest.raises(ValueError, match="aux gradient is not finite"):
        og.combine(gm, bad)
    with pytest.raises(ValueError, match="main gradient is not finite"):
        og.apply(bad, gm)
    assert all(p.grad is None for p in v.parameters())  # nothing written on error
    with pytest.raises(ValueError, match=r"main_loss must be a scalar tensor, got shape \(2,\)"):
        og.backward(torch.ones(2, requires_grad=True), L.backward)
    with pytest.raises(ValueError, match="aux_loss does not require grad"):
        og.backward(L.forward, L.backward.detach())
    with pytest.raises(TypeError, match="extra_loss must be a scalar torch.Tensor, got float"):
        og.backward(L.forward, L.backward, extra_loss=0.5)
    other = nn.Parameter(torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="depend on none of the params"):
        og.backward(other.sum(), other.pow(2).sum())


# ----------------------------------------------------------------------------- DICE losses
def test_fstar_values_and_derivative():
    y = torch.tensor([-5.0, -2.0, -1.0, 0.0, 0.5, 3.0], dtype=D, requires_grad=True)
    f = dice_fstar(y, "chi2")
    yd = y.detach()
    ref = torch.where(yd >= -2, yd + yd**2 / 4, torch.full_like(yd, -1.0))
    torch.testing.assert_close(f.detach(), ref)
    (gy,) = torch.autograd.grad(f.sum(), y)
    torch.testing.assert_close(gy, torch.clamp_min(yd / 2 + 1, 0))  # f*' = w* = f'^-1
    torch.testing.assert_close(dice_fstar(yd, "rkl"), torch.exp(yd - 1))
    torch.autograd.gradcheck(lambda t: dice_fstar(t, "chi2"), (torch.tensor([-3.0, -1.0, 0.7], dtype=D,
                                                                            requires_grad=True),))


def test_dice_weight():
    y = torch.tensor([-1.0, 0.5, 300.0], requires_grad=True)
    w = dice_weight(y)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 100.0]))
    torch.testing.assert_close(dice_weight(y, "rkl", max_weight=5.0), torch.tensor([math.exp(-2), math.exp(-0.5), 5.0]))


def test_odice_losses_definition():
    v, vt, b = _value_net(), _value_net(seed=9), _batch()
    s, _, r, s2, done = b
    lam, gamma = 0.6, 0.9
    L = odice_value_losses(v, vt, b, lam, gamma)
    with torch.no_grad():
        fwd = r + gamma * (1 - done) * vt(s2).squeeze(-1) - v(s).squeeze(-1)
        bwd = r + gamma * (1 - done) * v(s2).squeeze(-1) - vt(s).squeeze(-1)
    torch.testing.assert_close(L.forward, lam * dice_fstar(fwd).mean())
    torch.testing.assert_close(L.backward, lam * dice_fstar(bwd).mean())
    torch.testing.assert_close(L.init, (1 - lam) * v(s).mean())
    torch.testing.assert_close(L.residual, fwd)
    # the target network receives no gradient (it sits on the stop-gradient side of each residual)
    (L.forward + L.backward).backward()
    assert all(p.grad is None for p in vt.parameters())


def test_losses_bad_inputs():
    v, b = _value_net(), _batch()
    with pytest.raises(ValueError, match=r"lam must be in \(0, 1\), got 1.0"):
        odice_value_losses(v, v, b, lam=1.0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        dice_true_loss(v, b, lam=0.5, gamma=1.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        dice_fstar(torch.zeros(2), "kl")
    with pytest.raises(ValueError, match=r"batch must be \(obs, action, reward, next_obs, done\)"):
        odice_value_losses(v, v, b[:3], lam=0.5)
    with pytest.raises(ValueError, match="batch shapes disagree"):
        dice_true_loss(v, (b[0], b[1], b[2][:5], b[3], b[4]), lam=0.5)
    with pytest.raises(ValueError, match="max_weight must be finite and >= 0"):
        dice_weight(torch.zeros(2), max_weight=-1)


# ----------------------------------------------------------------------------- gridworld
def test_gridworld_dynamics():
    env = GridWorld(8)
    cells = np.array([[0, 0], [0, 0], [6, 7], [7, 6], [3, 4]])
    nxt, r, d = env.step(cells, np.array([0, 2, 3, 1, 3]))
    np.testing.assert_array_equal(nxt, [[0, 0], [0, 0], [7, 7], [7, 7], [4, 4]])  # walls keep the agent
    np.testing.assert_array_equal(d, [False, False, True, True, False])
    np.testing.assert_array_equal(r, [0, 0, 1, 1, 0])
    tn, tr, td = env.step(torch.as_tensor(cells), torch.tensor([0, 2, 3, 1, 3]))
    np.testing.assert_array_equal(tn.numpy(), nxt)
    assert td.tolist() == d.tolist()
    assert env.shortest_path_actions(0, 0) == [1, 3] and env.shortest_path_actions(7, 7) == []
    assert len(env.start_cells()) == 63
    obs = env.observe(np.array([[0, 0], [7, 7]]))
    torch.testing.assert_close(obs, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="goal must be a cell"):
        GridWorld(4, goal=(4, 0))
    with pytest.raises(ValueError, match="size must be an int >= 2"):
        GridWorld(1)


def test_dataset_properties_and_determinism():
    env = GridWorld(8)
    d = make_gridworld_dataset(env, episodes=40, seed=3)
    d2 = make_gridworld_dataset(env, episodes=40, seed=3)
    assert torch.equal(d.obs, d2.obs) and torch.equal(d.action, d2.action)
    assert not torch.equal(make_gridworld_dataset(env, episodes=40, seed=4).action[:50], d.action[:50])
    goal = torch.tensor(env.goal)
    at_goal = (d.next_cells == goal).all(-1)
    assert torch.equal(at_goal.float(), d.done) and torch.equal(d.reward, d.done)
    assert not (d.cells == goal).all(-1).any()  # episodes stop at the goal
    assert int(d.done.sum()) <= 40 <= len(d) <= 40 * 50
    # consecutive rows chain within an episode
    same_ep = d.done[:-1] == 0
    chained = (d.next_cells[:-1] == d.cells[1:]).all(-1)
    assert bool(chained[same_ep].float().mean() > 0.9)
    r = make_gridworld_dataset(env, episodes=40, seed=3, goal_reward=0.0, step_reward=-3.0)
    assert torch.equal(r.reward, torch.where(d.done > 0, 0.0, -3.0))
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got 1.5"):
        make_gridworld_dataset(env, epsilon=1.5)
    with pytest.raises(ValueError, match="episodes must be an int >= 1"):
        make_gridworld_dataset(env, episodes=0)
    with pytest.raises(TypeError, match="env must be a GridWorld"):
        make_gridworld_dataset("grid")


def test_evaluate_greedy_and_diagnostics():
    env = GridWorld(8)

    def oracle(obs):  # shortest-path policy from the observation
        cells = torch.round((obs + 1) * 3.5).long()
        logits = torch.zeros(len(obs), 4)
        logits[:, 1] = (cells[:, 1] < 7).float()
        logits[:, 3] = (cells[:, 0] < 7).float() + 0.5 * (cells[:, 1] >= 7).float()
        return logits

    out = evaluate_greedy(oracle, env)
    d = np.abs(env.start_cells() - 7).sum(-1)
    assert out["success"] == 100.0 and out["steps"] == pytest.approx(d.mean())
    down = evaluate_greedy(lambda o: torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(len(o), 4), env)
    assert down["success"] == pytest.approx(100 * 7 / 63)
    up = evaluate_greedy(lambda o: torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(len(o), 4), env)
    assert up["success"] == 0.0 and math.isnan(up["steps"])

    def v_dist(obs):
        return -torch.round((obs + 1) * 3.5).sub(7).abs().sum(-1, keepdim=True)

    assert value_rank_correlation(v_dist, env) == pytest.approx(1.0)
    assert math.isnan(value_rank_correlation(lambda o: torch.zeros(len(o), 1), env))
    x = torch.randn(10, 3)
    assert feature_cosine(lambda t: t, x, 2 * x) == pytest.approx(1.0)
    assert feature_cosine(lambda t: t, x, -x) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- claim
@pytest.fixture(scope="module")
def claim():
    import gradkit.harness.claims.odice  # noqa: F401  (registers the claim)
    from gradkit.harness.claims import CLAIMS

    return CLAIMS.get("odice")


def test_claim_registered(claim):
    assert claim.arxiv == "2402.00348" and claim.primary.ours == "orthogonal"
    assert claim.primary.baseline == "true" and claim.primary.metric == "v_err" and "v_err" in claim.plots
    assert "gradkit.optim.orthogonal.OrthogonalGradient" in claim.uses
    assert claim.resolve(None).control == {"orthogonal": "true"}


def test_claim_smoke(claim, smoke_run):
    out = smoke_run("odice")
    assert out.data == "gridworld8x8"
    assert set(out.metrics) == {"semi", "true", "orthogonal", "bc"}
    epochs = claim.protocol.at("smoke").epochs
    for arm, m in out.metrics.items():
        assert m["diverged"] == 0.0  # losses stayed finite
        assert len(out.curves["success"][arm]) == epochs
    # <g_b_perp, g_f> ~ 0 at every step of the orthogonal arm
    assert out.metrics["orthogonal"]["max_abs_perp_cos"] < 1e-3
    assert out.info["steps"] == 300 and out.info["transitions"] > 200
    for arm, m in out.metrics.items():
        assert m["v_err"] >= 0 and m["score"] <= 100 + 1e-6  # nothing beats V*
    ok, checks = claim.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 3


def _one_arm(claim, arm, seed, **overrides):
    """One arm of the claim as the runner calls it (setup, then the arm, each freshly seeded)."""
    from gradkit.engine import cpu_threads, seed_everything
    from gradkit.harness.claims.base import ArmContext
    from gradkit.harness.claims.odice import _run_arm, _setup

    base = dict(scale="smoke", seed=seed, device=torch.device("cpu"), p=claim.protocol.at("smoke", **overrides))
    with cpu_threads(1):
        seed_everything(seed)
        data = _setup(ArmContext(**base, arm="setup"))
        gen = seed_everything(seed)
        return _run_arm(ArmContext(**base, arm=arm, data=data, generator=gen))


def test_claim_arm_rerun_bit_identical(claim):
    # the raw 1/0 reward: forward and backward gradients are both non-zero from the first step
    # (with the claim's -3 step reward both sit in chi^2's flat region at first, so the smoke
    # run's projection check above can be vacuous)
    kw = dict(epochs=1, episodes=20, goal_reward=1.0, step_reward=0.0)
    a = _one_arm(claim, "orthogonal", 1, **kw)
    b = _one_arm(claim, "orthogonal", 1, **kw)
    assert a.metrics == b.metrics and a.curves == b.curves
    m = a.metrics
    assert m["fb_cos"] < -0.5 and m["conflict_frac"] > 0.5  # the forward/backward conflict
    assert 0 < m["max_abs_perp_cos"] < 1e-3  # <g_b_perp, g_f> ~ 0 at every step


# ----------------------------------------------------------------------------- exact values
def test_optimal_values_match_the_closed_form_on_the_deterministic_grid():
    env = GridWorld(6, goal=(5, 5))
    d = np.abs(env.start_cells() - np.asarray(env.goal)).sum(-1)
    v = env.optimal_values(0.9, goal_reward=0.0, step_reward=-3.0)
    np.testing.assert_allclose(v, -3.0 * (1 - 0.9 ** (d - 1)) / (1 - 0.9), atol=1e-8)
    v1 = env.optimal_values(0.9)  # +1 on entering the goal: gamma^(d-1)
    np.testing.assert_allclose(v1, 0.9 ** (d - 1.0), atol=1e-8)


def test_policy_values_of_the_shortest_path_policy_are_optimal_and_slip_costs_value():
    env = GridWorld(5, goal=(4, 4))
    acts = np.array([env.shortest_path_actions(int(x), int(y))[0] for x, y in env.start_cells()])
    np.testing.assert_allclose(env.policy_values(acts, 0.95), env.optimal_values(0.95), atol=1e-8)
    slippery = GridWorld(5, goal=(4, 4), slip=0.3)
    vs = slippery.optimal_values(0.95)
    assert (vs < env.optimal_values(0.95) + 1e-12).all()  # slipping can only delay the goal
    assert (slippery.policy_values(acts, 0.95) <= vs + 1e-9).all()
    uniform = slippery.policy_values(np.full((len(vs), 4), 0.25), 0.95)
    assert (uniform < vs).all()


def test_transition_rows_are_distributions_and_slip_needs_a_generator():
    env = GridWorld(4, goal=(3, 3), slip=0.25)
    P = env.transition_matrices()
    np.testing.assert_allclose(P.sum(-1), 1.0)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        env.step(np.array([[0, 0]]), np.array([3]))
    nxt, _, _ = env.step(np.array([[0, 0]] * 4000), np.full(4000, 3), rng=np.random.default_rng(0))
    moved_right = float((nxt[:, 0] == 1).mean())  # 0.75 + 0.25 / 4 in expectation
    assert abs(moved_right - 0.8125) < 0.03
    with pytest.raises(ValueError, match="slip"):
        GridWorld(4, goal=(3, 3), slip=1.5)
    with pytest.raises(ValueError, match="actions"):
        env.policy_values(np.zeros(3, dtype=int))


# ----------------------------------------------------------------------------- benchmark, docs
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.odice  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("odice-value-step-small")
    assert b.slug == "odice" and b.target is None
    res = b.run(2)
    assert res.baseline_s > 0 and res.candidate_s > 0 and res.extra["params"] == 4417


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    v, b = _value_net(), _batch()
    vt = _value_net(seed=2)
    vc, vtc = copy.deepcopy(v).cuda(), copy.deepcopy(vt).cuda()
    for net, tgt, batch in ((v, vt, b), (vc, vtc, tuple(t.cuda() for t in b))):
        L = odice_value_losses(net, tgt, batch, lam=0.6)
        OrthogonalGradient(net.parameters()).backward(L.forward, L.backward, extra_loss=L.init)
    for p, q in zip(v.parameters(), vc.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-9, atol=1e-11)


