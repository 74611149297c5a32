"""dta: the toy renderer, texture expansion, the DTN surrogate, its training and the EOT texture attack."""
import numpy as np
import pytest
import torch
from torch import nn

from gradkit.data.dta_scenes import SceneBatch, sample_scenes
from gradkit.robustness.dta import (DifferentiableTransformationNetwork, TexturePool, detection_rate,
                                    eot_texture_attack, expand_texture, make_dtn_pairs, masked_psnr, naive_paste,
                                    random_tiles, train_dtn)
from gradkit.robustness.toy_renderer import ToyRenderer

K, SIZE = 4, 32
GRAY = np.full((3, K, K), 0.5)


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(24, SIZE, seed=3)


@pytest.fixture(scope="module")
def renderer():
    return ToyRenderer(K)


@pytest.fixture(scope="module")
def trained():
    """A small DTN trained briefly on renderer pairs (shared by the tests that need a trained surrogate)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    r = ToyRenderer(K)
    pairs = make_dtn_pairs(r, sample_scenes(256, 16, seed=11), GRAY, random_tiles(256, K, g))
    dtn = DifferentiableTransformationNetwork(hidden=8)
    losses = train_dtn(dtn, pairs, steps=150, batch_size=32, lr=5e-3, generator=g)
    held = make_dtn_pairs(r, sample_scenes(48, 16, seed=12), GRAY, random_tiles(48, K, g))
    return dtn, losses, held


# ------------------------------------------------------------------------------------ scenes and renderer
def test_scenes_are_deterministic_and_sliceable():
    a, b = sample_scenes(5, SIZE, seed=7), sample_scenes(5, SIZE, seed=7)
    assert np.array_equal(a.background, b.background) and np.array_equal(a.noise_seed, b.noise_seed)
    sub = a[1:3]
    assert isinstance(sub, SceneBatch) and len(sub) == 2 and sub.size == SIZE
    assert np.array_equal(sub.cx, a.cx[1:3])
    assert len(a[4]) == 1 and a[4].cx[0] == a.cx[4]
    assert a.background.min() >= 0 and a.background.max() <= 1


def test_render_shapes_range_quantisation(renderer, scenes):
    x, m = renderer.render(np.random.default_rng(0).random((3, K, K)), scenes)
    assert isinstance(x, np.ndarray) and x.shape == (24, 3, SIZE, SIZE) and x.dtype == np.float32
    assert m.shape == (24, 1, SIZE, SIZE) and set(np.unique(m)) <= {0.0, 1.0}
    assert x.min() >= 0 and x.max() <= 1
    assert np.allclose(x * 255, np.round(x * 255), atol=1e-4)  # on the 8-bit grid
    assert 0.05 < m.mean() < 0.4  # the object covers part of the image


def test_render_is_deterministic_and_texture_only_changes_the_body(renderer, scenes):
    rng = np.random.default_rng(1)
    t1, t2 = rng.random((3, K, K)), rng.random((3, K, K))
    a, m = renderer.render(t1, scenes)
    b, _ = renderer.render(t1, scenes)
    c, _ = renderer.render(t2, scenes)
    assert np.array_equal(a, b)  # same tile, same scene seed: same image (same sensor noise)
    outside = np.broadcast_to(m == 0, a.shape)
    assert np.array_equal(a[outside], c[outside])  # texture reaches only the object's pixels
    assert not np.array_equal(a, c)


def test_render_per_scene_tiles_match_single_tiles(renderer, scenes):
    tiles = np.random.default_rng(2).random((len(scenes), 3, K, K))
    batch, _ = renderer.render(tiles, scenes)
    for i in (0, 5):
        one, _ = renderer.render(tiles[i], scenes[i:i + 1])
        assert np.array_equal(batch[i:i + 1], one)


def test_renderer_offers_no_gradient(renderer, scenes):
    tile = torch.rand(3, K, K, requires_grad=True)
    x, _ = renderer.render(tile, scenes[:2])
    assert isinstance(x, np.ndarray)  # numpy out: no autograd graph to follow
    # quantisation: a tiny texture change leaves almost every pixel unchanged (derivative 0 or undefined)
    base = np.full((3, K, K), 0.4)
    y0, _ = renderer.render(base, scenes)
    y1, _ = renderer.render(base + 1e-7, scenes)
    assert (y0 != y1).mean() < 1e-3


def test_geometry_index_matches_render(renderer, scenes):
    """A tile whose cells differ only in one channel shows its cell index in the render's body."""
    g = renderer.geometry(scenes)
    assert g.index.min() >= 0 and g.index.max() < K * K
    assert np.all(g.index[g.mask[:, 0] == 0] == 0)
    tile = torch.rand(3, K, K)
    e = expand_texture(tile, torch.from_numpy(g.index), torch.from_numpy(g.mask))
    expected = tile.reshape(3, -1)[:, torch.from_numpy(g.index)].permute(1, 0, 2, 3) * torch.from_numpy(g.mask)
    assert torch.equal(e, expected)


def test_empty_render_has_no_object(renderer, scenes):
    e = renderer.render_empty(scenes)
    x, m = renderer.render(GRAY, scenes)
    assert e.shape == x.shape
    assert not np.array_equal(e, x)


# ------------------------------------------------------------------------------------ expansion
def test_expand_texture_gradient_counts_pixels(renderer, scenes):
    """d/d tile of sum(eta_exp) = the number of masked pixels showing each cell (closed form)."""
    g = renderer.geometry(scenes[:4])
    index, mask = torch.from_numpy(g.index), torch.from_numpy(g.mask)
    tile = torch.rand(3, K, K, requires_grad=True)
    expand_texture(tile, index, mask).sum().backward()
    counts = torch.bincount(index[mask[:, 0] > 0], minlength=K * K).float().reshape(K, K)
    assert torch.allclose(tile.grad, counts.expand(3, K, K))


def test_expand_texture_gradcheck_float64(renderer, scenes):
    g = renderer.geometry(scenes[:2])
    index, mask = torch.from_numpy(g.index), torch.from_numpy(g.mask).double()
    tile = torch.rand(3, K, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: expand_texture(t, index, mask), (tile,), fast_mode=True)


# ------------------------------------------------------------------------------------ DTN
def test_dtn_exact_outside_mask_and_gradient_only_through_mask():
    torch.manual_seed(0)
    dtn = DifferentiableTransformationNetwork(hidden=8).double()
    x_ref = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.float64)
    mask[:, :, 4:12, 3:10] = 1
    index = torch.randint(0, K * K, (2, 16, 16))
    tile = torch.rand(3, K, K, dtype=torch.float64, requires_grad=True)
    out = dtn(x_ref, expand_texture(tile, index, mask), mask)
    outside = (mask == 0).expand_as(out)
    assert torch.equal(out[outside], x_ref[outside])
    (g_out,) = torch.autograd.grad(out[outside].sum(), tile, allow_unused=True, retain_graph=True)
    assert g_out is None or torch.count_nonzero(g_out) == 0
    (g_in,) = torch.autograd.grad(out[~outside].sum(), tile)
    assert torch.count_nonzero(g_in) > 0
    assert torch.autograd.gradcheck(lambda t: dtn(x_ref, expand_texture(t, index, mask), mask), (tile,), fast_mode=True)


def test_dtn_without_residual_is_gain_times_texture_plus_offset():
    torch.manual_seed(1)
    dtn = DifferentiableTransformationNetwork(hidden=8, residual=False)
    x_ref, eta = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    mask = torch.ones(2, 1, 12, 12)
    a, c = dtn.gain_offset(x_ref, mask)
    assert (a > 0).all()
    assert torch.allclose(dtn(x_ref, eta, mask), (a * eta + c).clamp(0, 1))


def test_train_dtn_reduces_loss_and_beats_naive(trained):
    dtn, losses, held = trained
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    with torch.no_grad():
        p_dtn = masked_psnr(dtn(held.x_ref, held.eta_exp, held.mask), held.x_eta, held.mask)
    p_naive = masked_psnr(naive_paste(held.x_ref, held.eta_exp, held.mask), held.x_eta, held.mask)
    assert p_dtn > p_naive + 5


def test_trained_dtn_identity_consistency(trained):
    """With the reference texture as the new texture, the trained DTN returns (close to) x_ref."""
    dtn, _, held = trained
    ref = expand_texture(torch.full((3, K, K), 0.5), held.index, held.mask)
    with torch.no_grad():
        ident = dtn(held.x_ref, ref, held.mask)
        other = dtn(held.x_ref, held.eta_exp, held.mask)
    assert masked_psnr(ident, held.x_ref, held.mask) > 28
    assert masked_psnr(ident, held.x_ref, held.mask) > masked_psnr(other, held.x_ref, held.mask) + 10


def test_masked_psnr_closed_form():
    x, y, m = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1), torch.zeros(1, 1, 4, 4)
    m[..., :2, :] = 1
    y[..., 2:, :] = 0.9  # outside the mask: ignored
    assert abs(masked_psnr(x, y, m) - 20.0) < 1e-4  # 10 log10(1 / 0.01)


# ------------------------------------------------------------------------------------ attack
def _victim(size=SIZE):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * size * size, 1)).eval()


def test_eot_attack_lowers_surrogate_confidence(trained, renderer, scenes):
    dtn, _, _ = trained
    victim = _victim(16)
    pool = TexturePool.render(renderer, sample_scenes(16, 16, seed=13), GRAY)
    g = torch.Generator().manual_seed(0)
    res = eot_texture_attack(dtn, victim, pool, tile_size=K, steps=10, lr=0.05, batch_size=8, loss="logit",
                             generator=g)
    assert res.tile.shape == (3, K, K) and res.tile.min() >= 0 and res.tile.max() <= 1
    assert len(res.losses) == 10
    with torch.no_grad():
        def mean_logit(t):
            return float(victim(dtn(pool.x_ref, expand_texture(t, pool.index, pool.mask), pool.mask)).mean())
        assert mean_logit(res.tile) < mean_logit(torch.full((3, K, K), 0.5))
    assert all(p.grad is None for p in victim.parameters())


def test_eot_attack_respects_eps(renderer, scenes):
    pool = TexturePool.render(renderer, scenes, GRAY)
    init = torch.full((3, K, K), 0.5)
    res = eot_texture_attack(naive_paste, _victim(), pool, tile_size=K, steps=5, lr=0.5, eps=0.1, init=init,
                             generator=torch.Generator().manual_seed(0))
    assert (res.tile - init).abs().max() <= 0.1 + 1e-6


def test_detection_rate():
    victim = lambda x: x.mean(dim=(1, 2, 3)) - 0.5  # noqa: E731
    x = torch.cat([torch.full((3, 3, 4, 4), 0.9), torch.full((1, 3, 4, 4), 0.1)])
    assert detection_rate(victim, x) == 75.0


# ------------------------------------------------------------------------------------ bad input
def test_bad_tiles(renderer, scenes):
    with pytest.raises(ValueError, match=r"tile must have shape \(3, 4, 4\)"):
        renderer.render(np.zeros((4, 4, 3)), scenes)
    with pytest.raises(ValueError, match=r"tile values must be in \[0, 1\]"):
        renderer.render(np.full((3, K, K), 1.5), scenes)
    with pytest.raises(ValueError, match="holds 2 tiles but there are 24 scenes"):
        renderer.render(np.zeros((2, 3, K, K)), scenes)
    with pytest.raises(ValueError, match="scenes must be a SceneBatch"):
        renderer.render(GRAY, "scenes")
    with pytest.raises(ValueError, match="tile_size must be"):
        ToyRenderer(0)
    g = renderer.geometry(scenes[:2])
    with pytest.raises(ValueError, match=r"tile must have shape .* got \(3, 4, 5\)"):
        expand_texture(torch.rand(3, 4, 5), torch.from_numpy(g.index), torch.from_numpy(g.mask))
    with pytest.raises(ValueError, match=r"index values must be tile cells in \[0, 4\)"):
        expand_texture(torch.rand(3, 2, 2), torch.from_numpy(g.index), torch.from_numpy(g.mask))
    with pytest.raises(ValueError, match="index must be an int64 tensor"):
        expand_texture(torch.rand(3, K, K), torch.from_numpy(g.index).float(), torch.from_numpy(g.mask))


def test_bad_attack_arguments(renderer, scenes):
    pool = TexturePool.render(renderer, scenes[:4], GRAY)
    v = _victim()
    with pytest.raises(ValueError, match="eps must be finite and >= 0, got -0.1"):
        eot_texture_attack(naive_paste, v, pool, eps=-0.1)
    with pytest.raises(ValueError, match=r"init must have shape \(3, 4, 4\)"):
        eot_texture_attack(naive_paste, v, pool, init=torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"init values must be in \[0, 1\]"):
        eot_texture_attack(naive_paste, v, pool, init=torch.full((3, K, K), -0.2))
    with pytest.raises(ValueError, match="loss must be one of"):
        eot_texture_attack(naive_paste, v, pool, loss="hinge")
    with pytest.raises(ValueError, match="pool must be a TexturePool"):
        eot_texture_attack(naive_paste, v, (pool.x_ref, pool.index, pool.mask))


def test_bad_images():
    dtn = DifferentiableTransformationNetwork(hidden=4)
    m = torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"x_ref values must be in \[0, 1\], got range"):
        dtn(torch.full((1, 3, 8, 8), 1.2), torch.rand(1, 3, 8, 8), m)
    with pytest.raises(ValueError, match="x_ref must have 3 channel"):
        dtn(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), m)
    with pytest.raises(ValueError, match="eta_exp must have x_ref's shape"):
        dtn(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 4, 4), m)
    with pytest.raises(ValueError, match=r"images values must be in \[0, 1\]"):
        detection_rate(lambda x: x.mean((1, 2, 3)), torch.full((2, 3, 4, 4), 255.0))
    with pytest.raises(ValueError, match=r"x_ref values must be in \[0, 1\]"):
        TexturePool(torch.full((1, 3, 4, 4), -1.0), torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="hidden must be"):
        DifferentiableTransformationNetwork(hidden=0)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_dtn(dtn, None, steps=1, loss="huber")
