"""MoCHi hard negative mixing, MoCo's queue InfoNCE, the memory queue, the momentum update and the
negative-weight probe (paper slug: hard-negative-mixing)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit import _native
from gradkit._validate import ArgumentError
from gradkit.nn.hard_negative_mixing import InfoNCEWithMixing, hard_negative_mix, queue_info_nce_loss, queue_logits
from gradkit.nn.memory_queue import MemoryQueue, momentum_update
from gradkit.probes.negative_weights import negative_weight_stats


def _unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ mixing
def test_shapes_unit_norm_no_grad_and_determinism():
    q = _unit(8, 16).requires_grad_()
    queue = _unit(64, 16, seed=1)
    h = hard_negative_mix(q, queue, n_hard=10, s=7, s_prime=3, generator=_gen())
    assert h.shape == (8, 10, 16) and not h.requires_grad
    torch.testing.assert_close(h.norm(dim=2), torch.ones(8, 10))
    torch.testing.assert_close(h, hard_negative_mix(q, queue, n_hard=10, s=7, s_prime=3, generator=_gen()))
    assert not torch.equal(h, hard_negative_mix(q, queue, n_hard=10, s=7, s_prime=3, generator=_gen(1)))


def test_accepts_a_memory_queue_and_float64():
    mq = MemoryQueue(16, 32, generator=_gen(), dtype=torch.float64)
    q = _unit(4, 16, dtype=torch.float64)
    h = hard_negative_mix(q, mq, n_hard=8, s=2, s_prime=2, generator=_gen())
    assert h.dtype == torch.float64 and h.shape == (4, 4, 16)


def test_type1_on_the_arc_between_two_hardest_negatives():
    """With N = 2 every type-1 negative is normalize(a n1 + (1 - a) n2), a in [0, 1]: in the span of the two
    hardest keys with non-negative coefficients."""
    q = _unit(5, 12, dtype=torch.float64)
    queue = _unit(40, 12, seed=3, dtype=torch.float64)
    h = hard_negative_mix(q, queue, n_hard=2, s=20, s_prime=0, generator=_gen())
    top2 = queue[(q @ queue.T).topk(2, dim=1).indices]  # (5, 2, 12)
    coef = torch.linalg.lstsq(top2.transpose(1, 2), h.transpose(1, 2)).solution  # (5, 2, 20)
    resid = top2.transpose(1, 2) @ coef - h.transpose(1, 2)
    assert resid.abs().max() < 1e-10
    assert (coef > -1e-10).all()


def test_type2_with_beta_max_zero_are_hardest_queue_entries():
    q = _unit(6, 8)
    queue = _unit(50, 8, seed=2)
    h = hard_negative_mix(q, queue, n_hard=5, s=0, s_prime=9, beta_max=0.0, generator=_gen())
    hard = queue[(q @ queue.T).topk(5, dim=1).indices]  # (6, 5, 8)
    dist = (h[:, :, None, :] - hard[:, None, :, :]).norm(dim=3).min(dim=2).values  # each h' to its nearest hard key
    assert dist.max() < 1e-5


def test_type2_are_harder_than_the_negative_they_mix():
    """q.h' = (beta + (1 - beta) q.n) / ||beta q + (1 - beta) n|| >= q.n when q.n >= 0; with N = 1 the negative is
    the hardest key."""
    q = _unit(32, 8, dtype=torch.float64)
    queue = _unit(64, 8, seed=4, dtype=torch.float64)
    sim_top = (q @ queue.T).max(dim=1).values
    assert (sim_top > 0).all()
    h = hard_negative_mix(q, queue, n_hard=1, s=0, s_prime=16, generator=_gen())
    sim_h = torch.einsum("bd,bsd->bs", q, h)
    assert (sim_h >= sim_top[:, None] - 1e-12).all()
    # and on average over a larger pool of hardest keys
    h = hard_negative_mix(q, queue, n_hard=8, s=0, s_prime=16, generator=_gen())
    hard = queue[(q @ queue.T).topk(8, dim=1).indices]
    assert torch.einsum("bd,bsd->bs", q, h).mean() > torch.einsum("bd,bsd->bs", q, hard).mean()


def test_beta_never_reaches_half():
    """beta < 0.5: the query's weight in h' stays below the negative's, so h' is closer to n_j than to q."""
    q = _unit(16, 32)
    queue = _unit(128, 32, seed=5)
    h = hard_negative_mix(q, queue, n_hard=1, s=0, s_prime=32, generator=_gen())
    n = queue[(q @ queue.T).argmax(1)]
    assert ((h * n[:, None]).sum(2) > (h * q[:, None]).sum(2)).all()


# ------------------------------------------------------------------------------------------ InfoNCE over a queue
def test_queue_info_nce_closed_form():
    tau = 0.5
    q = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-2.0)))
    assert queue_info_nce_loss(q, q, queue, tau=tau).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_is_the_softmax_weighted_sum_of_negatives():
    """dL/dq = -(1/tau)(1 - p_k) k + (1/tau) sum_n p_n n (per query, loss averaged over the batch); the synthetic
    negatives enter the sum as constants."""
    tau, b = 0.2, 4
    q = _unit(b, 6, dtype=torch.float64).requires_grad_()
    k = _unit(b, 6, seed=1, dtype=torch.float64)
    queue = _unit(20, 6, seed=2, dtype=torch.float64)
    syn = _unit(b, 3, 6, seed=3, dtype=torch.float64).requires_grad_()
    queue_info_nce_loss(q, k, queue, tau=tau, synthetic=syn).backward()
    with torch.no_grad():
        p = queue_logits(q, k, queue, tau, syn).softmax(1)
        negs = torch.cat([queue.expand(b, -1, -1), syn], dim=1)  # (b, 23, 6)
        ref = (-(1 - p[:, :1]) * k + torch.einsum("bn,bnd->bd", p[:, 1:], negs)) / (tau * b)
    torch.testing.assert_close(q.grad, ref)
    assert syn.grad is None


def test_gradcheck_queue_info_nce():
    q = _unit(3, 5, dtype=torch.float64).requires_grad_()
    k, queue = _unit(3, 5, seed=1, dtype=torch.float64), _unit(7, 5, seed=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: queue_info_nce_loss(x, k, queue, tau=0.3), (q,))


def test_without_mixing_the_module_is_plain_moco():
    q, k = torch.randn(8, 16, generator=_gen()), torch.randn(8, 16, generator=_gen(1))
    queue = _unit(64, 16, seed=2)
    plain = queue_info_nce_loss(F.normalize(q, dim=1), F.normalize(k, dim=1), queue, tau=0.2)
    torch.testing.assert_close(InfoNCEWithMixing(tau=0.2, s=0, s_prime=0)(q, k, queue), plain)
    late = InfoNCEWithMixing(tau=0.2, n_hard=8, s=8, s_prime=4, start_step=2)
    torch.testing.assert_close(late(q, k, queue), plain)
    torch.testing.assert_close(late(q, k, queue), plain)
    assert late.step == 2 and late.mixing
    assert late(q, k, queue) > plain  # extra negatives only add to the denominator
    assert late.last_stats["synthetic_share"] == pytest.approx(12 / 76)


@pytest.mark.parametrize("unit_queue", [True, False])
def test_module_matches_the_function_with_constant_synthetic_negatives(unit_queue):
    """The module computes q.h from the similarities and the mixes' norms, without building h; loss and gradient
    equal those of the materialised synthetic negatives (same draws), also for a queue of non-unit keys."""
    q0 = torch.randn(8, 16, generator=_gen(), dtype=torch.float64)
    k = torch.randn(8, 16, generator=_gen(1), dtype=torch.float64)
    queue = _unit(64, 16, seed=2, dtype=torch.float64)
    if not unit_queue:
        queue = queue * torch.rand(64, 1, generator=_gen(5), dtype=torch.float64).add(0.5)
    q1, q2 = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    loss1 = InfoNCEWithMixing(tau=0.2, n_hard=8, s=6, s_prime=2, generator=_gen(9))(q1, k, queue)
    loss1.backward()
    qn = F.normalize(q2, dim=1)
    syn = hard_negative_mix(qn, queue, n_hard=8, s=6, s_prime=2, generator=_gen(9))
    loss2 = queue_info_nce_loss(qn, F.normalize(k, dim=1), queue, tau=0.2, synthetic=syn)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(q1.grad, q2.grad)


def test_module_mixes_in_blocks_like_in_one_piece(monkeypatch):
    """The PyTorch path computes the norms of the mixes in cache-sized blocks of pairs; the block size changes
    nothing."""
    import gradkit.nn.hard_negative_mixing as hnm

    q, k = torch.randn(16, 8, generator=_gen()), torch.randn(16, 8, generator=_gen(1))
    queue = _unit(64, 8, seed=2)
    with _native.disabled():
        ref = InfoNCEWithMixing(n_hard=8, s=16, s_prime=4, generator=_gen(3))(q, k, queue)
        monkeypatch.setattr(hnm, "_PAIR_BLOCK", 24)  # 3 pairs of 8-d rows per block, 107 blocks
        got = InfoNCEWithMixing(n_hard=8, s=16, s_prime=4, generator=_gen(3))(q, k, queue)
    torch.testing.assert_close(got, ref)


def test_stats_proxy_accuracy_and_step_counting():
    q = torch.eye(4)
    loss_fn = InfoNCEWithMixing(tau=0.1, n_hard=2, s=0, s_prime=2)
    loss_fn(q, q, -torch.eye(4))
    st = loss_fn.last_stats
    assert st["proxy_acc_queue"] == 100.0 and 0.0 < st["synthetic_mass"] < 1.0 and loss_fn.step == 1
    loss_fn.eval()
    loss_fn(q, q, -torch.eye(4))
    assert loss_fn.step == 1


# ------------------------------------------------------------------------------------------ queue and momentum
def test_memory_queue_fifo_wraps_and_normalises():
    mq = MemoryQueue(4, 5, generator=_gen())
    assert mq.keys.shape == (5, 4) and mq.filled == 0
    torch.testing.assert_close(mq.keys.norm(dim=1), torch.ones(5))
    mq.enqueue(3.0 * torch.eye(4)[:3])
    mq.enqueue(torch.eye(4))
    assert mq.ptr == 2 and mq.filled == 5
    assert mq.keys.argmax(1).tolist() == [2, 3, 2, 0, 1]  # rows 3, 4, 0, 1 were overwritten by the second batch
    torch.testing.assert_close(mq.keys[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    mq.enqueue(torch.eye(4).repeat(2, 1))  # more keys than slots: the last `size` stay
    assert mq.filled == 5 and "filled=5" in repr(mq)
    clone = MemoryQueue(4, 5)
    clone.load_state_dict(mq.state_dict())
    assert torch.equal(clone.keys, mq.keys)
    keys = torch.randn(3, 4, generator=_gen(4), dtype=torch.float64)
    for batch in (keys, keys.float(), torch.zeros(1, 4)):  # cast to the queue's dtype; a zero row stays zero
        mq = MemoryQueue(4, 5)
        mq.enqueue(batch)
        assert mq.keys.dtype == torch.float32 and mq.ptr == len(batch)
        torch.testing.assert_close(mq.keys[:len(batch)], F.normalize(batch, dim=1).float())


def test_momentum_update():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    w_a, w_b = a.weight.detach().clone(), b.weight.detach().clone()
    momentum_update(a, b, 0.75)
    torch.testing.assert_close(b.weight, 0.75 * w_b + 0.25 * w_a)
    momentum_update(a, b, 1.0)
    torch.testing.assert_close(b.weight, 0.75 * w_b + 0.25 * w_a)
    momentum_update(a, b, 0.0)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    na, nb = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    na.running_mean.fill_(2.0)
    momentum_update(na, nb, 0.9)
    assert torch.equal(nb.running_mean, na.running_mean)


# ------------------------------------------------------------------------------------------ probe
def test_negative_weight_stats():
    q, k = torch.randn(8, 16, generator=_gen()), torch.randn(8, 16, generator=_gen(1))
    queue = _unit(100, 16, seed=2)
    w = negative_weight_stats(q, k, queue, tau=0.2)
    torch.testing.assert_close(w.p_pos + w.p_neg.sum(1), torch.ones(8))
    assert w.top_share(1.0) == pytest.approx(1.0) and w.synthetic_share == 0.0
    assert w.top_share(0.01) <= w.top_share(0.1) <= 1.0 and w.top_share(0.1) > 0.1  # hardest 10% > uniform share
    loss_fn = InfoNCEWithMixing(tau=0.2, n_hard=8, s=8, s_prime=4, generator=_gen(3))
    with _native.disabled():  # the draws of the module's PyTorch path are those of hard_negative_mix
        loss_fn(q, k, queue)
        syn = hard_negative_mix(F.normalize(q, dim=1), queue, n_hard=8, s=8, s_prime=4, generator=_gen(3))
    ws = negative_weight_stats(q, k, queue, tau=0.2, synthetic=syn)
    assert ws.n_queue == 100 and ws.synthetic_share == pytest.approx(loss_fn.last_stats["synthetic_mass"], rel=1e-5)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call", [
    lambda q, bad: hard_negative_mix(q, bad),
    lambda q, bad: queue_info_nce_loss(q, q, bad),
    lambda q, bad: InfoNCEWithMixing()(q, q, bad),
    lambda q, bad: negative_weight_stats(q, q, bad),
])
def test_queue_of_the_wrong_width(call):
    with pytest.raises(ArgumentError, match=r"queue must be a \(K, 16\) matrix .*got shape \(128, 8\)"):
        call(torch.randn(4, 16), torch.randn(128, 8))


def test_enqueue_of_the_wrong_width():
    with pytest.raises(ArgumentError, match=r"keys must be a \(B, 32\) matrix .*dim=32, got shape \(4, 16\)"):
        MemoryQueue(32, 64).enqueue(torch.randn(4, 16))


@pytest.mark.parametrize("kwargs, match", [
    ({"n_hard": 65}, "n_hard must be <= the queue size 64, got 65"),
    ({"n_hard": 0}, "n_hard must be a positive int, got 0"),
    ({"s": -1}, "s must be a non-negative int, got -1"),
    ({"s_prime": 1.5}, "s_prime must be a non-negative int, got float 1.5"),
    ({"beta_max": 0.6}, r"beta_max must be in \[0, 0.5\], got 0.6"),
    ({"generator": 3}, "generator must be a torch.Generator or None, got int"),
])
def test_mix_bad_arguments(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        hard_negative_mix(torch.randn(4, 16), torch.randn(64, 16), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"tau": 0.0}, "tau must be finite and > 0, got 0.0"),
    ({"beta_max": -0.1}, r"beta_max must be in \[0, 0.5\], got -0.1"),
    ({"start_step": -1}, "start_step must be a non-negative int, got -1"),
])
def test_module_bad_arguments(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        InfoNCEWithMixing(**kwargs)


def test_module_n_hard_larger_than_the_queue():
    with pytest.raises(ArgumentError, match="n_hard must be <= the queue size 16, got 64"):
        InfoNCEWithMixing(n_hard=64)(torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8))


def test_other_bad_inputs():
    q = torch.randn(4, 16)
    with pytest.raises(ArgumentError, match=r"q must be a \(B, d\) matrix"):
        hard_negative_mix(torch.randn(16), torch.randn(64, 16))
    with pytest.raises(ArgumentError, match=r"k must have the shape of q \(4, 16\), got \(3, 16\)"):
        queue_info_nce_loss(q, torch.randn(3, 16), torch.randn(64, 16))
    with pytest.raises(ArgumentError, match=r"synthetic must be a \(B, S, d\) tensor with B=4 and d=16"):
        queue_info_nce_loss(q, q, torch.randn(64, 16), synthetic=torch.randn(4, 16))
    with pytest.raises(ArgumentError, match="queue must be a floating-point tensor"):
        queue_info_nce_loss(q, q, torch.ones(64, 16, dtype=torch.long))
    with pytest.raises(ArgumentError, match="size must be a positive int, got 0"):
        MemoryQueue(8, 0)
    with pytest.raises(ArgumentError, match=r"m must be in \[0, 1\], got 1.5"):
        momentum_update(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
    with pytest.raises(ArgumentError, match="online and target must have the same parameter shapes"):
        momentum_update(nn.Linear(2, 2), nn.Linear(3, 2), 0.9)
    with pytest.raises(ArgumentError, match=r"fraction must be in \(0, 1\], got 0"):
        negative_weight_stats(q, q, torch.randn(64, 16)).top_share(0)
