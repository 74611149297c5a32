"""tanglenas: weight superposition == DARTS output mixture for entangled ops, samplers, bi-level steps."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.nas.arch import ArchParams
from gradkit.nas.bilevel import BilevelSearcher
from gradkit.nas.entangled import EntangledConv2d, EntangledLinear
from gradkit.testing import SavedBytesMeter

D = torch.float64


def _rand_weights(n1, n2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n1 * n2, generator=g, dtype=D), 0).view(n1, n2).requires_grad_()


def _grads(op, x, a, mode):
    y = op(x, a, mode=mode)
    params = [a] + [p for p in op.parameters()]
    return y, torch.autograd.grad((y.sin() * y).sum(), params)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_superpose_equals_mixture_outputs_and_grads(stride):
    torch.manual_seed(0)
    conv = EntangledConv2d(3, (4, 8, 16), (1, 3, 5), stride=stride).to(D)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    a = _rand_weights(3, 3)
    ys, gs = _grads(conv, x, a, "superpose")
    ym, gm = _grads(conv, x, a, "mixture")
    assert ys.shape == (2, 16, 8 // stride, 8 // stride)
    assert (ys - ym).abs().max() < 1e-10
    for u, v in zip(gs, gm):
        assert (u - v).abs().max() < 1e-10


def test_linear_superpose_equals_mixture_with_pair_of_weights():
    torch.manual_seed(1)
    lin = EntangledLinear((6, 12), (3, 5, 7)).to(D)
    x = torch.randn(4, 12, dtype=D)
    a_out = torch.softmax(torch.randn(3, dtype=D), 0).requires_grad_()
    a_in = torch.softmax(torch.randn(2, dtype=D), 0).requires_grad_()
    outs = []
    for mode in ("superpose", "mixture"):
        y = lin(x, (a_out, a_in), mode=mode)
        outs.append((y, torch.autograd.grad((y ** 2).sum(), [a_out, a_in, lin.weight, lin.bias])))
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-10
    for u, v in zip(outs[0][1], outs[1][1]):
        assert (u - v).abs().max() < 1e-10


def test_one_hot_weights_give_the_candidate_and_its_extracted_layer():
    """Closed form: a one-hot a selects exactly sub-network (i, j) = a plain conv with S_ij(W), zero-padded."""
    torch.manual_seed(2)
    conv = EntangledConv2d(2, (3, 5), (1, 3, 5)).to(D)
    x = torch.randn(2, 2, 6, 6, dtype=D)
    a = torch.zeros(2, 3, dtype=D)
    a[0, 1] = 1.0
    plain = conv.extract(0, 1)
    assert isinstance(plain, nn.Conv2d) and plain.weight.shape == (3, 2, 3, 3)
    # the 3x3 window is centred in the 5x5 kernel
    assert torch.equal(plain.weight, conv.weight[:3, :, 1:4, 1:4])
    ref = F.pad(plain(x), (0, 0, 0, 0, 0, 2))
    for mode in ("superpose", "mixture", "argmax"):
        assert (conv(x, a, mode=mode) - ref).abs().max() < 1e-12
    assert torch.all(conv(x, a)[:, 3:] == 0)  # missing channels are zeros


def test_linear_extract_and_centred_candidate():
    lin = EntangledLinear(8, (2, 4)).to(D)
    x = torch.randn(3, 8, dtype=D)
    sub = lin.extract(0, 0)
    assert sub.weight.shape == (2, 8)
    assert torch.allclose(lin.candidate(x, 0, 0)[:, :2], sub(x))


def test_argmax_mode_scale_flag():
    torch.manual_seed(3)
    conv = EntangledConv2d(1, (2, 4), (1, 3)).to(D)
    x = torch.randn(1, 1, 5, 5, dtype=D)
    a = torch.tensor([[0.1, 0.2], [0.6, 0.1]], dtype=D)
    raw = conv(x, a, mode="argmax")
    assert torch.allclose(raw, conv.candidate(x, 1, 0))
    assert torch.allclose(conv(x, a, mode="argmax", scale_argmax=True), 0.6 * raw)


def test_gradcheck_superpose_wrt_weights_and_arch():
    torch.manual_seed(4)
    conv = EntangledConv2d(1, (2, 3), (1, 3)).to(D)
    x = torch.randn(1, 1, 4, 4, dtype=D)

    def f(a, w, b):
        return torch.func.functional_call(conv, {"weight": w, "bias": b}, (x, a))

    a = _rand_weights(2, 2, seed=1)
    w = conv.weight.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (a, w, b))
    assert torch.allclose(f(a, w, b), conv(x, a, mode="mixture"))
    lin = EntangledLinear((2, 3), (1, 2)).to(D)
    xl = torch.randn(2, 3, dtype=D)
    assert torch.autograd.gradcheck(lambda a, w: torch.func.functional_call(lin, {"weight": w}, (xl, a)),
                                    (_rand_weights(2, 2, seed=2), lin.weight.detach().clone().requires_grad_()))


def test_superpose_saves_far_less_than_mixture():
    torch.manual_seed(5)
    conv = EntangledConv2d(8, (8, 16, 32), (1, 3, 5))
    x = torch.randn(64, 8, 8, 8, requires_grad=True)
    a = torch.full((3, 3), 1 / 9, requires_grad=True)
    sizes = {}
    for mode in ("superpose", "mixture"):
        with SavedBytesMeter() as m:
            conv(x, a, mode=mode)
        sizes[mode] = m.bytes
    assert sizes["superpose"] < 0.35 * sizes["mixture"]


def test_darts_drnas_gdas_samplers():
    g = torch.Generator().manual_seed(0)
    for sampler in ("darts", "drnas", "gdas"):
        ap = ArchParams((2, 4), sampler=sampler, init_std=1.0, generator=g)
        a = ap()
        assert a.shape == (2, 4) and torch.allclose(a.sum(-1), torch.ones(2))
        (a * torch.arange(4.0)).sum().backward()
        assert ap.alpha.grad is not None and ap.alpha.grad.abs().sum() > 0, sampler  # gradient reaches alpha
    gd = ArchParams(5, sampler="gdas", generator=g)
    a = gd()
    assert sorted(a.detach().tolist()).count(1.0) == 1 and (a.detach() == 0).sum() == 4  # hard one-hot forward
    gd.eval()
    assert torch.equal(gd(), F.one_hot(gd.alpha.argmax(), 5).float())
    dr = ArchParams(3, sampler="drnas", init_std=0.0)
    assert dr.regularizer() > 0 and ArchParams(3).regularizer() == 0
    dr.eval()
    assert torch.allclose(dr(), torch.full((3,), 1 / 3))


def test_combine_is_the_outer_product():
    a, b = torch.tensor([0.2, 0.8]), torch.tensor([0.1, 0.3, 0.6])
    c = ArchParams.combine(a, b)
    assert torch.allclose(c, a[:, None] * b[None, :]) and torch.isclose(c.sum(), torch.tensor(1.0))
    batched = ArchParams.combine(torch.rand(4, 2), torch.rand(4, 3), torch.rand(4, 5))
    assert batched.shape == (4, 2, 3, 5)


class _Quadratic(nn.Module):
    """L_train = 0.5 ||w - alpha||^2, L_val = 0.5 ||w - t||^2: the unrolled hypergradient is xi * (w' - t)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=D))
        self.alpha = nn.Parameter(torch.tensor([0.3, 0.1, -0.4], dtype=D))
        self.t = torch.tensor([2.0, 0.0, 1.0], dtype=D)

    @staticmethod
    def loss(model, batch):
        target = model.alpha if batch == "train" else model.t
        return 0.5 * ((model.w - target) ** 2).sum()


def test_second_order_hypergradient_matches_closed_form():
    m = _Quadratic()
    xi = 0.1
    w0, a0 = m.w.detach().clone(), m.alpha.detach().clone()
    w_prime = w0 - xi * (w0 - a0)
    expected = xi * (w_prime - m.t)
    s = BilevelSearcher(m, [m.alpha], torch.optim.SGD([m.w], lr=xi), torch.optim.SGD([m.alpha], lr=1.0), order=2,
                        loss_fn=_Quadratic.loss)
    s.step("train", "val")
    assert torch.allclose(a0 - m.alpha.detach(), expected, atol=1e-9)   # SGD lr 1: the step is the gradient
    # first order ignores the unrolling: L_val does not depend on alpha directly
    m1 = _Quadratic()
    s1 = BilevelSearcher(m1, [m1.alpha], torch.optim.SGD([m1.w], lr=xi), torch.optim.SGD([m1.alpha], lr=1.0),
                         loss_fn=_Quadratic.loss)
    out = s1.step("train", "val")
    assert torch.equal(m1.alpha.detach(), a0) and set(out) == {"train_loss", "val_loss"}
    assert torch.allclose(m1.w.detach(), w0 - xi * (w0 - a0))   # the weight step uses L_train


def test_bilevel_search_moves_alpha_and_keeps_weights_disjoint():
    torch.manual_seed(6)
    conv = EntangledConv2d(1, (2, 4), (1, 3))
    ap = ArchParams(2), ArchParams(2)
    arch = nn.ModuleList(ap)
    head = nn.Linear(4, 3)
    model_fn = lambda x: head(conv(x, ArchParams.combine(ap[0](), ap[1]())).mean((2, 3)))  # noqa: E731

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head, self.arch = conv, head, arch

        def forward(self, x):
            return model_fn(x)

    net = Net()
    weights = list(conv.parameters()) + list(head.parameters())
    s = BilevelSearcher(net, arch, torch.optim.SGD(weights, lr=0.1), torch.optim.Adam(arch.parameters(), lr=0.05))
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in arch.parameters()]
    for _ in range(3):
        out = s.step((x, y), (x, y))
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert any(not torch.equal(b, p) for b, p in zip(before, arch.parameters()))
    with pytest.raises(ValueError, match="overlap"):
        BilevelSearcher(net, arch, torch.optim.SGD(list(net.parameters()), lr=0.1),
                        torch.optim.Adam(arch.parameters()))
    with pytest.raises(ValueError, match="order must be one of"):
        BilevelSearcher(net, arch, torch.optim.SGD(weights, lr=0.1), torch.optim.Adam(arch.parameters()), order=3)
    with pytest.raises(ValueError, match="a_opt must optimise exactly"):
        BilevelSearcher(net, arch, torch.optim.SGD(weights, lr=0.1), torch.optim.Adam(list(arch.parameters())[:1]))


def test_bad_inputs_have_clear_errors():
    conv = EntangledConv2d(1, (2, 4), (1, 3))
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"out_choices index must be an int in \[0, 1\] \(2 candidates\), got 2"):
        conv.candidate(x, 2, 0)
    with pytest.raises(ValueError, match=r"kernel_choices index must be an int in \[0, 1\].*got 5"):
        conv.extract(0, 5)
    with pytest.raises(ValueError, match=r"arch_weights must have shape \(2, 2\).*got \(3, 2\)"):
        conv(x, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"vectors of lengths \(2, 2\).*got shapes \(3,\) and \(2,\)"):
        conv(x, (torch.ones(3), torch.ones(2)))
    with pytest.raises(ValueError, match="mode must be one of"):
        conv(x, torch.ones(2, 2), mode="sum")
    with pytest.raises(ValueError, match="kernel_choices must hold odd kernel sizes"):
        EntangledConv2d(1, 4, (2, 3))
    with pytest.raises(ValueError, match="out_choices must not repeat"):
        EntangledConv2d(1, (4, 4), 3)
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 0"):
        EntangledConv2d(0, 4, 3)
    with pytest.raises(ValueError, match=r"x must have 8 features.*got \(2, 5\)"):
        EntangledLinear((4, 8), 2)(torch.randn(2, 5), torch.ones(1, 2))
    with pytest.raises(ValueError, match="sampler must be one of"):
        ArchParams(3, sampler="enas")
    with pytest.raises(ValueError, match="tau must be finite and > 0, got 0"):
        ArchParams(3, tau=0)
    with pytest.raises(ValueError, match="shape must be a positive int"):
        ArchParams((2, 0))
    with pytest.raises(ValueError, match=r"weights\[1\] must share the leading dims"):
        ArchParams.combine(torch.ones(2, 3), torch.ones(4))
