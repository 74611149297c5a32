"""The M-FAC optimizer: precondition the gradient by the inverse empirical Fisher of the last m
gradients (paper slug: mfac, arXiv 2107.03356).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .._validate import real_scalar
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
        if isinstance(ngrads, bool) or not isinstance(ngrads, int) or ngrads < 1:
            raise ValueError(f"ngrads must be a positive int, got {ngrads!r}")
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
        self.mask = None
        if sparse:
            self.mask = torch.cat([(p.detach() != 0).reshape(-1).to(wdtype) for p in self._params])
        self._momentum_buffer: Tensor | None = None

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
        g = torch.cat([(torch.zeros(p.numel(), dtype=dt, device=p.device) if p.grad is None
                        else p.grad.detach().reshape(-1)) for p in self._params])
        if g.dtype != dt:  # one cast for the flat vector (a per-tensor no-op cast costs ~1 us each)
            g = g.to(dt)
        wd = self._group_vector("weight_decay")
        if not isinstance(wd, float) or wd != 0.0:
            g = g + wd * torch.cat([p.detach().reshape(-1).to(dt) for p in self._params])
        if self.mask is not None:
            g = g * self.mask
        u = self.fisher.update_mul(g)
        mom = self._group_vector("momentum")
        if not isinstance(mom, float) or mom != 0.0:
            if self._momentum_buffer is None:
                self._momentum_buffer = torch.zeros_like(u)
            buf = self._momentum_buffer
            if isinstance(mom, float):
                buf.mul_(mom).add_(u, alpha=1 - mom)
            else:
                buf.mul_(mom).add_((1 - mom) * u)
            u = buf
        if self.mask is not None:
            u = u * self.mask
        lr = self._group_vector("lr")
        if not isinstance(lr, float):
            u, lr = u * lr, 1.0
        steps = [v.view_as(p) if v.dtype == p.dtype else v.view_as(p).to(p.dtype)
                 for v, p in zip(u.split(self._sizes), self._params)]
        torch._foreach_add_(self._params, steps, alpha=-lr)
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        buf, mask = self._momentum_buffer, self.mask
        sd["mfac"] = {"fisher": self.fisher.state_dict(), "ngrads": self.ngrads, "d": self.d,
                      "momentum_buffer": None if buf is None else buf.clone(),
                      "mask": None if mask is None else mask.clone()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        if extra is None:
            raise ValueError("state_dict has no 'mfac' entry: not saved by gradkit.optim.MFAC")
        if extra["ngrads"] != self.ngrads or extra["d"] != self.d:
            raise ValueError(f"state_dict is for ngrads={extra['ngrads']}, d={extra['d']}; this optimizer has "
                             f"ngrads={self.ngrads}, d={self.d}")
        super().load_state_dict(state_dict)
        self.fisher.load_state_dict(extra["fisher"])
        dev, dt = self.fisher.grads.device, self.fisher.dtype
        buf = extra["momentum_buffer"]
        self._momentum_buffer = None if buf is None else buf.to(device=dev, dtype=dt).clone()
        mask = extra["mask"]
        self.mask = None if mask is None else mask.to(device=dev, dtype=dt).clone()
