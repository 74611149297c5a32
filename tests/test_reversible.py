"""Tests of the reversible-computation core (paper slugs: revcol, rev-mbconv)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradkit.functional.reversible import (
    MultiLevelReversibleFunction, ReversibleStep, bn_state_guard, invert_steps, run_steps,
)
from gradkit.nn.reversible import ReversibleBlock, ReversibleSequential
from gradkit.testing import SavedBytesMeter, assert_same_grads, param_grads


def mlp(d: int, *, dropout: float = 0.0, bn: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d, d)]
    if dropout:
        layers.append(nn.Dropout(dropout))
    if bn:
        layers.append(nn.BatchNorm1d(d))
    layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_seq(n: int, d: int = 4, *, dropout: float = 0.0, bn: bool = False, reversible: bool = True,
             dtype=torch.float64) -> ReversibleSequential:
    blocks = [ReversibleBlock(mlp(d, dropout=dropout, bn=bn), mlp(d, dropout=dropout), split_dim=-1)
              for _ in range(n)]
    return ReversibleSequential(*blocks, reversible=reversible).to(dtype)


def twin_of(seq: ReversibleSequential) -> ReversibleSequential:
    t = copy.deepcopy(seq)
    t.reversible = False
    return t


def naive_coupling(seq: ReversibleSequential, x: torch.Tensor) -> torch.Tensor:
    """The textbook RevNet forward written out by hand."""
    x1, x2 = x.chunk(2, dim=-1)
    for b in seq.blocks:
        y1 = x1 + b.f(x2)
        y2 = x2 + b.g(y1)
        x1, x2 = y1, y2
    return torch.cat([x1, x2], dim=-1)


# ----------------------------------------------------------------------------------------- math
def test_gradcheck_sequence_float64():
    torch.manual_seed(0)
    seq = make_seq(3)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seq, (x,))


def test_gradcheck_function_with_alphas_and_external_input():
    torch.manual_seed(0)

    class Lvl(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, lower, upper):
            h = self.a(lower)
            return torch.tanh(h if upper is None else h + self.b(upper))

    cols = [[Lvl().double() for _ in range(3)] for _ in range(3)]
    alphas = [[torch.full((1, 3), 0.7, dtype=torch.float64, requires_grad=True) for _ in range(3)]
              for _ in range(2)]
    steps = [ReversibleStep(cols[0], None)] + [ReversibleStep(c, a) for c, a in zip(cols[1:], alphas)]
    params = [p for c in cols for f in c for p in f.parameters()] + [a for al in alphas for a in al]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return MultiLevelReversibleFunction.run(steps, x, [None] * 3, params)

    assert torch.autograd.gradcheck(f, (x, *alphas[0], *alphas[1]))
    # and equal to plain autograd through the same steps, parameters included
    out = MultiLevelReversibleFunction.run(steps, x, [None] * 3, params)
    ref = run_steps(steps, x, [None] * 3)
    w = [torch.randn_like(o) for o in out]
    g1 = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(out, w)), [x, *params], allow_unused=True)
    g2 = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(ref, w)), [x, *params], allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)  # the first column's Up-like layer is unused in both
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_matches_naive_reference_forward():
    torch.manual_seed(0)
    seq = make_seq(4)
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.allclose(seq(x), naive_coupling(seq, x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dropout,bn", [(0.0, False), (0.3, False), (0.0, True), (0.3, True)])
def test_grads_equal_plain_twin_float64(dropout, bn):
    torch.manual_seed(0)
    seq = make_seq(5, dropout=dropout, bn=bn)
    twin = twin_of(seq)
    x = torch.randn(6, 8, dtype=torch.float64)

    def loss_for(inp):
        def f(m):
            torch.manual_seed(123)
            return (m(inp) ** 2).sum()
        return f

    ga, gb = param_grads(seq, loss_for(x)), param_grads(twin, loss_for(x))
    assert_same_grads(ga, gb, rtol=1e-10, atol=1e-12)
    # the input gradient too
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    loss_for(xa)(seq).backward()
    loss_for(xb)(twin).backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    # BatchNorm running statistics updated exactly as often as in the twin
    for (n, a), (_, b) in zip(seq.named_buffers(), twin.named_buffers()):
        assert torch.allclose(a, b, rtol=0, atol=1e-15), n


@pytest.mark.parametrize("dropout", [0.5, 0.0])  # levels that draw (states replayed) and levels that do not
def test_rng_state_after_backward_matches_plain(dropout):
    torch.manual_seed(0)
    seq = make_seq(3, dropout=dropout)
    twin = twin_of(seq)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    seq(x).sum().backward()
    after_rev = torch.rand(3)
    torch.manual_seed(7)
    twin(x).sum().backward()
    assert torch.equal(after_rev, torch.rand(3))


def test_inverse_reconstructs_input():
    torch.manual_seed(0)
    seq = make_seq(8).eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    assert (seq.inverse(seq(x)) - x).abs().max() < 1e-12
    seq32 = make_seq(16, dtype=torch.float32).eval()
    x32 = torch.randn(5, 8)
    assert (seq32.inverse(seq32(x32)) - x32).abs().max() < 1e-5
    blk = seq.blocks[0]
    assert (blk.inverse(blk(x)) - x).abs().max() < 1e-13


def test_saved_bytes_flat_in_depth():
    torch.manual_seed(0)
    rev, plain = [], []
    for n in (1, 4, 16):
        seq = make_seq(n, d=16, dtype=torch.float32)
        x = torch.randn(32, 32, requires_grad=True)
        with SavedBytesMeter() as m:
            seq(x)
        rev.append(m.bytes)
        with SavedBytesMeter() as m:
            twin_of(seq)(x)
        plain.append(m.bytes)
    assert rev[0] == rev[1] == rev[2] > 0
    assert plain[2] > 10 * plain[0]


def test_convolutional_coupling_channel_split():
    torch.manual_seed(0)
    blk = ReversibleBlock(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk, (x,))


def test_no_grad_and_frozen_params_paths():
    torch.manual_seed(0)
    seq = make_seq(2)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        y = seq(x)
    assert not y.requires_grad
    for p in seq.parameters():
        p.requires_grad_(False)
    xr = x.clone().requires_grad_()
    seq(xr).sum().backward()
    xt = x.clone().requires_grad_()
    twin_of(seq)(xt).sum().backward()
    assert torch.allclose(xr.grad, xt.grad, atol=1e-12)


def test_bn_state_guard_restores_stats():
    bn = nn.BatchNorm1d(3)
    before = bn.running_mean.clone()
    with bn_state_guard([bn]):
        bn(torch.randn(8, 3))
        assert not torch.equal(bn.running_mean, before)
    assert torch.equal(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 0


def test_invert_steps_first_step_gives_none():
    lv = ReversibleBlock(nn.Identity(), nn.Identity(), -1)
    st = lv.step()
    first = ReversibleStep(st.fns, None)
    out = invert_steps([first], None, [torch.zeros(1, 2), torch.zeros(1, 2)])
    assert out == [None, None]


# ------------------------------------------------------------------------------------ bad input
def test_odd_split_raises():
    seq = make_seq(1, dtype=torch.float32)
    with pytest.raises(ValueError, match="odd size 7"):
        seq(torch.randn(2, 7))


def test_mismatched_channel_split_raises():
    blk = ReversibleBlock(nn.Linear(4, 3), nn.Linear(4, 4), split_dim=-1)
    with pytest.raises(ValueError, match="mismatched channel split"):
        blk(torch.randn(2, 8, requires_grad=True))


def test_inplace_level_function_raises():
    blk = ReversibleBlock(nn.ReLU(inplace=True), nn.Linear(4, 4), split_dim=-1)
    with pytest.raises(RuntimeError, match="in place"):
        blk(torch.randn(2, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="in place"):
        ReversibleBlock(nn.ReLU(inplace=True), nn.Linear(4, 4), -1, reversible=False)(torch.randn(2, 8))


def test_constructor_errors():
    with pytest.raises(TypeError, match="f must be an nn.Module"):
        ReversibleBlock(lambda t: t, nn.Identity())
    with pytest.raises(TypeError, match="split_dim must be an int"):
        ReversibleBlock(nn.Identity(), nn.Identity(), split_dim=1.5)
    with pytest.raises(ValueError, match="at least one"):
        ReversibleSequential()
    with pytest.raises(TypeError, match=r"blocks\[0\] must be a ReversibleBlock"):
        ReversibleSequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="share one split_dim"):
        ReversibleSequential(ReversibleBlock(nn.Identity(), nn.Identity(), 1),
                             ReversibleBlock(nn.Identity(), nn.Identity(), -1))
    with pytest.raises(ValueError, match="split_dim=3 is out of range"):
        ReversibleBlock(nn.Identity(), nn.Identity(), 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least one ReversibleStep"):
        MultiLevelReversibleFunction.run([], None, [])
    st = ReversibleBlock(nn.Identity(), nn.Identity(), -1).step()
    with pytest.raises(ValueError, match="only steps\\[0\\] may be a first step"):
        MultiLevelReversibleFunction.run([st, ReversibleStep(st.fns, None)], None, [torch.zeros(1, 2)] * 2)


def test_recompute_updates_running_statistics_once_for_any_module():
    """EvoNorm-B0 (not a BatchNorm) inside a reversible block: running_var moves once per forward, as in
    plain autograd, although backward runs F and G a second time."""
    from gradkit.nn import EvoNormB0

    class Img(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = EvoNormB0(1)

        def forward(self, x):
            return self.norm(x.reshape(x.shape[0], 1, 2, 2)).reshape(x.shape)

    torch.manual_seed(0)
    seq = ReversibleSequential(ReversibleBlock(Img(), Img(), split_dim=-1))
    twin = copy.deepcopy(seq)
    twin.reversible = False
    x = torch.randn(6, 8, dtype=torch.float64)
    seq.double()(x).sum().backward()
    twin.double()(x).sum().backward()
    for a, b in zip(seq.buffers(), twin.buffers()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    assert not torch.allclose(seq.blocks[0].f.norm.running_var, torch.ones(1, dtype=torch.float64))


def test_rng_state_is_kept_only_for_levels_that_draw_random_numbers():
    torch.manual_seed(0)
    plain = ReversibleSequential(*[ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4), split_dim=-1) for _ in range(3)])
    def ctx_of(y):  # the reversible Function's node under the final concatenation
        return y.grad_fn.next_functions[0][0]

    y = plain(torch.randn(5, 8, requires_grad=True))
    assert ctx_of(y).rng_log == [None] * 6  # nothing to replay: no RNG state retained
    drop = ReversibleSequential(
        ReversibleBlock(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), nn.Linear(4, 4), split_dim=-1),
        ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4), split_dim=-1))
    y = drop(torch.randn(5, 8, requires_grad=True))
    kept = [e is not None for e in ctx_of(y).rng_log]
    assert kept == [True, False, False, False]
    mid = ReversibleSequential(*[ReversibleBlock(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
                                                 if i == 1 else nn.Linear(4, 4), split_dim=-1) for i in range(3)])
    y = mid(torch.randn(5, 8, requires_grad=True))
    assert [e is not None for e in ctx_of(y).rng_log] == [False, False, False, True, False, False]




def test_retained_bytes_flat_in_depth():
    """What a forward leaves allocated (profiler records: output, saved input, any ctx state such as RNG
    states) does not grow with the number of blocks; the plain twin's does."""
    from gradkit.testing import RetainedBytesMeter

    def retained(seq):
        x = torch.randn(16, 64, requires_grad=True)
        with RetainedBytesMeter() as m:
            y = seq(x)
        del y
        return m.bytes

    def stack(n, reversible=True):
        torch.manual_seed(0)
        return ReversibleSequential(*[ReversibleBlock(nn.Linear(32, 32), nn.Linear(32, 32), split_dim=-1)
                                      for _ in range(n)], reversible=reversible)

    retained(stack(2))  # warm-up: one-off caches (the drift probe's coordinates) are not per-call memory
    r2, r8 = retained(stack(2)), retained(stack(8))
    assert abs(r8 - r2) <= 1024  # flat (allocator rounding aside)
    p2, p8 = retained(stack(2, False)), retained(stack(8, False))
    assert p8 - p2 > 6 * 16 * 32 * 4  # the twin keeps every block's activations


def test_parameter_and_buffer_collection_matches_module_traversal():
    """The single-traversal collection equals nn.Module.parameters()/buffers() (order, shared and None entries)."""
    from gradkit.functional.reversible import ReversibleStep, _buffers_of, _params_and_buffers, collect_params

    shared = nn.Linear(3, 3)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), shared, shared)
    b = nn.Sequential(shared, nn.BatchNorm1d(3))
    b[1].register_buffer("empty", None)
    lp, bufs = _params_and_buffers([a, b])
    assert [[id(p) for p in ps] for ps in lp] == [[id(p) for p in m.parameters()] for m in (a, b)]
    assert [id(t) for t in bufs] == [id(t) for t in _buffers_of([a, b])]

    class Level(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, lower, upper):
            return self.m(lower)

    alpha = torch.tensor(0.5, requires_grad=True)
    st = ReversibleStep([Level(a), Level(b)], [1.0, alpha])
    ref, seen = [], set()
    for f in st.fns:
        for p in f.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                ref.append(p)
    assert [id(p) for p in collect_params([st])] == [id(p) for p in ref + [alpha]]
