"""Tests of input-gradient attribution, DiffROAR, PGD and the block data (paper slug: input-gradients)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.data import DataError
from gradkit.data.blocks import (
    block_dataset, block_digits, block_mnist, block_region_mask, checkerboard_patch, signal_coordinate_synthetic,
)
from gradkit.engine import fit, seed_everything
from gradkit.data import TensorBatches
from gradkit.probes.input_gradients import (
    InputGradient, attribution_mask, attribution_order, diffroar, gradient_mass_in_region, input_gradient, n_kept,
    top_hit_rate,
)
from gradkit.probes.saliency import Saliency
from gradkit.robustness import PGD, adversarial_loss, pgd_attack, pgd_train, robust_accuracy
from gradkit.testing import SavedBytesMeter


def _mlp(d_in=5, h=7, c=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, c)).to(dtype)


def _x(n=6, d=5, dtype=torch.float64, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------ input gradients
@pytest.mark.parametrize("target", ["loss", "logit"])
def test_input_gradient_matches_finite_differences(target):
    model, x, y = _mlp(), _x(), torch.tensor([0, 1, 2, 0, 1, 2])
    got = input_gradient(model, x, y, target=target, abs=False)

    def f(xi, c):
        with torch.no_grad():
            out = model(xi[None])
        return float(F.cross_entropy(out, torch.tensor([c])) if target == "loss" else out[0, c])

    h = 1e-6
    ref = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            e = torch.zeros_like(x[i]); e[j] = h
            ref[i, j] = (f(x[i] + e, int(y[i])) - f(x[i] - e, int(y[i]))) / (2 * h)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(input_gradient(model, x, y, target=target), ref.abs(), rtol=1e-6, atol=1e-8)


def test_logit_gradient_equals_saliency_and_default_target_is_prediction():
    model, x = _mlp(), _x()
    y = torch.tensor([2, 1, 0, 0, 1, 2])
    torch.testing.assert_close(InputGradient(model, "logit").attribute(x, target=y),
                               Saliency(model).attribute(x, target=y))
    pred = model(x).argmax(1)
    torch.testing.assert_close(InputGradient(model).attribute(x), InputGradient(model).attribute(x, target=pred))


def test_loss_and_logit_gradients_parallel_for_binary_logistic_model():
    torch.manual_seed(0)
    lin = nn.Linear(6, 1).double()
    model = lambda x: torch.cat([-lin(x) / 2, lin(x) / 2], 1)  # noqa: E731 - logistic model as 2 logits
    x, y = _x(8, 6), torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(3))
    gl = input_gradient(model, x, y, target="loss", abs=False)
    gz = input_gradient(model, x, y, target="logit", abs=False)
    cos = F.cosine_similarity(gl, gz, dim=1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos))
    # d CE/dx = -(1 - p_y) * d(z_y - z_other)/dx = -2 (1 - p_y) * d z_y/dx for logits (-s/2, s/2)
    p = torch.softmax(model(x), 1).gather(1, y[:, None]).detach()
    torch.testing.assert_close(gl, -2 * (1 - p) * gz)


def test_internal_batch_size_same_result_and_bounds_memory_for_256_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(1))
    ig = InputGradient(model)
    torch.testing.assert_close(ig.attribute(x, target=y, internal_batch_size=16), ig.attribute(x, target=y))

    calls = []
    state = {}

    def pre(mod, inp):
        state["m"] = SavedBytesMeter().__enter__()

    def post(mod, inp, out):
        state["m"].__exit__(None, None, None)
        calls.append((inp[0].shape[0], state["m"].bytes))

    hs = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        ig.attribute(x, target=y, internal_batch_size=16)
        chunked = list(calls)
        calls.clear()
        ig.attribute(x, target=y)
        whole = list(calls)
    finally:
        for h in hs:
            h.remove()
    assert len(chunked) == 16 and all(n <= 16 for n, _ in chunked)
    assert whole == [(256, whole[0][1])]
    # per-input saved activations of a chunk are 1/16 of the whole batch's (weight views are saved once per call)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert max(b for _, b in chunked) <= whole[0][1] / 16 + weights


# ------------------------------------------------------------------------------------ masks
def test_attribution_mask_keeps_round_k_d_coordinates():
    x = torch.ones(4, 64)
    a = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    for k in (0.05, 0.1, 0.37, 0.5, 1.0):
        for keep in ("top", "bottom"):
            m = attribution_mask(x, a, k, keep, fill=0.0)
            assert (m.sum(1) == n_kept(k, 64)).all()
            assert n_kept(k, 64) == max(1, round(k * 64 + 1e-9))


def test_attribution_mask_direction_and_fill():
    x = torch.arange(8.0).reshape(2, 4) + 10
    a = torch.tensor([[0.1, 0.9, 0.5, 0.0], [4.0, 3.0, 2.0, 1.0]])
    top = attribution_mask(x, a, 0.5, "top", fill=-1.0)
    bot = attribution_mask(x, a, 0.5, "bottom", fill=-1.0)
    assert top.tolist() == [[-1, 11, 12, -1], [14, 15, -1, -1]]
    assert bot.tolist() == [[10, -1, -1, 13], [-1, -1, 16, 17]]
    # k = 50% without ties: top and bottom are complementary
    assert torch.equal(torch.where(top == -1, bot, top), x)
    fill = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert attribution_mask(x, a, 0.25, "top", fill=fill).tolist() == [[0, 11, 2, 3], [14, 1, 2, 3]]
    # default fill = batch mean per coordinate
    assert attribution_mask(x, a, 0.25, "top")[0, 0].item() == pytest.approx(12.0)


def test_attribution_order_and_random_tie_breaking():
    a = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert attribution_order(a).tolist() == [[1, 2, 3, 0]]
    ties = torch.zeros(2000, 4)
    first = attribution_order(ties, torch.Generator().manual_seed(0))[:, 0]
    counts = torch.bincount(first, minlength=4).double() / 2000
    assert (counts - 0.25).abs().max() < 0.05  # no coordinate systematically first


def test_attribution_mask_channel_shared_scores():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    m = attribution_mask(x, a, 0.25, "top", fill=0.0)
    kept = m != 0
    assert torch.equal(kept[:, 0], kept[:, 1])  # both channels of a kept pixel are kept
    assert (kept[:, 0].flatten(1).sum(1) == 4).all()


# ------------------------------------------------------------------------------------ region mass and hit rates
def test_gradient_mass_in_region_matches_naive():
    g = torch.randn(5, 1, 4, 2, generator=torch.Generator().manual_seed(0))
    r = block_region_mask(torch.tensor([0, 1, 0, 1, 1]), 2, 2)
    got = gradient_mass_in_region(g, r)
    for i in range(5):
        ref = g[i].abs()[r[i]].sum() / g[i].abs().sum()
        assert got[i].item() == pytest.approx(ref.item())
    shared = gradient_mass_in_region(g, r[0])
    assert shared.shape == (5,)
    z = gradient_mass_in_region(torch.zeros(2, 3), torch.tensor([True, False, False]))
    assert torch.isnan(z).all()


def test_top_hit_rate():
    a = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.5]])
    j = torch.tensor([1, 1])
    assert top_hit_rate(a, j) == 0.5
    assert top_hit_rate(a, j, "bottom") == 0.5


# ------------------------------------------------------------------------------------ DiffROAR
def _toy(n, g):
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.stack([(2.0 * y - 1) + 0.3 * torch.randn(n, generator=g), torch.randn(n, generator=g)], 1), y


def _train_lin(m, x, y, s):
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    fit(m, opt, TensorBatches(x, y, batch_size=50, generator=torch.Generator().manual_seed(s)), epochs=10)


def _acc(m, x, y):
    with torch.no_grad():
        return 100.0 * float((m(x).argmax(1) == y).double().mean())


def test_diffroar_sign_true_feature_positive_random_near_zero_inverted_negative():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = _toy(400, g)
    xte, yte = _toy(2000, g)
    made = []

    def make():
        made.append(1)
        return nn.Linear(2, 2)

    true_tr, true_te = torch.tensor([1.0, 0.0]).expand(400, 2), torch.tensor([1.0, 0.0]).expand(2000, 2)
    res = diffroar(make, _train_lin, _acc, xtr, ytr, xte, yte, true_tr, true_te, ks=(0.5,), seeds=(0, 1))
    assert len(made) == 4  # fresh model per (k, keep, seed)
    assert res.acc_top[0.5] > 95 and res.acc_bottom[0.5] < 60
    assert res.diffroar[0.5] > 35
    inv = diffroar(make, _train_lin, _acc, xtr, ytr, xte, yte, 1 - true_tr, 1 - true_te, ks=(0.5,))
    assert inv.diffroar[0.5] == pytest.approx(-res.per_seed[0.5][0][0] + res.per_seed[0.5][0][1])
    rnd = diffroar(make, _train_lin, _acc, xtr, ytr, xte, yte, torch.rand(400, 2, generator=g),
                   torch.rand(2000, 2, generator=g), ks=(0.5,), seeds=(0, 1, 2))
    assert abs(rnd.diffroar[0.5]) < 8
    assert [r["k"] for r in res.rows()] == [0.5]


def test_diffroar_uses_given_test_attributions():
    """Masked test data come from attr_test (the original model's), never from the retrained model."""
    g = torch.Generator().manual_seed(1)
    xtr, ytr = _toy(200, g)
    xte, yte = _toy(300, g)
    seen = []

    def ev(m, x, y):
        seen.append(x.clone())
        return _acc(m, x, y)

    a_te = torch.rand(300, 2, generator=g)
    diffroar(lambda: nn.Linear(2, 2), _train_lin, ev, xtr, ytr, xte, yte, torch.rand(200, 2, generator=g), a_te,
             ks=(0.5,), mask_seed=3)
    fill = xtr.mean(0, keepdim=True)
    gm = torch.Generator().manual_seed(3)
    attribution_mask(xtr, torch.rand(200, 2), 0.5, "top", fill, generator=gm)  # consume like diffroar does
    expected_top = attribution_mask(xte, a_te, 0.5, "top", fill, generator=gm)
    kept = seen[0] != fill
    assert torch.equal(kept, expected_top != fill)


# ------------------------------------------------------------------------------------ PGD
def _lin_model(d=6, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, 2).double()


def test_pgd_linf_reaches_analytic_worst_case_of_linear_model():
    model = _lin_model()
    x, y = _x(10, 6), torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(0))
    w = model.weight.detach()
    direction = (w[1 - y] - w[y]).sign()  # increases the wrong-class margin
    x_adv = pgd_attack(model, x, y, eps=0.2, norm="linf", steps=3, step_size=0.5, random_start=False)
    torch.testing.assert_close(x_adv, x + 0.2 * direction)
    x_l2 = pgd_attack(model, x, y, eps=0.2, norm="l2", steps=3, step_size=0.5, random_start=False)
    v = w[1 - y] - w[y]
    torch.testing.assert_close(x_l2, x + 0.2 * v / v.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_range_and_raises_loss(norm):
    model = _mlp(d_in=5, c=3)
    x = torch.rand(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    x_adv = pgd_attack(model, x, y, eps=0.3, norm=norm, steps=10, clamp=(0.0, 1.0), generator=gen)
    d = (x_adv - x)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= 0.3 + 1e-9).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    again = pgd_attack(model, x, y, eps=0.3, norm=norm, steps=10, clamp=(0.0, 1.0),
                       generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x_adv, again)


def test_pgd_leaves_parameter_grads_alone_and_adversarial_training_runs_in_fit():
    model = _mlp(d_in=4, c=2, dtype=torch.float32)
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0.5).long()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    PGD(eps=0.1)(model, x, y)
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())
    gen = seed_everything(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attack = PGD(eps=0.05, steps=3, clamp=(0.0, 1.0))
    hist = pgd_train(model, opt, TensorBatches(x, y, batch_size=16, generator=gen), epochs=3, attack=attack,
                     generator=gen)
    assert len(hist.records) == 3 and all(math.isfinite(v) for v in hist.series("train_loss"))
    # the loss pgd_train minimises is adversarial_loss's
    loss = adversarial_loss(PGD(eps=0.05, steps=3, random_start=False))(model, (x, y))
    assert loss.requires_grad and loss.item() >= F.cross_entropy(model(x), y).item() - 1e-6
    from gradkit.engine import accuracy
    assert robust_accuracy(model, x, y, attack) <= accuracy(model, x, y) + 1e-9
    with pytest.raises(ValueError, match="compute_loss"):
        pgd_train(model, opt, [(x, y)], epochs=1, attack=attack, compute_loss=lambda m, b: 0)


# ------------------------------------------------------------------------------------ data
def test_signal_coordinate_synthetic_invariants():
    X, y, j = signal_coordinate_synthetic(10, 3000, seed=0)
    assert X.shape == (3000, 10) and y.dtype == torch.int64
    assert torch.equal((X != 0).sum(1), torch.ones(3000, dtype=torch.long))
    torch.testing.assert_close(X.gather(1, j[:, None])[:, 0], 2.0 * y - 1)
    freq = torch.bincount(j, minlength=10).double() / 3000
    assert (freq - 0.1).abs().max() < 0.03 and abs(y.double().mean().item() - 0.5) < 0.05
    _, _, j1 = signal_coordinate_synthetic(10, 50, seed=0, bias_prob=1.0)
    assert (j1 == 0).all()
    X2, _, _ = signal_coordinate_synthetic(10, 3000, seed=0)
    assert torch.equal(X, X2)


def test_block_dataset_and_region_mask():
    imgs = torch.rand(20, 3, 2)
    null = checkerboard_patch(3, 2)
    X, y, sig = block_dataset(imgs, torch.arange(20), null, seed=0)
    assert X.shape == (20, 1, 6, 2) and torch.equal(y, torch.arange(20))
    R = block_region_mask(sig, 3, 2)
    for i in range(20):
        torch.testing.assert_close(X[i, 0][R[i, 0]].reshape(3, 2), imgs[i])
        torch.testing.assert_close(X[i, 0][~R[i, 0]].reshape(3, 2), null)
    assert 0 < sig.sum() < 20
    split, s_tr, s_te = block_digits(seed=0)
    assert split.x_train.shape[1:] == (1, 16, 8) and set(split.y_train.tolist()) == {0, 1}
    assert len(s_tr) == len(split.y_train) and len(s_te) == len(split.y_test)
    assert float(split.x_train.max()) <= 1.0 and float(split.x_train.min()) >= 0.0


def test_block_mnist_real_data(data_root):
    split, s_tr, s_te = block_mnist(data_root, n_train=100, n_test=50, seed=0)
    assert split.x_train.shape == (100, 1, 56, 28) and split.x_test.shape == (50, 1, 56, 28)
    assert set(split.y_train.tolist()) <= {0, 1}


# ------------------------------------------------------------------------------------ errors
def test_clear_errors(tmp_path):
    model, x, y = _mlp(), _x(), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="target must be one of"):
        input_gradient(model, x, y, target="prob")
    with pytest.raises(ValueError, match="output must be one of"):
        InputGradient(model, output="x")
    with pytest.raises(ValueError, match="internal_batch_size"):
        input_gradient(model, x, y, internal_batch_size=0)
    with pytest.raises(ValueError, match="k must be"):
        attribution_mask(x, x.abs(), 0.0)
    with pytest.raises(ValueError, match="k must be"):
        attribution_mask(x, x.abs(), 1.5)
    with pytest.raises(ValueError, match="keep must be"):
        attribution_mask(x, x.abs(), 0.5, keep="middle")
    with pytest.raises(ValueError, match="attribution"):
        attribution_mask(x, x.abs()[:3], 0.5)
    with pytest.raises(ValueError, match="fill"):
        attribution_mask(x, x.abs(), 0.5, fill=torch.zeros(3))
    with pytest.raises(ValueError, match="fill must be finite"):
        attribution_mask(x, x.abs(), 0.5, fill=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        attribution_order(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="region_mask"):
        gradient_mass_in_region(torch.ones(2, 3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ks must"):
        diffroar(lambda: model, _train_lin, _acc, x, y, x, y, x, x, ks=())
    with pytest.raises(ValueError, match="seeds must"):
        diffroar(lambda: model, _train_lin, _acc, x, y, x, y, x, x, ks=(0.5,), seeds=(-1,))
    with pytest.raises(ValueError, match="attr_test"):
        diffroar(lambda: model, _train_lin, _acc, x, y, x, y, x, x[:2], ks=(0.5,))
    with pytest.raises(TypeError, match="train_fn"):
        diffroar(lambda: model, None, _acc, x, y, x, y, x, x)
    with pytest.raises(ValueError, match="eps must be finite"):
        PGD(eps=float("nan"))
    with pytest.raises(ValueError, match="norm must be"):
        PGD(eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="steps must"):
        pgd_attack(model, x, y, eps=0.1, steps=-1)
    with pytest.raises(ValueError, match="clamp"):
        PGD(eps=0.1, clamp=(1.0, 0.0))
    with pytest.raises(ValueError, match="y must"):
        pgd_attack(model, x, y[:2], eps=0.1)
    with pytest.raises(TypeError, match="attack must"):
        adversarial_loss("pgd")
    with pytest.raises(ValueError, match="d must be"):
        signal_coordinate_synthetic(1, 10)
    with pytest.raises(ValueError, match="bias_prob"):
        signal_coordinate_synthetic(10, 10, bias_prob=2.0)
    with pytest.raises(ValueError, match="null_patch"):
        block_dataset(torch.rand(3, 4, 4), torch.arange(3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="digits must"):
        block_digits(digits=(1, 1))
    with pytest.raises(DataError):
        block_mnist(tmp_path / "absent")


# ------------------------------------------------------------------------------------ claim
@pytest.fixture(scope="module")
def claim():
    from gradkit.harness.claims import get_claim

    return get_claim("input-gradients")


def test_claim_registered(claim):
    assert claim.arxiv == "2102.12781" and claim.primary.ours == "robust" and claim.primary.baseline == "standard"
    assert [v.name for v in claim.variants] == ["block-mnist"]


def test_claim_smoke(claim, smoke_run):
    out = smoke_run("input-gradients")
    assert out.data == "block-digits" and set(out.metrics) == {"standard", "robust"}
    assert len(out.curves["diffroar"]["robust"]) == len(claim.protocol.at("smoke").ks)
    checks = out.info["checks"]
    assert checks["mask_count_max_abs_err"] == 0.0
    assert checks["toy_diffroar_true_feature"] > 30.0
    assert abs(checks["toy_diffroar_random"]) < 10.0


def test_claim_rerun_bit_identical(claim, smoke_run):
    from gradkit.harness.claims import RunContext

    again = claim.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("input-gradients").metrics
    assert again.curves == smoke_run("input-gradients").curves


def test_claim_missing_data_root(claim, tmp_path):
    from gradkit.harness.claims import RunContext

    with pytest.raises(DataError):
        claim.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "absent"))
    with pytest.raises(DataError):
        claim.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_real_blockmnist_smoke(claim, data_root, smoke_run):
    out = smoke_run("input-gradients", data_root=data_root)
    assert out.data == "block-mnist" and set(out.metrics) == {"standard", "robust"}
    p = claim.protocol_for("smoke", data_root)
    assert (out.info["n_train"], out.info["n_test"]) == (p.n_train, p.n_test)
    for m in out.metrics.values():
        assert set(m) == {"block_signal_mass", "block_test_acc", "block_robust_acc"}
        assert 0.0 <= m["block_signal_mass"] <= 1.0 and math.isfinite(m["block_test_acc"])
