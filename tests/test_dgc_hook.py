"""In-process tests of the DGC DDP hook and of the compressor's state and errors (paper slug: dgc).

A one-process gloo group runs the real hook under DDP (the packed all_gather of one rank); the two-process
checks against the simulator are in test_dgc_distributed.py.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradkit.distributed.dgc import DGCCompressor, _blockwise_topk, decode_block16, encode_block16
from gradkit.distributed.dgc_hook import DGCHookError, DGCHookState, DGCState, dgc_comm_hook, dgc_hook
from gradkit.distributed.simulate import CompressorAggregator, DataParallelSimulator
from gradkit.engine import fit


@pytest.fixture(scope="module")
def group():
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if own:
        dist.destroy_process_group()


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(steps)]


def ddp_with_hook(model: nn.Module, validate_every: int = 0, bucket_cap_mb: float = 25.0, **kw):
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    kw.setdefault("warmup", None)
    kw.setdefault("density", 0.1)
    state = DGCState(DGCCompressor(world_size=1, **kw), module=ddp, validate_every=validate_every)
    ddp.register_comm_hook(state, dgc_hook)
    return ddp, state, torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.0)


def step(ddp, opt, batch) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(batch[0]), batch[1]).backward()
    opt.step()


class CountGathers:
    """Counts the torch.distributed collectives the hook launches (and how)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, bool, torch.dtype]] = []
        for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast"):
            orig = getattr(dist, name)

            def wrapped(*args, _orig=orig, _name=name, **kw):
                t = args[1] if _name == "all_gather" else args[0]
                self.calls.append((_name, bool(kw.get("async_op", False)), t.dtype))
                return _orig(*args, **kw)

            monkeypatch.setattr(dist, name, wrapped)


# ------------------------------------------------------------------------------------- the hook
def test_hook_equals_the_simulator_in_one_process(group):
    data = batches(12)
    ddp, state, opt = ddp_with_hook(make_model(), density=0.05, momentum=0.9, warmup=("paper", 1))
    for e in range(2):
        state.set_epoch(e)
        for b in data[6 * e:6 * e + 6]:
            step(ddp, opt, b)
    ref = make_model()
    agg = CompressorAggregator([DGCCompressor(density=0.05, momentum=0.9, warmup=("paper", 1), world_size=1)],
                               mode="flat")
    sim = DataParallelSimulator(ref, agg, 1)
    fit(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.0), lambda e: [(b,) for b in data[6 * e:6 * e + 6]],
        epochs=2, compute_loss=sim.compute_loss, before_step=sim.before_step, on_epoch_start=sim.set_epoch)
    for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert state.iteration == 12 and state.compressor.bytes_sent == agg.compressors[0].bytes_sent


def test_one_packed_async_all_gather_per_bucket_and_validation_only_when_due(group, monkeypatch):
    ddp, state, opt = ddp_with_hook(make_model(), bucket_cap_mb=0.0005, warmup=("paper", 1))  # several buckets
    data = batches(4)
    counter = CountGathers(monkeypatch)
    assert state.validate_next
    step(ddp, opt, data[0])                       # iteration 0: header + data per bucket
    assert not state.validate_next
    n0 = len(counter.calls)
    step(ddp, opt, data[1])                       # steady state
    steady = counter.calls[n0:]
    assert steady and all(c == ("all_gather", True, torch.uint8) for c in steady)
    buckets = len(steady)
    assert buckets >= 2   # (iteration 0 ran before DDP's bucket rebuild, in one first bucket)
    assert n0 % 2 == 0 and [c[1] for c in counter.calls[:n0]] == [False, True] * (n0 // 2)  # header, data
    state.set_epoch(1)                            # density 0.25 -> 0.1: k changes, validate once
    assert state.validate_next
    n1 = len(counter.calls)
    step(ddp, opt, data[2])
    assert len(counter.calls) - n1 == 2 * buckets
    assert [c[1] for c in counter.calls[n1:]].count(False) == buckets   # the blocking headers
    n2 = len(counter.calls)
    step(ddp, opt, data[3])
    assert len(counter.calls) - n2 == buckets
    state.validate_next = True                    # the flag; request_validation() sets it too
    n3 = len(counter.calls)
    step(ddp, opt, data[0])
    assert len(counter.calls) - n3 == 2 * buckets


@pytest.mark.parametrize("coding", ["auto", "int64", "block16"])
def test_steady_state_makes_no_host_sync(group, monkeypatch, coding):
    """After the validation iteration, the hook never turns a tensor into a Python value."""
    ddp, state, opt = ddp_with_hook(make_model(), momentum=0.9, index_coding=coding, clip_norm=5.0)
    data = batches(4)
    step(ddp, opt, data[0])
    step(ddp, opt, data[1])

    def forbidden(name):
        def f(self, *a, **k):
            raise AssertionError(f"host sync in the hook's steady state: Tensor.{name}")
        return f

    opt.zero_grad()
    loss = nn.functional.cross_entropy(ddp(data[2][0]), data[2][1])
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, forbidden(name))
        loss.backward()
    opt.step()
    assert state.iteration == 3


def test_state_is_keyed_by_parameter_name_across_the_bucket_rebuild(group):
    ddp, state, opt = ddp_with_hook(make_model(), momentum=0.9, bucket_cap_mb=0.0005)
    for b in batches(3):
        step(ddp, opt, b)
    sd = state.state_dict()["compressor"]
    assert set(sd["u"]) == set(sd["v"]) == {"0.weight", "2.weight"}
    assert set(sd["dense_u"]) == {"0.bias", "2.bias"}
    assert sd["u"]["0.weight"].shape == (16, 6)


def run(ddp, opt, state, data, epochs_at):
    for i, b in enumerate(data):
        if i in epochs_at:
            state.set_epoch(epochs_at[i])
        step(ddp, opt, b)


def test_state_dict_resume_continues_bit_identically(group):
    data = batches(10)
    kw = dict(density=0.05, momentum=0.9, nesterov=True, warmup=("official", 2), sample_ratio=0.3,
              generator=torch.Generator().manual_seed(3))
    ddp, state, opt = ddp_with_hook(make_model(), **kw)
    run(ddp, opt, state, data[:5], {0: 0, 3: 1})
    buf = io.BytesIO()
    torch.save({"model": ddp.module.state_dict(), "dgc": state.state_dict()}, buf)
    run(ddp, opt, state, data[5:], {2: 2})
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    kw["generator"] = torch.Generator().manual_seed(99)   # restored from the checkpoint
    model = make_model(seed=5)
    model.load_state_dict(ckpt["model"])
    ddp2, state2, opt2 = ddp_with_hook(model, **kw)
    state2.load_state_dict(ckpt["dgc"])
    assert state2.iteration == 5 and state2.compressor.epoch == 1
    run(ddp2, opt2, state2, data[5:], {2: 2})
    for p, q in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(p, q)
    a, b = state.compressor, state2.compressor
    assert all(torch.equal(a.v[k], b.v[k]) and torch.equal(a.u[k], b.u[k]) for k in a.v)
    assert a.bytes_sent == b.bytes_sent and state.iteration == state2.iteration == 10
    assert state2.bytes_overhead > state.bytes_overhead   # the reloaded state validated once more


def test_nan_gradient_fails_at_validation_naming_the_parameter(group):
    ddp, state, opt = ddp_with_hook(make_model())
    x, y = batches(1)[0]
    x = x.clone()
    x[0, 0] = float("nan")
    msg = r"rank 0: the gradient of '[02]\.(weight|bias)' has non-finite entries \(NaN/inf\)"
    with pytest.raises(DGCHookError, match=msg):
        step(ddp, opt, (x, y))
    assert state.compressor.u == {}  # nothing was compressed


def test_nan_in_steady_state_is_reported_at_the_next_validation(group):
    model = make_model()
    ddp, state, opt = ddp_with_hook(model)
    data = batches(3)
    step(ddp, opt, data[0])
    x = data[1][0].clone()
    x[0, 0] = float("nan")
    step(ddp, opt, (x, data[1][1]))   # no sync in the steady state: exchanged, flagged on the device
    state.request_validation()
    with pytest.raises(DGCHookError, match=r"non-finite \(NaN/inf\) gradients were exchanged in [1-9]\d* bucket"):
        step(ddp, opt, data[2])
    ddp2, state2, opt2 = ddp_with_hook(make_model(), validate_every=1)
    step(ddp2, opt2, data[0])
    with pytest.raises(DGCHookError, match="non-finite"):
        step(ddp2, opt2, (x, data[1][1]))


def test_old_names_are_aliases():
    assert DGCHookState is DGCState and dgc_comm_hook is dgc_hook


def test_state_rejects_bad_arguments(group):
    comp = DGCCompressor(world_size=1)
    model = make_model()
    with pytest.raises(TypeError, match="module is required"):
        DGCState(comp)
    with pytest.raises(TypeError, match="compressor must be a DGCCompressor"):
        DGCState(object(), module=model)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        DGCState(comp, module="model")
    with pytest.raises(ValueError, match="validate_every must be a non-negative int"):
        DGCState(comp, module=model, validate_every=-1)


def test_state_load_rejects_unknown_names_and_wrong_shapes(group):
    ddp, state, opt = ddp_with_hook(make_model(), momentum=0.9)
    step(ddp, opt, batches(1)[0])
    sd = state.state_dict()
    other = DGCState(DGCCompressor(world_size=1, warmup=None), module=make_model())
    bad = {**sd, "compressor": {**sd["compressor"], "u": {**sd["compressor"]["u"], "fc9.weight": torch.zeros(2)}}}
    with pytest.raises(ValueError, match="'fc9.weight', which is not a parameter name"):
        other.load_state_dict(bad)
    wrong = {k: t.t().contiguous() if t.dim() == 2 else t for k, t in sd["compressor"]["v"].items()}
    with pytest.raises(ValueError, match=r"'0\.weight' \(v\): expected shape \(16, 6\), got \(6, 16\)"):
        other.load_state_dict({**sd, "compressor": {**sd["compressor"], "v": wrong}})
    with pytest.raises(KeyError, match="misses 'iteration'"):
        other.load_state_dict({"compressor": sd["compressor"]})
    with pytest.raises(ValueError, match="iteration"):
        other.load_state_dict({**sd, "iteration": -2})
    assert other.compressor.u == {}   # nothing half-loaded
    other.load_state_dict(sd)
    assert other.iteration == 1


def test_hook_raises_for_a_parameter_outside_the_module(group):
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(DGCState(DGCCompressor(world_size=1, warmup=None), module=make_model()), dgc_hook)
    x, y = batches(1)[0]
    with pytest.raises(DGCHookError, match="not in the module"):
        nn.functional.cross_entropy(ddp(x), y).backward()


# ------------------------------------------------------------------------------------- compressor errors
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_compress_rejects_non_finite_gradients_naming_the_key(bad):
    c = DGCCompressor(density=0.1, warmup=None)
    c.compress("fc.weight", torch.randn(4, 5))
    u, v = c.u["fc.weight"].clone(), c.v["fc.weight"].clone()
    g = torch.randn(4, 5)
    g[1, 2] = bad
    with pytest.raises(ValueError, match=r"gradient for 'fc.weight' has non-finite entries .*(NaN|inf)"):
        c.compress("fc.weight", g)
    assert torch.equal(c.u["fc.weight"], u) and torch.equal(c.v["fc.weight"], v)   # state untouched
    with pytest.raises(ValueError, match="'b' has non-finite"):
        c.compress_group(["a", "b"], [torch.randn(3, 3), g])
    with pytest.raises(ValueError, match="'bias' has non-finite"):
        c.send_dense(g[1], "bias")
    sg = c.compress("x", torch.randn(4, 5))
    assert "a" not in c.u and c.bytes_sent == 2 * sg.nbytes   # failed calls sent nothing


def test_finite_check_has_no_false_alarm_on_overflowing_sums():
    c = DGCCompressor(density=0.5, warmup=None)
    big = torch.full((4, 4), 3e38)           # finite, but the sum overflows float32
    sg = c.compress("w", big)
    assert bool(torch.isfinite(sg.values).all())
    c.compress_group(["p", "q"], [torch.full((2, 2), 3e38), torch.full((2, 2), 3e38, dtype=torch.float32)])


def test_reusing_a_key_with_another_shape_or_dtype_raises():
    c = DGCCompressor(density=0.1, momentum=0.9, warmup=None)
    c.compress("w", torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"'w' was used with shape \(4, 5\).*shape \(5, 4\).*expected shape \(4, 5\)"):
        c.compress("w", torch.randn(5, 4))
    with pytest.raises(ValueError, match="'w' holds torch.float32 state.*torch.float64"):
        c.compress("w", torch.randn(4, 5, dtype=torch.float64))
    c.dense_momentum("b", torch.randn(5))
    with pytest.raises(ValueError, match=r"'b' was used with shape \(5,\)"):
        c.dense_momentum("b", torch.randn(6))
    with pytest.raises(ValueError, match="keys must be distinct"):
        c.compress_group(["w", "w"], [torch.randn(4, 5), torch.randn(4, 5)])


def test_compressor_resume_continues_bit_identically_with_sampling():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(200, 50, generator=g) for _ in range(8)]
    kw = dict(density=0.01, momentum=0.9, warmup=("paper", 2), sample_ratio=0.05, index_coding="block16")
    a = DGCCompressor(generator=torch.Generator().manual_seed(1), **kw)
    for gr in grads[:4]:
        a.compress("w", gr)
    a.set_epoch(1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = DGCCompressor(generator=torch.Generator().manual_seed(7), **kw)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for gr in grads[4:]:
        sa, sb = a.compress("w", gr), b.compress("w", gr)
        assert torch.equal(sa.values, sb.values) and torch.equal(sa.indices, sb.indices)
    assert torch.equal(a.v["w"], b.v["w"]) and a.density == b.density and a.bytes_sent == b.bytes_sent


def test_compressor_load_rejects_malformed_state():
    a = DGCCompressor(density=0.1, warmup=None, generator=torch.Generator())
    a.compress("w", torch.randn(4, 5))
    sd = a.state_dict()
    c = DGCCompressor(density=0.1, warmup=None)
    with pytest.raises(ValueError, match="generator=None"):
        c.load_state_dict(sd)
    del sd["generator"]
    with pytest.raises(ValueError, match="same keys"):
        c.load_state_dict({**sd, "v": {}})
    with pytest.raises(ValueError, match=r"u is \(4, 5\).*v is \(5, 4\)"):
        c.load_state_dict({**sd, "v": {"w": torch.zeros(5, 4)}})
    with pytest.raises(ValueError, match="map keys to tensors"):
        c.load_state_dict({**sd, "dense_u": {"b": [1.0]}})
    with pytest.raises(ValueError, match="unknown entries"):
        c.load_state_dict({**sd, "counters": {"bytes_lost": 3}})
    with pytest.raises(ValueError, match="epoch must be"):
        c.load_state_dict({**sd, "epoch": -1})
    assert c.u == {}
    c.load_state_dict(sd)
    assert torch.equal(c.v["w"], a.v["w"])


# ------------------------------------------------------------------------------------- sync-free pieces
@pytest.mark.parametrize("n, k", [(1 << 15, 1), (100_003, 97), (65_600, 200)])
def test_sync_free_blockwise_topk_is_an_exact_topk(n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) ** 3
    x[-1] = 1e6
    got = _blockwise_topk(x.abs(), k, sync_free=True)
    assert got.numel() == k and got.unique().numel() == k
    assert set(got.tolist()) == set(torch.topk(x.abs(), k).indices.tolist())


def test_block16_sync_free_decode_and_encode_match():
    for n, k in [(10, 3), (200_003, 3000)]:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k].sort().values
        packed = encode_block16(idx, n)
        counts = torch.bincount(idx >> 16, minlength=max(1, math.ceil(n / 65536))).to(torch.int32)
        assert torch.equal(packed[:counts.numel() * 4].view(torch.int32), counts)
        assert torch.equal(decode_block16(packed, n, k, check=False), decode_block16(packed, n, k))
