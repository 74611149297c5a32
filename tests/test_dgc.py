"""Tests of Deep Gradient Compression (paper slug: dgc): compressor math, warm-up, coding, simulator, claim."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradkit.distributed.dgc import (
    DGCCompressor, SparseGrad, decode_block16, encode_block16, select_topk, warmup_density,
)
from gradkit.distributed.simulate import CompressorAggregator, DataParallelSimulator, MeanAggregator, shard
from gradkit.engine import fit, seed_everything


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def data(n=48, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def train_sim(model, aggregator, workers, epochs=3, momentum=0.0, nesterov=False, batch=4):
    x, y = data()
    sim = DataParallelSimulator(model, aggregator, workers)
    loaders = sim.tensor_loaders(x, y, workers, batch, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov)
    return fit(model, opt, sim.batches(loaders), epochs=epochs, compute_loss=sim.compute_loss,
               before_step=sim.before_step, on_epoch_start=sim.set_epoch)


def comps(n, **kw):
    kw.setdefault("warmup", None)
    return [DGCCompressor(world_size=n, **kw) for _ in range(n)]


# ------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mode", ["tensor", "flat"])
def test_density_one_without_masking_is_momentum_sgd_on_the_average(nesterov, mode):
    ref, ours = mlp(), mlp()
    train_sim(ref, MeanAggregator(), 3, momentum=0.9, nesterov=nesterov)
    agg = CompressorAggregator(comps(3, density=1.0, momentum=0.9, nesterov=nesterov, momentum_masking=False),
                               mode=mode)
    train_sim(ours, agg, 3, momentum=0.0)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)


def test_density_one_with_masking_is_plain_sgd_for_compressed_tensors():
    # every entry is sent every step, so masking clears the momentum each time: u never carries over
    ref, ours = mlp(), mlp()
    for m in (ref, ours):
        for p in m.parameters():
            if p.dim() < 2:
                p.requires_grad_(False)
    train_sim(ref, MeanAggregator(), 2, momentum=0.0)
    train_sim(ours, CompressorAggregator(comps(2, density=1.0, momentum=0.9)), 2, momentum=0.0)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)


def test_mean_aggregator_equals_full_batch_training():
    ref, ours = mlp(), mlp()
    x, y = data()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    # worker r gets rows r, r+2, ...; the simulated step averages two batches of 4 = one batch of 8
    idx = [shard(len(x), r, 2) for r in range(2)]
    for _ in range(3):
        for s in range(0, len(idx[0]), 4):
            rows = torch.cat([i[s:s + 4] for i in idx])
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x[rows]), y[rows]).backward()
            opt.step()
    train_sim(ours, MeanAggregator(), 2, momentum=0.9)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("masking", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_conservation_sent_plus_residual_equals_all_added_velocity(masking, nesterov):
    g = torch.Generator().manual_seed(0)
    c = DGCCompressor(density=0.05, momentum=0.9, nesterov=nesterov, momentum_masking=masking, warmup=None)
    sent = torch.zeros(20, 10, dtype=torch.float64)
    added = torch.zeros_like(sent)
    m = 0.9
    for _ in range(15):
        grad = torch.randn(20, 10, generator=g, dtype=torch.float64)
        u_prev = c.u["w"].clone() if "w" in c.u else torch.zeros_like(grad)
        if nesterov:
            u_new = m * (u_prev + grad)
            added += u_new + grad
        else:
            added += m * u_prev + grad
        sg = c.compress("w", grad)
        sent += c.decompress([sg], sg.shape)
        torch.testing.assert_close(sent + c.v["w"], added, rtol=1e-12, atol=1e-12)


def test_group_compression_conserves_and_masks_each_tensor():
    g = torch.Generator().manual_seed(3)
    c = DGCCompressor(density=0.1, momentum=0.5, warmup=None)
    shapes = [(4, 5), (7, 3), (2, 2)]
    added = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    sent = torch.zeros(sum(math.prod(s) for s in shapes), dtype=torch.float64)
    for _ in range(6):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        for i, gr in enumerate(grads):
            u_prev = c.u[i].clone() if i in c.u else torch.zeros_like(gr)
            added[i] += 0.5 * u_prev + gr
        sg = c.compress_group([0, 1, 2], grads)
        assert sg.values.numel() == c.k_for(sent.numel())
        sent += c.decompress([sg], sent.numel())
        flat_v = torch.cat([c.v[i].reshape(-1) for i in range(3)])
        flat_u = torch.cat([c.u[i].reshape(-1) for i in range(3)])
        idx = sg.flat_indices()
        assert bool((flat_v[idx] == 0).all()) and bool((flat_u[idx] == 0).all())
        torch.testing.assert_close(sent + flat_v, torch.cat([a.reshape(-1) for a in added]))


@pytest.mark.parametrize("coding", ["auto", "int64", "block16"])
@pytest.mark.parametrize("sample_ratio", [None, 0.01, 0.5])
def test_selection_is_exactly_k_unique_and_the_largest(coding, sample_ratio):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(300, 70, generator=g)
    c = DGCCompressor(density=0.003, momentum=0.0, warmup=None, index_coding=coding, sample_ratio=sample_ratio,
                      generator=torch.Generator().manual_seed(2))
    sg = c.compress("w", grad)
    k = math.ceil(0.003 * grad.numel())
    idx = sg.flat_indices()
    assert sg.values.numel() == k and idx.unique().numel() == k
    assert set(idx.tolist()) == set(torch.topk(grad.abs().reshape(-1), k).indices.tolist())
    torch.testing.assert_close(sg.values, grad.reshape(-1)[idx])
    dense = c.decompress([sg], grad.shape)
    assert int((dense != 0).sum()) <= k


@pytest.mark.parametrize("sample_ratio", [None, 0.01])
def test_ties_are_truncated_to_k(sample_ratio):
    x = torch.ones(1000)
    x[::7] = 2.0  # 143 entries tie at the top
    for k in (1, 50, 143, 144, 600):
        idx = select_topk(x, k, sample_ratio, torch.Generator().manual_seed(0))
        assert idx.numel() == k and idx.unique().numel() == k
        assert bool((x[idx] == 2.0).all()) if k <= 143 else int((x[idx] == 2.0).sum()) == 143


def test_sampled_selection_matches_exact_on_many_draws():
    g = torch.Generator().manual_seed(5)
    for n, k in [(100_000, 100), (5000, 1), (5000, 4999), (20000, 2000)]:
        x = torch.randn(n, generator=g) * torch.rand(n, generator=g)
        s = select_topk(x, k, 0.01, torch.Generator().manual_seed(n))
        assert set(s.tolist()) == set(select_topk(x, k).tolist())


def test_block16_roundtrip_and_bytes():
    for n in (1, 10, 65536, 65537, 200_003):
        for k in sorted({1, min(n, 7), min(n, 3000)}):
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k].sort().values
            packed = encode_block16(idx, n)
            assert packed.dtype == torch.uint8 and packed.numel() == 4 * max(1, -(-n // 65536)) + 2 * k
            assert torch.equal(decode_block16(packed, n, k), idx)
    for bad in (torch.zeros(3, dtype=torch.uint8), torch.zeros(6, dtype=torch.int32)):
        with pytest.raises(ValueError, match="block16"):
            decode_block16(bad, 10, 1)
    with pytest.raises(ValueError, match="do not sum"):
        decode_block16(torch.zeros(6, dtype=torch.uint8), 10, 1)  # count 0 but one value


def test_byte_counters_and_ratios():
    c = DGCCompressor(density=0.01, warmup=("paper", 1), index_coding="int32")
    w, b = torch.randn(100, 100), torch.randn(100)
    c.compress("w", w)                      # epoch 0: density 0.25
    c.send_dense(b)
    assert c.bytes_sent == 2500 * 8 + 400 and c.bytes_dense == 10000 * 4 + 400 and c.bytes_sent_steady == 0
    c.set_epoch(1)
    c.compress("w", w)
    c.send_dense(b)
    assert c.bytes_sent_steady == 100 * 8 + 400 and c.bytes_dense_steady == 40400
    assert c.compression_ratio(steady=True) == pytest.approx(40400 / 1200)
    assert c.compression_ratio(sparse_only=True) == pytest.approx(40000 / 800)
    assert c.compression_ratio() == pytest.approx(80800 / (20400 + 1200))
    cb = DGCCompressor(density=0.01, warmup=None, index_coding="block16")
    cb.compress("w", w)
    assert cb.bytes_sent == 100 * 4 + 100 * 2 + 4


def test_warmup_schedules():
    paper = [warmup_density(e, 0.001, ("paper", 4)) for e in range(6)]
    assert paper == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625, 0.001, 0.001])
    official = [warmup_density(e, 0.001, ("official", 5)) for e in range(6)]
    assert official == pytest.approx([0.001 ** (1 / 6), 0.001 ** (2 / 6), 0.001 ** 0.5, 0.001 ** (4 / 6),
                                      0.001 ** (5 / 6), 0.001])
    assert round(official[0], 3) == 0.316 and round(official[1], 3) == 0.1
    assert [warmup_density(e, 0.01, [0.5, 0.1]) for e in range(3)] == [0.5, 0.1, 0.01]
    assert warmup_density(0, 0.3, None) == 0.3
    assert warmup_density(0, 0.5, ("paper", 4)) == 0.5  # never below the final density
    c = DGCCompressor(density=0.001, warmup=("paper", 4))
    assert c.density == 0.25 and c.set_epoch(10) == 0.001 and c.k_for(1000) == 1


def test_state_dict_roundtrip_continues_identically():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(30, 20, generator=g, dtype=torch.float64) for _ in range(6)]
    a = DGCCompressor(density=0.05, warmup=("official", 3), world_size=1)
    for gr in grads[:3]:
        a.compress("w", gr)
        a.dense_momentum("b", gr[0])
    a.set_epoch(1)
    b = DGCCompressor(density=0.05, warmup=("official", 3), world_size=1)
    b.load_state_dict(a.state_dict())
    assert b.density == a.density and b.bytes_sent == a.bytes_sent
    for gr in grads[3:]:
        sa, sb = a.compress("w", gr), b.compress("w", gr)
        assert torch.equal(sa.values, sb.values) and torch.equal(sa.indices, sb.indices)
        assert torch.equal(a.dense_momentum("b", gr[0]), b.dense_momentum("b", gr[0]))
    assert torch.equal(a.v["w"], b.v["w"]) and torch.equal(a.u["w"], b.u["w"])
    with pytest.raises(KeyError, match="misses"):
        b.load_state_dict({"u": {}})


def test_local_clipping_bounds_the_added_gradient():
    c = DGCCompressor(density=1.0, momentum=0.0, clip_norm=2.0, world_size=4, warmup=None)
    g = torch.full((10, 10), 5.0, dtype=torch.float64)
    sg = c.compress("w", g)
    assert float(sg.values.norm()) == pytest.approx(2.0 / math.sqrt(4), rel=1e-5)
    small = torch.full((10, 10), 1e-3, dtype=torch.float64)
    sg2 = DGCCompressor(density=1.0, momentum=0.0, clip_norm=2.0, world_size=4, warmup=None).compress("w", small)
    torch.testing.assert_close(sg2.values.sort().values, small.reshape(-1).sort().values)  # below the threshold


def test_dgc_trains_a_small_problem_and_beats_nothing():
    seed_everything(0)
    model = mlp()
    hist = train_sim(model, CompressorAggregator(comps(2, density=0.1, momentum=0.9)), 2, epochs=8)
    losses = hist.series("train_loss")
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)


def test_works_in_float32_and_bfloat16_grads():
    for dtype in (torch.float32, torch.bfloat16):
        c = DGCCompressor(density=0.1, warmup=None)
        sg = c.compress("w", torch.randn(10, 10).to(dtype))
        assert sg.values.dtype == dtype and c.decompress([sg], (10, 10)).dtype == dtype


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    (dict(density=0.0), "density must be in"), (dict(density=1.5), "density must be in"),
    (dict(density=float("nan")), "density must be finite"), (dict(momentum=1.0), "momentum must be in"),
    (dict(world_size=0), "world_size must be a positive int"), (dict(clip_norm=-1.0), "clip_norm must be"),
    (dict(warmup=("linear", 3)), "warmup kind"), (dict(warmup=[0.5, 2.0]), r"warmup\[1\] must be in"),
    (dict(warmup="paper"), "warmup must be"), (dict(min_dim=-1), "min_dim"),
    (dict(sample_ratio=0.0), "sample_ratio"), (dict(index_coding="int8"), "index_coding"),
])
def test_compressor_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DGCCompressor(**kw)


def test_decompress_rejects_malformed_parts():
    c = DGCCompressor(density=0.1, world_size=2, warmup=None)
    ok = SparseGrad(torch.ones(3), torch.tensor([0, 1, 2], dtype=torch.int32), 10, torch.Size([10]))
    with pytest.raises(ValueError, match="one part per worker"):
        c.decompress([ok], 10)
    bad_idx = SparseGrad(torch.ones(3), torch.tensor([0, 1, 10], dtype=torch.int32), 10, torch.Size([10]))
    with pytest.raises(ValueError, match="worker 1.*outside"):
        c.decompress([ok, bad_idx], 10)
    nan = SparseGrad(torch.tensor([1.0, float("nan"), 1.0]), ok.indices, 10, torch.Size([10]))
    with pytest.raises(ValueError, match="non-finite"):
        c.decompress([nan, ok], 10)
    short = SparseGrad(torch.ones(2), ok.indices, 10, torch.Size([10]))
    with pytest.raises(ValueError, match="equal length"):
        c.decompress([ok, short], 10)
    floaty = SparseGrad(torch.ones(3), torch.ones(3), 10, torch.Size([10]))
    with pytest.raises(ValueError, match="int32/int64"):
        c.decompress([ok, floaty], 10)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="k must be an int"):
        select_topk(torch.randn(5), 6)
    with pytest.raises(ValueError, match="epoch must be"):
        warmup_density(-1, 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        DGCCompressor(warmup=None).compress("w", torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="world_size is 2 but 3 workers"):
        CompressorAggregator(comps(2) + [DGCCompressor(world_size=2)])
    c = DGCCompressor(world_size=2)
    with pytest.raises(ValueError, match="own compressor"):
        CompressorAggregator([c, c])
    with pytest.raises(ValueError, match="mode"):
        CompressorAggregator(comps(1), mode="bucket")
    with pytest.raises(ValueError, match="world_size is 3 but the aggregator has 2"):
        DataParallelSimulator(mlp(), CompressorAggregator(comps(2)), 3)
    with pytest.raises(ValueError, match="rank must be"):
        shard(10, 2, 2)
    sim = DataParallelSimulator(mlp(), MeanAggregator(), 2)
    with pytest.raises(ValueError, match="one batch iterable per worker"):
        sim.batches([[1]])
    x, y = data()
    uneven = [[(x[:4], y[:4])] * 2, [(x[:4], y[:4])]]
    with pytest.raises(ValueError, match="different lengths"):
        list(sim.batches(uneven)(0))


def test_train_script_refuses_to_run_without_torchrun(monkeypatch, capsys):
    from gradkit.distributed.train_dgc import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["--epochs", "1"]) == 2
    assert "torchrun" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- claim, bench
def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.base import CLAIMS
    from gradkit.harness.claims.dgc import CLAIM

    assert CLAIMS.get("dgc") is CLAIM and CLAIM.control == {"dgc": "topk"}
    out = smoke_run("dgc")
    for arm, m in out.metrics.items():
        assert m["train_loss"] < m["first_loss"], arm
    d = out.info["protocol"]["density"]
    assert out.metrics["dgc"]["ratio_steady_sparse_only"] >= 0.9 / (2 * d)
    assert out.metrics["dgc"]["ratio_steady"] > 20.0 and out.metrics["dense"]["ratio"] == 1.0
    assert out.metrics["dgc"]["test_acc"] > 80.0


def test_claim_missing_fashion_mnist(tmp_path):
    from gradkit.data import DataError
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.dgc import CLAIM

    with pytest.raises(DataError, match="Fashion-MNIST"):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_fashion_mnist_smoke(data_root, smoke_run):
    if not (data_root / "fashion_mnist").is_dir():
        pytest.skip("fashion_mnist/ not in the real data folder")
    out = smoke_run("dgc", data_root=data_root)
    p = out.info["protocol"]
    assert p["density"] == 0.001 and p["hidden"] == 256 and p["lr_decay"] is True
    assert set(out.metrics) == {"dense", "topk", "dgc"}
    for arm, m in out.metrics.items():
        assert math.isfinite(m["test_acc"]) and 20.0 <= m["test_acc"] <= 100.0, arm
    # 784-256-10: the dense biases are 0.1% of the parameters, so whole-model bytes come close to the
    # compressed tensors' own ratio (int32 index + fp32 value per sent entry: 1 / (2 d) = 500x)
    assert out.metrics["dgc"]["ratio_steady_sparse_only"] >= 0.9 / (2 * p["density"])
    assert out.metrics["dgc"]["ratio_steady"] >= 0.55 * out.metrics["dgc"]["ratio_steady_sparse_only"]


def test_fixed_subset_split_is_seed_independent_and_standardised():
    import numpy as np

    from gradkit.data.readers import fixed_subset_split

    rng = np.random.RandomState(3)
    x, y = rng.randint(0, 256, size=(50, 4, 4)).astype(np.uint8), rng.randint(0, 10, size=50)
    a, b = fixed_subset_split((x, y), (x, y), 20, 10), fixed_subset_split((x, y), (x, y), 20, 10)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (20, 4, 4) and a.x_test.shape == (10, 4, 4)
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std(unbiased=False)) - 1) < 1e-4
    assert len(fixed_subset_split((x, y), (x, y), 500, 500).y_train) == 50  # capped at the data


def test_benchmarks_register_and_wire_ratio():
    import gradkit.harness.benchmarks.dgc as bench
    from gradkit.harness.bench import BENCHMARKS

    assert "dgc-compress-vs-backward" in BENCHMARKS and "dgc-train-step" in BENCHMARKS
    grads = [torch.randn(1024, 1024), torch.randn(10, 1024)]
    ratio, dense, sent = bench._wire_ratio("block16", grads)
    assert ratio >= 500.0 and dense == 4 * (1024 * 1024 + 10240)


@pytest.mark.parametrize("n, k", [(1 << 15, 1), (1 << 15, 128), (100_003, 97), (1 << 20, 1049), (65_600, 200)])
def test_blockwise_exact_topk_matches_torch_topk(n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) ** 3
    x[-1] = 1e6 if k > 1 else x[-1]  # a winner in the short tail row
    got = select_topk(x, k)
    assert got.numel() == k and got.unique().numel() == k
    assert set(got.tolist()) == set(torch.topk(x.abs(), k).indices.tolist())


def test_blockwise_topk_with_ties_returns_a_valid_topk_set():
    x = torch.zeros(1 << 16)
    x[::5] = 1.0  # 13,108 entries tie
    x[7] = 3.0
    idx = select_topk(x, 100)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert 7 in idx.tolist() and bool((x[idx] >= 1.0).all())
