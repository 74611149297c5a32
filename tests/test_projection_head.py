"""projection-head: contrastive losses, projection heads and the encoder+head wrapper, the feature-weight probe
and the linear probe."""
import math

import pytest
import torch
from torch import nn

from gradkit.nn.contrastive import info_nce_loss, spectral_contrastive_loss
from gradkit.nn.projection_head import ProjectionHead, WithProjectionHead
from gradkit.probes.feature_weights import LayerOutputs, feature_weights
from gradkit.probes.linear_eval import linear_probe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ losses
def test_spectral_loss_matches_loops():
    g = _gen()
    h1, h2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    n = 5
    pos = sum(float(h1[i] @ h2[i]) for i in range(n)) / n
    neg = sum(float(h1[i] @ h2[j]) ** 2 for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert spectral_contrastive_loss(h1, h2).item() == pytest.approx(-2 * pos + neg, rel=1e-12)


def test_info_nce_matches_loops():
    g = _gen(1)
    h1, h2 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    tau, n = 0.5, 4
    z = torch.nn.functional.normalize(torch.cat([h1, h2]), dim=1)
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        denom = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(2 * n) if b != a)
        total += -math.log(math.exp(float(z[a] @ z[pos]) / tau) / denom)
    assert info_nce_loss(h1, h2, tau=tau).item() == pytest.approx(total / (2 * n), rel=1e-10)


@pytest.mark.parametrize("loss", [spectral_contrastive_loss, lambda a, b: info_nce_loss(a, b, tau=0.3)])
def test_losses_gradcheck(loss):
    g = _gen(2)
    h1 = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (h1, h2))


def test_spectral_loss_minimum_for_orthonormal_known_case():
    # rows c * e_i: every positive pair gives c^2, every negative pair is orthogonal, so L = -2 c^2
    n, c = 4, 1.5
    h = c * torch.eye(n, dtype=torch.float64)
    assert spectral_contrastive_loss(h, h).item() == pytest.approx(-2 * c ** 2, rel=1e-12)


@pytest.mark.parametrize("bad, match", [
    ((torch.randn(4, 3), torch.randn(4, 2)), "same shape"),
    ((torch.randn(1, 3), torch.randn(1, 3)), "at least 2 rows"),
    ((torch.randn(4), torch.randn(4)), "same shape"),
    (([1.0, 2.0], torch.randn(2, 1)), "h1 must be a torch.Tensor"),
    ((torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)), "floating"),
])
def test_loss_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        spectral_contrastive_loss(*bad)


def test_info_nce_tau_error():
    with pytest.raises(ValueError, match="tau must be finite and > 0, got 0"):
        info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), tau=0)


# ------------------------------------------------------------------------------------------ heads
def test_fixed_reweight_head_weights_and_no_parameters():
    head = ProjectionHead(4, kind="fixed_reweight", kappa=0.5)
    assert list(head.parameters()) == []
    torch.testing.assert_close(head(torch.ones(2, 4)), torch.tensor([[1.0, 0.5, 0.25, 0.125]] * 2))
    torch.testing.assert_close(ProjectionHead(3, kind="fixed_reweight", kappa=1.0)(torch.arange(3.0)), torch.arange(3.0))
    custom = ProjectionHead(3, kind="fixed_reweight", weights=[2.0, 1.0, 0.5])
    torch.testing.assert_close(custom(torch.ones(1, 3, dtype=torch.float64)), torch.tensor([[2.0, 1.0, 0.5]],
                                                                                            dtype=torch.float64))


def test_mlp_and_linear_heads_shapes():
    mlp = ProjectionHead(8, hidden=16, out_dim=4, depth=3)
    assert mlp(torch.randn(5, 8)).shape == (5, 4)
    assert sum(isinstance(m, nn.ReLU) for m in mlp.modules()) == 2
    lin = ProjectionHead(8, kind="linear", depth=2)
    assert all(m.bias is None for m in lin.modules() if isinstance(m, nn.Linear))
    assert "kind='linear'" in repr(lin)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0), "dim must be a positive int, got 0"),
    (dict(dim=4, kind="conv"), "kind must be one of"),
    (dict(dim=4, kappa=0.0), r"kappa must be in \(0, 1\], got 0.0"),
    (dict(dim=4, kappa=1.5), r"kappa must be in \(0, 1\], got 1.5"),
    (dict(dim=4, depth=0), "depth must be a positive int, got 0"),
    (dict(dim=4, kind="fixed_reweight", out_dim=3), "out_dim must equal dim"),
    (dict(dim=3, kind="fixed_reweight", weights=[1.0, -1.0, 1.0]), "weights must be 3 finite positive"),
    (dict(dim=3, kind="fixed_reweight", weights=[1.0, 1.0]), "weights must be 3 finite positive"),
])
def test_head_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectionHead(**kwargs)


def test_wrapper_width_mismatch_is_a_clear_error():
    enc = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16))
    with pytest.raises(ValueError, match="head expects input width 8 but the encoder outputs width 16"):
        WithProjectionHead(enc, ProjectionHead(8))
    # an encoder whose width cannot be read at construction: caught at the first forward
    model = WithProjectionHead(nn.Flatten(), ProjectionHead(8))
    with pytest.raises(ValueError, match="expects inputs of width 8, got shape"):
        model(torch.randn(2, 3, 3))
    with pytest.raises(TypeError, match="encoder must be an nn.Module"):
        WithProjectionHead(lambda x: x, ProjectionHead(8))


def test_wrapper_features_and_discard():
    enc = nn.Linear(6, 4)
    model = WithProjectionHead(enc, ProjectionHead(4, out_dim=2))
    x = torch.randn(3, 6)
    torch.testing.assert_close(model.features(x, "pre"), enc(x))
    torch.testing.assert_close(model.features(x, "post"), model(x))
    assert model.discard() is enc
    with pytest.raises(ValueError, match="layer must be one of"):
        model.features(x, layer="middle")


# ------------------------------------------------------------------------------------------ feature weights
def test_feature_weights_are_singular_values_for_diagonal_weights():
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.diag(torch.tensor([2.0, -1.0, 0.5])))
        net[1].weight.copy_(torch.diag(torch.tensor([3.0, 1.0, -4.0])))
    w = feature_weights(net, torch.eye(3), layers=["0", "1"])
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.5], [6.0, 1.0, 2.0]]))


def test_feature_weights_with_bias_and_base():
    lin = nn.Linear(2, 2)  # affine: the bias cancels in f(base + mu) - f(base)
    w = feature_weights(nn.Sequential(lin), torch.tensor([[1.0, 0.0]]), layers="0", base=torch.ones(2))
    torch.testing.assert_close(w, lin.weight[:, :1].detach().norm().reshape(1, 1))


def _balanced(g, d_in=6, k=4, scale=0.3):
    w1 = scale * torch.randn(k, d_in, generator=g, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(w1 @ w1.T)
    w2 = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T  # W2^T W2 = W1 W1^T
    return w1.requires_grad_(), w2.requires_grad_()


def test_balancedness_and_square_root_law_under_small_lr_gd():
    g = _gen(3)
    d_in, k = 6, 4
    w1, w2 = _balanced(g, d_in, k)
    mu = torch.eye(d_in, dtype=torch.float64)[:3]
    strengths = torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64)
    zz = torch.randint(0, 2, (256, 3), generator=g).double() * 2 - 1
    x = (zz * strengths) @ mu + 0.05 * torch.randn(256, d_in, generator=g, dtype=torch.float64)
    scale0 = (w1 @ w1.T).norm()
    for _ in range(300):
        h = x @ w1.T @ w2.T
        loss = spectral_contrastive_loss(h, h)
        g1, g2 = torch.autograd.grad(loss, [w1, w2])
        with torch.no_grad():
            w1 -= 1e-3 * g1
            w2 -= 1e-3 * g2
    with torch.no_grad():
        gap = (w1 @ w1.T - w2.T @ w2).norm() / max(float((w1 @ w1.T).norm()), float(scale0))
        assert gap < 1e-3
        model = WithProjectionHead(nn.Linear(d_in, k, bias=False), nn.Linear(k, k, bias=False)).double()
        model.encoder.weight.copy_(w1)
        model.head.weight.copy_(w2)
    # balanced layers: W2^T W2 = W1 W1^T, so along W1's right singular vectors v_j (singular value s_j) the
    # pre-projection weight is s_j and the end-to-end weight is s_j^2: w_pre = sqrt(w_post)
    v = torch.linalg.svd(w1.detach(), full_matrices=False).Vh
    w = feature_weights(model, v, layers=["encoder", "head"])
    assert (w[0].log() - 0.5 * w[1].log()).abs().max() < 1e-3


def test_feature_weights_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    net = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        feature_weights(net, torch.eye(3), layers="lin")
    assert not net.lin._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with LayerOutputs(net, "lin"):
            net(torch.randn(1, 3))
    assert not net.lin._forward_hooks


def test_feature_weights_reused_module_keeps_last_call():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(2, 2, bias=False), relu, nn.Linear(2, 2, bias=False), relu)
    w = feature_weights(net, torch.eye(2), layers="1")
    out = torch.relu(net[2](torch.relu(net[0](torch.eye(2))))).detach()
    torch.testing.assert_close(w[0], out.norm(dim=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(directions=torch.randn(3)), r"directions must be a \(k, d\) matrix"),
    (dict(directions=torch.randn(2, 3), base=torch.zeros(4)), r"base must have shape \(3,\)"),
    (dict(directions=torch.randn(2, 3), layers="nope"), "layer 'nope' not found"),
])
def test_feature_weights_errors(kwargs, match):
    net = nn.Sequential(nn.Linear(3, 2))
    args = dict(layers="0", **kwargs) if "layers" not in kwargs else kwargs
    with pytest.raises(ValueError, match=match):
        feature_weights(net, **args)


# ------------------------------------------------------------------------------------------ linear probe
def test_linear_probe_separable_and_scale_invariant():
    g = _gen(4)
    y = torch.randint(0, 3, (120,), generator=g)
    x = torch.randn(120, 5, generator=g) * 0.1
    x[:, 0] += y.float() * 3.0
    acc = linear_probe(x[:80], y[:80], x[80:], y[80:], C=1.0)
    assert acc == 100.0
    scaled = x * torch.tensor([1e-4, 1.0, 1e3, 1.0, 1.0])
    assert linear_probe(scaled[:80], y[:80], scaled[80:], y[80:], C=1.0) == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(feats_test=torch.randn(4, 2)), "feats_test must have 3 columns"),
    (dict(y_train=torch.ones(10)), "y_train must be 10 integer labels"),
    (dict(y_train=torch.zeros(10, dtype=torch.long)), "at least two classes"),
    (dict(C=0.0), "C must be finite and > 0, got 0.0"),
    (dict(feats_train=torch.randn(10)), r"feats_train must be an \(N, d\) matrix"),
])
def test_linear_probe_errors(kwargs, match):
    args = dict(feats_train=torch.randn(10, 3), y_train=torch.arange(10) % 2, feats_test=torch.randn(4, 3),
                y_test=torch.arange(4) % 2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_probe(**args)
