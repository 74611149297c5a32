"""Tests of unit matching between networks (paper slug: convergent-learning): correlations, matchings, sparse
stitching, spectral clusters, the activation probe's hooks, the claim, the benchmark."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.engine import fit
from gradkit.probes.unit_matching import (ActivationRecorder, SparseStitch, chance_correlation, collect_activations,
                                          dead_units, fit_sparse_prediction, joint_spectral_clusters, match_units,
                                          partner_r2, prediction_r2, standardize, unit_correlation, units_view)
from gradkit.testing import assert_no_hooks_left, count_hooks

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))


# ------------------------------------------------------------------------------------------ correlations
def test_correlation_matches_numpy_and_has_unit_diagonal():
    a = torch.randn(300, 5, generator=gen(), dtype=D)
    b = torch.randn(300, 4, generator=gen(1), dtype=D) + a[:, :4]
    c = unit_correlation(a, b)
    ref = np.corrcoef(a.numpy().T, b.numpy().T)[:5, 5:]
    assert c.shape == (5, 4)
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-12)
    cc = unit_correlation(a)
    np.testing.assert_allclose(torch.diagonal(cc).numpy(), 1.0, atol=1e-12)
    assert torch.allclose(cc, cc.T)


def test_dead_units_correlate_zero_never_nan():
    a = torch.randn(50, 4, generator=gen())
    a[:, 2] = 3.7  # a dead (constant) unit
    c = unit_correlation(a)
    assert torch.isfinite(c).all()
    assert (c[2] == 0).all() and (c[:, 2] == 0).all()
    assert dead_units(a).tolist() == [False, False, True, False]
    z, mean, std = standardize(a)
    assert (z[:, 2] == 0).all() and std[2] == 1.0


def test_values_stay_in_unit_interval_in_float32():
    a = torch.randn(64, 3, generator=gen())
    c = unit_correlation(a, torch.cat([a, -a], 1))
    assert c.dtype == torch.float32 and c.abs().max() <= 1.0


def test_permuted_rescaled_units_are_recovered_exactly():
    a = torch.relu(torch.randn(400, 7, generator=gen(), dtype=D))
    perm = torch.randperm(7, generator=gen(3))
    scales = torch.rand(7, generator=gen(4), dtype=D) * 5 + 0.1
    b = a[:, perm] * scales + 2.0  # B unit j = scale_j * A unit perm[j] + offset
    m = match_units(unit_correlation(a, b))
    assert torch.equal(perm[m.partner], torch.arange(7))  # B unit partner[i] is A unit i
    np.testing.assert_allclose(m.corr.numpy(), 1.0, atol=1e-12)
    assert m.n_shared == 0 and m.mean == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(4, 4), (5, 5), (6, 6), (3, 5), (4, 6)])
def test_bipartite_equals_brute_force(shape):
    k_a, k_b = shape
    for seed in range(3):
        c = torch.rand(k_a, k_b, generator=gen(seed), dtype=D) * 2 - 1
        m = match_units(c)
        best = max(sum(float(c[i, p[i]]) for i in range(k_a)) for p in itertools.permutations(range(k_b), k_a))
        assert float(m.corr.sum()) == pytest.approx(best, abs=1e-12)
        assert len(set(m.partner.tolist())) == k_a  # one-to-one
        assert torch.equal(m.corr, c[torch.arange(k_a), m.partner])


def test_semi_matching_is_rowwise_argmax_and_dominates_bipartite():
    c = torch.rand(6, 6, generator=gen(), dtype=D)
    s, b = match_units(c, "semi"), match_units(c)
    assert torch.equal(s.partner, c.argmax(1))
    assert s.mean >= b.mean
    c2 = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    assert match_units(c2, "semi").n_shared == 1  # both A units pick B unit 0


def test_exclude_self_is_a_best_derangement():
    c = torch.rand(5, 5, generator=gen(2), dtype=D)
    c = (c + c.T) / 2
    c.fill_diagonal_(1.0)
    m = match_units(c, exclude_self=True)
    assert all(m.partner[i] != i for i in range(5))
    best = max(sum(float(c[i, p[i]]) for i in range(5)) for p in itertools.permutations(range(5))
               if all(p[i] != i for i in range(5)))
    assert float(m.corr.sum()) == pytest.approx(best, abs=1e-12)
    assert int(match_units(c, "semi", exclude_self=True).partner.eq(torch.arange(5)).sum()) == 0


def test_chance_is_the_mean_over_all_pairings():
    c = torch.rand(4, 4, generator=gen(), dtype=D)
    exact = np.mean([sum(float(c[i, p[i]]) for i in range(4)) / 4 for p in itertools.permutations(range(4))])
    assert chance_correlation(c) == pytest.approx(exact, abs=1e-12)


# ------------------------------------------------------------------------------------------ sparse stitch
def test_stitch_without_l1_is_least_squares():
    a = torch.randn(200, 6, generator=gen(), dtype=D)
    b = a @ torch.randn(6, 3, generator=gen(1), dtype=D) + 0.3 * torch.randn(200, 3, generator=gen(2), dtype=D)
    fit_ = fit_sparse_prediction(a, b, 0.0, steps=2000, test=(a, b))
    za, _, _ = standardize(a)
    zb, _, _ = standardize(b)
    ref = torch.linalg.lstsq(za, zb).solution.T
    assert torch.allclose(fit_.stitch.weight.detach(), ref, atol=1e-4)
    pred = fit_.stitch(a)
    assert fit_.r2 == pytest.approx(prediction_r2(pred.detach(), b), abs=1e-12)
    assert fit_.nnz == 6 and fit_.nnz_fraction == 1.0


def test_stitch_matches_lasso_and_gives_exact_zeros():
    from sklearn.linear_model import Lasso

    a = torch.randn(300, 8, generator=gen(), dtype=D)
    w = torch.zeros(8, 4, dtype=D)
    w[0, 0], w[3, 1], w[5, 2], w[[1, 2], 3] = 1.0, -2.0, 0.5, 1.0
    b = a @ w + 0.2 * torch.randn(300, 4, generator=gen(1), dtype=D)
    za, _, _ = standardize(a)
    zb, _, _ = standardize(b)
    for l1 in (1e-3, 3e-2):
        f = fit_sparse_prediction(a, b, l1, steps=3000, test=(a, b))
        ref = Lasso(alpha=l1, fit_intercept=False, tol=1e-12, max_iter=100000).fit(za.numpy(), zb.numpy()).coef_
        np.testing.assert_allclose(f.stitch.weight.detach().numpy(), ref, atol=1e-6)
    sparse = fit_sparse_prediction(a, b, 3e-2, steps=500, test=(a, b))
    assert 0 < sparse.stitch.nnz() < 32 and (sparse.stitch.weight == 0).any()
    dense = fit_sparse_prediction(a, b, 1e-5, steps=500, test=(a, b))
    assert sparse.nnz < dense.nnz


def test_prox_penalty_and_sgd_loop():
    s = SparseStitch(3, 2, l1=0.5)
    with torch.no_grad():
        s.weight.copy_(torch.tensor([[1.0, -0.2, 0.0], [-2.0, 0.4, 0.6]]))
    assert float(s.penalty().detach()) == pytest.approx(0.5 * 4.2)
    s.prox_(lr=0.8)  # threshold 0.4
    assert torch.allclose(s.weight, torch.tensor([[0.6, 0.0, 0.0], [-1.6, 0.0, 0.2]]))
    assert s.nnz() == 3 and s.nnz_per_unit().tolist() == [1, 2]
    # the usage of the docstring: SGD steps on the data loss then prox steps give a sparse, useful map
    a = torch.randn(256, 5, generator=gen())
    b = a[:, [0, 2]] * torch.tensor([1.0, -1.0])
    st = SparseStitch(5, 2, l1=0.01)
    opt = torch.optim.SGD(st.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        loss = 0.5 * (st(a) - b).square().sum(1).mean()
        loss.backward()
        opt.step()
        st.prox_(0.1)
    assert st.nnz() == 2 and float(loss.detach()) < 0.01


def test_conv_stitch_is_the_linear_stitch_at_every_position():
    lin = SparseStitch(3, 2, l1=0.0)
    conv = SparseStitch(3, 2, l1=0.0, conv=True)
    with torch.no_grad():
        for s in (lin, conv):
            s.weight.copy_(torch.randn(2, 3, generator=gen()))
            s.in_mean.fill_(0.5), s.out_std.fill_(2.0)
    x = torch.randn(4, 3, 5, 5, generator=gen(1))
    y = conv(x)
    assert y.shape == (4, 2, 5, 5)
    assert torch.allclose(units_view(y), lin(units_view(x)), atol=1e-6)
    ref = nn.functional.conv2d((x - 0.5), conv.weight[:, :, None, None]) * 2.0
    assert torch.allclose(y, ref, atol=1e-6)


def test_partner_r2_is_one_for_a_permuted_copy_and_r2_known_value():
    a = torch.randn(200, 5, generator=gen(), dtype=D)
    b = 3 * a[:, [4, 0, 1, 3, 2]] - 1
    assert partner_r2(a[:150], b[:150], a[150:], b[150:]) == pytest.approx(1.0, abs=1e-12)
    t = torch.tensor([[1.0], [2.0], [3.0]], dtype=D)
    assert prediction_r2(torch.full_like(t, 2.0), t) == pytest.approx(0.0)
    assert prediction_r2(t + 1, t) == pytest.approx(1 - 3 / 2)


def test_sparse_fit_with_a_validation_split_is_reproducible():
    a = torch.randn(100, 6, generator=gen(), dtype=D)
    b = a[:, :3] + 0.1 * torch.randn(100, 3, generator=gen(1), dtype=D)
    f1 = fit_sparse_prediction(a, b, 1e-3, 200, generator=gen(5))
    f2 = fit_sparse_prediction(a, b, 1e-3, 200, generator=gen(5))
    assert f1.r2 == f2.r2 and 0.9 < f1.r2 <= 1.0


# ------------------------------------------------------------------------------------------ clusters
def test_spectral_clusters_pair_copies_of_the_same_units():
    base = torch.randn(400, 3, generator=gen(), dtype=D)
    a = base.repeat_interleave(2, 1) + 0.05 * torch.randn(400, 6, generator=gen(1), dtype=D)
    b = a[:, torch.randperm(6, generator=gen(2))] + 0.05 * torch.randn(400, 6, generator=gen(3), dtype=D)
    res = joint_spectral_clusters(unit_correlation(a), unit_correlation(a, b), unit_correlation(b), 3)
    assert res.mixed_fraction == 1.0 and res.within > 0.9 > 0.2 > res.between
    assert res.cross_within > 0.9
    for k in range(3):  # each cluster: the 2 copies of one base unit in A and the 2 in B
        assert int((res.labels_a == k).sum()) == 2 and int((res.labels_b == k).sum()) == 2


# ------------------------------------------------------------------------------------------ the probe
def test_collect_activations_restores_mode_and_leaves_no_hooks():
    net = mlp()
    net.train()
    x = torch.randn(30, 4, generator=gen())
    before = count_hooks(net)
    acts = collect_activations(net, "1", x, batch_size=7)
    assert acts.shape == (30, 8) and net.training
    assert torch.allclose(acts, torch.relu(net[0](x)).detach(), atol=1e-6)
    both = collect_activations(net, ["1", net[3]], [(x[:10], None), (x[10:], None)])
    assert set(both) == {"1", "3"} and both["3"].shape == (30, 6)
    assert_no_hooks_left(net, before)


def test_hooks_removed_when_training_raises():
    net = mlp()
    before = count_hooks(net)
    rec = ActivationRecorder(net, ["1", "3"])

    def bad_loss(model, batch):
        model(batch[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with rec:
            fit(net, torch.optim.SGD(net.parameters(), lr=0.1), [(torch.randn(4, 4), torch.zeros(4).long())],
                epochs=1, compute_loss=bad_loss)
    assert_no_hooks_left(net, before)
    rec.remove()  # idempotent
    assert_no_hooks_left(net, before)


def test_a_forward_that_raised_leaves_no_partial_record():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 1))  # the last layer fails on shape
    with ActivationRecorder(net, "1") as rec:
        with pytest.raises(RuntimeError):
            net(torch.randn(5, 2))
        net[2] = nn.Linear(3, 1)
        net(torch.randn(6, 2))
    assert rec.forwards == 1 and rec.activations().shape == (6, 3)


def test_reused_module_needs_call_index():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(3, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(self.act(x)))

    m = Twice()
    x = torch.randn(8, 3, generator=gen())
    with ActivationRecorder(m, "act") as rec:
        m(x), m(x)
    with pytest.raises(RuntimeError, match="ran 2 times"):
        rec.activations("act")
    assert torch.equal(rec.activations("act", call=0), torch.relu(torch.cat([x, x])))
    assert rec.activations("act", call=-1).shape == (16, 3)
    with pytest.raises(ValueError, match="call must be"):
        rec.activations("act", call=2)


def test_conv_positions_are_samples():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 1, 6, 6, generator=gen())
    acts = collect_activations(conv, "1", x)
    out = torch.relu(conv[0](x)).detach()
    assert acts.shape == (2 * 36, 4)
    assert torch.equal(acts[7], out[0, :, 1, 1])  # sample = (image 0, position (1, 1))
    assert collect_activations(conv, "1", x, position_stride=2).shape == (2 * 9, 4)
    assert collect_activations(conv, "1", x, spatial="mean").shape == (2, 4)


# ------------------------------------------------------------------------------------------ clear errors
def test_errors_name_the_argument():
    net = mlp()
    with pytest.raises(ValueError, match="layer 'nope' not found"):
        collect_activations(net, "nope", torch.randn(3, 4))
    with pytest.raises(ValueError, match="not a submodule"):
        ActivationRecorder(net, nn.ReLU())
    with pytest.raises(ValueError, match="spatial must be one of"):
        ActivationRecorder(net, "1", spatial="avg")
    with pytest.raises(ValueError, match="position_stride must be a positive int"):
        units_view(torch.randn(2, 3, 4, 4), position_stride=0)
    bad = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        bad[0].bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite activation"):
        collect_activations(bad, "0", torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        unit_correlation(torch.randn(1, 3))
    with pytest.raises(ValueError, match="same number of samples"):
        unit_correlation(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(samples, units\) matrix"):
        unit_correlation(torch.randn(5))
    with pytest.raises(ValueError, match="floating-point"):
        unit_correlation(torch.ones(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be finite"):
        unit_correlation(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="rows <= columns"):
        match_units(torch.rand(3, 2))
    with pytest.raises(ValueError, match="method must be one of"):
        match_units(torch.rand(2, 2), "greedy")
    with pytest.raises(ValueError, match="exclude_self needs a square"):
        match_units(torch.rand(2, 3), exclude_self=True)
    with pytest.raises(ValueError, match="l1 must be finite and >= 0"):
        fit_sparse_prediction(torch.randn(10, 2), torch.randn(10, 2), -1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        fit_sparse_prediction(torch.randn(5, 2), torch.randn(5, 2), 0.1, val_fraction=0.1)
    with pytest.raises(ValueError, match="test units must match"):
        fit_sparse_prediction(torch.randn(10, 2), torch.randn(10, 2), 0.1, test=(torch.randn(4, 3), torch.randn(4, 2)))
    with pytest.raises(ValueError, match="in_units must be a positive int"):
        SparseStitch(0, 2)
    with pytest.raises(ValueError, match="a must have 3 units"):
        SparseStitch(3, 2)(torch.randn(4, 2))
    c = unit_correlation(torch.randn(20, 3))
    with pytest.raises(ValueError, match="corr_aa must be"):
        joint_spectral_clusters(c, c, c[:2, :2], 2)
    with pytest.raises(ValueError, match="n_clusters must be an int in"):
        joint_spectral_clusters(c, c, c, 1)
    with pytest.raises(RuntimeError, match="no forward"):
        ActivationRecorder(net, "1").activations()


# ------------------------------------------------------------------------------------------ the claim, bench
def test_claim_smoke_measures(smoke_run):
    out = smoke_run("convergent-learning")
    m = out.metrics
    for arm in ("trained", "untrained", "init"):
        assert len(out.curves["sorted_l1"][arm]) == 128
        s = out.curves["sorted_l1"][arm]
        assert all(x >= y - 1e-12 for x, y in zip(s, s[1:])) and -1 <= s[-1] <= s[0] <= 1
        assert m[arm]["semi_l1"] >= m[arm]["matched_l1"] - 1e-12
    assert m["trained"]["test_acc"] > 50.0 and m["trained"]["matched_l1"] > m["chance"]["matched_l1"]
    assert 0 < m["sparse"]["nnz_frac"] <= 1 and m["sparse"]["r2_l1"] <= 1
    assert out.info["protocol"]["stitch_steps"] == 100


def test_benchmark_runs():
    from gradkit.harness.bench import BENCHMARKS, load_benchmarks

    load_benchmarks()
    b = BENCHMARKS.get("convergent-learning-probe-step")
    r = b.run(2)
    assert r.baseline_s > 0 and r.candidate_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda():
    dev = torch.device("cuda")
    net = mlp().to(dev)
    acts = collect_activations(net, "1", torch.randn(50, 4, device=dev))
    c = unit_correlation(acts, acts.flip(1))
    assert c.device.type == "cuda" and match_units(c).partner.device.type == "cuda"
    f = fit_sparse_prediction(acts, acts, 1e-3, 50, test=(acts, acts))
    assert f.stitch.weight.device.type == "cuda" and f.r2 > 0.9
