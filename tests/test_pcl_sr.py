"""Tests of PCL-SR (paper slug: pcl-sr): Haar transform, samples, embedder, losses, PCLLoss and the SR net."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from gradkit._validate import ArgumentError
from gradkit.sr.degradations import make_contrastive_samples, random_gaussian_blur, sharpen, upscale_factor
from gradkit.sr.embedder import WaveletPatchEmbedder
from gradkit.sr.net import SUPPORTED_SCALES, ResidualSR
from gradkit.sr.pcl_loss import PCLLoss, dual_contrastive_loss, multi_positive_infonce, spatial_cosine
from gradkit.sr.wavelet import HaarHighPass, haar_dwt, haar_idwt

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n=4, c=1, size=16, seed=0, dtype=torch.float32):
    return torch.rand(n, c, size, size, generator=gen(seed), dtype=dtype)


def small_pcl(seed=0, **kw) -> PCLLoss:
    torch.manual_seed(seed)
    emb = WaveletPatchEmbedder(1, widths=(8, 8, 16), patch=2)
    return PCLLoss(emb, torch.optim.Adam(emb.parameters(), 1e-3), layers=(0, 2), generator=gen(seed + 1), **kw)


# ---------------------------------------------------------------------------------------- Haar transform
def test_haar_perfect_reconstruction_and_orthogonality():
    x = images(3, 2, 8, dtype=D)
    bands = haar_dwt(x)
    assert all(b.shape == (3, 2, 4, 4) for b in bands)
    torch.testing.assert_close(haar_idwt(*bands), x, atol=1e-12, rtol=0)
    # orthonormal: energy kept, and the 4 filters are orthonormal on a 2x2 block
    energy = sum((b ** 2).sum() for b in bands)
    torch.testing.assert_close(energy, (x ** 2).sum(), atol=1e-10, rtol=0)
    basis = torch.eye(4, dtype=D).reshape(4, 1, 2, 2)
    m = torch.stack([torch.cat([b.reshape(-1) for b in haar_dwt(e[None])]) for e in basis])
    torch.testing.assert_close(m @ m.T, torch.eye(4, dtype=D))


def test_haar_known_block_and_highpass_zero_on_constants():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D).reshape(1, 1, 2, 2)
    ll, lh, hl, hh = (float(b) for b in haar_dwt(x))
    assert (ll, lh, hl, hh) == pytest.approx((5.0, -2.0, -1.0, 0.0))
    hp = HaarHighPass()(torch.full((2, 3, 8, 8), 0.7))
    assert hp.shape == (2, 9, 4, 4) and float(hp.abs().max()) == 0.0


def test_haar_gradcheck():
    x = images(1, 1, 4, dtype=D).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: haar_dwt(t), (x,))
    bands = [b.detach().requires_grad_() for b in haar_dwt(x.detach())]
    assert torch.autograd.gradcheck(haar_idwt, tuple(bands))


def test_haar_bad_input():
    with pytest.raises(ArgumentError, match="even height and width"):
        haar_dwt(torch.rand(1, 1, 5, 4))
    with pytest.raises(ArgumentError, match="4-D"):
        HaarHighPass()(torch.rand(4, 4))
    with pytest.raises(ArgumentError, match="floating"):
        haar_dwt(torch.ones(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ArgumentError, match="shape of ll"):
        haar_idwt(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 3))


# ---------------------------------------------------------------------------------------- degradations
def test_sharpen_identity_constant_and_closed_form():
    x = images(2, 3, 9, dtype=D)
    torch.testing.assert_close(sharpen(x, 1.0), x)
    c = torch.full((2, 1, 6, 6), 0.3, dtype=D)
    torch.testing.assert_close(sharpen(c, 2.5), c)
    # a single bright pixel at the centre of a 3x3 image: s = 5/13 there, border pixels are kept
    x = torch.zeros(1, 1, 3, 3, dtype=D)
    x[..., 1, 1] = 1.0
    out = sharpen(x, 2.0)
    assert float(out[0, 0, 1, 1]) == pytest.approx(5 / 13 + 2 * (1 - 5 / 13))
    assert float(out[0, 0, 0, 0]) == 0.0
    # per-image factors, and clamp
    two = torch.cat([x, x])
    per = sharpen(two, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(per[0], x[0])
    assert float(per[1, 0, 1, 1]) == pytest.approx(5 / 13)
    assert float(sharpen(x, 3.0, clamp=(0.0, 1.0)).max()) <= 1.0


def test_random_blur_keeps_constants_and_mean_and_smooths():
    c = torch.full((3, 2, 12, 12), 0.4)
    torch.testing.assert_close(random_gaussian_blur(c, generator=gen(1)), c)
    x = images(4, 1, 32, seed=2, dtype=D)
    y = random_gaussian_blur(x, generator=gen(3))
    assert y.shape == x.shape
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert abs(float(y.mean() - x.mean())) < 0.02
    hf = HaarHighPass()
    assert float(hf(y).abs().mean()) < float(hf(x).abs().mean())
    assert float((y[inner] - x[inner]).abs().mean()) > 0
    # the same generator seed gives the same blur
    torch.testing.assert_close(random_gaussian_blur(x, generator=gen(3)), y)


def test_make_contrastive_samples_shapes_and_no_grad():
    hr = images(4, 1, 16).requires_grad_()
    lr = F.avg_pool2d(hr.detach(), 2)
    pos, neg = make_contrastive_samples(hr, lr, n_pos=2, n_neg=3, generator=gen())
    assert len(pos) == 3 and len(neg) == 4
    assert all(t.shape == hr.shape and not t.requires_grad for t in pos + neg)
    torch.testing.assert_close(pos[0], hr.detach())
    torch.testing.assert_close(neg[0], F.interpolate(lr, scale_factor=2, mode="bicubic"))
    pos0, neg0 = make_contrastive_samples(hr, lr, n_pos=0, n_neg=0)
    assert len(pos0) == 1 and len(neg0) == 1


def test_degradations_bad_input():
    x = images()
    with pytest.raises(ArgumentError, match="factor"):
        sharpen(x, -1.0)
    with pytest.raises(ArgumentError, match="factor"):
        sharpen(x, torch.ones(3))
    with pytest.raises(ArgumentError, match="clamp"):
        sharpen(x, 2.0, clamp=(1.0, 0.0))
    with pytest.raises(ArgumentError, match="ksizes"):
        random_gaussian_blur(x, ksizes=(4,))
    with pytest.raises(ArgumentError, match="sigma"):
        random_gaussian_blur(x, sigma=(2.0, 1.0))
    with pytest.raises(ArgumentError, match="generator"):
        random_gaussian_blur(x, generator=0)
    with pytest.raises(ArgumentError, match="n_pos"):
        make_contrastive_samples(x, F.avg_pool2d(x, 2), n_pos=-1)
    with pytest.raises(ArgumentError, match="sharp_range"):
        make_contrastive_samples(x, F.avg_pool2d(x, 2), sharp_range=(3.0, 1.0))


def test_scale_factor_checks():
    hr = images(2, 1, 12)
    assert upscale_factor(hr, F.avg_pool2d(hr, 2)) == 2
    assert upscale_factor(hr, F.avg_pool2d(hr, 3)) == 3
    with pytest.raises(ArgumentError, match="scale factor"):
        upscale_factor(hr, torch.rand(2, 1, 5, 5))
    with pytest.raises(ArgumentError, match="scale factor"):
        upscale_factor(hr, torch.rand(2, 1, 6, 4))
    with pytest.raises(ArgumentError, match="same batch size"):
        upscale_factor(hr, torch.rand(3, 1, 6, 6))


# ---------------------------------------------------------------------------------------- SR net
@pytest.mark.parametrize("scale", SUPPORTED_SCALES)
def test_sr_net_shapes(scale):
    net = ResidualSR(in_channels=2, width=4, blocks=1, scale=scale)
    assert net(torch.rand(3, 2, 5, 6)).shape == (3, 2, 5 * scale, 6 * scale)


def test_sr_net_bad_scale_and_input():
    with pytest.raises(ArgumentError, match=r"scale must be one of \(2, 3, 4\), got 5"):
        ResidualSR(scale=5)
    with pytest.raises(ArgumentError, match="scale"):
        ResidualSR(scale=1.5)
    with pytest.raises(ArgumentError, match="width"):
        ResidualSR(width=0)
    with pytest.raises(ArgumentError, match="lr must be"):
        ResidualSR(in_channels=1)(torch.rand(2, 3, 8, 8))


def test_pcl_loss_rejects_unsupported_scale():
    pcl = small_pcl()
    hr = images(2, 1, 16)
    with pytest.raises(ArgumentError, match="scale factor"):
        pcl(hr.clone(), hr, torch.rand(2, 1, 7, 7))
    with pytest.raises(ArgumentError, match="sr must have the shape of hr"):
        pcl(torch.rand(2, 1, 8, 8), hr, F.avg_pool2d(hr, 2))


# ---------------------------------------------------------------------------------------- embedder
def test_embedder_shapes_features_and_errors():
    emb = WaveletPatchEmbedder(1, widths=(8, 8, 16, 16), patch=4)
    logits, feats = emb(images(3, 1, 32), return_features=True)
    assert logits.shape == (3, 16)
    assert [tuple(f.shape) for f in feats] == [(3, 8, 16, 16), (3, 8, 8, 8), (3, 16, 8, 8), (3, 16, 4, 4)]
    assert bool((feats[0] < 0).any())  # taken before the LeakyReLU
    with pytest.raises(ArgumentError, match="widths"):
        WaveletPatchEmbedder(1, widths=())
    with pytest.raises(ArgumentError, match="strides"):
        WaveletPatchEmbedder(1, widths=(4, 4), strides=(1,))
    with pytest.raises(ArgumentError, match="in_ch"):
        WaveletPatchEmbedder(0)
    with pytest.raises(ArgumentError, match=r"x must be an \(N, 1, H, W\)"):
        emb(images(2, 3, 32))


# ---------------------------------------------------------------------------------------- losses
def test_dual_contrastive_loss_matches_the_formula():
    r, f = torch.randn(5, dtype=D, generator=gen(1)), torch.randn(7, dtype=D, generator=gen(2))
    real = torch.stack([-torch.log(torch.exp(ri) / (torch.exp(ri) + torch.exp(f).sum())) for ri in r]).mean()
    fake = torch.stack([-torch.log(torch.exp(-fj) / (torch.exp(-fj) + torch.exp(-r).sum())) for fj in f]).mean()
    torch.testing.assert_close(dual_contrastive_loss(r.reshape(1, 5), f.reshape(7, 1)), real + fake)
    with pytest.raises(ArgumentError, match="fake_logits"):
        dual_contrastive_loss(r, torch.zeros(0))


def test_multi_positive_infonce_equals_cross_entropy_and_log_uniform():
    f_sr = torch.randn(3, 4, 2, 2, dtype=D, generator=gen(0))
    pos = [torch.randn(3, 4, 2, 2, dtype=D, generator=gen(i)) for i in (1, 2)]
    neg = [torch.randn(3, 4, 2, 2, dtype=D, generator=gen(i)) for i in (3, 4, 5)]
    tau = 0.5
    s_neg = torch.stack([spatial_cosine(f_sr, n) for n in neg], 1)
    ce = torch.stack([F.cross_entropy(torch.cat([spatial_cosine(f_sr, p)[:, None], s_neg], 1) / tau,
                                      torch.zeros(3, dtype=torch.long)) for p in pos]).mean()
    torch.testing.assert_close(multi_positive_infonce(f_sr, pos, neg, tau), ce)
    # every similarity equal (all features the same map) -> log(1 + n_neg)
    same = [f_sr.clone() for _ in range(3)]
    torch.testing.assert_close(multi_positive_infonce(f_sr, same[:2], same), torch.tensor(math.log(4.0), dtype=D))
    # spatial cosine by hand: channel cosine per position, mean over positions
    a, b = f_sr[:1], pos[0][:1]
    by_hand = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(spatial_cosine(a, b), by_hand.mean().reshape(1))


def test_multi_positive_infonce_bad_input():
    f = torch.rand(2, 3, 4)
    with pytest.raises(ArgumentError, match="f_pos_list"):
        multi_positive_infonce(f, [], [f])
    with pytest.raises(ArgumentError, match="tau"):
        multi_positive_infonce(f, [f], [f], tau=0.0)
    with pytest.raises(ArgumentError, match="share one shape"):
        multi_positive_infonce(f, [torch.rand(2, 3, 5)], [f])


# ---------------------------------------------------------------------------------------- PCLLoss
def _sr_batch(seed=0):
    torch.manual_seed(seed)
    net = ResidualSR(1, width=4, blocks=1, scale=2)
    hr = images(4, 1, 16, seed=seed)
    lr = F.avg_pool2d(hr, 2)
    return net, hr, lr


def test_pcl_gradient_reaches_sr_net_not_embedder():
    net, hr, lr = _sr_batch()
    pcl = small_pcl(weight=0.5)
    before = [p.detach().clone() for p in pcl.embedder.parameters()]
    sr = net(lr)
    loss = pcl(sr, hr, lr)
    assert loss.requires_grad and math.isfinite(float(loss.detach()))
    assert set(pcl.last) == {"embedder_loss", "cl"}
    # the embedder moved by its own optimiser (one step) ...
    assert any(not torch.equal(b, p) for b, p in zip(before, pcl.embedder.parameters()))
    grads = [None if p.grad is None else p.grad.clone() for p in pcl.embedder.parameters()]
    # ... and the update ran on detached tensors: the SR net got no gradient from it
    assert all(p.grad is None for p in net.parameters())
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert float(g.abs().sum()) > 0
    # the generator term leaves the embedder's gradients as its own update left them
    for a, p in zip(grads, pcl.embedder.parameters()):
        assert (a is None and p.grad is None) or torch.equal(a, p.grad)
    assert all(p.requires_grad for p in pcl.embedder.parameters())
    assert pcl.embedder.training


def test_pcl_blocked_build_sends_no_gradient():
    net, hr, lr = _sr_batch()
    pcl = small_pcl(block_generator_grad=True)
    loss = pcl(net(lr), hr, lr)
    assert math.isfinite(float(loss)) and not loss.requires_grad


def test_pcl_update_embedder_sees_detached_tensors():
    net, hr, lr = _sr_batch()
    pcl = small_pcl()
    sr = net(lr)
    pos, neg = make_contrastive_samples(hr, lr, 2, 2, generator=gen())
    seen = []
    handle = pcl.embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    try:
        pcl.update_embedder(sr, pos, neg)
    finally:
        handle.remove()
    assert seen == [False]
    assert all(p.grad is None for p in net.parameters())


def test_pcl_term_is_lowest_at_the_hr_image():
    net, hr, lr = _sr_batch()
    pcl = small_pcl(d_steps=0)
    pos, neg = make_contrastive_samples(hr, lr, 2, 2, generator=gen(4))
    at_hr = float(pcl.contrastive_term(hr, pos, neg))
    at_neg = [float(pcl.contrastive_term(n, pos, neg)) for n in neg]
    assert at_hr < min(at_neg)


def test_embedder_dual_loss_decreases_on_fixed_sets():
    hr = images(8, 1, 16, seed=5)
    lr = F.avg_pool2d(hr, 2)
    pcl = small_pcl(seed=3)
    pos, neg = make_contrastive_samples(hr, lr, 2, 2, generator=gen(6))
    sr = F.interpolate(lr, scale_factor=2, mode="bilinear")
    losses = [pcl.update_embedder(sr, pos, neg) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_pcl_loss_bad_arguments():
    emb = WaveletPatchEmbedder(1, widths=(4,))
    opt = torch.optim.SGD(emb.parameters(), 0.1)
    with pytest.raises(ArgumentError, match="embedder must be an nn.Module"):
        PCLLoss(lambda x: x, opt)
    with pytest.raises(ArgumentError, match="embedder_optimizer"):
        PCLLoss(emb, "adam")
    with pytest.raises(ArgumentError, match="layers"):
        PCLLoss(emb, opt, layers=())
    with pytest.raises(ArgumentError, match="weight"):
        PCLLoss(emb, opt, weight=0.0)
    with pytest.raises(ArgumentError, match="n_neg"):
        PCLLoss(emb, opt, n_neg=0)
    with pytest.raises(ArgumentError, match="block_generator_grad"):
        PCLLoss(emb, opt, block_generator_grad=1)
    hr = images(2, 1, 8)
    with pytest.raises(ArgumentError, match="out of range"):
        PCLLoss(emb, opt, layers=(3,))(hr.clone(), hr, F.avg_pool2d(hr, 2))


# ---------------------------------------------------------------------------------------- benchmark
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.pcl_sr  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("pcl-sr-loss-step")
    assert b.slug == "pcl-sr" and b.target is None
    r = b.run(2)
    assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)
