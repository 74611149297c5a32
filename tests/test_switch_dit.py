"""Tests of Switch-DiT (paper slug: switch-dit): the MoE mask, the prior loss and the tiny DiT."""
from __future__ import annotations

import pytest
import torch

from gradkit.generative.dit import TinyDiT
from gradkit.nn.switch_moe import (DiffusionPriorLoss, TimestepGatedMoEMask, diffusion_prior_matrix,
                                   jensen_shannon, match_prior_columns)


def test_zero_init_switch_equals_dit():
    torch.manual_seed(0)
    dit = TinyDiT(depth=2, routing=None)
    with torch.no_grad():
        for q in dit.parameters():
            q.normal_(std=0.2)   # leave adaLN-Zero's zeros: the blocks must not be identities
    sw = TinyDiT(depth=2, routing="switch")
    sw.load_state_dict(dit.state_dict(), strict=False)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    out = dit(x, t, y)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(sw(x, t, y), out, rtol=1e-5, atol=1e-5)
    _, routing = sw.forward_with_routing(x, t, y)
    assert all(bool((m == 1).all()) for m in routing.masks)


def test_mask_matches_reference_and_gates():
    torch.manual_seed(1)
    moe = TimestepGatedMoEMask(8, num_experts=3, k=2).double()
    with torch.no_grad():
        moe.expert_weight.normal_()
        moe.expert_bias.normal_()
    x, t, emb = torch.randn(2, 5, 8, dtype=torch.double), torch.tensor([1, 7]), torch.randn(10, 8, dtype=torch.double)
    mask, probs, usage = moe(x, t, emb)
    p_all, _ = moe.route(emb)
    ref = torch.ones_like(x)
    for b in range(2):
        for e in p_all[t[b]].topk(2).indices.tolist():
            ref[b] += p_all[t[b], e] * (x[b] @ moe.expert_weight[e] + moe.expert_bias[e])
    torch.testing.assert_close(mask, ref)
    assert usage.sum(1).eq(2).all()


def test_prior_matrix_rows():
    P = diffusion_prior_matrix(1000, 4, 3, 2)
    assert P.sum(1).eq(8).all()
    assert P[0, :8].eq(1).all() and P[-1, -8:].eq(1).all()


def test_matching_identity_and_zero_jsd():
    P = diffusion_prior_matrix(20, 1, 3, 2, alpha=1.0)
    perm = torch.tensor([2, 0, 1])
    match = match_prior_columns(P[:, perm], P, generator=torch.Generator().manual_seed(0))
    assert sorted(match.tolist()) == [0, 1, 2]
    assert torch.equal(P[:, match], P[:, perm])
    loss = DiffusionPriorLoss(20, 1, 3, 2, alpha=1.0)
    t = torch.arange(20)
    assert float(loss([P[t] / 2], [P], t)) < 1e-5
    assert float(jensen_shannon(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))) > 0.1


def test_prior_gradient_reaches_router():
    model = TinyDiT(depth=2, routing="switch")
    prior = DiffusionPriorLoss(1000, 2, 3, 2)
    t = torch.tensor([0, 999])
    _, r = model.forward_with_routing(torch.randn(2, 1, 8, 8), t, torch.tensor([0, 1]))
    prior(r.probs, r.usage, t).backward()
    assert model.blocks[0].moe.router.weight.grad.abs().sum() > 0


def test_bad_input():
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        TimestepGatedMoEMask(8, num_experts=2, k=3)
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        DiffusionPriorLoss(10, 1, num_experts=2, k=3)
    with pytest.raises(ValueError, match="routing"):
        TinyDiT(routing="dense")


def test_benchmarks_run():
    from gradkit.harness.bench import BENCHMARKS, load_benchmarks
    load_benchmarks()
    for name in ("switch-dit-block", "switch-dit-model"):
        res = BENCHMARKS.get(name).run(1)
        assert res.baseline_s > 0 and res.candidate_s > 0
    assert BENCHMARKS.get("switch-dit-block").target == 1.3
