"""Tests of the Dropout Inversion Attack (paper slug: dia): MaskableDropout, the mask space, the attack, claim."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from gradkit.harness.claims.dia import DropoutMLP
from gradkit.nn.maskable_dropout import (
    MODES, MaskableDropout, activation_shapes, convert_dropout, dropout_masks, dropout_mode, maskable_dropouts,
)
from gradkit.privacy import PRESETS, GradientInversion, PixelSpace, gradient_distance, model_gradients
from gradkit.privacy.dia import (
    DIAPreset, DropoutInversionAttack, DropoutMaskSpace, client_gradients,
)


# ------------------------------------------------------------------------------------ MaskableDropout
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_record_mode_equals_nn_dropout_with_the_same_rng(p, dtype):
    x = torch.randn(5, 7, 3, dtype=dtype)
    torch.manual_seed(11)
    ref = nn.functional.dropout(x, p, training=True)
    layer = MaskableDropout(p, mode="record").train()
    torch.manual_seed(11)
    out = layer(x)
    assert torch.equal(out, ref)
    assert layer.mask.shape == x.shape and set(layer.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(layer.mask.bool(), ref != 0)


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_replay_reproduces_train_mode_output_and_gradient_exactly(p):
    torch.manual_seed(0)
    model = DropoutMLP(12, (16, 16), 5, p=p, bias=True)
    x, y = torch.randn(3, 12), torch.tensor([0, 1, 4])
    grads, masks = client_gradients(model, x, y, generator=torch.Generator().manual_seed(5))
    model.train()
    with dropout_mode(model, "record", generator=torch.Generator().manual_seed(5)):
        out_rec = model(x)
    for mode in (True, False):  # replay ignores train/eval mode
        model.train(mode)
        with dropout_mode(model, "replay", masks=masks):
            assert torch.equal(model(x), out_rec)
            g2 = model_gradients(model, x, y)
        assert all(torch.equal(a, b) for a, b in zip(grads, g2))


def test_mask_of_ones_equals_eval_mode_and_normal_mode_is_nn_dropout():
    torch.manual_seed(0)
    model = DropoutMLP(8, (10,), 3, p=0.5).eval()
    x = torch.randn(4, 8)
    ref = model(x)
    shapes = activation_shapes(model, x.shape)
    assert shapes == [torch.Size([4, 10])]
    model.train()
    # inverted dropout h * M / (1 - p): the constant keep-probability mask M = 1 - p is eval mode
    with dropout_mode(model, "replay", masks=[torch.full(s, 0.5) for s in shapes]):
        assert torch.equal(model(x), ref)
    with dropout_mode(model, "replay", masks=[torch.ones(s) for s in shapes]):  # ones: h / (1 - p)
        assert not torch.allclose(model(x), ref)
    layer = MaskableDropout(0.3).train()
    torch.manual_seed(2)
    a = layer(x)
    torch.manual_seed(2)
    assert torch.equal(a, nn.Dropout(0.3).train()(x))
    assert torch.equal(layer.eval()(x), x)


def test_record_without_dropout_records_the_keep_probability():
    x = torch.randn(2, 6)
    layer = MaskableDropout(0.5, mode="record").eval()
    assert torch.equal(layer(x), x) and torch.equal(layer.mask, torch.full_like(x, 0.5))
    assert torch.equal(layer.replay(layer.mask).train()(x), x)
    layer = MaskableDropout(0.0, mode="record").train()
    assert torch.equal(layer(x), x) and torch.equal(layer.mask, torch.ones_like(x))


def test_optimise_mode_is_differentiable_in_the_mask():
    layer = MaskableDropout(0.5)
    x = torch.randn(2, 4, dtype=torch.float64)
    m = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    layer.optimise(m)
    assert torch.autograd.gradcheck(lambda m_: MaskableDropout(0.5).optimise(m_)(x), (m,))
    out = layer(x)
    (g,) = torch.autograd.grad(out.sum(), m)
    assert torch.allclose(g, x * 2.0)  # d(h * m / (1 - p))/dm = h / (1 - p)


@pytest.mark.parametrize("act", [nn.GELU, nn.Tanh])
def test_gradcheck_matching_loss_wrt_data_and_masks(act):
    """The DIA objective is differentiable in x and in the masks (double backward), float64."""
    torch.manual_seed(0)
    model = DropoutMLP(6, (5, 4), 3, p=0.5, bias=False, activation=act).double()
    y = torch.tensor([1, 2])
    target, _ = client_gradients(model, torch.rand(2, 6, dtype=torch.float64), y,
                                 generator=torch.Generator().manual_seed(0))
    shapes = activation_shapes(model, (2, 6))
    x = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    m1 = torch.rand(shapes[0], dtype=torch.float64, requires_grad=True)
    m2 = torch.rand(shapes[1], dtype=torch.float64, requires_grad=True)

    def f(x, m1, m2):
        with dropout_mode(model, "optimise", masks=[m1, m2]):
            return gradient_distance(model_gradients(model, x, y, create_graph=True), target)

    model.eval()
    assert torch.autograd.gradcheck(f, (x, m1, m2))


def test_maskable_dropout_bad_inputs():
    for p in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="p must"):
            MaskableDropout(p)
    with pytest.raises(ValueError, match="mode must be one of"):
        MaskableDropout(0.5, mode="replace")
    layer = MaskableDropout(0.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        layer.mode = "train"
    layer.mode = "replay"
    with pytest.raises(RuntimeError, match="has no mask"):
        layer(torch.randn(2, 3))
    layer.replay(torch.ones(1, 3))
    with pytest.raises(ValueError, match="per sample"):
        layer(torch.randn(2, 3))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        layer.replay([1, 0, 1])
    with pytest.raises(TypeError, match="floating-point or bool"):
        layer.replay(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="generator"):
        MaskableDropout(0.5, generator=3)
    assert "mode='replay'" in repr(layer) and MODES == ("normal", "record", "replay", "optimise")
    # a bool mask (as recorded by the official code) is accepted
    assert torch.equal(layer.replay(torch.ones(2, 3, dtype=torch.bool))(torch.ones(2, 3)), 2 * torch.ones(2, 3))


def test_dropout_mode_and_helpers():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.2)))
    model = convert_dropout(model)
    layers = maskable_dropouts(model)
    assert [l.p for l in layers] == [0.3, 0.2] and all(l.mode == "normal" for l in layers)
    assert isinstance(convert_dropout(nn.Dropout(0.1)), MaskableDropout)
    model.train()
    with dropout_mode(model, "record"):
        model(torch.randn(3, 4))
        masks = dropout_masks(model)
        assert [m.shape for m in masks] == [torch.Size([3, 6])] * 2
    assert all(l.mode == "normal" and l.mask is None for l in layers)  # restored
    with pytest.raises(ValueError, match="needs masks"):
        with dropout_mode(model, "replay"):
            pass
    with pytest.raises(ValueError, match="2 MaskableDropout layers"):
        with dropout_mode(model, "replay", masks=[torch.ones(3, 6)]):
            pass
    with pytest.raises(ValueError, match="only used in"):
        with dropout_mode(model, "record", masks=masks):
            pass
    with pytest.raises(ValueError, match="input_shape"):
        activation_shapes(model, (0, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        maskable_dropouts("model")
    with pytest.raises(ValueError, match="widths"):
        DropoutMLP(4, (), 2)
    with pytest.raises(ValueError, match="in_features"):
        DropoutMLP(0, (3,), 2)


# ------------------------------------------------------------------------------------ mask space
def _setup(p=0.5, seed=0, widths=(24, 24), d=16, bias=False):
    torch.manual_seed(seed)
    model = DropoutMLP(d, widths, 4, p=p, bias=bias)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([1])
    grads, masks = client_gradients(model, x, y, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, y, grads, masks


def test_mask_space_init_project_regularizer_snapshot():
    model, x, *_ = _setup(p=0.25)
    space = DropoutMaskSpace.for_model(model, (8, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                                       mask_reg=1e-4)
    assert [m.shape for m in space.masks] == [torch.Size([8, 24])] * 2 and space.batch_size == 8
    assert all(m.is_leaf and m.requires_grad for m in space.parameters())
    assert space.signed_parameters() == []  # DIA signs the data gradient only
    allm = torch.cat([m.flatten() for m in space.masks])
    assert set(allm.unique().tolist()) <= {0.0, 1.0} and abs(allm.mean().item() - 0.75) < 0.1
    ref = 1e-4 * sum(abs((1 - m.mean().item()) - 0.25) for m in space.masks)
    assert space.regularizer().item() == pytest.approx(ref, rel=1e-5)
    with torch.no_grad():
        space.masks[0].add_(0.7)
        space.masks[1].sub_(2.0)
        space.project()
    # clipped to [0, 1], not re-binarised
    assert float(space.masks[0].detach().max()) <= 1.0 and float(space.masks[1].detach().min()) == 0.0
    snap = space.snapshot()
    assert set(snap) == {"mask0", "mask1"} and not snap["mask0"].requires_grad
    with pytest.raises(NotImplementedError):
        space.render()
    kp = DropoutMaskSpace.for_model(model, (2, 1, 4, 4), init="keep_prob")
    assert torch.allclose(kp.masks[0], torch.full((2, 24), 0.75))
    assert kp.regularizer().item() == pytest.approx(0.0, abs=1e-9)
    assert DropoutMaskSpace.for_model(model, (2, 1, 4, 4), init="ones", mask_reg=0).regularizer() == 0.0


def test_mask_space_attach_restores_layers():
    model, *_ = _setup()
    space = DropoutMaskSpace.for_model(model, (1, 1, 4, 4))
    layers = maskable_dropouts(model)
    with space.attach():
        assert all(l.mode == "optimise" and l.mask is m for l, m in zip(layers, space.masks))
    assert all(l.mode == "normal" and l.mask is None for l in layers)


def test_mask_space_bad_inputs():
    model, *_ = _setup()
    layers = maskable_dropouts(model)
    with pytest.raises(ValueError, match="shapes has"):
        DropoutMaskSpace(layers, [(1, 24)])
    with pytest.raises(ValueError, match="same batch size"):
        DropoutMaskSpace(layers, [(1, 24), (2, 24)])
    with pytest.raises(ValueError, match="init must be"):
        DropoutMaskSpace(layers, [(1, 24), (1, 24)], init="zeros")
    with pytest.raises(ValueError, match=r"init\[1\]"):
        DropoutMaskSpace(layers, [(1, 24), (1, 24)], init=[torch.ones(1, 24), torch.ones(2, 24)])
    with pytest.raises(ValueError, match="mask_reg"):
        DropoutMaskSpace(layers, [(1, 24), (1, 24)], mask_reg=-1.0)
    with pytest.raises(TypeError, match="MaskableDropout"):
        DropoutMaskSpace([nn.Dropout(0.5)], [(1, 24)])
    with pytest.raises(ValueError, match="p > 0"):
        DropoutMaskSpace.for_model(DropoutMLP(16, (8,), 4, p=0.0), (1, 16))


# ------------------------------------------------------------------------------------ presets
def test_presets_follow_the_official_configs():
    dia, ig, igt = PRESETS.get("dia"), PRESETS.get("dia-ig"), PRESETS.get("dia-ig-train")
    assert isinstance(dia, DIAPreset) and dia.mask_reg == 1e-4 and dia.mask_init == "bernoulli"
    for pr in (dia, ig, igt):
        assert (pr.cost, pr.tv, pr.lr, pr.signed, pr.keep_best, pr.early_stop, pr.iters) == \
            ("cosine", 1e-5, 0.1, True, True, 1e-5, 20000)
    assert dia.model_mode == ig.model_mode == "eval" and igt.model_mode == "train"
    assert replace(dia, iters=3).mask_reg == 1e-4
    with pytest.raises(ValueError, match="mask_reg"):
        DIAPreset(name="x", mask_reg=float("inf"))
    with pytest.raises(ValueError, match="mask_init"):
        DIAPreset(name="x", mask_init="zeros")


# ------------------------------------------------------------------------------------ the attack
def _short(name, iters=120):
    return replace(PRESETS.get(name), iters=iters)


def test_true_masks_explain_the_gradient_but_a_deterministic_model_does_not():
    """The invariant behind the paper: with M* replayed the true x matches G* exactly; in eval mode it does not."""
    model, x, y, grads, masks = _setup()
    att = GradientInversion(model, _short("dia-ig"))
    model.eval()
    with dropout_mode(model, "replay", masks=masks):
        assert att.matching_loss(x, y, grads).item() < 1e-6
    assert att.matching_loss(x, y, grads).item() > 1e-2


def test_dia_beats_ig_and_recovers_the_masks():
    model, x, y, grads, true_masks = _setup(p=0.5)
    init = lambda: PixelSpace(x.shape, generator=torch.Generator().manual_seed(7))  # noqa: E731
    ig = GradientInversion(model, _short("dia-ig")).run(grads, y, init())
    dia_att = DropoutInversionAttack(model, _short("dia"))
    dia = dia_att.run(grads, y, init(), generator=torch.Generator().manual_seed(8))
    wb = dia_att.run_white_box(grads, y, init(), true_masks)
    assert dia.match_loss < 0.1 * ig.match_loss and wb.match_loss < 0.1 * ig.match_loss
    err = lambda r: float(((r.x - x) ** 2).mean())  # noqa: E731
    assert err(dia) < 0.2 * err(ig)
    est = dia.snapshots["extra0"]
    assert set(est) == {"mask0", "mask1"}
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in est.values())
    assert all(l.mode == "normal" and l.mask is None for l in maskable_dropouts(model))  # detached afterwards


def test_dia_falls_back_to_ig_without_dropout():
    model, x, y, grads, _ = _setup(p=0.0)
    att = DropoutInversionAttack(model, _short("dia", 20))
    assert att.fallback
    a = att.run(grads, y, PixelSpace(x.shape, generator=torch.Generator().manual_seed(1)))
    b = GradientInversion(model, _short("dia-ig", 20)).run(grads, y, PixelSpace(x.shape, generator=torch.Generator()
                                                                                 .manual_seed(1)))
    assert torch.equal(a.x, b.x) and a.history == b.history and a.snapshots.keys() == {"space"}


def test_batch_and_per_sample_masks():
    torch.manual_seed(0)
    model = DropoutMLP(16, (12,), 4, p=0.5)
    x = torch.rand(2, 1, 4, 4)
    y = torch.tensor([0, 3])
    grads, masks = client_gradients(model, x, y, generator=torch.Generator().manual_seed(0))
    assert masks[0].shape == (2, 12)
    res = DropoutInversionAttack(model, _short("dia", 5)).run(grads, y, PixelSpace(x.shape))
    assert res.snapshots["extra0"]["mask0"].shape == (2, 12) and res.x.shape == x.shape


def test_attack_bad_inputs():
    model, x, y, grads, _ = _setup()
    att = DropoutInversionAttack(model, _short("dia", 3))
    with pytest.raises(ValueError, match="one tensor per model parameter"):
        att.run(grads[:-1], y, PixelSpace(x.shape))
    with pytest.raises(ValueError, match="shape"):
        att.run([g.T for g in grads], y, PixelSpace(x.shape))
    with pytest.raises(ValueError, match="victim batch of 1"):
        att.run(grads, torch.tensor([1, 2]), PixelSpace(x.shape))
    masks2 = att.masks_for((2, 1, 4, 4))
    with pytest.raises(ValueError, match="victim batch of 2"):
        att.run(grads, y, PixelSpace(x.shape), masks=masks2)
    with pytest.raises(TypeError, match="DropoutMaskSpace"):
        att.run(grads, y, PixelSpace(x.shape), masks=[torch.ones(1, 24)])
    with pytest.raises(TypeError, match="SearchSpace"):
        att.run(grads, y, x)
    with pytest.raises(ValueError, match="no MaskableDropout"):
        DropoutInversionAttack(nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Dropout(0.5)))
    capped = DropoutInversionAttack(model, replace(_short("dia", 3), max_batch=1))
    with pytest.raises(ValueError, match="at most 1"):
        capped.run(grads, torch.tensor([1, 2]), PixelSpace((2, 1, 4, 4)))


def test_client_gradients_restores_modes_and_uses_the_generator():
    model, x, y, *_ = _setup()
    model.eval()
    g1, m1 = client_gradients(model, x, y, generator=torch.Generator().manual_seed(3))
    g2, m2 = client_gradients(model, x, y, generator=torch.Generator().manual_seed(3))
    assert not model.training and all(l.mode == "normal" for l in maskable_dropouts(model))
    assert all(torch.equal(a, b) for a, b in zip(m1, m2)) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(not g.requires_grad for g in g1)


# ------------------------------------------------------------------------------------ claim
def test_claim_registered():
    from gradkit.harness.claims.dia import ARMS, CLAIM

    assert CLAIM.arxiv == "2208.06163" and CLAIM.primary.ours == "dia_p50" and CLAIM.primary.baseline == "ig_p50"
    assert set(ARMS) == {f"{a}_{t}" for a in ("ig", "dia", "whitebox") for t in ("p25", "p50")} | {
        "ig_train_p50", "dia_p0"}
    assert CLAIM.control == {"dia_p25": "ig_p25", "dia_p50": "ig_p50"}
    assert [v.name for v in CLAIM.variants] == ["mnist"]


def test_claim_smoke(smoke_run):
    out = smoke_run("dia")
    n_img = out.info["protocol"]["n_img"]
    for arm, m in out.metrics.items():
        assert m["images"] == (1 if arm in ("ig_train_p50", "dia_p0") else n_img), arm
    # DIA matches the gradient better than IG; the masks keep their drop rate
    for t, p in (("p25", 0.25), ("p50", 0.5)):
        assert out.metrics[f"dia_{t}"]["match_loss"] < out.metrics[f"ig_{t}"]["match_loss"]
        assert abs(out.metrics[f"dia_{t}"]["mask_mean"] - (1 - p)) < 0.15
    assert "mask_mean" not in out.metrics["dia_p0"]  # no dropout: DIA falls back to IG
    grid = out.info["images"]["reconstructions_p50"]
    assert list(grid) == ["original", "ig", "dia", "whitebox"]
    assert all(len(rows) == n_img and len(rows[0]) == 8 and len(rows[0][0]) == 8 for rows in grid.values())
    assert all(0.0 <= v <= 1.0 for rows in grid.values() for img in rows for r in img for v in r)
    curve = out.curves["log10_match_loss"]["dia_p50"]
    assert len(curve) == len(out.info["curve_axes"]["log10_match_loss"]["x"]) and curve[-1] <= curve[0]


def test_claim_missing_data_root(tmp_path):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.dia import CLAIM
    from gradkit.data import DataError

    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "absent"))
    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_real_mnist_smoke(data_root, smoke_run):
    from gradkit.harness.claims.dia import CLAIM
    from gradkit.harness.suite import decide

    out = smoke_run("dia", data_root=data_root)
    assert out.data == "mnist" and set(out.metrics) == {"ig_p50", "dia_p50", "whitebox_p50"}
    assert all(math.isfinite(v) for m in out.metrics.values() for v in m.values())
    assert len(CLAIM.criterion_for("mnist").evaluate([out.metrics])[1]) == 2
    assert decide(CLAIM, out.data, [out.metrics]).control_passed is not None  # the variant's control evaluates
