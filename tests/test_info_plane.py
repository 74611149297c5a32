"""Tests of the information-plane probes (paper slug: info-plane): estimators, recorder, gradient SNR, claim."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.data import TensorBatches
from gradkit.engine import fit
from gradkit.probes.gradient_snr import GradientSNR, SNRStats
from gradkit.probes.information import (InformationPlaneRecorder, binned_mutual_information,
                                        kde_mutual_information, log_spaced_steps)
from gradkit.testing import count_hooks

BITS = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=12)))  # all 4096 patterns, in {-1, 1}


def parity(x: torch.Tensor) -> torch.Tensor:
    return ((x > 0).sum(1) % 2).long()


def entropy_bits(values) -> float:
    c = Counter(values)
    n = sum(c.values())
    return -sum(v / n * math.log2(v / n) for v in c.values())


def naive_binned(T: np.ndarray, y: np.ndarray, n_bins: int, lo: float, hi: float, x_ids=None):
    """Dictionary counting: each row's tuple of bin indices is a symbol; I = H(A) + H(B) - H(A, B)."""
    n = len(T)
    x_ids = list(range(n)) if x_ids is None else list(x_ids)
    sym = []
    for row in T:
        idx = []
        for v in row:
            k = int(math.floor((v - lo) / (hi - lo) * n_bins))
            idx.append(min(max(k, 0), n_bins - 1))
        sym.append(tuple(idx))
    h_t = entropy_bits(sym)
    ixt = h_t + entropy_bits(x_ids) - entropy_bits(list(zip(sym, x_ids)))
    ity = h_t + entropy_bits(list(y)) - entropy_bits(list(zip(sym, y)))
    return ixt, ity


# ------------------------------------------------------------------------------------------ binned
def test_identity_layer_keeps_all_12_bits_and_the_label():
    y = parity(BITS)
    ixt, ity = binned_mutual_information(BITS, y)
    assert ixt == pytest.approx(12.0, abs=1e-9)
    assert ity == pytest.approx(1.0, abs=1e-9)  # H(Y) of the balanced parity label


def test_constant_layer_and_label_layer():
    y = parity(BITS)
    assert binned_mutual_information(torch.full((4096, 3), 0.3), y) == (pytest.approx(0.0, abs=1e-12),) * 2
    onehot = nn.functional.one_hot(y, 2).float()
    ixt, ity = binned_mutual_information(onehot, y)
    assert ixt == pytest.approx(1.0, abs=1e-12) and ity == pytest.approx(1.0, abs=1e-12)
    y3 = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)  # H(Y) = 1.5 bits
    ixt, ity = binned_mutual_information(nn.functional.one_hot(y3).float(), y3)
    assert ixt == pytest.approx(1.5, abs=1e-12) and ity == pytest.approx(1.5, abs=1e-12)


@pytest.mark.parametrize("seed, n_bins, rng", [(0, 3, (-1.0, 1.0)), (1, 5, (-0.5, 0.5)), (2, 30, (-1.0, 1.0)),
                                                (3, 2, (0.0, 2.0))])
def test_matches_naive_counting(seed, n_bins, rng):
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(60, 3, generator=g, dtype=torch.float64) * 0.7
    y = torch.randint(0, 3, (60,), generator=g)
    x_ids = torch.randint(0, 25, (60,), generator=g)
    for ids in (None, x_ids):
        got = binned_mutual_information(T, y, n_bins, rng, ids)
        ref = naive_binned(T.numpy(), y.tolist(), n_bins, *rng, None if ids is None else ids.tolist())
        assert got[0] == pytest.approx(ref[0], abs=1e-12) and got[1] == pytest.approx(ref[1], abs=1e-12)


def test_wide_layer_falls_back_to_row_unique():
    g = torch.Generator().manual_seed(0)
    T = torch.rand(50, 20, generator=g) * 2 - 1  # 20 units x log2(30) bits > 62: rows compared whole
    T[25:] = T[:25]
    y = torch.randint(0, 2, (50,), generator=g)
    got = binned_mutual_information(T, y)
    ref = naive_binned(T.double().numpy(), y.tolist(), 30, -1.0, 1.0)
    assert got[0] == pytest.approx(ref[0], abs=1e-12) and got[1] == pytest.approx(ref[1], abs=1e-12)


def test_invariant_to_permuting_units_and_rows():
    g = torch.Generator().manual_seed(0)
    T = torch.tanh(BITS @ torch.randn(12, 6, generator=g))
    y = parity(BITS)
    ref = binned_mutual_information(T, y)
    perm_rows = torch.randperm(len(T), generator=g)
    perm_units = torch.randperm(6, generator=g)
    for Tp, yp in ((T[:, perm_units], y), (T[perm_rows], y[perm_rows])):
        got = binned_mutual_information(Tp, yp)
        assert got[0] == pytest.approx(ref[0], abs=1e-9) and got[1] == pytest.approx(ref[1], abs=1e-9)


def test_bounds_clipping_and_adaptive_range():
    g = torch.Generator().manual_seed(1)
    T = torch.randn(200, 4, generator=g) * 3
    y = torch.randint(0, 2, (200,), generator=g)
    ixt, ity = binned_mutual_information(T, y)
    assert 0.0 <= ixt <= math.log2(200) + 1e-12 and 0.0 <= ity <= 1.0 + 1e-12
    # values outside the range land in the end bins: the same as clipping them first
    assert binned_mutual_information(T, y) == binned_mutual_information(T.clamp(-1, 1), y)
    # adaptive bins follow the data: invariant to a positive affine map of the layer
    a = binned_mutual_information(T, y, value_range="adaptive")
    b = binned_mutual_information(2.5 * T + 7.0, y, value_range="adaptive")
    assert a[0] == pytest.approx(b[0], abs=1e-9) and a[1] == pytest.approx(b[1], abs=1e-9)


def test_coarser_nested_bins_never_hold_more_information():
    g = torch.Generator().manual_seed(2)
    T = torch.tanh(BITS @ torch.randn(12, 3, generator=g))
    y = parity(BITS)
    fine, coarse = binned_mutual_information(T, y, 30), binned_mutual_information(T, y, 15)  # 15 | 30
    assert coarse[0] <= fine[0] + 1e-12 and coarse[1] <= fine[1] + 1e-12


def test_repeated_inputs_condition_on_x():
    # input 0 -> T = a twice; input 1 -> T = b once, c once: H(T) = 1.5, H(T|X) = 0.5, I(X;T) = 1
    T = torch.tensor([[-0.9], [-0.9], [0.1], [0.9]])
    y = torch.tensor([0, 0, 1, 1])
    ixt, ity = binned_mutual_information(T, y, x_ids=torch.tensor([0, 0, 1, 1]))
    assert ixt == pytest.approx(1.0, abs=1e-12) and ity == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ kernel
def test_kde_two_points_closed_form():
    for d2, v in ((0.5, 0.1), (2.0, 1.0), (0.01, 0.02)):
        T = torch.tensor([[0.0, 0.0], [math.sqrt(d2), 0.0]], dtype=torch.float64)
        ixt, ity = kde_mutual_information(T, torch.tensor([0, 1]), v)
        expect = -math.log2((1 + math.exp(-d2 / (2 * v))) / 2)
        assert ixt == pytest.approx(expect, rel=1e-10) and ity == pytest.approx(expect, rel=1e-10)


def test_kde_limits_and_invariances():
    y = parity(BITS)
    # tiny noise on distinct rows: every input is resolved, log2(n) bits; identical rows: 0 bits
    ixt, ity = kde_mutual_information(BITS[:512], y[:512], noise_var=1e-3)
    assert ixt == pytest.approx(9.0, abs=1e-6) and ity == pytest.approx(1.0, abs=1e-3)
    assert kde_mutual_information(torch.zeros(64, 3), y[:64])[0] == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    T = torch.randn(300, 4, generator=g, dtype=torch.float64)
    yy = torch.randint(0, 3, (300,), generator=g)
    ref = kde_mutual_information(T, yy, 0.3)
    perm = torch.randperm(300, generator=g)
    for Tp, yp in ((T[perm], yy[perm]), (T[:, [3, 1, 0, 2]] + 5.0, yy)):
        got = kde_mutual_information(Tp, yp, 0.3)
        assert got[0] == pytest.approx(ref[0], abs=1e-9) and got[1] == pytest.approx(ref[1], abs=1e-9)
    assert 0.0 < ref[0] <= math.log2(300)
    # more noise, less information; the block size changes nothing
    assert kde_mutual_information(T, yy, 3.0)[0] < ref[0]
    assert kde_mutual_information(T, yy, 0.3, block=7)[0] == pytest.approx(ref[0], abs=1e-9)


def test_kde_matches_brute_force_double():
    g = torch.Generator().manual_seed(3)
    T = torch.tanh(torch.randn(200, 5, generator=g))
    y = torch.randint(0, 2, (200,), generator=g)
    D = ((T.double()[:, None] - T.double()[None]) ** 2).sum(-1)

    def bound(idx):
        return float(-(torch.logsumexp(-D[idx][:, idx] / 0.2, 1) - math.log(len(idx))).mean() / math.log(2))

    ixt = bound(torch.arange(200))
    cond = sum(float((y == c).double().mean()) * bound(torch.nonzero(y == c).reshape(-1)) for c in (0, 1))
    got = kde_mutual_information(T, y, 0.1)  # float32 input
    assert got[0] == pytest.approx(ixt, abs=1e-4) and got[1] == pytest.approx(ixt - cond, abs=1e-4)


# ------------------------------------------------------------------------------------------ errors
def test_estimator_errors():
    y = torch.tensor([0, 1, 0])
    T = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="T must have at least 2 rows"):
        binned_mutual_information(torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="T must be finite"):
        binned_mutual_information(torch.tensor([[0.0], [float("nan")], [1.0]]), y)
    with pytest.raises(ValueError, match="T must be a floating-point tensor"):
        binned_mutual_information(torch.zeros(3, 2, dtype=torch.long), y)
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        binned_mutual_information(T, y.float())
    with pytest.raises(ValueError, match=r"y must be a 1-D tensor with one entry per row \(3\)"):
        binned_mutual_information(T, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_bins must be an int >= 2, got 1"):
        binned_mutual_information(T, y, n_bins=1)
    with pytest.raises(ValueError, match="value_range must be finite numbers with low < high"):
        binned_mutual_information(T, y, value_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="value_range must be one of"):
        binned_mutual_information(T, y, value_range="auto")
    with pytest.raises(ValueError, match="value_range must be a"):
        binned_mutual_information(T, y, value_range=3.0)
    with pytest.raises(ValueError, match="x_ids must be a 1-D tensor"):
        binned_mutual_information(T, y, x_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise_var must be finite and > 0"):
        kde_mutual_information(T, y, noise_var=0.0)
    with pytest.raises(ValueError, match="T must have at least 2 rows"):
        kde_mutual_information(torch.zeros(1, 2), torch.tensor([0]))


def test_log_spaced_steps():
    s = log_spaced_steps(1000, 40)
    assert len(s) == 40 and s[0] == 1 and s[-1] == 1000 and all(b > a for a, b in zip(s, s[1:]))
    assert log_spaced_steps(5, 5) == [1, 2, 3, 4, 5] and log_spaced_steps(7, 1) == [7]
    assert log_spaced_steps(100, 3, first=10) == [10, 32, 100]
    with pytest.raises(ValueError, match=r"count must be an int in \[1, 5\], got 6"):
        log_spaced_steps(5, 6)
    with pytest.raises(ValueError, match="last must be an int >= 1"):
        log_spaced_steps(0, 1)


# ------------------------------------------------------------------------------------------ recorder
def _net() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():  # layer 1 copies the input (tanh(+-1) fall in distinct bins); layer 3 is constant
        m[0].weight.copy_(torch.eye(12))
        m[0].bias.zero_()
        m[2].weight.zero_()
        m[2].bias.fill_(0.2)
    return m


def test_recorder_known_answers_history_and_no_hooks_left():
    m = _net()
    y = parity(BITS)
    before = count_hooks(m)
    rec = InformationPlaneRecorder(m, ["1", "3"], BITS, y, kde_noise_var=1e-3, kde_samples=256)
    m.train()
    rec.record(0)
    rec.record(5)
    assert count_hooks(m) == before and m.training
    h = rec.history
    assert h["step"].tolist() == [0, 5] and h["ixt"].shape == (2, 2) and h["ity_kde"].shape == (2, 2)
    np.testing.assert_allclose(h["ixt"][:, 0], 12.0, atol=1e-9)
    np.testing.assert_allclose(h["ity"][:, 0], 1.0, atol=1e-9)
    np.testing.assert_allclose(h["ixt"][:, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(h["ixt_kde"][:, 0], 8.0, atol=1e-6)  # 256 distinct rows, tiny noise
    np.testing.assert_allclose(h["ixt_kde"][:, 1], 0.0, atol=1e-9)
    assert rec.seconds > 0
    rec.reset()
    assert rec.history["ixt"].shape == (0, 2)


def test_recorder_chunked_forward_and_transform():
    m = _net()
    with torch.no_grad():
        m[2].weight.normal_()
    y = parity(BITS)
    soft = {"4": lambda h: torch.softmax(h, -1)}
    a = InformationPlaneRecorder(m, ["1", "3", "4"], BITS, y, transforms=soft).record(0)
    b = InformationPlaneRecorder(m, ["1", "3", "4"], BITS, y, transforms=soft, batch_size=1000).record(0)
    assert a == b
    c = InformationPlaneRecorder(m, ["4"], BITS, y).record(0)  # logits are clipped into [-1, 1]
    assert c["ixt"][0] != pytest.approx(a["ixt"][2])


def test_recorder_as_engine_callback_records_on_schedule_and_removes_hooks_when_training_raises():
    m = _net()
    y = parity(BITS)
    rec = InformationPlaneRecorder(m, ["1"], BITS, y, steps=[2, 4])
    before = count_hooks(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    batches = TensorBatches(BITS[:256], y[:256], batch_size=128, generator=torch.Generator().manual_seed(0))
    fit(m, opt, batches, epochs=4, on_epoch_end=rec.on_epoch_end)
    assert rec.history["step"].tolist() == [2, 4] and count_hooks(m) == before

    def boom(epoch, hist):
        raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        with rec:
            assert count_hooks(m) == before + 1
            fit(m, opt, batches, epochs=1, on_epoch_end=boom)
    assert count_hooks(m) == before


class _Broken(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.act = nn.Tanh()
        self.unused = nn.Tanh()
        self.lin = nn.Linear(12, 4)

    def forward(self, x):
        h = self.act(self.lin(x))
        if self.mode == "twice":
            h = self.act(h)
        if self.mode == "nan":
            h = h * float("nan")
        if self.mode == "raise":
            raise RuntimeError("forward failed")
        return h


def test_recorder_errors_and_hooks_removed_on_failure():
    y = parity(BITS)
    m = _Broken("ok")
    with pytest.raises(ValueError, match="no module named 'fc9'; its modules are 'act', 'unused', 'lin'"):
        InformationPlaneRecorder(m, ["fc9"], BITS, y)
    with pytest.raises(ValueError, match="X must have at least 2 rows"):
        InformationPlaneRecorder(m, ["act"], BITS[:1], y[:1])
    with pytest.raises(ValueError, match="y must be a 1-D tensor with one entry per row"):
        InformationPlaneRecorder(m, ["act"], BITS, y[:10])
    with pytest.raises(ValueError, match="layers must name at least one module"):
        InformationPlaneRecorder(m, [], BITS, y)
    with pytest.raises(ValueError, match="layers must be distinct"):
        InformationPlaneRecorder(m, ["act", "act"], BITS, y)
    with pytest.raises(ValueError, match="transforms names layers that are not recorded"):
        InformationPlaneRecorder(m, ["act"], BITS, y, transforms={"lin": torch.relu})
    with pytest.raises(ValueError, match="kde_samples needs kde_noise_var"):
        InformationPlaneRecorder(m, ["act"], BITS, y, kde_samples=100)
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        InformationPlaneRecorder(lambda x: x, ["act"], BITS, y)
    with pytest.raises(ValueError, match="step must be a non-negative int|step must be an int >= 0"):
        InformationPlaneRecorder(m, ["act"], BITS, y).record(-1)
    with pytest.raises(RuntimeError, match="layer 'unused' did not run"):
        InformationPlaneRecorder(m, ["unused"], BITS, y).record(0)
    assert count_hooks(m) == 0
    for mode, exc, msg in (("twice", RuntimeError, "layer 'act' ran 2 times"),
                           ("nan", ValueError, "layer 'lin' produced .* non-finite"),
                           ("raise", RuntimeError, "forward failed")):
        bad = _Broken(mode)
        bad.train()
        layer = "lin" if mode == "nan" else "act"
        if mode == "nan":
            bad.lin.bias.data.fill_(float("nan"))
        with pytest.raises(exc, match=msg):
            InformationPlaneRecorder(bad, [layer], BITS, y).record(0)
        assert count_hooks(bad) == 0 and bad.training


# ------------------------------------------------------------------------------------------ SNR
def _linear_with_grads(grads):
    """A Linear(3 -> 2) whose weight receives the given gradients in turn; returns (model, snr, feed)."""
    model = nn.Linear(3, 2)
    snr = GradientSNR(model)

    def feed():
        for g in grads:
            model.weight.grad = g.clone()
            model.bias.grad = torch.zeros(2)
            snr.accumulate()
    return model, snr, feed


def test_snr_identical_gradients_have_zero_spread():
    g = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    model, snr, feed = _linear_with_grads([g] * 5)
    feed()
    st = snr.end_epoch()["weight"]
    assert isinstance(st, SNRStats) and list(snr.params) == ["weight"]  # biases (1-D) are left out by default
    assert st.mean_norm == pytest.approx(float(g.norm()), rel=1e-6)
    assert st.std_norm == pytest.approx(0.0, abs=1e-6) and st.batches == 5
    assert st.ratio > 1e5
    assert st.weight_norm == pytest.approx(float(model.weight.detach().norm()), rel=1e-6)


def test_snr_matches_numpy_and_noise_ratio_falls_with_batches():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 3, generator=gen) + 0.5 for _ in range(7)]
    _, snr, feed = _linear_with_grads(grads)
    feed()
    st = snr.end_epoch()["weight"]
    a = np.stack([g.numpy() for g in grads]).astype(np.float64)
    assert st.mean_norm == pytest.approx(np.linalg.norm(a.mean(0)), rel=1e-5)
    assert st.std_norm == pytest.approx(np.linalg.norm(a.std(0)), rel=1e-5)  # population std
    ratios = []
    for n in (10, 1000):
        noise = [torch.randn(2, 3, generator=gen) for _ in range(n)]  # zero mean: ratio ~ 1/sqrt(n)
        _, s, f = _linear_with_grads(noise)
        f()
        ratios.append(s.end_epoch()["weight"].ratio)
    assert ratios[1] < 0.15 and ratios[1] < ratios[0]
    assert snr.history["weight"]["ratio"] == [st.ratio]


def test_snr_with_fit_one_ratio_per_weight_matrix_no_hooks():
    m = _net()
    y = parity(BITS)
    snr = GradientSNR(m)
    before = count_hooks(m)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    batches = TensorBatches(BITS[:512], y[:512], batch_size=128, generator=torch.Generator().manual_seed(0))
    fit(m, opt, batches, epochs=3, before_step=snr.before_step, on_epoch_end=snr.on_epoch_end)
    assert count_hooks(m) == before
    assert set(snr.history) == {"0.weight", "2.weight", "4.weight"}
    assert all(len(v["ratio"]) == 3 for v in snr.history.values())
    custom = GradientSNR(m, param_filter=lambda name, p: name.endswith("bias"))
    assert set(custom.params) == {"0.bias", "2.bias", "4.bias"}


def test_snr_errors():
    m = nn.Linear(3, 2)
    snr = GradientSNR(m)
    with pytest.raises(RuntimeError, match="parameter 'weight' has no .grad"):
        snr.accumulate()
    m.weight.grad = torch.ones(2, 3)
    snr.accumulate()
    with pytest.raises(RuntimeError, match="at least 2 batches"):
        snr.end_epoch()
    with pytest.raises(ValueError, match="param_filter selected no trainable parameter"):
        GradientSNR(m, param_filter=lambda n, p: False)
    with pytest.raises(ValueError, match="param_filter must be callable"):
        GradientSNR(m, param_filter="weight")
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        GradientSNR([m])


# ------------------------------------------------------------------------------------------ claim
def test_claim_smoke_values_in_range(smoke_run):
    out = smoke_run("info-plane")
    h_y = out.info["h_y_bits"]
    assert h_y == pytest.approx(1.0, abs=1e-12)
    n_layers = 6
    for arm in ("tanh", "relu", "untrained"):
        for li in range(1, n_layers + 1):
            ixt = np.asarray(out.curves[f"ixt_layer{li}"][arm])
            ity = np.asarray(out.curves[f"ity_layer{li}"][arm])
            assert len(ixt) == len(out.info["curve_axes"][f"ixt_layer{li}"]["x"]) == 6  # epoch 0 + 5 records
            assert np.isfinite(ixt).all() and (ixt >= 0).all() and (ixt <= 12 + 1e-9).all()
            assert np.isfinite(ity).all() and (ity >= 0).all() and (ity <= h_y + 1e-9).all()
            kde = np.asarray(out.curves[f"kde_ixt_layer{li}"][arm])
            assert (kde >= 0).all() and (kde <= math.log2(256) + 1e-6).all()
    for arm in ("tanh", "relu"):
        assert out.metrics[arm]["n_snr_ratios"] == 6.0
        assert len(out.curves["snr_layer1"][arm]) == out.info["protocol"]["epochs"]
    # the untrained network's trajectory is flat: it cannot compress
    assert out.metrics["untrained"]["compression_bits"] == 0.0


def test_benchmarks_registered_and_run():
    import gradkit.harness.benchmarks.info_plane  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("info-plane-snr-step")
    assert b.slug == "info-plane"
    r = b.run(2)
    assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)
    assert BENCHMARKS.get("info-plane-probes-step").slug == "info-plane"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    y = parity(BITS)
    cpu = _net()
    gpu = _net().cuda()
    a = InformationPlaneRecorder(cpu, ["1", "3"], BITS, y, kde_noise_var=0.1, kde_samples=512).record(0)
    b = InformationPlaneRecorder(gpu, ["1", "3"], BITS.cuda(), y.cuda(), kde_noise_var=0.1, kde_samples=512).record(0)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-4)
    snr = GradientSNR(gpu)
    for i in range(3):
        gpu.zero_grad()
        nn.functional.cross_entropy(gpu(BITS[i::3].cuda()), y[i::3].cuda()).backward()
        snr.accumulate()
    assert math.isfinite(snr.end_epoch()["0.weight"].ratio)
