"""boundary-tilting: the linear geometry of adversarial examples, the linear probe, and the shared attacks
(FGSM, targeted PGD, expectation over transformations, transfer evaluation, bad-input errors)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.robustness.boundary_tilting import (adversarial_strength, boundary_distance, deviation_angle,
                                                 local_linearisation, margin, minimal_adversarial, mirror_images,
                                                 nearest_centroid_direction, tilt)
from gradkit.robustness.eot import GaussianNoise, RandomShift
from gradkit.robustness.fgsm import FGSM, fgsm
from gradkit.robustness.linear_probe import LinearProbe
from gradkit.robustness.pgd import PGD, pgd_attack, robust_accuracy
from gradkit.robustness.transfer import transfer_matrix


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _two_blobs(n=200, d=5, seed=0, dtype=torch.float64):
    g = _gen(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x[:, 0] += 3.0 * (2.0 * y - 1.0)
    return x, y


# ------------------------------------------------------------------------------------ geometry


def test_nearest_centroid_closed_form_and_deviation_angle_invariants():
    X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    z, bz = nearest_centroid_direction(X, y)
    torch.testing.assert_close(z, torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert float(bz) == pytest.approx(-2.0)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert float(deviation_angle(w, z)) == pytest.approx(math.pi / 4)
    assert float(deviation_angle(3.7 * w, 0.2 * z)) == pytest.approx(math.pi / 4)  # positive scaling
    assert float(deviation_angle(z, z)) == pytest.approx(0.0, abs=1e-7)            # NC itself
    assert float(deviation_angle(-z, z)) == pytest.approx(math.pi)
    # per-row weights
    rows = torch.stack([w, z, -z])
    torch.testing.assert_close(deviation_angle(rows, z),
                               torch.tensor([math.pi / 4, 0.0, math.pi], dtype=torch.float64), atol=1e-7, rtol=0)


def test_distance_minimal_adversarial_and_mirror_images():
    X, _ = _two_blobs(50, 4)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    b = 0.3
    m = margin(X, w, b)
    d = boundary_distance(X, w, b)
    torch.testing.assert_close(d, m.abs() / w.norm())
    xa = minimal_adversarial(X, w, b)
    torch.testing.assert_close(margin(xa, w, b), torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((xa - X).norm(dim=1), d)                    # the perturbation is the distance
    xo = minimal_adversarial(X, w, b, overshoot=0.01)
    assert bool((torch.sign(margin(xo, w, b)) == -torch.sign(m)).all())
    xm = mirror_images(X, w, b)
    torch.testing.assert_close(margin(xm, w, b), -m)                       # opposite sign, same |margin|
    torch.testing.assert_close((xm - X).norm(dim=1), 2 * d)
    # a point on the far side of an axis-aligned boundary, by hand
    torch.testing.assert_close(mirror_images(torch.tensor([[3.0, 4.0]]), torch.tensor([0.0, 1.0]), -1.0),
                               torch.tensor([[3.0, -2.0]]))


def test_tilt_rotates_by_phi_keeps_norm_and_scales_distance_by_cos():
    z = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    u = torch.tensor([0.3, 0.0, 1.0], dtype=torch.float64)                  # not orthogonal to z: projected
    for phi in (0.0, 0.3, 1.0, 1.5):
        w = tilt(z, u, phi)
        assert float(deviation_angle(w, z)) == pytest.approx(phi, abs=1e-7)
        assert float(w.norm()) == pytest.approx(2.0)
        assert float(w[1]) == pytest.approx(0.0, abs=1e-12)
    # data with no variance along u (third coordinate 0): predictions unchanged, distance * cos(phi)
    X, y = _two_blobs(100, 3)
    X[:, 2] = 0.0
    zz, bz = nearest_centroid_direction(X, y)
    mid = (X[y == 0].mean(0) + X[y == 1].mean(0)) / 2
    for phi in (0.5, 1.2, 1.55):
        w = tilt(zz, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), phi)
        b = -(w * mid).sum()
        assert torch.equal(margin(X, w, b) > 0, margin(X, zz, bz) > 0)


def test_idealised_identity_and_strength_is_inverse_cosine():
    """Data in span(z), boundaries through the same point: d_C = d_NC cos(theta), S = 1/cos(theta)."""
    g = _gen(1)
    d = 6
    z = torch.zeros(d, dtype=torch.float64)
    z[0] = 4.0
    y = torch.arange(40) % 2
    t = torch.randn(40, generator=g, dtype=torch.float64) * 0.5 + 2.0 * (2.0 * y - 1.0)
    X = torch.zeros(40, d, dtype=torch.float64)
    X[:, 0] = t
    z_est, bz = nearest_centroid_direction(X, y)
    mid = (X[y == 0].mean(0) + X[y == 1].mean(0)) / 2
    u = torch.randn(d, generator=g, dtype=torch.float64)
    for theta in (0.2, 0.9, 1.4):
        w = tilt(z_est, u, theta)
        b = -(w * mid).sum()
        torch.testing.assert_close(boundary_distance(X, w, b), boundary_distance(X, z_est, bz) * math.cos(theta))
        s = adversarial_strength(X, y, w, b, z_est, bz)
        assert s["ratio_mean"] == pytest.approx(1 / math.cos(theta), rel=1e-9)
        assert s["ratio_median"] == pytest.approx(s["inv_cos"], rel=1e-9)
        assert s["theta"] == pytest.approx(theta, abs=1e-9)
    nc = adversarial_strength(X, y, z_est, bz)
    assert nc["ratio_mean"] == pytest.approx(1.0) and nc["n_correct"] == 40


def test_local_linearisation_is_exact_for_a_linear_model_and_first_order_for_an_mlp():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    w, b = local_linearisation(lin, x, i=0, j=2)
    W, B = lin.weight.detach(), lin.bias.detach()
    torch.testing.assert_close(w, (W[2] - W[0]).expand(7, -1))
    torch.testing.assert_close(b, (B[2] - B[0]).expand(7))
    # per-row classes, images flattened
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    w2, b2 = local_linearisation(lin, x, i=y, j=(y + 1) % 3)
    torch.testing.assert_close(margin(x, w2, b2), (lin(x).gather(1, ((y + 1) % 3)[:, None])
                                                   - lin(x).gather(1, y[:, None])).squeeze(1).detach())
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    xi = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    w3, b3 = local_linearisation(mlp, xi, 0, 1)
    assert w3.shape == (3, 4)
    step = 1e-4 * torch.randn(3, 4, dtype=torch.float64)
    f = lambda v: (mlp(v)[:, 1] - mlp(v)[:, 0]).detach()
    pred = margin(xi.flatten(1) + step, w3, b3)
    torch.testing.assert_close(pred, f((xi.flatten(1) + step).reshape(3, 1, 2, 2)), atol=1e-7, rtol=0)


def test_linear_probe_matches_closed_form_and_regularisation_shrinks_the_angle():
    X, y = _two_blobs(120, 6, seed=2)
    X[:, 5] = 0.01 * torch.randn(120, generator=_gen(3), dtype=torch.float64)  # a nearly flat direction
    z, _ = nearest_centroid_direction(X, y)
    angles = []
    prev = None
    for lam in (10.0, 1.0, 1e-2, 1e-4):
        prev = LinearProbe(lam=lam, tol=1e-10, max_iter=2000).fit(X, y, init=prev)
        grad = torch.autograd.functional.jacobian(lambda w: prev.objective(X, y, w, prev.b), prev.w)
        assert float(grad.abs().max()) < 1e-6                               # a stationary point
        angles.append(float(deviation_angle(prev.w, z)))
    assert angles == sorted(angles) and angles[0] < 0.05                     # strong lambda: w ~ z
    assert prev.accuracy(X, y) == 100.0 and prev.predict(X).dtype == torch.int64
    # huge lambda: the direction is exactly the centroid difference in the limit (balanced classes)
    strong = LinearProbe(lam=1e4, tol=1e-14).fit(X, y)
    assert float(deviation_angle(strong.w, z)) < 1e-3
    sq = LinearProbe(lam=1e-2, loss="squared_hinge").fit(X, y)
    assert sq.accuracy(X, y) == 100.0


# ------------------------------------------------------------------------------------ shared attacks


def _lin(d=6, c=2, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c).double().eval()


def test_fgsm_is_one_signed_step_and_the_pgd_preset():
    model = _lin()
    x = torch.rand(10, 6, generator=_gen(0), dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=_gen(1))
    w = model.weight.detach()
    torch.testing.assert_close(fgsm(model, x, y, eps=0.1), x + 0.1 * (w[1 - y] - w[y]).sign())
    v = w[1 - y] - w[y]
    torch.testing.assert_close(fgsm(model, x, y, eps=0.1, norm="l2"), x + 0.1 * v / v.norm(dim=1, keepdim=True))
    a = FGSM(eps=0.1, clamp=(0.0, 1.0))
    assert (a.steps, a.step_size, a.random_start) == (1, 0.1, False)
    xa = a(model, x, y)
    assert xa.min() >= 0 and xa.max() <= 1
    assert robust_accuracy(model, x, y, a) <= robust_accuracy(model, x, y, FGSM(eps=0.0)) + 1e-9


def test_targeted_pgd_moves_towards_the_target_class():
    model = _lin(d=4, c=3)
    x = torch.randn(12, 4, generator=_gen(2), dtype=torch.float64)
    target = torch.full((12,), 2)
    xa = pgd_attack(model, x, target, eps=0.3, steps=5, step_size=0.1, random_start=False, targeted=True)
    w = model.weight.detach()
    # linear model: the targeted step raises the target logit relative to the others -> loss to target falls
    with torch.no_grad():
        assert F.cross_entropy(model(xa), target) < F.cross_entropy(model(x), target)
    assert ((xa - x).abs().amax(1) <= 0.3 + 1e-12).all()
    big = pgd_attack(model, x, target, eps=50.0, steps=50, step_size=2.0, random_start=False, targeted=True)
    assert bool((model(big).argmax(1) == 2).all())
    # untargeted vs targeted with 2 classes: targeting the other class = the untargeted step
    m2 = _lin(d=4, c=2)
    y = torch.randint(0, 2, (12,), generator=_gen(3))
    torch.testing.assert_close(fgsm(m2, x, 1 - y, eps=0.2, targeted=True), fgsm(m2, x, y, eps=0.2))
    del w


def test_eot_averages_the_loss_over_transformations_in_one_batch():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(6, 5, generator=_gen(4), dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=_gen(5))
    noise = GaussianNoise(0.2)
    # EOT with K samples == one PGD step on the explicitly averaged loss with the same draws
    K = 4
    xa = pgd_attack(model, x, y, eps=0.1, steps=1, step_size=0.1, random_start=False, transform=noise,
                    eot_samples=K, generator=_gen(7))
    draws = noise(x.repeat(K, 1), _gen(7)) - x.repeat(K, 1)
    d = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model((x + d).repeat(K, 1) + draws), y.repeat(K))
    (g,) = torch.autograd.grad(loss, d)
    torch.testing.assert_close(xa, x + 0.1 * g.sign())
    # sigma = 0 is plain PGD
    torch.testing.assert_close(PGD(0.1, steps=3, random_start=False, transform=GaussianNoise(0.0), eot_samples=2)(
        model, x, y), pgd_attack(model, x, y, 0.1, steps=3, random_start=False))


def test_random_shift_is_a_per_row_integer_translation():
    img = torch.zeros(3, 1, 5, 5, dtype=torch.float64)
    img[:, 0, 2, 2] = 1.0
    out = RandomShift(1)(img, _gen(0))
    assert out.shape == img.shape and torch.allclose(out.sum((1, 2, 3)), torch.ones(3, dtype=torch.float64))
    pos = out[:, 0].flatten(1).argmax(1)
    assert all(abs(int(p) // 5 - 2) <= 1 and abs(int(p) % 5 - 2) <= 1 for p in pos)
    assert torch.equal(RandomShift(0)(img, _gen(0)), img)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: RandomShift(2)(t, _gen(1)), (x,))


def test_transfer_matrix_diagonal_is_white_box_robust_accuracy():
    torch.manual_seed(0)
    x, y = _two_blobs(80, 4, seed=6)
    a, b = _lin(4, 2, seed=1), _lin(4, 2, seed=2)
    for m in (a, b):  # fit each linear model a little
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(50):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    a.train()  # transfer_matrix evaluates in eval mode and restores the mode
    attack = PGD(eps=0.5, steps=5, random_start=False)
    res = transfer_matrix({"a": a, "b": b}, x, y, attack, batch_size=32)
    assert a.training and not b.training
    for s, m in (("a", a), ("b", b)):
        assert res.accuracy[s][s] == pytest.approx(robust_accuracy(m, x, y, attack))
    assert set(res.clean) == {"a", "b"} and all(0 <= v <= 100 for v in res.clean.values())
    assert 0.0 <= res.transfer_rate("a", "b") <= 1.0


# ------------------------------------------------------------------------------------ bad input


def test_attack_errors_are_clear():
    model = _lin()
    x, y = torch.rand(4, 6, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="eps must be finite and >= 0, got -0.1"):
        pgd_attack(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="eps must be"):
        FGSM(eps=-1.0)
    with pytest.raises(ValueError, match=r"x must lie in the declared range clamp=\(0.0, 0.5\)"):
        pgd_attack(model, x + 0.6, y, eps=0.1, clamp=(0.0, 0.5))
    drop = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()  # train mode
    with pytest.raises(ValueError, match="model is in train mode .*Dropout.*train_mode=True"):
        pgd_attack(drop, x, y, eps=0.1)
    with pytest.raises(ValueError, match="model is in train mode .*BatchNorm1d"):
        fgsm(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double(), x, y, eps=0.1)
    pgd_attack(drop, x, y, eps=0.1, steps=1, train_mode=True)  # said so: allowed
    pgd_attack(drop.eval(), x, y, eps=0.1, steps=1)
    with pytest.raises(ValueError, match="eot_samples must be 1 without a transform"):
        pgd_attack(model, x, y, eps=0.1, eot_samples=3)
    with pytest.raises(TypeError, match="transform must be None or a callable"):
        PGD(eps=0.1, transform=3)
    with pytest.raises(ValueError, match="eot_samples must be"):
        PGD(eps=0.1, transform=GaussianNoise(0.1), eot_samples=0)
    with pytest.raises(TypeError, match="targeted must be a bool"):
        pgd_attack(model, x, y, eps=0.1, targeted=1)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        GaussianNoise(-1.0)
    with pytest.raises(ValueError, match="max_shift must be an int >= 0"):
        RandomShift(-1)
    with pytest.raises(ValueError, match="x must be images"):
        RandomShift(1)(x)
    with pytest.raises(TypeError, match="models must be a non-empty mapping"):
        transfer_matrix([model], x, y, PGD(0.1))
    with pytest.raises(TypeError, match="attack must be a PGD preset"):
        transfer_matrix({"m": model}, x, y, "fgsm")
    with pytest.raises(ValueError, match="same number of rows"):
        transfer_matrix({"m": model}, x, y[:2], PGD(0.1))


def test_geometry_errors_are_clear():
    X, y = _two_blobs(10, 3)
    w = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="y must hold both binary labels 0 and 1"):
        nearest_centroid_direction(X, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y must have shape \(10,\)"):
        nearest_centroid_direction(X, y[:3])
    with pytest.raises(ValueError, match="X must be a \\(N, d\\) matrix"):
        boundary_distance(X[0], w, 0.0)
    with pytest.raises(ValueError, match=r"w must have shape \(d,\) or \(N, d\) with d = 3"):
        boundary_distance(X, torch.ones(4, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="w must be non-zero"):
        mirror_images(X, torch.zeros(3, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="w must be finite"):
        margin(X, torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="phi must be in \\[0, pi/2\\]"):
        tilt(w, torch.tensor([1.0, 0, 0], dtype=torch.float64), 2.0)
    with pytest.raises(ValueError, match="u must not be parallel to w"):
        tilt(w, 2 * w, 0.5)
    with pytest.raises(ValueError, match="overshoot must be finite and >= 0"):
        minimal_adversarial(X, w, 0.0, overshoot=-1.0)
    with pytest.raises(ValueError, match="z and b_z must be given together"):
        adversarial_strength(X, y, w, 0.0, z=w)
    with pytest.raises(ValueError, match="b must be a scalar"):
        margin(X, w, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="i must be a class index"):
        local_linearisation(_lin(3), X, i=0.5, j=1)
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        LinearProbe(lam=-1.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        LinearProbe(loss="hinge")
    with pytest.raises(ValueError, match="y must hold a label in"):
        LinearProbe().fit(X, y + 1)
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearProbe().predict(X)
    with pytest.raises(ValueError, match="init must be a fitted LinearProbe"):
        LinearProbe().fit(X, y, init=LinearProbe())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_geometry_keeps_dtype(dtype):
    X, y = _two_blobs(30, 4, dtype=dtype)
    z, bz = nearest_centroid_direction(X, y)
    p = LinearProbe(lam=1e-2).fit(X, y)
    for t in (z, bz, boundary_distance(X, p.w, p.b), mirror_images(X, p.w, p.b), tilt(z, X[0], 0.3), p.w):
        assert t.dtype == dtype
