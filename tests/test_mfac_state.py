"""MFAC keeps its whole state in ``optimizer.state``: torch.save mid-training and a reload into a fresh
optimizer on a fresh model continue bit-identically (paper slug: mfac)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from gradkit.optim import MFAC

D = torch.float64


def _model(seed: int = 0, dtype=D) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    return m


def _batches(n_steps: int, dtype=D):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(12, 5, generator=g, dtype=dtype), torch.randint(0, 3, (12,), generator=g))
            for _ in range(n_steps)]


def _step(model, opt, batch):
    opt.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def _sparsify(model):
    with torch.no_grad():
        model[0].weight[:, :2] = 0


def _run(kw, steps, resume_at=None, dtype=D, sparse=False):
    batches = _batches(steps, dtype)
    model = _model(dtype=dtype)
    if sparse:
        _sparsify(model)
    opt = MFAC(model.parameters(), sparse=sparse, **kw)
    for t in range(steps):
        if t == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ck = torch.load(buf)                  # weights_only=True: tensors, numbers and strings only
            model = _model(seed=42, dtype=dtype)  # fresh weights, then the saved ones
            model.load_state_dict(ck["model"])
            opt = MFAC(model.parameters(), sparse=sparse, **kw)
            opt.load_state_dict(ck["opt"])
        _step(model, opt, batches[t])
    return model, opt


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2, ngrads=4, method="woodbury"),
    dict(lr=1e-2, ngrads=4, method="mfac", momentum=0.9, weight_decay=1e-3),
    dict(lr=1e-2, ngrads=3, method="woodbury", momentum=0.5, damp=1e-3),
], ids=["woodbury", "mfac-momentum-wd", "woodbury-momentum"])
@pytest.mark.parametrize("resume_at", [2, 6])   # before the ring buffer is full / after it wrapped
def test_resume_through_torch_save_is_bit_identical(kw, resume_at):
    full, _ = _run(kw, 11)
    resumed, opt = _run(kw, 11, resume_at=resume_at)
    assert _same(full, resumed)
    assert opt.state[next(iter(resumed.parameters()))]["step"] == 11


def test_resume_float32_model_keeps_float64_factors():
    kw = dict(lr=1e-2, ngrads=4, momentum=0.5)
    full, _ = _run(kw, 10, dtype=torch.float32)
    resumed, opt = _run(kw, 10, resume_at=5, dtype=torch.float32)
    assert _same(full, resumed)
    st = opt.state[next(iter(resumed.parameters()))]
    # torch's Optimizer.load_state_dict would cast these to the parameters' float32
    assert st["dots"].dtype == D and st["inv"].dtype == D and st["grads"].dtype == torch.float32


def test_resume_sparse_keeps_mask():
    kw = dict(lr=1e-2, ngrads=3)
    full, _ = _run(kw, 8, sparse=True)
    resumed, opt = _run(kw, 8, resume_at=4, sparse=True)
    assert _same(full, resumed)
    assert torch.all(resumed[0].weight[:, :2] == 0) and opt.mask is not None


def test_all_state_lives_in_optimizer_state():
    model = _model()
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=3, momentum=0.9)
    for b in _batches(4):
        _step(model, opt, b)
    first = next(iter(model.parameters()))
    st = opt.state[first]
    assert set(st) == {"step", "slot", "since_refresh", "damp", "method", "grads", "dots", "inv", "momentum_buffer"}
    assert st["step"] == 4 and st["slot"] == 4 % 3 and st["method"] == "woodbury"
    assert st["grads"] is opt.fisher.grads and st["dots"] is opt.fisher.dots and st["inv"] is opt.fisher.inv
    assert len(opt.state) == 1
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"} and set(sd["state"]) == {0}
    assert set(opt.state_dict()["state"][0]) == set(st)
    mf = MFAC(_model().parameters(), ngrads=2, method="mfac")
    assert {"coef", "pivots"} <= set(mf.state_dict()["state"][0])


def test_loaded_state_is_a_copy_not_shared():
    model = _model()
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=3, momentum=0.5)
    batches = _batches(6)
    for b in batches[:3]:
        _step(model, opt, b)
    model2 = _model(seed=3)
    model2.load_state_dict(model.state_dict())
    opt2 = MFAC(model2.parameters(), lr=1e-2, ngrads=3, momentum=0.5)
    opt2.load_state_dict(opt.state_dict())          # live references, as torch's optimizers return
    for b in batches[3:]:
        _step(model, opt, b)                        # must not move opt2's window / momentum
        _step(model2, opt2, b)
    assert _same(model, model2)
    s1, s2 = opt.state[next(iter(model.parameters()))], opt2.state[next(iter(model2.parameters()))]
    assert s1["grads"].data_ptr() != s2["grads"].data_ptr()
    assert s1["momentum_buffer"].data_ptr() != s2["momentum_buffer"].data_ptr()


def test_load_into_other_method_recomputes_the_factor():
    model = _model()
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=4)
    batches = _batches(7)
    for b in batches[:5]:
        _step(model, opt, b)
    sd = opt.state_dict()
    model2 = _model(seed=9)
    model2.load_state_dict(model.state_dict())
    opt2 = MFAC(model2.parameters(), lr=1e-2, ngrads=4, method="mfac")
    opt2.load_state_dict(sd)
    for b in batches[5:]:
        _step(model, opt, b)
        _step(model2, opt2, b)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)


def test_loads_the_earlier_state_dict_format():
    model = _model()
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=3, momentum=0.5)
    batches = _batches(6)
    for b in batches[:4]:
        _step(model, opt, b)
    st = opt.state_dict()["state"][0]
    legacy = {"state": {}, "param_groups": opt.state_dict()["param_groups"],
              "mfac": {"fisher": {"grads": st["grads"].clone(), "dots": st["dots"].clone(), "slot": st["slot"],
                                  "count": st["step"], "inv": st["inv"].clone(), "since_refresh": st["since_refresh"]},
                       "ngrads": 3, "d": opt.d, "momentum_buffer": st["momentum_buffer"].clone(), "mask": None}}
    model2 = _model(seed=4)
    model2.load_state_dict(model.state_dict())
    opt2 = MFAC(model2.parameters(), lr=1e-2, ngrads=3, momentum=0.5)
    opt2.load_state_dict(legacy)
    for b in batches[4:]:
        _step(model, opt, b)
        _step(model2, opt2, b)
    assert _same(model, model2)


def test_load_state_dict_bad_inputs():
    model = _model()
    opt = MFAC(model.parameters(), ngrads=3)
    sd = opt.state_dict()
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        opt.load_state_dict([sd])
    with pytest.raises(ValueError, match="must have 'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(ValueError, match="no M-FAC state under parameter 0"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[0\] has no 'dots'"):
        opt.load_state_dict({**sd, "state": {0: {"grads": sd["state"][0]["grads"]}}})
    with pytest.raises(ValueError, match="is for ngrads=3, d=.*this optimizer has ngrads=5"):
        MFAC(model.parameters(), ngrads=5).load_state_dict(sd)
    with pytest.raises(ValueError, match="has no sparsity mask but this MFAC was built with sparse=True"):
        MFAC(model.parameters(), ngrads=3, sparse=True).load_state_dict(sd)
    with pytest.raises(ValueError, match="has sparsity mask but this MFAC was built with sparse=False"):
        opt.load_state_dict(MFAC(model.parameters(), ngrads=3, sparse=True).state_dict())
    assert opt.state[next(iter(model.parameters()))]["step"] == 0   # failed loads changed nothing
