"""Tests of PGI (paper slug: pgi): CBLinear/CBFuse math, the auxiliary-branch wrapper, deployment, claim, docs."""
from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradkit.nn.pgi import CBFuse, CBLinear, DeepSupervision, PGIWrapper, conv_stages, make_aux_copy, pool_head
from gradkit.testing import assert_same_grads, param_grads

REPO = Path(__file__).resolve().parent.parent
ROUTES = {1: [1], 3: [1, 3], 5: [1, 3, 5], 7: [1, 3, 5, 7]}


# ---------------------------------------------------------------------------------------- helpers
def small_main(seed: int = 0, depth: int = 8, width: int = 4, dtype=torch.float64):
    torch.manual_seed(seed)
    stages = conv_stages(1, width, depth, downsample_at=(2, 4, 6)[: max(0, (depth - 1) // 2)], dims=1)
    head = pool_head(width, 3, dims=1)
    return stages.to(dtype), head.to(dtype)


def small_pgi(seed: int = 0, routes=None, aux_weight: float = 0.25, dtype=torch.float64):
    stages, head = small_main(seed, dtype=dtype)
    plain = nn.Sequential(*copy.deepcopy(list(stages)), copy.deepcopy(head))
    torch.manual_seed(seed + 100)
    pgi = PGIWrapper(stages, make_aux_copy(stages), head, pool_head(4, 3, dims=1).to(dtype),
                     ROUTES if routes is None else routes, aux_weight=aux_weight).to(dtype)
    return pgi, plain


def data(n: int = 6, length: int = 40, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, length, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def nearest_index(n_in: int, n_out: int) -> list[int]:
    """PyTorch's 'nearest' source index for each output position: floor(i * n_in / n_out)."""
    return [min(int(math.floor(i * n_in / n_out)), n_in - 1) for i in range(n_out)]


def naive_resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    for d, n_out in enumerate(size):
        idx = torch.tensor(nearest_index(x.shape[2 + d], n_out))
        x = x.index_select(2 + d, idx)
    return x


def naive_aux_forward(pgi: PGIWrapper, x: torch.Tensor) -> torch.Tensor:
    """The paper's equations written out: pieces by explicit matmul, fused sum at each aux stage input."""
    feats, h = {}, x
    for j, s in enumerate(pgi.main_stages):
        h = s(h)
        feats[j] = h
    pieces: dict[tuple[int, int], torch.Tensor] = {}
    for j, ks in pgi.routes.items():
        conv = pgi.cb_linear[str(j)].conv
        w, b = conv.weight.reshape(conv.weight.shape[0], -1), conv.bias
        full = torch.einsum("oc,ncl->nol", w, feats[j]) + b[None, :, None]
        start = 0
        for k in ks:
            c = pgi.aux_stages[k][0].in_channels
            pieces[(j, k)] = full[:, start : start + c]
            start += c
    a = x
    for k, stage in enumerate(pgi.aux_stages):
        for (j, kk), p in sorted(pieces.items()):
            if kk == k:
                a = a + naive_resize(p, tuple(a.shape[2:]))
        a = stage(a)
    return pgi.aux_head(a)


# ---------------------------------------------------------------------------------------- CBLinear
@pytest.mark.parametrize("dims, shape", [(0, (5, 6)), (1, (5, 6, 7)), (2, (5, 6, 3, 4)), (3, (2, 6, 2, 3, 2))])
def test_cblinear_equals_split_matmul(dims, shape):
    torch.manual_seed(0)
    cb = CBLinear(6, [2, 3, 1], dims=dims).double()
    x = torch.randn(shape, dtype=torch.float64)
    outs = cb(x)
    assert [o.shape[1] for o in outs] == [2, 3, 1]
    w = cb.conv.weight.reshape(6, 6)
    full = torch.einsum("oc,nc...->no...", w, x) + cb.conv.bias.reshape(1, 6, *([1] * dims))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[1], full[:, 2:5], rtol=1e-12, atol=1e-12)  # pieces in declared order
    assert "out_channels=[2, 3, 1]" in repr(cb)


def test_cblinear_has_bias_and_kernel_one():
    cb = CBLinear(8, [4, 4], dims=2)
    assert isinstance(cb.conv, nn.Conv2d) and cb.conv.kernel_size == (1, 1) and cb.conv.bias is not None
    assert isinstance(CBLinear(8, [4], dims=0).conv, nn.Linear)


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_channels=0, out_channels=[2]), "in_channels must be an int >= 1"),
    (dict(in_channels=2.5, out_channels=[2]), "in_channels must be an int >= 1"),
    (dict(in_channels=4, out_channels=[]), "out_channels must be a non-empty list"),
    (dict(in_channels=4, out_channels=3), "out_channels must be a non-empty list"),
    (dict(in_channels=4, out_channels=[2, 0]), r"out_channels\[1\] must be an int >= 1, got 0"),
    (dict(in_channels=4, out_channels=[2], dims=4), "dims must be 0"),
    (dict(in_channels=4, out_channels=[2], dims=True), "dims must be 0"),
])
def test_cblinear_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBLinear(**kwargs)


def test_cblinear_bad_input():
    cb = CBLinear(4, [2], dims=1)
    with pytest.raises(ValueError, match=r"layout \(N, C, L\) with C = 4, got shape \(2, 3, 5\)"):
        cb(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="got shape"):
        cb(torch.randn(2, 4, 5, 5))


# ---------------------------------------------------------------------------------------- CBFuse
def test_cbfuse_resizes_to_target_and_sums():
    torch.manual_seed(0)
    a = (torch.randn(2, 3, 5), torch.randn(2, 4, 5))          # e.g. a deeper (shorter) level
    b = (torch.randn(2, 3, 20),)                               # a longer level: downsampled to the target
    target = torch.randn(2, 4, 10)
    out = CBFuse([1])([a, target])
    torch.testing.assert_close(out, target + naive_resize(a[1], (10,)), rtol=0, atol=0)
    assert out.shape == target.shape
    t3 = torch.randn(2, 3, 10)
    out = CBFuse([0, 0])([a, b, t3])
    ref = torch.stack([naive_resize(a[0], (10,)), naive_resize(b[0], (10,)), t3]).sum(0)  # the official form
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_cbfuse_2d_nonmultiple_sizes_and_vectors():
    torch.manual_seed(0)
    p, t = torch.randn(1, 2, 3, 5), torch.randn(1, 2, 7, 4)
    torch.testing.assert_close(CBFuse([0])([(p,), t]), t + naive_resize(p, (7, 4)), rtol=0, atol=0)
    v, tv = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(CBFuse([0])([(v,), tv]), v + tv, rtol=0, atol=0)
    torch.testing.assert_close(CBFuse([0])([v, tv]), v + tv, rtol=0, atol=0)  # a bare tensor = one piece


def test_cblinear_cbfuse_gradcheck_float64():
    torch.manual_seed(0)
    cb = CBLinear(3, [2, 4], dims=1).double()
    fuse = CBFuse([1])
    m = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, t: fuse([cb(m), t]), (m, t))
    assert torch.autograd.gradgradcheck(lambda m, t: fuse([cb(m), t]), (m, t))


@pytest.mark.parametrize("call, match", [
    (lambda: CBFuse([]), "indices must be a non-empty list"),
    (lambda: CBFuse([-1]), r"indices\[0\] must be an int >= 0, got -1"),
    (lambda: CBFuse([0])([torch.randn(1, 2, 3)]), "expects a list of 1 CBLinear outputs followed by the target"),
    (lambda: CBFuse([0])(torch.randn(1, 2, 3)), "expects a list of 1"),
    (lambda: CBFuse([2])([(torch.randn(1, 2, 3),), torch.randn(1, 2, 3)]), "has only 1 piece"),
    (lambda: CBFuse([0])([(torch.randn(1, 3, 3),), torch.randn(1, 2, 3)]), r"expected the target's batch and channels"),
    (lambda: CBFuse([0])([(torch.randn(1, 2, 3),), torch.randn(2)]), "target .* must be a tensor"),
])
def test_cbfuse_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------- PGIWrapper: forward
def test_training_forward_matches_naive_reference():
    pgi, _ = small_pgi()
    x, _ = data()
    main_out, aux_out = pgi(x)
    assert main_out.shape == aux_out.shape == (6, 3)
    pgi_ref = copy.deepcopy(pgi)
    ref = naive_aux_forward(pgi_ref, x)
    torch.testing.assert_close(aux_out, ref, rtol=1e-10, atol=1e-10)


def test_main_forward_is_unchanged_by_the_aux_branch():
    pgi, plain = small_pgi()
    x, _ = data()
    pgi.train(), plain.train()
    main_out, _ = pgi(x)
    assert torch.equal(main_out, plain(x))  # read-only coupling: only gradients differ
    # main BatchNorm running stats are updated exactly as in the plain network (aux BN has its own)
    for (n, b1), (_, b2) in zip(pgi.main_stages.named_buffers(), plain[:-1].named_buffers()):
        assert torch.equal(b1, b2), n
    aux_bn = pgi.aux_stages[0][1]
    assert not torch.equal(aux_bn.running_mean, pgi.main_stages[0][1].running_mean)


def test_eval_forward_skips_the_aux_branch_and_ignores_its_parameters():
    pgi, plain = small_pgi()
    x, _ = data()
    pgi.train()
    pgi(x)
    plain(x)  # same BN statistics in both
    calls = []
    aux_mods = list(pgi.aux_stages) + [pgi.aux_head] + list(pgi.cb_linear.values()) + list(pgi.cb_fuse.values())
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in aux_mods]
    pgi.eval(), plain.eval()
    out = pgi(x)
    assert isinstance(out, torch.Tensor) and not calls
    assert torch.equal(out, plain(x))
    with torch.no_grad():
        for p in pgi.aux_parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(pgi(x), out)
    for h in handles:
        h.remove()


def test_loss_is_main_plus_weighted_aux_and_aux_target():
    pgi, _ = small_pgi(aux_weight=0.25)
    x, y = data()
    main_out, aux_out = outs = pgi(x)
    y2 = (y + 1) % 3
    torch.testing.assert_close(pgi.loss(outs, y), F.cross_entropy(main_out, y) + 0.25 * F.cross_entropy(aux_out, y))
    torch.testing.assert_close(pgi.loss(outs, y, aux_target=y2),
                               F.cross_entropy(main_out, y) + 0.25 * F.cross_entropy(aux_out, y2))
    torch.testing.assert_close(pgi.loss(main_out, y), F.cross_entropy(main_out, y))
    mse = lambda o, t: (o - F.one_hot(t, 3).to(o)).square().mean()  # noqa: E731
    torch.testing.assert_close(pgi.loss(outs, y, criterion=mse), mse(main_out, y) + 0.25 * mse(aux_out, y))
    with pytest.raises(ValueError, match="outputs must be forward"):
        pgi.loss((main_out,), y)


# ---------------------------------------------------------------------------------------- PGIWrapper: gradients
def test_aux_weight_zero_gives_the_plain_networks_gradients():
    pgi, plain = small_pgi(aux_weight=0.0)
    x, y = data()
    g_pgi = param_grads(pgi, lambda m: m.loss(m(x), y))
    g_plain = param_grads(plain, lambda m: F.cross_entropy(m(x), y))
    n_stages = len(pgi.main_stages)
    main_only = {}
    for name, g in g_pgi.items():
        if name.startswith("main_stages."):
            main_only[name.removeprefix("main_stages.")] = g
        elif name.startswith("main_head."):
            main_only[f"{n_stages}." + name.removeprefix("main_head.")] = g
        else:
            assert torch.count_nonzero(g) == 0, name  # aux parameters get nothing at weight 0
    assert_same_grads(main_only, g_plain, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("routes, deepest", [(ROUTES, 7), ({1: [1], 3: [1, 3]}, 3), ({0: [0]}, 0)])
def test_aux_loss_reaches_main_stages_up_to_the_deepest_route_only(routes, deepest):
    pgi, _ = small_pgi(routes=routes)
    x, y = data()
    g = param_grads(pgi, lambda m: F.cross_entropy(m(x)[1], y))  # aux loss only
    for j, stage in enumerate(pgi.main_stages):
        norm = sum(float(g[f"main_stages.{n}"].abs().sum()) for n, _ in
                   [(f"{j}.{pn}", p) for pn, p in stage.named_parameters()])
        assert (norm > 0) == (j <= deepest), (j, norm)
    assert all(torch.count_nonzero(g[n]) == 0 for n in g if n.startswith("main_head."))
    assert all(torch.count_nonzero(g[n]) > 0 for n in g if n.startswith("cb_linear."))


def test_gradcheck_wrapper_loss_float64():
    pgi, _ = small_pgi(routes={1: [0, 1], 3: [3]})
    for m in pgi.modules():  # BN batch statistics are fine for gradcheck; keep them but in float64
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0
    x, y = data(n=4, length=16)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pgi.loss(pgi(x), y), (x,))


def test_declared_piece_order_is_respected():
    """routes {3: [3, 1]} splits CBLinear_3 as [piece for aux 3, piece for aux 1]."""
    pgi_a, _ = small_pgi(routes={3: [1, 3]})
    pgi_b, _ = small_pgi(routes={3: [3, 1]})
    assert pgi_a.cb_fuse["1"].indices == (0,) and pgi_b.cb_fuse["1"].indices == (1,)
    with torch.no_grad():  # give B the same link weights, pieces swapped (channels are equal: 4 and 4)
        wa, ba = pgi_a.cb_linear["3"].conv.weight, pgi_a.cb_linear["3"].conv.bias
        pgi_b.cb_linear["3"].conv.weight.copy_(torch.cat([wa[4:], wa[:4]]))
        pgi_b.cb_linear["3"].conv.bias.copy_(torch.cat([ba[4:], ba[:4]]))
        pgi_b.aux_stages.load_state_dict(pgi_a.aux_stages.state_dict())
        pgi_b.aux_head.load_state_dict(pgi_a.aux_head.state_dict())
    x, _ = data()
    torch.testing.assert_close(pgi_a(x)[1], pgi_b(x)[1], rtol=0, atol=0)
    torch.testing.assert_close(pgi_b(x)[1], naive_aux_forward(pgi_b, x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------- deploy
def _flops(model, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def test_deploy_is_exactly_the_main_network():
    pgi, plain = small_pgi()
    x, y = data()
    opt = torch.optim.Adam(pgi.parameters(), lr=1e-2)
    for _ in range(3):  # train a little so every parameter and BN buffer moved
        opt.zero_grad()
        pgi.loss(pgi(x), y).backward()
        opt.step()
    model = pgi.deploy()
    assert isinstance(model, nn.Sequential) and not model.training
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in pgi.main_parameters())
    assert set(model.state_dict()) == set(plain.state_dict())
    assert not any(isinstance(m, (CBLinear, CBFuse)) for m in model.modules())
    pgi.eval()
    assert torch.equal(model(x), pgi(x))
    plain.eval()
    assert _flops(model, x) == _flops(plain, x) == _flops(pgi, x) > 0
    # deploy() copies: training the wrapper further leaves the deployed model unchanged
    before = model(x)
    pgi.train()
    opt.zero_grad()
    pgi.loss(pgi(x), y).backward()
    opt.step()
    assert torch.equal(model(x), before)
    shared = pgi.deploy(copy=False)
    assert shared[0] is pgi.main_stages[0] and shared[-1] is pgi.main_head


def test_parameter_groups_partition_the_wrapper():
    pgi, _ = small_pgi()
    ids = [id(p) for p in pgi.parameters()]
    main, aux = [id(p) for p in pgi.main_parameters()], [id(p) for p in pgi.aux_parameters()]
    assert sorted(main + aux) == sorted(ids) and not set(main) & set(aux)


# ---------------------------------------------------------------------------------------- layouts, dtypes
def test_two_d_and_vector_main_networks():
    torch.manual_seed(0)
    stages = conv_stages(3, 8, 4, downsample_at=(1, 3), dims=2)
    pgi = PGIWrapper(stages, make_aux_copy(stages), pool_head(8, 5, dims=2), pool_head(8, 5, dims=2),
                     {1: [0, 1], 3: [1, 3]})
    x = torch.randn(2, 3, 9, 9)
    main_out, aux_out = pgi(x)
    assert main_out.shape == aux_out.shape == (2, 5)
    assert pgi.cb_linear["1"].out_channels == (3, 8) and pgi.cb_linear["1"].dims == 2
    mlp = nn.ModuleList([nn.Sequential(nn.Linear(6, 10), nn.ReLU()), nn.Sequential(nn.Linear(10, 10), nn.ReLU())])
    pv = PGIWrapper(mlp, make_aux_copy(mlp), nn.Linear(10, 2), nn.Linear(10, 2), {1: [0, 1]})
    assert pv.cb_linear["1"].dims == 0 and pv.cb_linear["1"].out_channels == (6, 10)
    mo, ao = pv(torch.randn(4, 6))
    assert mo.shape == ao.shape == (4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_and_no_grad(dtype):
    pgi, _ = small_pgi(dtype=dtype)
    x, y = data(dtype=dtype)
    with torch.no_grad():
        main_out, aux_out = pgi(x)
    assert main_out.dtype == aux_out.dtype == dtype and torch.isfinite(aux_out.float()).all()
    loss = pgi.loss(pgi(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in pgi.aux_parameters())


def test_explicit_channels_and_inference_errors():
    class Block(nn.Module):  # no attribute naming its channels
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.w

    stages = nn.ModuleList([Block(), Block()])
    with pytest.raises(ValueError, match="cannot infer the output channels of main stage 1.*main_channels"):
        PGIWrapper(stages, make_aux_copy(stages), nn.Flatten(), nn.Flatten(), {1: [0]})
    with pytest.raises(ValueError, match="cannot infer the input channels of aux stage 0.*aux_channels"):
        PGIWrapper(stages, make_aux_copy(stages), nn.Flatten(), nn.Flatten(), {1: [0]}, main_channels=[2, 2])
    with pytest.raises(ValueError, match="cannot infer the feature layout of main stage 1.*dims"):
        PGIWrapper(stages, make_aux_copy(stages), nn.Flatten(), nn.Flatten(), {1: [0]}, main_channels=[2, 2],
                   aux_channels=[2, 2])
    pgi = PGIWrapper(stages, make_aux_copy(stages), nn.Flatten(), nn.Flatten(), {1: [0]}, main_channels=[2, 2],
                     aux_channels=[2, 2], dims=1)
    main_out, aux_out = pgi(torch.randn(3, 2, 5))
    assert main_out.shape == aux_out.shape == (3, 10)
    with pytest.raises(ValueError, match=r"main_channels must be a list of 2 ints"):
        PGIWrapper(stages, make_aux_copy(stages), nn.Flatten(), nn.Flatten(), {1: [0]}, main_channels=[2])
    with pytest.raises(ValueError, match=r"aux_channels\[1\] must be an int >= 1"):
        PGIWrapper(stages, make_aux_copy(stages), nn.Flatten(), nn.Flatten(), {1: [0]}, aux_channels=[2, 0])


@pytest.mark.parametrize("routes, match", [
    ({}, "routes must be a non-empty dict"),
    ([(1, [1])], "routes must be a non-empty dict"),
    ({8: [1]}, r"routes key 8 must be a main stage index in \[0, 8\)"),
    ({-1: [0]}, "routes key -1"),
    ({1: []}, r"routes\[1\] must be a non-empty list"),
    ({1: 1}, r"routes\[1\] must be a non-empty list"),
    ({1: [9]}, r"aux stage indices must be in \[0, 8\)"),
    ({1: [3]}, "same or lower depth"),
    ({3: [1, 1]}, "lists an aux stage twice"),
])
def test_route_errors(routes, match):
    stages, head = small_main()
    with pytest.raises(ValueError, match=match):
        PGIWrapper(stages, make_aux_copy(stages), head, copy.deepcopy(head), routes)


def test_wrapper_argument_errors():
    stages, head = small_main()
    aux = make_aux_copy(stages)
    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match="aux_weight must be finite and >= 0"):
            PGIWrapper(stages, aux, head, head, ROUTES, aux_weight=bad)
    with pytest.raises(TypeError, match="aux_weight must be a real number"):
        PGIWrapper(stages, aux, head, head, ROUTES, aux_weight="0.25")
    pgi = PGIWrapper(stages, aux, head, copy.deepcopy(head), ROUTES)
    with pytest.raises(ValueError, match="aux_weight must be finite"):
        pgi.aux_weight = float("nan")
    with pytest.raises(TypeError, match="main_stages must be an nn.ModuleList"):
        PGIWrapper(nn.Linear(2, 2), aux, head, head, ROUTES)
    with pytest.raises(ValueError, match="aux_stages must hold at least one stage"):
        PGIWrapper(stages, nn.ModuleList(), head, head, ROUTES)
    with pytest.raises(TypeError, match="aux_head must be an nn.Module"):
        PGIWrapper(stages, aux, head, lambda x: x, ROUTES)
    with pytest.raises(ValueError, match="dims must be 0"):
        PGIWrapper(stages, aux, head, head, ROUTES, dims=5)
    assert "aux_weight=0.25" in repr(pgi) and "routes=" in repr(pgi)


# ---------------------------------------------------------------------------------------- make_aux_copy
def test_make_aux_copy_same_structure_fresh_weights():
    stages, _ = small_main(dtype=torch.float32)
    x, _ = data(dtype=torch.float32)
    for s in stages:  # move main BN statistics away from their init
        x = s(x)
    aux = make_aux_copy(stages)
    assert isinstance(aux, nn.ModuleList) and len(aux) == len(stages)
    for (n1, p1), (n2, p2) in zip(stages.named_parameters(), aux.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape and p1.data_ptr() != p2.data_ptr()
        if n1.endswith("0.weight"):
            assert not torch.equal(p1, p2), n1
    assert torch.equal(aux[0][1].running_mean, torch.zeros(4))  # buffers reset too
    assert not torch.equal(stages[0][1].running_mean, torch.zeros(4))
    as_list = make_aux_copy(list(stages))
    assert isinstance(as_list, nn.ModuleList) and len(as_list) == 8
    with pytest.raises(TypeError, match="stages must be an nn.Module or a non-empty list"):
        make_aux_copy([])
    with pytest.raises(TypeError, match="stages must be an nn.Module"):
        make_aux_copy("stages")


# ---------------------------------------------------------------------------------------- builders
def test_conv_stages_and_pool_head():
    stages = conv_stages(1, 16, 8, downsample_at=(2, 4, 6), dims=1)
    x = torch.randn(2, 1, 40)
    lengths = []
    for s in stages:
        x = s(x)
        lengths.append(x.shape[-1])
    assert lengths == [40, 40, 20, 20, 10, 10, 5, 5]
    assert pool_head(16, 10)(x).shape == (2, 10)
    assert pool_head(16, 10, dims=0)(torch.randn(2, 16)).shape == (2, 10)
    assert conv_stages(3, 4, 2, dims=2)[0][0].in_channels == 3


@pytest.mark.parametrize("call, match", [
    (lambda: conv_stages(0, 4, 2), "in_channels must be an int >= 1"),
    (lambda: conv_stages(1, 4, 0), "depth must be an int >= 1"),
    (lambda: conv_stages(1, 4, 2, downsample_at=(2,)), r"downsample_at must hold stage indices in \[0, 2\)"),
    (lambda: conv_stages(1, 4, 2, dims=0), "dims must be 1, 2 or 3"),
    (lambda: pool_head(4, 0), "num_classes must be an int >= 1"),
    (lambda: pool_head(4, 2, dims=7), "dims must be 0"),
])
def test_builder_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------- deep supervision
def test_deep_supervision_loss_eval_and_deploy():
    stages, head = small_main()
    plain = nn.Sequential(*copy.deepcopy(list(stages)), copy.deepcopy(head))
    ds = DeepSupervision(stages, head, {3: pool_head(4, 3).double(), 1: pool_head(4, 3).double()}, weight=0.25)
    assert ds.heads_at == (1, 3)
    x, y = data()
    main_out, aux = outs = ds(x)
    assert len(aux) == 2 and torch.equal(main_out, plain(x))
    h = x
    feats = []
    for s in ds.stages:
        h = s(h)
        feats.append(h)
    ref = F.cross_entropy(main_out, y) + 0.25 * (F.cross_entropy(ds.aux_heads["1"](feats[1]), y)
                                                 + F.cross_entropy(ds.aux_heads["3"](feats[3]), y))
    torch.testing.assert_close(ds.loss(outs, y), ref)
    g = param_grads(ds, lambda m: sum(F.cross_entropy(a, y) for a in m(x)[1]))
    for name, gv in g.items():  # aux-head losses reach stages up to the deepest head (3), never the main head
        if name.startswith("stages."):
            assert (torch.count_nonzero(gv) > 0) == (int(name.split(".")[1]) <= 3), name
        elif name.startswith("head."):
            assert torch.count_nonzero(gv) == 0, name
    ds.eval(), plain.eval()
    model = ds.deploy()
    assert torch.equal(model(x), ds(x))  # (BN statistics moved with the extra train-mode forwards above)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert sorted(map(id, ds.parameters())) == sorted(map(id, [*ds.main_parameters(), *ds.aux_parameters()]))
    assert "heads_at=[1, 3]" in repr(ds)


def test_deep_supervision_errors():
    stages, head = small_main()
    with pytest.raises(ValueError, match="aux_heads must be a non-empty dict"):
        DeepSupervision(stages, head, {})
    with pytest.raises(ValueError, match=r"aux_heads key 8 must be a stage index in \[0, 8\)"):
        DeepSupervision(stages, head, {8: pool_head(4, 3)})
    with pytest.raises(TypeError, match=r"aux_heads\[1\] must be an nn.Module"):
        DeepSupervision(stages, head, {1: "head"})
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        DeepSupervision(stages, head, {1: pool_head(4, 3)}, weight=-1.0)
    ds = DeepSupervision(stages, head, {1: pool_head(4, 3)})
    with pytest.raises(ValueError, match="outputs must be forward"):
        ds.loss([1, 2, 3], torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------- claim
def test_claim_registered():
    from gradkit.harness.claims import get_claim
    from gradkit.harness.claims.pgi import ARMS

    claim = get_claim("pgi")
    assert claim.arxiv == "2402.13616" and claim.primary.ours == "pgi" and claim.primary.baseline == "plain"
    assert ARMS == ("plain", "deep_sup", "pgi") and claim.plots == ("test_acc", "grad_early")
    for dotted in claim.uses:
        mod, name = dotted.rsplit(".", 1)
        assert hasattr(importlib.import_module(mod), name), dotted


def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.pgi import ARMS, CLAIM

    out = smoke_run("pgi")
    assert out.data == "mnist1d" and set(out.metrics) == set(ARMS)
    assert out.info["n_train"] == 4000 and out.info["n_test"] == 1000
    epochs = CLAIM.protocol.at("smoke").epochs
    for arm, m in out.metrics.items():
        assert m["train_loss"] > 0 and m["grad_early"] > 0
        assert m["infer_params"] == out.metrics["plain"]["infer_params"]  # same deployed network in every arm
        assert m["infer_kflops"] == out.metrics["plain"]["infer_kflops"] > 0
        assert len(out.curves["test_acc"][arm]) == epochs
    pgi = out.metrics["pgi"]
    # deploy() output equals wrapper.eval()(x) exactly; same params and FLOPs as the plain net
    assert pgi["deploy_out_diff"] == 0.0 and pgi["deploy_param_diff"] == 0.0 and pgi["deploy_flop_diff"] == 0.0
    assert pgi["train_params"] > pgi["infer_params"] and pgi["total_loss"] > pgi["train_loss"]
    assert out.metrics["plain"]["total_loss"] == pytest.approx(out.metrics["plain"]["train_loss"], rel=1e-5)
    ok, checks = CLAIM.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 5 and all(c.passed for c in checks[2:])


def test_claim_smoke_is_bit_reproducible(smoke_run):
    from gradkit.harness.claims.base import RunContext
    from gradkit.harness.claims.pgi import CLAIM

    again = CLAIM.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == smoke_run("pgi").metrics


def test_claim_arms_share_the_main_init():
    from gradkit.harness.claims.pgi import ARMS, CLAIM, build_arm

    p = CLAIM.protocol.at("quick")
    states = []
    for arm in ARMS:
        torch.manual_seed(3)
        model = build_arm(arm, p)
        main = model if arm == "plain" else model.deploy()
        states.append(main.state_dict())
    for s in states[1:]:
        assert all(torch.equal(s[k], states[0][k]) for k in states[0])
    with pytest.raises(ValueError, match="arm must be one of"):
        build_arm("nope", p)


# ---------------------------------------------------------------------------------------- benchmark, docs
def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.pgi  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("pgi-train-step")
    assert b.slug == "pgi" and b.target is None
    r = b.run(1)
    assert math.isfinite(r.ratio) and r.ratio > 0 and r.extra["train_params"] > r.extra["main_params"]


