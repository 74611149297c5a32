"""Orthogonal-gradient update: keep a main gradient, add only the part of an auxiliary gradient
orthogonal to it (odice, arXiv 2402.00348).

O-DICE splits the true gradient of a DICE value objective into a *forward* part (through V(s)) and
a *backward* part (through V(s')); when the two conflict the backward part can cancel the forward
one. The update keeps the forward gradient and adds the backward gradient's component on the
normal plane of the forward gradient::

    g = g_main + eta * (g_aux - <g_main, g_aux> / max(||g_main||^2, eps) * g_main)

Nothing here is RL-specific: any loss split into a main and an auxiliary term can use it. The
projection is global over all parameters (one concatenated vector, as in the paper) unless
``per_tensor=True`` (a different method: one projection per parameter tensor).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .._validate import param_list, real_scalar
from .transform import GradientTransform

__all__ = ["orthogonal_combine", "OrthogonalGradient"]


def _check_eta_eps(eta: Any, eps: Any) -> tuple[float, float]:
    eta = real_scalar("eta", eta, nonneg=True)
    eps = real_scalar("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    return eta, eps


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dot products accumulate in at least float32 (half/bfloat16 gradients are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def _project(gm: Tensor, ga: Tensor, eta: float, eps: float) -> tuple[Tensor, Tensor]:
    """``(g_main + eta * g_aux_perp, stats)`` on flat vectors in a working dtype, no checks.

    ``stats`` = [<m,m>, <m,a>, <a,a>, <a_perp,m>, <a_perp,a_perp>] as one tensor (one sync to read).
    """
    mm = torch.dot(gm, gm)
    ma = torch.dot(gm, ga)
    coef = ma / torch.clamp_min(mm, eps)
    perp = ga - coef * gm
    out = gm + eta * perp if eta != 1.0 else gm + perp
    stats = torch.stack([mm, ma, torch.dot(ga, ga), torch.dot(perp, gm), torch.dot(perp, perp)])
    return out, stats


def _check_finite_stats(stats: list[float], main: str, aux: str) -> None:
    mm, ma, aa = stats[0], stats[1], stats[2]
    if not math.isfinite(mm):
        raise ValueError(f"{main} is not finite (contains nan or inf); the orthogonal projection "
                         "needs finite gradients")
    if not (math.isfinite(aa) and math.isfinite(ma)):
        raise ValueError(f"{aux} is not finite (contains nan or inf); the orthogonal projection "
                         "needs finite gradients")


def orthogonal_combine(g_main: Tensor, g_aux: Tensor, eta: float = 1.0, eps: float = 1e-10) -> Tensor:
    """``g_main + eta * (g_aux - proj_{g_main} g_aux)``: the O-DICE orthogonal-gradient combination.

    Paper: odice (Mao et al., ICLR 2024). With ``c = <g_main, g_aux> / max(||g_main||^2, eps)``::

        g = g_main + eta * (g_aux - c * g_main)        # == (1 - eta*c) * g_main + eta * g_aux

    The inputs are two gradients of the same parameters, any (equal) shape; they are treated as
    one flat vector each. The result has the input's shape and dtype; dot products accumulate in
    at least float32. ``g_main == 0`` gives ``eta * g_aux`` (no NaN, thanks to ``eps``);
    ``g_aux = -g_main`` gives ``g_main`` back, where the plain sum would give 0. Non-finite inputs
    raise (this reads two scalars back from the device).

    Example::

        g = orthogonal_combine(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0]))
        g                                                    # tensor([1., 2.])
        torch.dot(g - torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))   # 0
    """
    eta, eps = _check_eta_eps(eta, eps)
    for name, g in (("g_main", g_main), ("g_aux", g_aux)):
        if not isinstance(g, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(g).__name__}")
        if not g.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {g.dtype}")
    if g_main.shape != g_aux.shape:
        raise ValueError(f"g_main and g_aux must have the same shape, got {tuple(g_main.shape)} "
                         f"and {tuple(g_aux.shape)}")
    if g_main.device != g_aux.device:
        raise ValueError(f"g_main and g_aux must be on the same device, got {g_main.device} and {g_aux.device}")
    wd = _work_dtype(torch.promote_types(g_main.dtype, g_aux.dtype))
    out, stats = _project(g_main.detach().reshape(-1).to(wd), g_aux.detach().reshape(-1).to(wd), eta, eps)
    _check_finite_stats(stats.tolist(), "g_main", "g_aux")
    return out.to(g_main.dtype).reshape(g_main.shape)


def _flatten_params(params: Any) -> list[Tensor]:
    """Distinct floating-point tensors that require grad (tensor, iterable, or param groups)."""
    out = param_list(params, "OrthogonalGradient")
    for i, p in enumerate(out):
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] must be floating-point, got dtype {p.dtype}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
    return out


class OrthogonalGradient(GradientTransform):
    """Write ``g_main + eta * g_aux_perp`` (+ any extra gradient) into the parameters' ``.grad``.

    Paper: odice (Mao et al., ICLR 2024): the orthogonal-gradient update of DICE value learning,
    with ``g_main`` the forward gradient (through V(s)) and ``g_aux`` the backward gradient
    (through V(s'))::

        g = g_main + eta * (g_aux - <g_main, g_aux> / max(||g_main||^2, eps) * g_main) + grad(extra)

    One global projection over all ``params`` (concatenated) by default, as in the paper;
    ``per_tensor=True`` projects each parameter tensor separately (a different method).
    Parameter groups (``optimizer.param_groups``) are accepted; parameters reached by neither
    loss are left untouched.

    From losses, three ways, all of which *accumulate* into ``.grad`` like ``Tensor.backward``
    (call ``optimizer.zero_grad()`` first); they need ``params`` at construction:

    - ``backward(main_loss, aux_loss, extra_loss=None)``: the two gradients are taken separately
      with ``torch.autograd.grad`` (never as a difference of accumulated ``.grad``), combined,
      and written; ``extra_loss`` (e.g. O-DICE's ``(1 - lambda) * mean V(s)``) is added plainly.
    - ``surrogate(main_loss, aux_loss, extra_loss=None)``: the same as a scalar to return from a
      training loop's loss function: its value is ``main + eta * aux + extra`` (for logging),
      its ``.backward()`` writes exactly the combined gradient (+ the extra loss's gradient).
    - by hand, after computing the two parts yourself: ``apply(main_grads, aux_grads)`` with one
      tensor (or None) per parameter; ``combine`` returns the result without writing it.

    As a gradient transform (:mod:`gradkit.optim.transform`; it needs two gradients, so the
    auxiliary one is set aside first): ``aux_loss.backward()``, then ``og.stash(params)`` moves
    each ``.grad`` into a buffer (leaving ``.grad`` None); ``main_loss.backward()``; then
    ``og(params)`` - or ``wrap(optimizer, og)`` at ``step()``, or ``og.attach(params)`` attached
    only around the main backward - replaces ``.grad`` (= ``g_main``) by the combination and
    empties the buffer. Calling ``og(params)`` without a stash raises ``RuntimeError``. An extra
    loss is backpropagated after ``og(params)`` (by hand) or goes through ``backward``/``surrogate``.
    ``state_dict()`` is empty: nothing is carried from one update to the next (a pending stash is
    not saved).

    ``last`` holds statistics of the latest combination (floats): ``coef`` = c (global
    projection only), ``cos`` = cos(g_main, g_aux), ``perp_cos`` = cos(g_aux_perp, g_main)
    (0 up to rounding), ``main_norm``, ``aux_norm``, ``perp_norm``. Reading them back costs one
    device sync per step. Non-finite gradients raise ``ValueError`` before anything is written.

    Example::

        og = OrthogonalGradient(model.parameters(), eta=1.0)
        opt.zero_grad(); og.backward(loss_forward, loss_backward, extra_loss=loss_init)
        opt.step()
        # or: loss_backward.backward(retain_graph=True); og.stash(); loss_forward.backward(); og(); opt.step()
    """

    def __init__(self, params: Any = None, eta: float = 1.0, eps: float = 1e-10, per_tensor: bool = False) -> None:
        self.params = None if params is None else _flatten_params(params)
        self.eta, self.eps = _check_eta_eps(eta, eps)
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be a bool, got {type(per_tensor).__name__} {per_tensor!r}")
        self.per_tensor = per_tensor
        self.last: dict[str, float] = {}
        self._aux: dict[int, tuple[Tensor, Tensor]] | None = None   # id(param) -> (param, stashed grad)

    def _own(self) -> list[Tensor]:
        if self.params is None:
            raise TypeError("OrthogonalGradient was built without params: the loss-based methods need them "
                            "(OrthogonalGradient(model.parameters(), ...))")
        return self.params

    # ------------------------------------------------------------------------------ gradients
    def _check_loss(self, name: str, loss: Any) -> None:
        if not isinstance(loss, Tensor):
            raise TypeError(f"{name} must be a scalar torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"{name} does not require grad: it does not depend on the parameters")

    def gradients(self, loss: Tensor, name: str = "loss", retain_graph: bool = True) -> list[Tensor | None]:
        """Gradient of one scalar loss w.r.t. every parameter (None where the loss does not reach it)."""
        self._check_loss(name, loss)
        return list(torch.autograd.grad(loss.reshape(()), self._own(), retain_graph=retain_graph,
                                        allow_unused=True))

    # ------------------------------------------------------------------------------ combination
    def _check_grads(self, name: str, grads: Any, params: list[Tensor]) -> list[Tensor | None]:
        if isinstance(grads, Tensor):
            raise TypeError(f"{name} must be a sequence with one tensor (or None) per parameter, got a "
                            "single tensor (use orthogonal_combine for flat vectors)")
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of tensors or None, got {type(grads).__name__}") from None
        if len(grads) != len(params):
            raise ValueError(f"{name} has {len(grads)} entries, expected {len(params)} (one per parameter)")
        for i, (g, p) in enumerate(zip(grads, params)):
            if g is None:
                continue
            if not isinstance(g, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor or None, got {type(g).__name__}")
            if g.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(g.shape)}, expected the parameter's "
                                 f"{tuple(p.shape)}")
            if g.is_sparse or g.layout != torch.strided:
                raise ValueError(f"{name}[{i}] has a {g.layout} layout; only dense gradients are supported")
            if g.device != p.device:
                raise ValueError(f"{name}[{i}] is on {g.device}, its parameter on {p.device}")
        return grads

    def combine(self, main_grads: Sequence[Tensor | None], aux_grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Per-parameter ``g_main + eta * g_aux_perp`` (None where both parts are None); updates ``last``."""
        return self._combine(self._own(), main_grads, aux_grads)

    def _combine(self, params: list[Tensor], main_grads: Sequence[Tensor | None],
                 aux_grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        gm = self._check_grads("main_grads", main_grads, params)
        ga = self._check_grads("aux_grads", aux_grads, params)
        used = [i for i in range(len(params)) if gm[i] is not None or ga[i] is not None]
        out: list[Tensor | None] = [None] * len(params)
        if not used:
            self.last = {}
            return out

        def flat(gs: list[Tensor | None], idx: list[int], wd: torch.dtype) -> Tensor:
            return torch.cat([(gs[i].detach() if gs[i] is not None else torch.zeros_like(params[i]))
                              .reshape(-1).to(wd) for i in idx])

        groups = [[i] for i in used] if self.per_tensor else [used]
        if not self.per_tensor:
            devices = {params[i].device for i in used}
            if len(devices) > 1:
                raise ValueError(f"the global projection needs all parameters on one device, got "
                                 f"{sorted(map(str, devices))}; use per_tensor=True")
        all_stats = []
        for idx in groups:
            wd = _work_dtype(functools.reduce(torch.promote_types, [params[i].dtype for i in idx]))
            res, stats = _project(flat(gm, idx, wd), flat(ga, idx, wd), self.eta, self.eps)
            all_stats.append(stats)
            offset = 0
            for i in idx:
                n = params[i].numel()
                out[i] = res[offset:offset + n].view_as(params[i]).to(params[i].dtype)
                offset += n
        if len({s.device for s in all_stats}) == 1:
            total = torch.stack([s.to(torch.float64) for s in all_stats]).sum(0)
        else:  # per_tensor with parameters on several devices
            total = sum(s.to("cpu", torch.float64) for s in all_stats)
        mm, ma, aa, pm, pp = total.tolist()
        _check_finite_stats([mm, ma, aa], "main gradient", "aux gradient")
        nm, na, npp = math.sqrt(mm), math.sqrt(aa), math.sqrt(max(pp, 0.0))
        self.last = {
            "cos": ma / (nm * na) if nm > 0 and na > 0 else 0.0,
            "perp_cos": pm / (npp * nm) if npp > 0 and nm > 0 else 0.0,
            "main_norm": nm, "aux_norm": na, "perp_norm": npp,
        }
        if not self.per_tensor:
            self.last["coef"] = ma / max(mm, self.eps)
        return out

    def apply(self, main_grads: Sequence[Tensor | None], aux_grads: Sequence[Tensor | None]) -> None:
        """Combine per-parameter gradient parts and accumulate the result into ``.grad``."""
        for p, g in zip(self._own(), self.combine(main_grads, aux_grads)):
            if g is None:
                continue
            p.grad = g if p.grad is None else p.grad.add_(g)

    # ------------------------------------------------------------------------------ from losses
    def _from_losses(self, main_loss: Tensor, aux_loss: Tensor, extra_loss: Tensor | None) -> list[Tensor | None]:
        self._check_loss("main_loss", main_loss)
        self._check_loss("aux_loss", aux_loss)
        if extra_loss is not None:
            self._check_loss("extra_loss", extra_loss)
        g = self.combine(self.gradients(main_loss, "main_loss"), self.gradients(aux_loss, "aux_loss"))
        if all(gi is None for gi in g):
            raise ValueError("main_loss and aux_loss depend on none of the params")
        return g

    def surrogate(self, main_loss: Tensor, aux_loss: Tensor, extra_loss: Tensor | None = None) -> Tensor:
        """A scalar whose value is ``main + eta * aux + extra`` and whose gradient is the combination.

        Both gradient parts are computed here with ``torch.autograd.grad`` (the graphs are kept
        while the losses live, so ``extra_loss`` may share them); ``.backward()`` on the result
        accumulates ``g_main + eta * g_aux_perp + grad(extra_loss)`` into ``.grad``. Use it where a
        training loop (``gradkit.engine.fit``) calls ``backward`` on the loss it is given.
        """
        g = self._from_losses(main_loss, aux_loss, extra_loss)
        value = (main_loss.detach() + self.eta * aux_loss.detach()).reshape(())
        inject = sum((p * gi).sum() for p, gi in zip(self._own(), g) if gi is not None)
        value = value + (inject - inject.detach())  # value unchanged, gradient = g exactly
        if extra_loss is not None:
            value = value + extra_loss.reshape(())
        return value

    def backward(self, main_loss: Tensor, aux_loss: Tensor, extra_loss: Tensor | None = None) -> Tensor:
        """Accumulate ``g_main + eta * g_aux_perp + grad(extra_loss)`` into ``.grad``.

        Returns the detached value ``main + eta * aux + extra`` (for logging).
        """
        g = self._from_losses(main_loss, aux_loss, extra_loss)
        for p, gi in zip(self._own(), g):
            if gi is not None:
                p.grad = gi if p.grad is None else p.grad.add_(gi)
        value = (main_loss.detach() + self.eta * aux_loss.detach()).reshape(())
        if extra_loss is not None:
            extra_loss.backward()
            value = value + extra_loss.detach().reshape(())
        return value

    # ------------------------------------------------------------------------------ transform protocol
    def _transform_params(self, params: Any) -> list[Tensor]:
        return self._resolve_params(params)  # None: the construction-time params

    @torch.no_grad()
    def stash(self, params: Any = None) -> None:
        """Move the current ``.grad`` of ``params`` (the auxiliary gradient) into a buffer, leaving None.

        A second ``stash`` before ``og(params)`` adds to the buffer (gradient accumulation).
        """
        plist = self._transform_params(params)
        aux = {} if self._aux is None else self._aux
        for i, p in enumerate(plist):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.layout != torch.strided:
                raise ValueError(f"params[{i}] has a {g.layout} gradient; only dense gradients are supported")
            prev = aux.get(id(p))
            aux[id(p)] = (p, g if prev is None else prev[1].add_(g))
            p.grad = None
        self._aux = aux

    @property
    def stashed(self) -> bool:
        """True between :meth:`stash` and the next ``og(params)``."""
        return self._aux is not None

    @torch.no_grad()
    def __call__(self, params: Any = None) -> None:
        """Replace each ``.grad`` (the main gradient) by ``g_main + eta * g_aux_perp`` using the stash.

        ``params=None``: the params given at construction. Parameters with neither a gradient nor a
        stashed one are left untouched; the stash is emptied.
        """
        plist = self._transform_params(params)
        if self._aux is None:
            raise RuntimeError("OrthogonalGradient has no auxiliary gradient: call og.stash(params) after the "
                               "auxiliary loss's backward and before the main loss's backward")
        aux = self._aux
        main = [p.grad for p in plist]
        extra = [aux[id(p)][1] if id(p) in aux else None for p in plist]
        out = self._combine(plist, main, extra)
        self._aux = None
        for p, g in zip(plist, out):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    def __repr__(self) -> str:
        return (f"OrthogonalGradient(eta={self.eta:g}, eps={self.eps:g}, per_tensor={self.per_tensor}, "
                f"params={'None' if self.params is None else len(self.params)})")
