"""The gradient-transform protocol (gradkit.optim.transform): wrap(), hooks, state_dict round trips,
and GradientNoise / OrthogonalGradient as transforms."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from gradkit.optim import (GradientNoise, GradientTransform, MFAC, OrthogonalGradient, TransformedOptimizer,
                           attach, wrap)
from gradkit.testing import assert_no_hooks_left, count_hooks

D = torch.float64


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(D)


def _data(seed: int = 1, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _gn(**kw) -> GradientNoise:
    return GradientNoise(eta=kw.pop("eta", 0.05), generator=torch.Generator().manual_seed(kw.pop("seed", 7)), **kw)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


class Scale(GradientTransform):
    """A tiny transform for tests: multiply every gradient by ``c`` and count the calls."""

    def __init__(self, c: float, params=None) -> None:
        self.c, self.calls = c, 0
        self.params = None if params is None else list(params)

    def __call__(self, params=None) -> None:
        for p in self._resolve_params(params):
            if p.grad is not None:
                p.grad.mul_(self.c)
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, sd):
        self.calls = sd["calls"]


# ----------------------------------------------------------------------------- wrap
def test_wrap_applies_transforms_in_order_before_step():
    model = _mlp()
    x, y = _data()
    seen = {}
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    inner.register_step_pre_hook(lambda o, a, k: seen.update(g=[p.grad.clone() for p in model.parameters()]))
    add_one = lambda ps: [p.grad.add_(1.0) for p in ps if p.grad is not None]  # noqa: E731  a plain function
    opt = wrap(inner, Scale(2.0), add_one)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, TransformedOptimizer)
    opt.zero_grad()
    _loss(model, x, y).backward()
    clean = [p.grad.clone() for p in model.parameters()]
    before = _params(model)
    opt.step()
    for g0, g, p0, p in zip(clean, seen["g"], before, model.parameters()):
        assert torch.equal(g, g0 * 2.0 + 1.0)             # scale first, then add: the given order
        assert torch.equal(p.detach(), p0.add(g, alpha=-0.1))  # the optimizer used the transformed gradient
    assert opt.state_dict()["transforms"] == [{"calls": 1}, None]
    assert "Scale" in repr(opt) and "SGD" in repr(opt)


def test_wrap_passes_through_groups_state_zero_grad_and_scheduler():
    model = _mlp()
    inner = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = wrap(inner, _gn())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    assert len(inner.state) == len(list(model.parameters()))   # Adam's state lives in the inner optimizer
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.zeros(2, dtype=D))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"] == [extra]
    mf = wrap(MFAC(model.parameters(), ngrads=2))              # no transforms: a pass-through wrapper
    assert mf.fisher is mf.optimizer.fisher                    # other attributes are read from the optimizer


def test_wrap_equals_apply_by_hand_and_bound_transform_keeps_its_params():
    x, y = _data()
    runs = []
    for mode in ("hand", "wrap", "wrap_bound"):
        model = _mlp()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        bound = mode != "wrap"
        gn = _gn(clip_norm=1.0) if not bound else GradientNoise(
            model.parameters(), eta=0.05, clip_norm=1.0, generator=torch.Generator().manual_seed(7))
        opt = inner if mode == "hand" else wrap(inner, gn)
        for _ in range(4):
            opt.zero_grad()
            _loss(model, x, y).backward()
            if mode == "hand":
                gn.apply()
            opt.step()
        assert gn.step_count == 4
        runs.append(_params(model))
    assert _equal(runs[0], runs[1]) and _equal(runs[0], runs[2])
    # a transform bound to a subset acts on that subset only, even when wrapped around more params
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), Scale(0.0, params=model[4].parameters()))
    _loss(model, x, y).backward()
    opt.step()
    assert all(torch.all(p.grad == 0) for p in model[4].parameters())
    assert all(p.grad.abs().sum() > 0 for p in model[0].parameters())


# ----------------------------------------------------------------------------- hooks
def test_hook_form_equals_wrap_form_and_removes_every_hook():
    x, y = _data()
    hooks_before = count_hooks(_mlp())
    runs = []
    for mode in ("wrap", "hook", "ctx"):
        model = _mlp()
        gn = _gn(clip_norm=0.5)           # a global clip norm: needs every gradient at once
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        opt = wrap(inner, gn) if mode == "wrap" else inner
        handle = gn.attach(model.parameters()) if mode == "hook" else None
        for _ in range(5):
            opt.zero_grad()
            if mode == "ctx":
                with gn.attach(model.parameters()) as h:
                    assert h.active and count_hooks(model) == hooks_before + 6
                    _loss(model, x, y).backward()
                assert not h.active
            else:
                _loss(model, x, y).backward()
            opt.step()
        if handle is not None:
            assert count_hooks(model) == hooks_before + 6
            handle.remove()
            handle.remove()  # idempotent
        assert_no_hooks_left(model, before=hooks_before)
        assert gn.step_count == 5
        runs.append(_params(model))
    assert _equal(runs[0], runs[1]) and _equal(runs[0], runs[2])


def test_hooks_removed_when_backward_raises_inside_context():
    model = _mlp()
    x, y = _data()

    def boom(ps):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with attach(boom, model.parameters()):
            _loss(model, x, y).backward()
    assert_no_hooks_left(model)
    model.zero_grad()
    _loss(model, x, y).backward()   # a later backward is unaffected


def test_hooks_run_once_per_backward_on_the_params_that_got_gradients():
    model = _mlp()
    x, y = _data()
    calls = []
    handle = attach(lambda ps: calls.append([tuple(p.shape) for p in ps]), model.parameters())
    _loss(model, x, y).backward()
    model[4](torch.randn(2, 16, dtype=D)).sum().backward()   # reaches only the last layer
    handle.remove()
    assert calls[0] == [tuple(p.shape) for p in model.parameters()]    # all, in the given order
    assert calls[1] == [(3, 16), (3,)]
    assert "active=False" in repr(handle)


def test_hooks_and_gradient_accumulation():
    """Attached for good, a transform runs per backward pass; attached around the last micro-batch only,
    it runs once on the accumulated gradient, exactly like the wrap form."""
    x, y = _data()
    micro = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    runs = []
    for mode in ("wrap", "last", "always"):
        model = _mlp()
        gn = _gn()
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        opt = wrap(inner, gn) if mode == "wrap" else inner
        handle = gn.attach(model.parameters()) if mode == "always" else None
        for _ in range(3):
            opt.zero_grad()
            for xb, yb in micro[:-1]:
                _loss(model, xb, yb).backward()
            if mode == "last":
                with gn.attach(model.parameters()):
                    _loss(model, *micro[-1]).backward()
            else:
                _loss(model, *micro[-1]).backward()
            opt.step()
        if handle:
            handle.remove()
        assert gn.step_count == (12 if mode == "always" else 3)
        runs.append(_params(model))
    assert _equal(runs[0], runs[1]) and not _equal(runs[0], runs[2])


# ----------------------------------------------------------------------------- state_dict round trips
def _noisy_run(steps, *, resume_at=None):
    """SGD+momentum wrapped with GradientNoise; optionally save at ``resume_at`` through torch.save and
    continue in fresh objects (a differently initialised model)."""
    x, y = _data(n=64)
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), _gn(eta=0.1, clip_norm=2.0))
    for t in range(steps):
        if t == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ck = torch.load(buf)                      # weights_only: only tensors, numbers and strings
            model = _mlp(seed=99)
            model.load_state_dict(ck["model"])
            opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                       _gn(eta=0.1, clip_norm=2.0, seed=12345))
            opt.load_state_dict(ck["opt"])
            assert opt.transforms[0].step_count == resume_at
        xb, yb = x[(t * 16) % 64:(t * 16) % 64 + 16], y[(t * 16) % 64:(t * 16) % 64 + 16]
        opt.zero_grad()
        _loss(model, xb, yb).backward()
        opt.step()
    return _params(model)


def test_gradient_noise_wrapped_resume_is_bit_identical():
    full = _noisy_run(9)
    assert _equal(full, _noisy_run(9, resume_at=4))
    assert not _equal(full, _noisy_run(8))


def test_gradient_noise_by_hand_resume_with_torch_save():
    x, y = _data()

    def run(resume):
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gn = GradientNoise(model.parameters(), eta=0.05, generator=torch.Generator().manual_seed(3))
        for t in range(8):
            if resume and t == 5:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gn": gn.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf)
                model = _mlp(seed=5)
                model.load_state_dict(ck["model"])
                opt = torch.optim.Adam(model.parameters(), lr=1e-2)
                opt.load_state_dict(ck["opt"])
                gn = GradientNoise(model.parameters(), eta=0.05, generator=torch.Generator())
                gn.load_state_dict(ck["gn"])
            opt.zero_grad()
            _loss(model, x, y).backward()
            gn(model.parameters())
            opt.step()
        return _params(model)

    assert _equal(run(False), run(True))


def test_mfac_wrapped_with_noise_resume_is_bit_identical():
    x, y = _data()

    def run(resume):
        model = _mlp()
        opt = wrap(MFAC(model.parameters(), lr=1e-2, momentum=0.5, ngrads=3), _gn(eta=1e-3))
        for t in range(7):
            if resume and t == 4:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf)
                model = _mlp(seed=1)
                model.load_state_dict(ck["model"])
                opt = wrap(MFAC(model.parameters(), lr=1e-2, momentum=0.5, ngrads=3), _gn(eta=1e-3, seed=0))
                opt.load_state_dict(ck["opt"])
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        return _params(model)

    assert _equal(run(False), run(True))


# ----------------------------------------------------------------------------- OrthogonalGradient
def _two_losses(model, x, y):
    out = model(x)
    return nn.functional.cross_entropy(out, y), out.pow(2).mean()


@pytest.mark.parametrize("per_tensor", [False, True])
def test_orthogonal_stash_then_call_equals_backward(per_tensor):
    x, y = _data()
    ref, got_hand, got_wrap, got_hook = _mlp(), _mlp(), _mlp(), _mlp()
    og = OrthogonalGradient(ref.parameters(), eta=0.7, per_tensor=per_tensor)
    og.backward(*_two_losses(ref, x, y))
    # by hand: auxiliary backward, stash, main backward, og(params)
    og2 = OrthogonalGradient(eta=0.7, per_tensor=per_tensor)
    main, aux = _two_losses(got_hand, x, y)
    aux.backward(retain_graph=True)
    og2.stash(got_hand.parameters())
    assert og2.stashed and all(p.grad is None for p in got_hand.parameters())
    main.backward()
    og2(got_hand.parameters())
    assert not og2.stashed
    # wrapped: the combination happens at step()
    opt = wrap(torch.optim.SGD(got_wrap.parameters(), lr=0.0), OrthogonalGradient(eta=0.7, per_tensor=per_tensor))
    main, aux = _two_losses(got_wrap, x, y)
    aux.backward(retain_graph=True)
    opt.transforms[0].stash(got_wrap.parameters())
    main.backward()
    opt.step()
    # hook: attached only around the main backward
    og4 = OrthogonalGradient(got_hook.parameters(), eta=0.7, per_tensor=per_tensor)
    main, aux = _two_losses(got_hook, x, y)
    aux.backward(retain_graph=True)
    og4.stash()
    with og4.attach():
        main.backward()
    assert_no_hooks_left(got_hook)
    for m in (got_hand, got_wrap, got_hook):
        for p, q in zip(ref.parameters(), m.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-13, atol=1e-15)
    assert og.state_dict() == {} and og2.last.keys() == og.last.keys()
    og.load_state_dict({})


def test_orthogonal_transform_errors():
    model = _mlp()
    og = OrthogonalGradient(eta=1.0)
    with pytest.raises(RuntimeError, match=r"no auxiliary gradient: call og.stash\(params\)"):
        og(model.parameters())
    with pytest.raises(TypeError, match="built without params"):
        og()
    with pytest.raises(TypeError, match="built without params: the loss-based methods need them"):
        og.backward(*_two_losses(model, *_data()))
    with pytest.raises(TypeError, match=r"params\[0\] must be a torch.Tensor"):
        og.stash([1.0])
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        og.load_state_dict([1])
    assert repr(og) == "OrthogonalGradient(eta=1, eps=1e-10, per_tensor=False, params=None)"


# ----------------------------------------------------------------------------- bad inputs
def test_wrap_attach_and_state_bad_inputs():
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    gn = _gn()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        wrap([sgd], gn)
    with pytest.raises(TypeError, match=r"transforms\[1\] must be callable as transform\(params\), got int"):
        wrap(sgd, gn, 3)
    with pytest.raises(TypeError, match=r"transforms\[0\] is a class \(GradientNoise\); pass an instance"):
        wrap(sgd, GradientNoise)
    with pytest.raises(ValueError, match=r"transforms\[1\] is the same object as transforms\[0\]"):
        wrap(sgd, gn, gn)
    with pytest.raises(TypeError, match="transform must be callable"):
        attach("noise", model.parameters())
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(3,\)\) must be a leaf tensor that requires grad"):
        attach(gn, [torch.zeros(3)])
    nonleaf = (torch.zeros(3, requires_grad=True) * 2)
    with pytest.raises(ValueError, match="must be a leaf tensor"):
        gn.attach([nonleaf])
    with pytest.raises(ValueError, match="params is empty"):
        attach(gn, [])
    with pytest.raises(TypeError, match=r"GradientNoise was built without params: call it as t\(params\)"):
        gn.apply()
    with pytest.raises(TypeError, match="built without params"):
        gn.attach()
    with pytest.raises(TypeError, match="params must be a tensor, an iterable"):
        gn(3)
    assert count_hooks(model) == 0
    opt = wrap(sgd, gn)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        opt.load_state_dict([1, 2])
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['transforms'\] must have one entry per transform \(1\), got 2"):
        opt.load_state_dict({**sd, "transforms": [{}, {}]})
    with pytest.raises(ValueError, match=r"state_dict\['transforms'\]\[0\] holds a state but transforms\[0\]"):
        wrap(torch.optim.SGD(model.parameters(), lr=0.1), lambda ps: None).load_state_dict(sd)
    opt.load_state_dict({k: v for k, v in sd.items() if k != "transforms"})  # a plain optimizer state dict
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        gn.load_state_dict(None)
    with pytest.raises(ValueError, match="has a 'generator_state' but this GradientNoise has no generator"):
        GradientNoise(eta=0.1).load_state_dict(gn.state_dict())
    with pytest.raises(TypeError, match=r"state_dict\['generator_state'\] must be a uint8 tensor"):
        gn.load_state_dict({"step_count": 1, "generator_state": [1, 2]})
    assert gn.step_count == 0   # a failed load changes nothing
    assert "params=None" in repr(gn)


def test_wrapped_optimizer_deepcopy_keeps_working():
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), Scale(0.5))
    opt2 = copy.deepcopy(opt)
    assert opt2.transforms[0] is not opt.transforms[0] and len(opt2.param_groups) == 1
