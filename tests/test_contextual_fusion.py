"""Tests of late fusion, the object/context scenes and Gaussian blur (paper slug: contextual-fusion)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.data.object_context import (
    N_FAMILIES, context_textures, context_view, make_object_context_dataset, object_context_digits, object_view,
    paste_objects,
)
from gradkit.nn.late_fusion import LateFusionClassifier
from gradkit.robustness.blur import gaussian_blur, gaussian_kernel1d
from gradkit.robustness.pgd import pgd_attack


def _ext(d_in=12, d_out=4, seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(d_in, d_out)]
    if bn:
        layers.append(nn.BatchNorm1d(d_out))
    return nn.Sequential(*layers, nn.Tanh())


def _fusion(**kw):
    torch.manual_seed(3)
    return LateFusionClassifier({"fg": _ext(seed=1), "bg": _ext(d_out=5, seed=2)}, {"fg": 4, "bg": 5}, 3, **kw)


def _x(n=6, seed=0):
    return torch.rand(n, 1, 3, 4, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ late fusion
def test_fusion_is_a_linear_layer_on_concatenated_features():
    model = _fusion()
    x = _x()
    f = torch.cat([model.extractors["fg"](x), model.extractors["bg"](x)], 1)
    torch.testing.assert_close(model(x), f @ model.head.weight.T + model.head.bias)
    assert model(x).shape == (6, 3) and model.features(x).shape == (6, 9)
    # the logits are the sum of the streams' contributions (bias counted once)
    torch.testing.assert_close(model(x), model.stream_logits(x, "fg") + model.stream_logits(x, "bg") - model.head.bias)


def test_zeroing_a_stream_gives_that_stream_s_own_linear_classifier():
    model = _fusion()
    x = _x()
    single = LateFusionClassifier({"bg": model.extractors["bg"]}, {"bg": 5}, 3)
    with torch.no_grad():
        single.head.weight.copy_(model.head.weight[:, model.block("bg")])
        single.head.bias.copy_(model.head.bias)
        model.head.weight[:, model.block("fg")] = 0.0
    torch.testing.assert_close(model(x), single(x))
    torch.testing.assert_close(model(x), model.stream_logits(x, "bg"))


def test_stream_penalty_is_l2_of_its_block_and_its_gradient_stays_there():
    model = _fusion()
    w = model.head.weight
    assert math.isclose(float(model.stream_weight_penalty("fg").detach()), float((w.detach()[:, :4] ** 2).sum()), rel_tol=1e-6)
    model.stream_weight_penalty("fg").backward()
    g = model.head.weight.grad
    torch.testing.assert_close(g[:, :4], 2 * w.detach()[:, :4])
    assert float(g[:, 4:].abs().max()) == 0.0
    assert model.head.bias.grad is None


def test_frozen_extractors_get_no_gradient_and_stay_in_eval_mode():
    torch.manual_seed(0)
    model = LateFusionClassifier({"fg": _ext(bn=True)}, {"fg": 4}, 3)
    model.train()
    assert model.training and not model.extractors["fg"].training
    assert not any(p.requires_grad for p in model.extractors.parameters())
    F.cross_entropy(model(_x()), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert model.head.weight.grad is not None
    # batch norm uses its running statistics: a one-example batch gives the same output as in a batch
    x = _x()
    torch.testing.assert_close(model(x[:1]), model(x)[:1])
    unfrozen = LateFusionClassifier({"fg": _ext(bn=True)}, {"fg": 4}, 3, freeze=False).train()
    assert unfrozen.extractors["fg"].training and all(p.requires_grad for p in unfrozen.extractors.parameters())


def test_input_gradient_flows_through_frozen_extractors():
    model = _fusion().eval()
    x = _x().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    assert g.abs().sum() > 0


def test_fusion_gradcheck_float64():
    model = _fusion().double().eval()
    x = _x().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: model.stream_logits(t, "fg"), (x,))
    assert torch.autograd.gradcheck(model, (x,))


def test_fusion_bad_arguments():
    e = _ext()
    with pytest.raises(ValueError, match="extractors must be a non-empty mapping"):
        LateFusionClassifier({}, {}, 3)
    with pytest.raises(TypeError, match=r"extractors\['fg'\] must be an nn.Module"):
        LateFusionClassifier({"fg": lambda x: x}, {"fg": 4}, 3)
    with pytest.raises(ValueError, match="feat_dims must give one feature size per extractor"):
        LateFusionClassifier({"fg": e}, {"bg": 4}, 3)
    with pytest.raises(ValueError, match=r"feat_dims\['fg'\] must be a positive int, got 0"):
        LateFusionClassifier({"fg": e}, {"fg": 0}, 3)
    with pytest.raises(ValueError, match="n_classes must be a positive int"):
        LateFusionClassifier({"fg": e}, {"fg": 4}, 0)
    with pytest.raises(ValueError, match="freeze must be a bool"):
        LateFusionClassifier({"fg": e}, {"fg": 4}, 3, freeze=1)
    with pytest.raises(ValueError, match="extractor names must be non-empty strings"):
        LateFusionClassifier({"a.b": e}, {"a.b": 4}, 3)
    model = LateFusionClassifier({"fg": e}, {"fg": 5}, 3)
    with pytest.raises(ValueError, match=r"extractor 'fg' must return features of shape \(N, 5\), got \(6, 4\)"):
        model(_x())
    with pytest.raises(ValueError, match=r"name must be one of the streams \('fg',\), got 'bg'"):
        model.stream_weight_penalty("bg")


def test_fgsm_through_fusion_is_a_signed_input_gradient_step():
    model = _fusion().eval()
    x = _x() * 0.8 + 0.1  # away from the clamp
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps = 0.05
    xa = pgd_attack(model, x, y, eps, steps=1, step_size=eps, random_start=False, clamp=(0.0, 1.0))
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    nz = g != 0
    torch.testing.assert_close((xa - x)[nz], eps * g.sign()[nz])
    with torch.no_grad():
        assert F.cross_entropy(model(xa), y) > F.cross_entropy(model(x), y)


# ------------------------------------------------------------------------------------ scenes
def test_paste_is_over_compositing_in_the_object_square():
    obj = torch.tensor([[[[1.0, 0.0], [0.5, 0.25]]]])
    bg = torch.full((1, 1, 4, 4), 0.4)
    x = paste_objects(obj, bg, torch.tensor([[1, 2]]))
    expect = bg.clone()
    expect[0, 0, 1:3, 2:4] = obj[0, 0] + (1 - obj[0, 0]) * 0.4
    torch.testing.assert_close(x, expect)


def test_textures_range_families_and_determinism():
    fam = torch.arange(N_FAMILIES).repeat(3)
    a = context_textures(fam, 16, torch.Generator().manual_seed(0))
    b = context_textures(fam, 16, torch.Generator().manual_seed(0))
    assert a.shape == (30, 1, 16, 16) and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # noiseless gratings of family 0 (vertical stripes, period 4) repeat every 4 pixels along x
    v = context_textures(torch.zeros(2, dtype=torch.long), 16, torch.Generator().manual_seed(1), noise=0.0)
    torch.testing.assert_close(v[..., 4:], v[..., :-4], atol=1e-5, rtol=0)
    torch.testing.assert_close(v[..., 1:, :], v[..., :-1, :], atol=1e-5, rtol=0)


def test_context_strength_sets_how_often_the_family_is_the_label():
    objs, labels = torch.rand(2000, 1, 4, 4), torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 1.0):
        _, y, fam, pos = make_object_context_dataset(objs, labels, q, seed=1, size=8)
        rate = float((fam == y).float().mean())
        assert abs(rate - (q + (1 - q) / 10)) < 0.04, (q, rate)
        assert int(pos.min()) >= 0 and int(pos.max()) <= 4


def test_views_and_bundled_scenes():
    g = torch.Generator().manual_seed(0)
    x, fam = context_view(5, size=16, hole=8, generator=g)
    assert x.shape == (5, 1, 16, 16) and fam.shape == (5,)
    assert int((x[:, 0] == 0).flatten(1).sum(1).min()) >= 64  # the object's square is masked out
    ov = object_view(torch.ones(3, 1, 8, 8), 16, g)
    assert int((ov == 1).flatten(1).sum(1).min()) >= 64
    d = object_context_digits(0.8, seed=0, copies_train=1, copies_test=1)
    assert d.split.x_train.shape == (1437, 1, 16, 16) and d.split.x_test.shape == (360, 1, 16, 16)
    assert float(d.split.x_train.min()) >= 0 and float(d.split.x_train.max()) <= 1


def test_scene_bad_arguments():
    with pytest.raises(ValueError, match=r"families must hold ints in \[0, 9\], got values in \[0, 10\]"):
        context_textures(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="families must be a 1-D integer tensor"):
        context_textures(torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"context_strength must be in \[0, 1\], got 1.5"):
        make_object_context_dataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 1.5)
    with pytest.raises(ValueError, match=r"objects must lie in \[0, 1\]"):
        make_object_context_dataset(torch.rand(2, 1, 4, 4) + 1, torch.tensor([0, 1]), 0.5)
    with pytest.raises(ValueError, match="do not fit in scenes of size 8"):
        make_object_context_dataset(torch.rand(2, 1, 9, 9), torch.tensor([0, 1]), 0.5, size=8)
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 9\]"):
        make_object_context_dataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 12]), 0.5)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 2\]"):
        paste_objects(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 4, 4), torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="hole must be an int in"):
        context_view(2, size=8, hole=9)
    with pytest.raises(ValueError, match=r"amplitude\[1\] must be in"):
        context_textures(torch.tensor([0]), amplitude=(0.5, 0.2))


# ------------------------------------------------------------------------------------ blur
def test_blur_known_cases():
    torch.testing.assert_close(gaussian_kernel1d(1.0).sum(), torch.tensor(1.0))
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gaussian_blur(x, 0.0), x)
    torch.testing.assert_close(gaussian_blur(torch.full((1, 2, 6, 6), 0.7), 1.5), torch.full((1, 2, 6, 6), 0.7))
    # an impulse far from the border becomes the outer product of the 1-D kernel
    imp = torch.zeros(1, 1, 15, 15)
    imp[0, 0, 7, 7] = 1.0
    k = gaussian_kernel1d(1.0)
    torch.testing.assert_close(gaussian_blur(imp, 1.0)[0, 0, 4:11, 4:11], k[:, None] * k[None, :])
    # channels are blurred independently; (N, H, W) input keeps its shape; a grid smaller than the radius works
    torch.testing.assert_close(gaussian_blur(x, 1.0)[:, 1], gaussian_blur(x[:, 1], 1.0))
    assert gaussian_blur(torch.rand(1, 1, 3, 3), 2.0).shape == (1, 1, 3, 3)


def test_blur_gradcheck_and_bad_arguments():
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 0.8), (x,))
    with pytest.raises(ValueError, match="sigma must be finite and >= 0, got -1"):
        gaussian_blur(x, -1)
    with pytest.raises(ValueError, match=r"x must be images of shape \(N, C, H, W\)"):
        gaussian_blur(torch.rand(4, 4), 1.0)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        gaussian_blur(torch.ones(1, 1, 4, 4, dtype=torch.long), 1.0)


# ------------------------------------------------------------------------------------ the claim at smoke
def test_claim_smoke_checks(smoke_run):
    out = smoke_run("contextual-fusion")
    c = out.info["checks"]
    assert c["fgsm_loss_increase"] > 0
    assert c["logits_shape_ok"] == 1.0 and c["penalty_inside_block_ok"] == 1.0
    assert c["penalty_grad_outside_block"] == 0.0
    m = out.metrics
    # for the fg-only model the attack crafted on it is white-box
    assert m["fg_only"]["t_acc_e10"] == m["fg_only"]["w_acc_e10"]
    (grid,) = out.info["images"].values()
    assert list(grid) == ["clean", "T: fg eps 0.1", "W: joint eps 0.1", "blur 1"]
    assert all(len(rows) == 8 for rows in grid.values())
