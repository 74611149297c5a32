"""Tests of GIFD (paper slug: gifd): l1-ball projection, layered generator, feature search, stage loop, claim."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradkit.generative import LayeredGenerator, SmallVAE, small_generator, train_small_generator, vae_loss
from gradkit.privacy import PRESETS, GradientInversion, LatentSpace, model_gradients
from gradkit.privacy.gifd import GIFD, FeatureSpace, feature_radius, project_l1_ball


# ------------------------------------------------------------------------------------ l1-ball projection
def _bisection_projection(v: torch.Tensor, r: float) -> torch.Tensor:
    """Naive reference: find theta >= 0 with sum max(|v| - theta, 0) = r by bisection (float64)."""
    a = v.abs()
    if a.sum() <= r:
        return v.clone()
    lo, hi = 0.0, float(a.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((a - mid).clamp_min(0).sum()) > r:
            lo = mid
        else:
            hi = mid
    return torch.sign(v) * (a - 0.5 * (lo + hi)).clamp_min(0)


def test_project_l1_ball_matches_bisection_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        d = torch.randn(3, 2, 5, generator=g, dtype=torch.float64) * (trial + 1)
        radii = torch.rand(3, generator=g, dtype=torch.float64) * 5
        p = project_l1_ball(d, radii)
        for i in range(3):
            ref = _bisection_projection(d[i].flatten(), float(radii[i]))
            torch.testing.assert_close(p[i].flatten(), ref, atol=1e-9, rtol=0)
        assert (p.flatten(1).abs().sum(1) <= radii + 1e-9).all()


def test_project_l1_ball_invariants():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(6, 4, 3, 3, generator=g)
    # inside the ball: identity; on the sphere after projection; r = 0 gives zero
    big = d.flatten(1).abs().sum(1) + 1.0
    assert torch.equal(project_l1_ball(d, big), d)
    p = project_l1_ball(d, 2.0)
    norms = p.flatten(1).abs().sum(1)
    assert (norms <= 2.0 + 1e-5).all() and torch.allclose(norms, torch.full_like(norms, 2.0), atol=1e-4)
    assert torch.equal(project_l1_ball(d, 0.0), torch.zeros_like(d))
    # signs kept, magnitudes shrunk
    assert ((p * d) >= 0).all() and (p.abs() <= d.abs() + 1e-7).all()
    # closest point: no random point of the ball is closer
    for _ in range(50):
        y = torch.randn(6, 36, generator=g)
        y = y / y.abs().sum(1, keepdim=True) * 2.0 * torch.rand(6, 1, generator=g)
        assert ((d.flatten(1) - p.flatten(1)).norm(dim=1) <= (d.flatten(1) - y).norm(dim=1) + 1e-5).all()
    # per sample: a sample's projection does not depend on the others
    torch.testing.assert_close(project_l1_ball(d[2:3], 2.0), p[2:3])


def test_project_l1_ball_errors():
    d = torch.randn(2, 5)
    with pytest.raises(ValueError, match="radius must be finite"):
        project_l1_ball(d, -1.0)
    with pytest.raises(ValueError, match="radius must be finite"):
        project_l1_ball(d, float("nan"))
    with pytest.raises(ValueError, match="one value per sample"):
        project_l1_ball(d, torch.ones(3))
    with pytest.raises(ValueError, match="radius must be finite and >= 0"):
        project_l1_ball(d, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="delta must be a floating tensor"):
        project_l1_ball(torch.ones(2, 5, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        project_l1_ball(torch.tensor([[float("inf"), 0.0]]), 1.0)


def test_feature_radius():
    h = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(feature_radius(h, 0.5), torch.tensor([3.0, 0.5]))
    with pytest.raises(ValueError, match="rho must be finite and >= 0"):
        feature_radius(h, -0.1)


# ------------------------------------------------------------------------------------ generator
def _gen(seed=0, dtype=torch.float32, size=8) -> LayeredGenerator:
    torch.manual_seed(seed)
    g = small_generator(16, size).to(dtype)
    # non-trivial BatchNorm running statistics
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return g.eval()


def test_layered_generator_stages_compose():
    g = _gen(dtype=torch.float64)
    z = torch.randn(3, 16, dtype=torch.float64)
    x = g(z)
    assert g.num_blocks == 4
    assert g.stage_shapes() == [(16,), (32, 2, 2), (32, 4, 4), (16, 8, 8), (1, 8, 8)]
    for k in range(g.num_blocks + 1):
        torch.testing.assert_close(g.forward_from(k, g.forward_to(k, z)), x, atol=1e-12, rtol=0)
    for j in range(5):
        for k in range(j, 5):
            torch.testing.assert_close(g.forward_between(j, k, g.forward_to(j, z)), g.forward_to(k, z))
    assert x.shape == (3, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    assert small_generator(8, 28).stage_shapes()[-1] == (1, 28, 28)


def test_layered_generator_errors():
    g = _gen()
    with pytest.raises(ValueError, match=r"stage must be an int in \[0, 4\]"):
        g.forward_to(5, torch.randn(1, 16))
    with pytest.raises(ValueError, match="j <= k"):
        g.forward_between(2, 1, torch.randn(1, 16))
    with pytest.raises(ValueError, match="at least one module"):
        LayeredGenerator([], latent_dim=4)
    with pytest.raises(TypeError, match=r"blocks\[0\] must be an nn.Module"):
        LayeredGenerator([lambda x: x], latent_dim=4)
    with pytest.raises(ValueError, match="image_size must be a multiple of 4"):
        small_generator(16, 10)
    with pytest.raises(ValueError, match="latent_dim must be an int >= 1"):
        small_generator(0, 8)


def test_vae_loss_matches_naive_reference():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    recon = torch.rand(4, 1, 8, 8) * 0.98 + 0.01
    mu, logvar = torch.randn(4, 16), torch.randn(4, 16) * 0.3
    bce = -(x * recon.log() + (1 - x) * (1 - recon).log()).sum() / 4
    kl = sum(0.5 * float((mu[i] ** 2 + logvar[i].exp() - 1 - logvar[i]).sum()) for i in range(4)) / 4
    torch.testing.assert_close(vae_loss(recon, x, mu, logvar, beta=0.5), bce + 0.5 * kl, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        vae_loss(recon[:2], x, mu, logvar)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        vae_loss(recon, x, mu, logvar, beta=-1)
    vae = SmallVAE(_gen().train(), (1, 8, 8))
    out, m, lv = vae(x)
    assert out.shape == x.shape and m.shape == lv.shape == (4, 16)


def test_train_small_generator_learns_and_freezes():
    torch.manual_seed(0)
    imgs = (torch.rand(128, 1, 8, 8) > 0.7).float() * 0.9
    g = train_small_generator(imgs, epochs=3, seed=0)
    assert isinstance(g, LayeredGenerator) and not g.training
    assert all(not p.requires_grad for p in g.parameters())
    g2 = train_small_generator(imgs, epochs=3, seed=0)  # reproducible
    z = torch.randn(2, 16)
    torch.testing.assert_close(g(z), g2(z), atol=0, rtol=0)
    with pytest.raises(ValueError, match="kind must be 'vae'"):
        train_small_generator(imgs, kind="dcgan")
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        train_small_generator(imgs * 3)
    with pytest.raises(ValueError, match=r"images must be a \(N, C, H, W\) tensor"):
        train_small_generator(imgs[:, 0])


# ------------------------------------------------------------------------------------ the attack
def _victim(seed=0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(),
                         nn.Linear(4 * 64, 10)).to(dtype).eval()


def _setup(dtype=torch.float32):
    g = _gen(dtype=dtype)
    model = _victim(dtype=dtype)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=dtype)
    y = torch.tensor([4])
    return g, model, x, y, model_gradients(model, x, y)


def test_presets_registered():
    p = PRESETS.get("gifd")
    assert (p.cost, p.tv, p.image_norm, p.lr, p.iters, p.signed, p.schedule) == \
        ("cosine", 1e-4, 1e-6, 0.1, 1000, False, "cosine_warmup")
    assert PRESETS.get("latent").iters == 1000 and PRESETS.get("latent").schedule == "cosine_warmup"


def test_feature_space_projection_and_render():
    g, model, x, y, grads = _setup()
    h0 = g.forward_to(2, torch.randn(2, 16))
    space = FeatureSpace(g, 2, h0, rho=0.1)
    torch.testing.assert_close(space.render(), g.forward_from(2, h0))
    assert space.signed_parameters() == [] and space.parameters() == [space.h]
    with torch.no_grad():
        space.h.add_(torch.randn_like(space.h) * 5)
        space.project()
    assert (space.deviation() <= space.radius * (1 + 1e-5)).all()
    torch.testing.assert_close(space.radius, 0.1 * h0.flatten(1).abs().sum(1))
    # inside the core's attacker: every kept iterate respects the ball
    space = FeatureSpace(g, 2, g.forward_to(2, torch.randn(1, 16)), radius=2.0)
    res = GradientInversion(model, dataclass_replace_iters("gifd", 10)).run(grads, y, space)
    assert float(space.deviation(res.snapshots["space"]["h"])) <= 2.0 * (1 + 1e-5)
    torch.testing.assert_close(g.forward_from(2, res.snapshots["space"]["h"]).clamp(0, 1), res.x)


def test_feature_space_errors():
    g, *_ = _setup()
    h = g.forward_to(2, torch.randn(1, 16))
    with pytest.raises(ValueError, match=r"stage must be an int in \[1, 3\]"):
        FeatureSpace(g, 0, h, rho=0.1)
    with pytest.raises(ValueError, match=r"per-sample shape \(32, 2, 2\)"):
        FeatureSpace(g, 1, h, rho=0.1)
    with pytest.raises(ValueError, match="exactly one of radius and rho"):
        FeatureSpace(g, 2, h)
    with pytest.raises(ValueError, match="exactly one of radius and rho"):
        FeatureSpace(g, 2, h, radius=1.0, rho=0.1)
    with pytest.raises(TypeError, match="generator must be a LayeredGenerator"):
        FeatureSpace(nn.Linear(2, 2), 1, h, rho=0.1)
    with pytest.raises(ValueError, match="radius must be finite and >= 0"):
        FeatureSpace(g, 2, h, radius=-1.0)


def test_gifd_stage_loop_invariants():
    g, model, x, y, grads = _setup()
    attack = GIFD(model, g, steps_per_stage=15, rho=(0.1, 0.2, 0.3), restarts=2)
    res = attack.run(grads, y, generator=torch.Generator().manual_seed(0))
    assert res.stages == [0, 1, 2, 3] and len(res.stage_losses) == 4 and len(res.stage_images) == 4
    # every stage starts from the previous best (same image), so the kept loss never rises
    assert all(b <= a + 1e-6 for a, b in zip(res.stage_losses, res.stage_losses[1:]))
    # selection by the gradient loss only
    best = min(range(4), key=lambda i: res.stage_losses[i])
    assert res.stage == res.stages[best] and res.match_loss == res.stage_losses[best]
    torch.testing.assert_close(res.x, res.stage_images[best])
    # per stage: the best restart
    for i in range(4):
        assert res.stage_losses[i] == min(r[i] for r in res.restart_losses)
    # the l1 constraint holds at every stage
    assert res.l1_ratio[0] == 0.0 and all(0 <= r <= 1 + 1e-5 for r in res.l1_ratio)
    assert res.x.shape == x.shape and 0 <= float(res.x.min()) and float(res.x.max()) <= 1
    assert len(res.history) == 4 * 16 and all(math.isfinite(v) for v in res.history)
    # bit-identical rerun from the same seed
    res2 = attack.run(grads, y, generator=torch.Generator().manual_seed(0))
    assert res2.stage_losses == res.stage_losses


def test_gifd_latent_stage_is_spherical_and_equals_latent_search():
    g, model, x, y, grads = _setup()
    z0 = torch.randn(1, 16, generator=torch.Generator().manual_seed(5)) * 1.7
    res = GIFD(model, g, stages=(0,), steps_per_stage=20).run(grads, y, z0=z0)
    z = res.stage_results[0].snapshots["space"]["z"]
    torch.testing.assert_close(z.norm(dim=1), z0.norm(dim=1), rtol=1e-5, atol=1e-6)
    # stage 0 of GIFD is the core's latent search with the same settings
    base = GradientInversion(model, dataclass_replace_iters("latent", 20)).run(grads, y, LatentSpace(g, z0))
    assert res.match_loss == base.match_loss
    torch.testing.assert_close(res.x, base.x)


def dataclass_replace_iters(name, iters):
    import dataclasses

    return dataclasses.replace(PRESETS.get(name), iters=iters)


def test_gifd_float64():
    g, model, x, y, grads = _setup(torch.float64)
    res = GIFD(model, g, stages=(0, 2), steps_per_stage=5, rho=0.2).run(grads, y, generator=torch.Generator().manual_seed(0))
    assert res.x.dtype == torch.float64 and math.isfinite(res.match_loss)


def test_gifd_bad_input():
    g, model, x, y, grads = _setup()
    attack = GIFD(model, g, steps_per_stage=2)
    with pytest.raises(ValueError, match="one tensor per model parameter"):
        attack.run(grads[:-1], y)
    with pytest.raises(ValueError, match=r"target_grads\[0\] has shape"):
        attack.run([torch.zeros(3)] + grads[1:], y)
    with pytest.raises(ValueError, match="non-finite"):
        attack.run([grads[0] * float("nan")] + grads[1:], y)
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D integer tensor"):
        attack.run(grads, torch.tensor(4))
    with pytest.raises(ValueError, match=r"z0 must have shape \(1, 2, 16\)"):
        attack.run(grads, torch.tensor([1, 2]), z0=torch.randn(1, 16))
    g.train()
    with pytest.raises(ValueError, match="generator must be in eval mode"):
        attack.run(grads, y)
    g.eval()
    with pytest.raises(ValueError, match="stages must increase strictly from 0"):
        GIFD(model, g, stages=(1, 2))
    with pytest.raises(ValueError, match="stages must increase strictly from 0"):
        GIFD(model, g, stages=(0, 4))
    with pytest.raises(ValueError, match="rho must hold one value per feature stage"):
        GIFD(model, g, stages=(0, 1, 2), rho=(0.1,))
    with pytest.raises(ValueError, match="restarts must be a positive int"):
        GIFD(model, g, restarts=0)
    with pytest.raises(ValueError, match="steps_per_stage must be a positive int"):
        GIFD(model, g, steps_per_stage=0)
    with pytest.raises(KeyError, match="unknown inversion preset"):
        GIFD(model, g, preset="nope")


# ------------------------------------------------------------------------------------ the claim
def test_claim_registered():
    import importlib

    from gradkit.harness.claims.gifd import CLAIM

    assert CLAIM.slug == "gifd" and CLAIM.primary.metric == "psnr_ood"
    assert [v.name for v in CLAIM.variants] == ["mnist+fashion"]
    assert CLAIM.resolve(None).control == {"gifd": "latent"}
    for dotted in CLAIM.uses:
        mod, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), name), dotted


def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.gifd import ARMS, CLAIM

    out = smoke_run("gifd")
    p = CLAIM.protocol.at("smoke")
    assert out.data == "digits" and list(out.metrics) == list(ARMS)
    # the l1 constraint holds at every stage; GIFD's gradient loss <= latent-only's
    assert out.metrics["gifd"]["l1_ratio_max"] <= 1 + 1e-5
    assert out.metrics["gifd"]["grad_loss_ood"] <= out.metrics["latent"]["grad_loss_ood"] + 1e-6
    assert out.metrics["gifd"]["stage_ood"] in (0.0, 1.0, 2.0)
    assert {f"psnr_ood_stage{k}" for k in p.stages} <= set(out.metrics["gifd"])
    assert out.info["label_inference_acc"] == 100.0
    for grid in ("in-distribution", "out-of-distribution"):
        rows = out.info["images"][grid]
        assert list(rows) == ["original", "pixel", "latent", "gifd"]
        for r in rows.values():
            t = torch.tensor(r)
            assert t.shape == (1, 8, 8) and t.min() >= 0 and t.max() <= 1
    budget = p.steps_per_stage * len(p.stages)
    assert len(out.curves["match_loss_ood"]["gifd"]) == len(out.curves["match_loss_ood"]["latent"]) == budget
    assert set(out.info["iter_cost_ratio"]) == set(ARMS) and all(v > 0 for v in out.info["iter_cost_ratio"].values())
    ok, checks = CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 2 and isinstance(ok, bool)
    # reruns are bit-identical on CPU
    assert CLAIM.run(RunContext(scale="smoke", seed=0)).metrics == out.metrics


def test_claim_missing_data_root(tmp_path):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.gifd import CLAIM
    from gradkit.data import DataError

    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "absent"))
    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_real_victims(data_root):
    from gradkit.harness.claims.gifd import CLAIM, mnist_victims

    p = CLAIM.protocol_for("quick", data_root)
    prior, key, victims, size = mnist_victims(p, 0, data_root)
    assert size == 28 and prior.shape == (5000, 1, 28, 28)
    assert [v[0] for v in victims] == ["id", "ood_mnist", "ood_fashion"]
    assert int(victims[0][2]) < 5 <= int(victims[1][2])
    for _, x, _ in victims:
        assert x.shape == (1, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
