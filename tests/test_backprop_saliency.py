"""Tests of the backprop saliency framework (paper slug: backprop-saliency): math, probes, claim, docs."""
from __future__ import annotations

import math
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.probes.saliency import (
    GradCAM, LayerCapture, LayerSaliency, LinearApprox, MetaSaliency, NormGrad, Saliency, center_maps,
    class_sensitivity, input_gradient_saliency, normalize_maps, pearson_per_example, pointing_game,
    pointing_hits, two_phase_map,
)
from gradkit.testing import SavedBytesMeter, count_hooks

REPO = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """conv1 -> pool -> conv2 (ReLU inplace) -> GAP -> linear; ``reuse`` applies one ReLU twice."""

    def __init__(self, c_in: int = 3, reuse: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.reuse = reuse

    def forward(self, x):
        h = F.max_pool2d(self.act(self.conv1(x)), 2)
        h = self.conv2(h)
        h = self.act(h) if self.reuse else torch.relu(h)
        return self.fc(h.mean((2, 3)))


def _net(dtype=torch.float32, **kw) -> Net:
    torch.manual_seed(0)
    return Net(**kw).to(dtype).eval()


def _x(n=4, dtype=torch.float32, c=3, s=8):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(1), dtype=dtype)


# ------------------------------------------------------------------------------------ phase 1/2 math
def _explicit_phi(x, g, phase1):
    n, c, h, w = x.shape
    if phase1 == "bias":
        return g
    if phase1 == "scaling":
        return x * g
    if phase1 == "avg_bias_scaling":
        return x * g.mean((2, 3), keepdim=True)
    if phase1 == "conv1x1":
        return torch.einsum("nihw,njhw->nijhw", x, g).reshape(n, c * c, h, w)
    # loop implementation of the 3x3 patch (zero padding)
    xp = F.pad(x, (1, 1, 1, 1))
    patch = torch.zeros(n, c, 9, h, w, dtype=x.dtype)
    for k, (dy, dx) in enumerate([(a, b) for a in range(3) for b in range(3)]):
        patch[:, :, k] = xp[:, :, dy:dy + h, dx:dx + w]
    if phase1 == "conv3x3":
        return torch.einsum("nkhw,njhw->nkjhw", patch.reshape(n, 9 * c, h, w), g).reshape(n, 9 * c * c, h, w)
    return (patch * g[:, :, None]).reshape(n, 9 * c, h, w)


def _explicit_reduce(phi, phase2):
    return {"norm": lambda p: p.norm(dim=1), "filter_norm": lambda p: p.clamp(min=0).norm(dim=1),
            "sum": lambda p: p.sum(1), "max": lambda p: p.amax(1)}[phase2](phi)


@pytest.mark.parametrize("phase1", ["bias", "scaling", "avg_bias_scaling", "conv1x1", "conv3x3", "conv3x3_depthwise"])
@pytest.mark.parametrize("phase2", ["norm", "filter_norm", "sum", "max"])
def test_two_phase_map_matches_explicit_tensor(phase1, phase2):
    g0 = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 4, generator=g0, dtype=torch.float64)
    g = torch.randn(2, 3, 5, 4, generator=g0, dtype=torch.float64)
    ref = _explicit_reduce(_explicit_phi(x, g, phase1), phase2)
    torch.testing.assert_close(two_phase_map(x, g, phase1, phase2), ref, rtol=1e-10, atol=1e-12)


def test_normgrad_factorizes_as_product_of_norms():
    x, g = torch.randn(3, 7, 4, 4, dtype=torch.float64), torch.randn(3, 7, 4, 4, dtype=torch.float64)
    outer = torch.einsum("nihw,njhw->nijhw", x, g)
    torch.testing.assert_close(outer.flatten(1, 2).norm(dim=1), x.norm(dim=1) * g.norm(dim=1))
    torch.testing.assert_close(two_phase_map(x, g), x.norm(dim=1) * g.norm(dim=1))


def test_inserted_identity_conv1x1_gradient_is_outer_product():
    # build the virtual layer explicitly: a 1x1 conv initialised to identity after conv2, per-location grads
    model = _net(torch.float64)
    x = _x(2, torch.float64)
    feats = {}

    def head(h):
        return model.fc(torch.relu(h).mean((2, 3)))

    h = model.conv2(F.max_pool2d(model.act(model.conv1(x)), 2)).detach()
    n, c, hh, ww = h.shape
    # per-location virtual weights W_u (C x C) = identity: y_u = W_u h_u
    w_virtual = torch.eye(c, dtype=torch.float64).expand(hh * ww, c, c).clone().requires_grad_()
    hu = h.permute(0, 2, 3, 1).reshape(n, hh * ww, c)
    out = torch.einsum("uij,nuj->nui", w_virtual, hu).reshape(n, hh, ww, c).permute(0, 3, 1, 2)
    score = head(out)[0, 2]  # one example so the per-location gradient is that example's
    (gw,) = torch.autograd.grad(score, w_virtual)
    # hook-based shortcut: g = d score / d h, phi_u = g_u h_u^T (rows: output channel i, cols: input j)
    with LayerCapture(model, ["conv2"]) as cap:
        s2 = model(x)[0, 2]
        (g,) = torch.autograd.grad(s2, cap.single("conv2"))
    phi = torch.einsum("ihw,jhw->hwij", g[0], h[0]).reshape(hh * ww, c, c)
    torch.testing.assert_close(gw, phi, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw.flatten(1).norm(dim=1).reshape(hh, ww), two_phase_map(h, g)[0])


def test_linear_approx_at_input_sums_to_taylor_term():
    model = _net(torch.float64)
    x = _x(3, torch.float64).requires_grad_()
    y = torch.tensor([0, 3, 1])
    score = model(x).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(score, x)
    lin = two_phase_map(x.detach(), g, "scaling", "sum")  # input "layer"
    torch.testing.assert_close(lin.sum((1, 2)), (x.detach() * g).sum((1, 2, 3)))


def test_gradcam_equals_avg_bias_form_and_relu_linear_approx_at_last_layer():
    # in Net, conv2's output goes through ReLU then GAP: take the ReLU output as the layer by
    # building a model whose last conv block ends in a ReLU module
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double().eval()
    x, y = _x(4, torch.float64), torch.tensor([0, 1, 2, 3])
    cam = GradCAM(model, "3").layer_maps(x, y)["3"]
    avg = LayerSaliency(model, "3", phase1="avg_bias_scaling", phase2="sum", relu=True).layer_maps(x, y)["3"]
    lin = LinearApprox(model, "3", relu=True).layer_maps(x, y)["3"]
    torch.testing.assert_close(cam, avg)
    torch.testing.assert_close(cam, lin)  # g is spatially constant right before GAP
    # away from the last layer Grad-CAM and the linear approximation differ
    cam1 = GradCAM(model, "1").layer_maps(x, y)["1"]
    lin1 = LinearApprox(model, "1", relu=True).layer_maps(x, y)["1"]
    assert not torch.allclose(cam1, lin1)


def test_normgrad_selective_is_filter_norm_of_scaling():
    model = _net()
    x, y = _x(), torch.tensor([1, 2, 3, 4])
    with LayerCapture(model, ["conv2"]) as cap:
        (g,) = torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), cap.single("conv2"))
    a = cap.single("conv2").detach()
    sel = NormGrad(model, "conv2", selective=True).layer_maps(x, y)["conv2"]
    torch.testing.assert_close(sel, (a * g).clamp(min=0).norm(dim=1))
    ng = NormGrad(model, "conv2").layer_maps(x, y)["conv2"]
    torch.testing.assert_close(ng, a.norm(dim=1) * g.norm(dim=1))


# ------------------------------------------------------------------------------------ gradient saliency
def test_saliency_matches_autograd_reference():
    model = _net(torch.float64)
    x = _x(5, torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4])
    got = Saliency(model).attribute(x, target=y, abs=False, internal_batch_size=2)
    ref = torch.stack([_grad_one(model, x[i], int(y[i])) for i in range(5)])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Saliency(model).attribute(x, target=y), ref.abs())
    m = input_gradient_saliency(model, x, target=y)
    assert m.shape == (5, 1, 8, 8)
    torch.testing.assert_close(m, ref.abs().amax(1, keepdim=True))


def _grad_one(model, xi, c):
    xi = xi[None].clone().requires_grad_()
    (g,) = torch.autograd.grad(model(xi)[0, c], xi)
    return g[0]


def test_saliency_agrees_with_captum():
    captum_attr = pytest.importorskip("captum.attr")
    model = _net()
    x, y = _x(6), torch.tensor([0, 1, 2, 3, 4, 0])
    ours = Saliency(model).attribute(x, target=y)
    theirs = captum_attr.Saliency(model).attribute(x, target=y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    ours = Saliency(model).attribute(x, target=y, abs=False)
    theirs = captum_attr.Saliency(model).attribute(x, target=y, abs=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_target_none_explains_top_class_and_int_target_broadcasts():
    model = _net()
    x = _x()
    top = model(x).argmax(1)
    torch.testing.assert_close(Saliency(model).attribute(x), Saliency(model).attribute(x, target=top))
    torch.testing.assert_close(NormGrad(model, "conv2").attribute(x, target=2),
                               NormGrad(model, "conv2").attribute(x, target=[2] * 4))


# ------------------------------------------------------------------------------------ attribution classes
def test_layer_saliency_shapes_normalisation_and_product():
    model = _net()
    x, y = _x(3, s=8), torch.tensor([0, 1, 2])
    one = NormGrad(model, "conv2").attribute(x, target=y)
    assert one.shape == (3, 1, 8, 8)
    assert float(one.min()) >= 0 and float(one.max()) <= 1 + 1e-6
    assert torch.allclose(one.flatten(1).amax(1), torch.ones(3), atol=1e-4)
    raw = NormGrad(model, "conv2", upsample=False, normalize=False).attribute(x, target=y)
    assert raw.shape == (3, 1, 4, 4)
    both = NormGrad(model, ["conv1", "conv2"]).attribute(x, target=y)
    c1 = NormGrad(model, "conv1").attribute(x, target=y)
    torch.testing.assert_close(both, c1 * one)


def test_constant_map_normalises_to_zero_not_nan():
    m = normalize_maps(torch.ones(2, 1, 4, 4))
    assert torch.isfinite(m).all() and float(m.abs().max()) == 0.0


def test_internal_batch_size_gives_same_maps():
    model = _net()
    x, y = _x(7), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    for attr in (NormGrad(model, ["conv1", "conv2"]), GradCAM(model, "conv2"), Saliency(model)):
        torch.testing.assert_close(attr.attribute(x, target=y, internal_batch_size=3), attr.attribute(x, target=y))


class _PerForwardSavedBytes:
    """Bytes autograd saves during each forward of ``model`` (a fresh SavedBytesMeter per call) and batch sizes."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls, self._meter, self._handles = model, [], None, []

    def __enter__(self):
        def pre(mod, inp):
            self._meter = SavedBytesMeter().__enter__()

        def post(mod, inp, out):
            self._meter.__exit__(None, None, None)
            self.calls.append((inp[0].shape[0], self._meter.bytes))

        self._handles = [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


@pytest.mark.parametrize("make", [lambda m: NormGrad(m, ["conv1", "conv2"]), lambda m: GradCAM(m, "conv2"),
                                  lambda m: Saliency(m)])
def test_internal_batch_size_bounds_memory_for_256_inputs(make):
    model = _net()
    x = torch.randn(256, 3, 16, 16)
    y = torch.randint(0, 5, (256,))
    attr = make(model)
    with _PerForwardSavedBytes(model) as one:
        attr.attribute(x[:16], target=y[:16])
    with _PerForwardSavedBytes(model) as chunked:
        attr.attribute(x, target=y, internal_batch_size=16)
    with _PerForwardSavedBytes(model) as whole:
        attr.attribute(x, target=y)
    (n1, b1), = one.calls
    assert n1 == 16 and b1 > 0
    assert chunked.calls == [(16, b1)] * 16  # 16 forwards of 16 inputs, each saving one chunk's bytes
    # a chunk's input is a view of x: its storage is counted whole (Saliency's input is a leaf: not counted)
    x_bytes = 0 if isinstance(attr, Saliency) else x.untyped_storage().nbytes()
    act1 = b1 - x_bytes
    assert act1 > 0 and whole.calls[0][0] == 256 and whole.calls[0][1] - x_bytes >= 15 * act1
    # no chunk's graph outlives it: when a chunk starts, the previous chunks' activations are gone
    alive, refs = [], []
    h1 = model.register_forward_pre_hook(lambda m, i: alive.append(sum(r() is not None for r in refs)))
    h2 = model.conv1.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    try:
        attr.attribute(x, target=y, internal_batch_size=16)
    finally:
        h1.remove()
        h2.remove()
    assert len(alive) == 16 and max(alive) == 0


def test_meta_saliency_restores_model_and_uses_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5))
    model.train()
    x, y = _x(3), torch.tensor([0, 1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    h = model[1].register_forward_pre_hook(lambda m, i: modes.append(m.training))
    try:
        out = MetaSaliency(NormGrad(model, "4"), lr=1e-2).attribute(x, target=y)
    finally:
        h.remove()
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    assert modes and not any(modes)  # BatchNorm ran in eval mode throughout
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-exact restore (running stats untouched too)
    assert all(p.grad is None for p in model.parameters())


def test_meta_saliency_equals_saliency_of_manually_stepped_model():
    model = _net(torch.float64)
    x, y = _x(2, torch.float64), torch.tensor([3, 1])
    lr = 0.05
    got = MetaSaliency(NormGrad(model, "conv2"), lr=lr).attribute(x, target=y)
    for i in range(2):
        clone = _net(torch.float64)
        loss = F.cross_entropy(clone(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(clone.parameters()))
        with torch.no_grad():
            for p, g in zip(clone.parameters(), grads):
                p -= lr * g
        ref = NormGrad(clone, "conv2").attribute(x[i:i + 1], target=y[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], ref)
    neg = MetaSaliency(NormGrad(model, "conv2"), lr=lr, negate=True).attribute(x, target=y)
    assert not torch.allclose(neg, got)
    plain = torch.cat([NormGrad(model, "conv2").attribute(x[i:i + 1], target=y[i:i + 1]) for i in range(2)])
    assert torch.equal(MetaSaliency(NormGrad(model, "conv2"), lr=0.0).attribute(x, target=y), plain)


def test_meta_saliency_restores_weights_on_exception():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Boom:
        forward_func = model

        def attribute(self, inputs, target=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        MetaSaliency(Boom(), lr=1.0).attribute(_x(1), target=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------------------------ hooks
def test_probes_remove_hooks_even_on_error_and_handle_reused_modules():
    model = _net(reuse=True)
    before = count_hooks(model)
    NormGrad(model, "conv2").attribute(_x(), target=0)
    assert count_hooks(model) == before
    # the reused in-place ReLU runs twice per forward: an explicit call index is required
    with pytest.raises(RuntimeError, match="ran 2 times"):
        NormGrad(model, "act").attribute(_x(), target=0)
    assert count_hooks(model) == before
    m0 = NormGrad(model, "act", call=0, upsample=False, normalize=False).attribute(_x(), target=1)
    m1 = NormGrad(model, "act", call=1, upsample=False, normalize=False).attribute(_x(), target=1)
    assert m0.shape[-1] == 8 and m1.shape[-1] == 4
    assert count_hooks(model) == before
    with pytest.raises(ValueError):
        with LayerCapture(model, ["conv2"]):
            assert count_hooks(model) == before + 1
            raise ValueError("inside")
    assert count_hooks(model) == before


def test_inplace_relu_after_layer_does_not_corrupt_capture():
    model = _net(torch.float64, reuse=True)  # conv2 output is followed by an in-place ReLU
    x, y = _x(2, torch.float64), torch.tensor([0, 1])
    with LayerCapture(model, ["conv2"]) as cap:
        (g,) = torch.autograd.grad(model(x).gather(1, y[:, None]).sum(), cap.single("conv2"))
    h = model.conv2(F.max_pool2d(torch.relu(model.conv1(x)), 2))
    assert (cap.single("conv2") < 0).any()  # pre-ReLU values kept
    torch.testing.assert_close(cap.single("conv2").detach(), h.detach())
    ref = torch.autograd.grad(model.fc(torch.relu(h).mean((2, 3))).gather(1, y[:, None]).sum(), h)[0]
    torch.testing.assert_close(g, ref)


# ------------------------------------------------------------------------------------ metrics
def test_pointing_game_and_baselines():
    maps = torch.zeros(3, 1, 10, 10)
    maps[0, 0, 2, 3] = 1  # inside the box
    maps[1, 0, 9, 9] = 1  # far away
    maps[2, 0, 2, 8] = 1  # 2 px right of the box
    boxes = torch.tensor([[1, 1, 6, 4]] * 3)
    assert pointing_hits(maps, boxes, 0).tolist() == [True, False, False]
    assert pointing_hits(maps, boxes, 2).tolist() == [True, False, True]
    assert pointing_game(maps, boxes, 2) == pytest.approx(200 / 3)
    c = center_maps(2, (9, 9))
    assert c.shape == (2, 1, 9, 9) and int(c[0].flatten().argmax()) == 4 * 9 + 4


def test_pearson_and_class_sensitivity():
    a = torch.randn(4, 1, 5, 5)
    torch.testing.assert_close(pearson_per_example(a, 3 * a + 1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(pearson_per_example(a, -a), -torch.ones(4, dtype=torch.float64))
    assert pearson_per_example(a, torch.ones_like(a)).abs().max() == 0  # constant map -> 0
    model = _net()
    cs = class_sensitivity(Saliency(model), model, _x())
    assert -1.0 <= cs <= 1.0
    # NormGrad right before GAP is class-blind: ||g_u|| is spatially constant
    torch.manual_seed(0)
    gap = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 5)).eval()
    assert class_sensitivity(NormGrad(gap, "1"), gap, _x()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------ errors
def test_clear_errors():
    model = _net()
    x = _x()
    with pytest.raises(ValueError, match="phase1"):
        LayerSaliency(model, "conv2", phase1="conv5x5")
    with pytest.raises(ValueError, match="phase2"):
        LayerSaliency(model, "conv2", phase2="mean")
    with pytest.raises(ValueError, match="combine"):
        LayerSaliency(model, "conv2", combine="min")
    with pytest.raises(ValueError, match="not found"):
        NormGrad(model, "conv9")
    with pytest.raises(ValueError, match="empty"):
        NormGrad(model, [])
    with pytest.raises(TypeError, match="model"):
        NormGrad(lambda v: v, "conv2")
    with pytest.raises(ValueError, match="internal_batch_size"):
        Saliency(model).attribute(x, target=0, internal_batch_size=0)
    with pytest.raises(ValueError, match="target"):
        Saliency(model).attribute(x, target=[0, 1])
    with pytest.raises(ValueError, match="target classes"):
        NormGrad(model, "conv2").attribute(x, target=7)
    with pytest.raises(TypeError, match="target"):
        Saliency(model).attribute(x, target=torch.tensor([0.5] * 4))
    with pytest.raises(TypeError, match="inputs"):
        Saliency(model).attribute(x.numpy(), target=0)
    with pytest.raises(ValueError, match="lr must be finite"):
        MetaSaliency(NormGrad(model, "conv2"), lr=float("nan"))
    with pytest.raises(ValueError, match="lr"):
        MetaSaliency(NormGrad(model, "conv2"), lr=-1.0)
    with pytest.raises(TypeError, match="attribute"):
        MetaSaliency(object())
    with pytest.raises(ValueError, match="same shape"):
        two_phase_map(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="boxes"):
        pointing_game(torch.zeros(2, 4, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(torch.zeros(2, 4, 4), torch.zeros(2, 4), tolerance=-1)
    with pytest.raises(ValueError, match="upsample=True and normalize=True"):
        NormGrad(model, ["conv1", "conv2"], normalize=False)


def test_dtypes_and_no_grad_context():
    for dtype in (torch.float64, torch.bfloat16):
        model = _net(dtype)
        with torch.no_grad():  # attribution still works inside no_grad
            m = NormGrad(model, "conv2").attribute(_x(2, dtype), target=1)
        assert m.dtype == dtype and torch.isfinite(m.float()).all()


# ------------------------------------------------------------------------------------ claim
def test_claim_registered():
    import importlib

    from gradkit.harness.claims.backprop_saliency import CLAIM

    assert CLAIM.slug == "backprop-saliency" and CLAIM.primary.metric == "pointing"
    assert [v.name for v in CLAIM.variants] == ["mnist-canvas"]
    for dotted in CLAIM.uses:
        mod, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), name), dotted


def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.backprop_saliency import CLAIM, POINTING_ARMS, SENSITIVITY_ARMS

    out = smoke_run("backprop-saliency")
    assert set(out.metrics) == set(POINTING_ARMS) | {"model"}
    for arm in SENSITIVITY_ARMS:
        assert out.metrics[arm]["meta_lr"] in CLAIM.protocol.at("smoke").meta_lrs
    # the paper's identities, checked on every run
    ck = out.info["checks"]
    assert ck["normgrad_factorization_rel_err"] < 1e-5
    assert ck["gradcam_vs_avg_bias_err"] < 1e-6 and ck["gradcam_vs_linear_approx_last_layer_err"] < 1e-5
    assert ck["meta_restore_max_abs_diff"] == 0.0


def test_claim_smoke_is_bit_reproducible(smoke_run):
    from gradkit.harness.claims.backprop_saliency import CLAIM
    from gradkit.harness.claims.base import RunContext

    again = CLAIM.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("backprop-saliency").metrics


def test_claim_missing_data_root(tmp_path):
    from gradkit.harness.claims.backprop_saliency import CLAIM
    from gradkit.harness.claims.base import RunContext
    from gradkit.data import DataError

    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "absent"))
    with pytest.raises(DataError):
        CLAIM.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))


def test_claim_real_mnist_smoke(data_root, smoke_run):
    if not (data_root / "mnist").is_dir():
        pytest.skip("mnist/ not in the real data folder")
    out = smoke_run("backprop-saliency", data_root=data_root)
    assert out.data == "mnist-canvas"
    assert out.info["protocol"]["canvas"] == 64 and out.info["protocol"]["tolerance"] == 6.0
    for m in out.metrics.values():
        assert all(math.isfinite(v) for v in m.values())


# ------------------------------------------------------------------------------------ benchmark, docs, device
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.backprop_saliency  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("backprop-saliency-normgrad-attribution")
    assert b.slug == "backprop-saliency" and b.target is None
    r = b.run(1)
    assert math.isfinite(r.ratio) and r.ratio > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    model = _net(torch.float64)
    x, y = _x(3, torch.float64), torch.tensor([0, 1, 2])
    cpu = NormGrad(model, ["conv1", "conv2"]).attribute(x, target=y)
    model_c = model.cuda()
    gpu = NormGrad(model_c, ["conv1", "conv2"]).attribute(x.cuda(), target=y.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)
    meta = MetaSaliency(NormGrad(model_c, "conv2"), lr=1e-2).attribute(x.cuda(), target=y.cuda())
    assert meta.device.type == "cuda"
