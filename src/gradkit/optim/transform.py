"""The gradient-transform protocol: edit parameter gradients in place between ``backward()`` and ``step()``.

A *gradient transform* is any object ``t`` with

- ``t(params)``: edit the ``.grad`` of ``params`` (tensors) in place; parameters whose ``.grad`` is
  None are skipped. The return value is the transform's own (``GradientNoise`` returns ``sigma_t``).
- ``t.state_dict()`` / ``t.load_state_dict(sd)`` (optional for plain functions): what it needs to
  resume bit-identically (step counters, RNG state), made of tensors, numbers and strings so that
  ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it.

Three ways to run one, all equal for one backward per update (tested bit-for-bit):

- by hand: ``loss.backward(); t(model.parameters()); opt.step()``;
- wrapped: ``opt = wrap(torch.optim.SGD(...), t1, t2)`` runs ``t1`` then ``t2`` before every ``step()``
  (once per update, after all accumulated backward passes);
- as hooks: ``handle = t.attach(params)`` registers ``register_post_accumulate_grad_hook`` on every
  parameter; the hooks only note which parameters received a gradient and queue one callback that runs
  ``t`` at the **end of each backward pass**, on those parameters in the given order (so a global clip
  norm and the draw order of random noise are the same as by hand). ``handle.remove()`` removes every
  hook; the handle is also a context manager.

Hooks and gradient accumulation: hooks run once per *backward pass*, on the gradient accumulated so
far. With k micro-batches per update the transform therefore runs k times (k noise draws, k counter
steps), each on a partial sum. To transform once per update either use :func:`wrap` (or call ``t`` by
hand) or attach only around the last micro-batch's backward::

    for x in micro[:-1]: loss_fn(x).backward()
    with gn.attach(model.parameters()):
        loss_fn(micro[-1]).backward()        # gn runs once, on the full accumulated gradient
    opt.step()

:class:`GradientTransform` is the base class of gradkit's transforms (``GradientNoise``,
``OrthogonalGradient``): it supplies ``attach``, an empty state and the params handling. A transform
built with ``params`` is *bound* to them: ``t()`` and ``t.attach()`` use them, and :func:`wrap` calls it
on them instead of on all of the optimizer's parameters.

Example::

    gn = GradientNoise(eta=0.01, generator=torch.Generator().manual_seed(0))
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), gn)
    opt.zero_grad(); loss.backward(); opt.step()        # noise is added before the SGD update
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .._validate import param_list

__all__ = ["GradientTransform", "TransformHandle", "TransformedOptimizer", "attach", "wrap"]


def check_state_mapping(state_dict: Any, owner: str) -> Mapping:
    """``state_dict`` must be a mapping (the argument of every ``load_state_dict``)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping (from {owner}.state_dict()), got {type(state_dict).__name__}")
    return state_dict


def _bound_params(transform: Any) -> list[Tensor] | None:
    """The parameters a transform was built on (its ``params`` attribute), or None when unbound."""
    ps = getattr(transform, "params", None)
    if isinstance(ps, list) and ps and all(isinstance(p, Tensor) for p in ps):
        return ps
    return None


def _check_transform(name: str, transform: Any) -> None:
    if isinstance(transform, type):
        raise TypeError(f"{name} is a class ({transform.__name__}); pass an instance, e.g. {transform.__name__}(...)")
    if not callable(transform):
        raise TypeError(f"{name} must be callable as transform(params), got {type(transform).__name__}")


def _leaf_params(params: Any, owner: str) -> list[Tensor]:
    ps = param_list(params, owner)
    for i, p in enumerate(ps):
        if not p.requires_grad or not p.is_leaf:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) must be a leaf tensor that requires grad "
                             "to take a post-accumulate-grad hook")
    return ps


class GradientTransform:
    """Base class of an in-place gradient transform: ``t(params)`` edits ``.grad`` (see module docs).

    Subclasses implement ``__call__(params=None)`` (``None`` = the params given at construction) and,
    if they carry state, ``state_dict`` / ``load_state_dict``.

    Example::

        class Scale(GradientTransform):
            def __call__(self, params=None):
                for p in self._resolve_params(params):
                    if p.grad is not None: p.grad.mul_(0.5)
    """

    params: list[Tensor] | None = None

    def __call__(self, params: Any = None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(params=None)")

    def _resolve_params(self, params: Any) -> list[Tensor]:
        """``params`` as a list of distinct tensors, or the construction-time params when None."""
        if params is None:
            if self.params is None:
                raise TypeError(f"{type(self).__name__} was built without params: call it as t(params) "
                                "or pass params to the constructor")
            return self.params
        return param_list(params, type(self).__name__)

    def state_dict(self) -> dict[str, Any]:
        """State to resume from (none by default)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (nothing to restore by default)."""
        check_state_mapping(state_dict, type(self).__name__)

    def attach(self, params: Any = None) -> "TransformHandle":
        """Run this transform at the end of every backward pass via per-parameter hooks (see :func:`attach`)."""
        return attach(self, self._resolve_params(params))


class TransformHandle:
    """Hooks of one :func:`attach` call: ``remove()`` removes all of them; usable as a context manager."""

    def __init__(self, transform: Callable[[list[Tensor]], Any], params: list[Tensor]) -> None:
        self.transform = transform
        self.params = params
        self._fired: set[int] = set()
        self._queued = False
        self._handles: list[Any] = []
        try:
            for p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        """True until :meth:`remove` is called."""
        return bool(self._handles)

    def _hook(self, p: Tensor) -> None:
        self._fired.add(id(p))
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._run)

    def _run(self) -> None:
        fired, self._fired, self._queued = self._fired, set(), False
        if not self._handles:  # removed during this backward pass
            return
        ps = [p for p in self.params if id(p) in fired]
        with torch.no_grad():
            self.transform(ps)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "TransformHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"TransformHandle({type(self.transform).__name__}, params={len(self.params)}, active={self.active})"


def attach(transform: Callable[[list[Tensor]], Any], params: Any) -> TransformHandle:
    """Run ``transform(ps)`` at the end of every backward pass that accumulates into ``params``.

    One ``register_post_accumulate_grad_hook`` per parameter notes that its gradient arrived; the first
    one in a backward pass queues a callback that, once the pass is over, calls ``transform`` once on
    the parameters that received a gradient, in the order of ``params``. Returns a
    :class:`TransformHandle` (``remove()`` / ``with``). See the module docs for gradient accumulation.

    Example::

        handle = attach(GradientNoise(eta=0.01), model.parameters())
        loss.backward(); opt.step()            # the noise was added at the end of backward
        handle.remove()
    """
    _check_transform("transform", transform)
    return TransformHandle(transform, _leaf_params(params, "attach"))


class TransformedOptimizer(torch.optim.Optimizer):
    """An optimizer that runs gradient transforms, in order, on its parameters before each ``step()``.

    Made by :func:`wrap`. ``param_groups``, ``state``, ``defaults``, ``zero_grad``, ``add_param_group``
    and the hook registrations pass through to the wrapped optimizer (so LR schedulers and
    ``GradScaler`` work; the scaler unscales before the transforms run); other attributes are read
    from it (``wrapped.fisher`` of an MFAC). ``state_dict()`` is the wrapped optimizer's with one
    more key, ``"transforms"``: each transform's ``state_dict()`` (None for one without state).
    ``step(closure)`` evaluates the closure once, then transforms, then steps without it (optimizers
    that re-evaluate the closure, like LBFGS, would not see transformed gradients: not supported).
    """

    _step_supports_amp_scaling = False  # GradScaler must unscale before the transforms see the grads

    def __init__(self, optimizer: torch.optim.Optimizer, transforms: Sequence[Any]) -> None:  # noqa: super-init
        self.__dict__["optimizer"] = optimizer
        self.transforms = tuple(transforms)

    # ------------------------------------------------------------------------ pass-through
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def register_step_pre_hook(self, hook: Callable) -> Any:
        """Registered on the wrapped optimizer: it runs after the transforms, just before the update."""
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable) -> Any:
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    # ------------------------------------------------------------------------ transforms
    def _all_params(self) -> list[Tensor]:
        out, seen = [], set()
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def apply_transforms(self) -> None:
        """Run every transform once, in order (what :meth:`step` does before the update)."""
        params = None
        with torch.no_grad():
            for t in self.transforms:
                own = _bound_params(t)
                if own is None and params is None:
                    params = self._all_params()
                t(own if own is not None else params)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply_transforms()
        self.optimizer.step()
        return loss

    # ------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = dict(self.optimizer.state_dict())
        sd["transforms"] = [t.state_dict() if hasattr(t, "state_dict") else None for t in self.transforms]
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load the wrapped optimizer's state and, if present, each transform's (``"transforms"``)."""
        sd = dict(check_state_mapping(state_dict, "TransformedOptimizer"))
        ts = sd.pop("transforms", None)
        if ts is not None:
            if not isinstance(ts, (list, tuple)) or len(ts) != len(self.transforms):
                got = f"{len(ts)} entries" if isinstance(ts, (list, tuple)) else type(ts).__name__
                raise ValueError(f"state_dict['transforms'] must have one entry per transform "
                                 f"({len(self.transforms)}), got {got}")
            for i, (t, s) in enumerate(zip(self.transforms, ts)):
                if s is not None and not hasattr(t, "load_state_dict"):
                    raise ValueError(f"state_dict['transforms'][{i}] holds a state but transforms[{i}] "
                                     f"({type(t).__name__}) has no load_state_dict")
        self.optimizer.load_state_dict(sd)
        if ts is not None:
            for t, s in zip(self.transforms, ts):
                if s is not None:
                    t.load_state_dict(s)

    def __repr__(self) -> str:
        names = ", ".join(getattr(t, "__name__", type(t).__name__) for t in self.transforms)
        return f"TransformedOptimizer({type(self.optimizer).__name__}, transforms=[{names}])"


def wrap(optimizer: torch.optim.Optimizer, *transforms: Any) -> TransformedOptimizer:
    """Return ``optimizer`` wrapped so that ``transforms`` edit the gradients (in order) before each step.

    Each transform is called as ``t(params)``: on the parameters it was built on if it is bound
    (``GradientNoise(model.parameters(), ...)``), else on all of the optimizer's parameters (every
    group, in order). Transforms run once per ``step()``, i.e. once per update however many backward
    passes were accumulated. See :class:`TransformedOptimizer` for what passes through.

    Example::

        opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-3), GradientNoise(eta=0.01))
        opt.zero_grad(); loss.backward(); opt.step()
        torch.save(opt.state_dict(), "opt.pt")       # Adam's state + the noise step counter and RNG
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    seen: dict[int, int] = {}
    for i, t in enumerate(transforms):
        _check_transform(f"transforms[{i}]", t)
        if id(t) in seen:
            raise ValueError(f"transforms[{i}] is the same object as transforms[{seen[id(t)]}]; "
                             "a transform runs once per step")
        seen[id(t)] = i
    return TransformedOptimizer(optimizer, transforms)
