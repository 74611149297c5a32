"""The M-FAC optimizer: precondition the gradient by the inverse empirical Fisher of the last m
gradients (paper slug: mfac, arXiv 2107.03356).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .._validate import positive_int, real_scalar
from ..curvature.fisher import SlidingFisherInverse

__all__ = ["MFAC"]


class MFAC(torch.optim.Optimizer):
    """M-FAC: ``w <- w - lr * F^{-1} g`` with ``F`` the damped empirical Fisher of the last ``ngrads`` gradients.

    Paper: mfac (Frantar, Kurtic, Alistarh, NeurIPS 2021). One flat window over all parameters
    (every group); per step, as the official ``MFAC.step``::

        g = grad + weight_decay * w                       (flattened over all params)
        insert g into the window (replacing the oldest), then u = F^{-1} g,
            F = damp I + (1/m) sum_{i<=m} g_i g_i^T       (window starts as zeros)
        v = momentum * v + (1 - momentum) * u  (if momentum > 0, else v = u)
        w <- w - lr * v

    Since g is in the window, ``u = (m / damp) G^T (m I + G G^T / damp)^{-1} e_g``: the first step gives
    ``u = m g / (m damp + ||g||^2)``. ``lr``, ``momentum`` and ``weight_decay`` are read per param group.
    ``sparse=True`` freezes the weights that are exactly 0 at construction (masked out of g and of the
    update). Memory: ``ngrads x d`` floats (``dtype``, default the parameters' dtype) + O(ngrads^2) float64.
    Cost per step O(d m + m^2) with ``method="woodbury"`` (default), O(d m + m^3) with ``"mfac"``.

    State: everything lives in ``self.state`` under the first parameter, as one dict (the window
    ``grads`` (m x d), ``dots`` = K, the factor ``inv`` (woodbury) or ``coef``/``pivots`` (mfac),
    ``slot``, ``step``, ``since_refresh``, ``damp``, ``method``, and ``momentum_buffer`` / ``mask``
    (flat, length d) when used), so ``torch.save(opt.state_dict())`` and a ``load_state_dict`` into a
    fresh MFAC on a fresh model continue bit-identically. As with torch's optimizers the returned
    dict references the live tensors (save it before the next step); loading copies them, keeping
    each tensor's dtype (K and the factors stay float64) on this optimizer's device. ``self.fisher``
    is the :class:`SlidingFisherInverse` that computes on those tensors.

    Example::

        model = torch.nn.Linear(10, 2)
        opt = MFAC(model.parameters(), lr=1e-3, ngrads=32)
        model(torch.randn(4, 10)).sum().backward(); opt.step()
    """

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 ngrads: int = 1024, damp: float = 1e-5, method: str = "woodbury", sparse: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        lr = real_scalar("lr", lr, nonneg=True)
        momentum = real_scalar("momentum", momentum, nonneg=True)
        if momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        weight_decay = real_scalar("weight_decay", weight_decay, nonneg=True)
        ngrads = positive_int("ngrads", ngrads)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        for gi, group in enumerate(self.param_groups):
            for k in ("lr", "momentum", "weight_decay"):
                v = real_scalar(f"param_groups[{gi}]['{k}']", group[k], nonneg=True)
                if k == "momentum" and v >= 1:
                    raise ValueError(f"param_groups[{gi}]['momentum'] must be in [0, 1), got {v!r}")
        self._params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(self._params):
            if not p.is_floating_point():
                raise TypeError(f"params[{i}] must be floating-point, got dtype {p.dtype}")
        first = self._params[0]
        for i, p in enumerate(self._params):
            if p.device != first.device:
                raise ValueError(f"all params must be on one device, params[{i}] is on {p.device}, "
                                 f"params[0] on {first.device}")
        self._sizes = [p.numel() for p in self._params]
        self.d = sum(self._sizes)
        wdtype = dtype if dtype is not None else (torch.float64 if first.dtype == torch.float64 else torch.float32)
        self.fisher = SlidingFisherInverse(ngrads, self.d, damp=damp, method=method, dtype=wdtype,
                                           device=first.device)
        self.ngrads, self.damp, self.method = ngrads, self.fisher.damp, method
        self.sparse = bool(sparse)
        st = self.state[first]
        st.update(step=0, slot=0, since_refresh=0, damp=self.damp, method=method,
                  grads=self.fisher.grads, dots=self.fisher.dots)
        st.update(self._factors())
        if sparse:
            st["mask"] = torch.cat([(p.detach() != 0).reshape(-1).to(wdtype) for p in self._params])

    # ------------------------------------------------------------------------------ state
    _FACTORS = {"woodbury": ("inv",), "mfac": ("coef", "pivots")}

    def _factors(self) -> dict[str, Tensor]:
        return {k: getattr(self.fisher, k) for k in self._FACTORS[self.method]}

    @property
    def _mstate(self) -> dict[str, Any]:
        """The optimizer's whole state: ``self.state[first parameter]``."""
        return self.state[self._params[0]]

    @property
    def mask(self) -> Tensor | None:
        """The flat 0/1 mask of ``sparse=True`` (None otherwise)."""
        return self._mstate.get("mask")

    def _sync(self) -> None:
        """Write ``self.fisher``'s counters and (rebound) factors into ``self.state``.

        The window and K are the same tensors in both (updated in place); the counters are ints and
        the woodbury inverse is rebound at each update, so they are copied after every change.
        """
        f = self.fisher
        self._mstate.update(slot=f.slot, step=f.count, since_refresh=f.since_refresh,
                            grads=f.grads, dots=f.dots, **self._factors())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "fisher"):
            raise RuntimeError("MFAC keeps one flat gradient window over the parameters given at construction; "
                               "add_param_group after construction is not supported (build a new MFAC)")
        super().add_param_group(param_group)

    def _group_vector(self, key: str) -> Tensor | float:
        """A per-coordinate vector of a group hyper-parameter, or a float when all groups agree."""
        vals = [g[key] for g in self.param_groups]
        if all(v == vals[0] for v in vals):
            return float(vals[0])
        parts = [torch.full((p.numel(),), float(g[key]), dtype=self.fisher.dtype, device=p.device)
                 for g in self.param_groups for p in g["params"]]
        return torch.cat(parts)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dt = self.fisher.dtype
        mask = self.mask
        g = torch.cat([(torch.zeros(p.numel(), dtype=dt, device=p.device) if p.grad is None
                        else p.grad.detach().reshape(-1)) for p in self._params])
        if g.dtype != dt:  # one cast for the flat vector (a per-tensor no-op cast costs ~1 us each)
            g = g.to(dt)
        wd = self._group_vector("weight_decay")
        if not isinstance(wd, float) or wd != 0.0:
            g = g + wd * torch.cat([p.detach().reshape(-1).to(dt) for p in self._params])
        if mask is not None:
            g = g * mask
        st = self._mstate
        u = self.fisher.update_mul(g)
        self._sync()
        mom = self._group_vector("momentum")
        if not isinstance(mom, float) or mom != 0.0:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = torch.zeros_like(u)
            if isinstance(mom, float):
                buf.mul_(mom).add_(u, alpha=1 - mom)
            else:
                buf.mul_(mom).add_((1 - mom) * u)
            u = buf
        if mask is not None:
            u = u * mask
        lr = self._group_vector("lr")
        if not isinstance(lr, float):
            u, lr = u * lr, 1.0
        steps = [v.view_as(p) if v.dtype == p.dtype else v.view_as(p).to(p.dtype)
                 for v, p in zip(u.split(self._sizes), self._params)]
        torch._foreach_add_(self._params, steps, alpha=-lr)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict; the M-FAC state is ``state[0]`` (references, not copies)."""
        return super().state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict`: param groups via torch, the M-FAC state copied exactly (dtypes kept)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping (from MFAC.state_dict()), got {type(state_dict).__name__}")
        sd = _from_legacy(state_dict)
        if "state" not in sd or "param_groups" not in sd:
            raise ValueError("state_dict must have 'state' and 'param_groups' keys (from MFAC.state_dict())")
        saved = sd["state"].get(0)
        if not isinstance(saved, Mapping) or not isinstance(saved.get("grads"), Tensor):
            raise ValueError("state_dict has no M-FAC state under parameter 0: not saved by gradkit.optim.MFAC")
        for k in ("dots", "slot", "step", "since_refresh"):
            if k not in saved:
                raise ValueError(f"state_dict['state'][0] has no {k!r}: not saved by gradkit.optim.MFAC")
        m, d = (tuple(saved["grads"].shape) + (None, None))[:2]
        if saved["grads"].dim() != 2 or (m, d) != (self.ngrads, self.d):
            raise ValueError(f"state_dict is for ngrads={m}, d={d}; this optimizer has ngrads={self.ngrads}, "
                             f"d={self.d}")
        if ("mask" in saved) != self.sparse:
            raise ValueError(f"state_dict {'has' if 'mask' in saved else 'has no'} sparsity mask but this MFAC "
                             f"was built with sparse={self.sparse}")
        own = self._mstate  # this optimizer's buffers (dtype, device): the saved state is copied into them
        super().load_state_dict({**sd, "state": {k: v for k, v in sd["state"].items() if k != 0}})
        self.state[self._params[0]] = own
        dev, dt = own["grads"].device, self.fisher.dtype
        # an inverse saved with another method or damp is recomputed from K (fisher.load_state_dict refactors)
        same = saved.get("method", "woodbury") == self.method and saved.get("damp", self.damp) == self.damp
        self.fisher.load_state_dict({"grads": saved["grads"], "dots": saved["dots"], "slot": saved["slot"],
                                     "count": saved["step"], "since_refresh": saved["since_refresh"],
                                     "inv": saved.get("inv") if same else None})
        own.pop("momentum_buffer", None)
        if saved.get("momentum_buffer") is not None:
            own["momentum_buffer"] = saved["momentum_buffer"].detach().to(device=dev, dtype=dt, copy=True)
        if self.sparse:
            own["mask"] = saved["mask"].detach().to(device=dev, dtype=dt, copy=True)
        own.update(damp=self.damp, method=self.method)
        self._sync()


def _from_legacy(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict of the earlier format (M-FAC state under an ``"mfac"`` key) in the current one."""
    sd = dict(sd)
    extra = sd.pop("mfac", None)
    if extra is None:
        return sd
    f = extra["fisher"]
    st = {"grads": f["grads"], "dots": f["dots"], "slot": f["slot"], "step": f["count"],
          "since_refresh": f.get("since_refresh", 0)}
    if f.get("inv") is not None:
        st.update(inv=f["inv"], method="woodbury")
    if extra.get("momentum_buffer") is not None:
        st["momentum_buffer"] = extra["momentum_buffer"]
    if extra.get("mask") is not None:
        st["mask"] = extra["mask"]
    sd["state"] = {**dict(sd.get("state", {})), 0: st}
    return sd
