"""Adam with metaplasticity for the hidden weights of binarised networks (paper slug: ``continual-binary``,
its baseline: Laborieux et al., Nature Communications 2021)."""
from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import ArgumentError, real_scalar

__all__ = ["MetaplasticAdam", "metaplastic_factor"]


def metaplastic_factor(hidden: torch.Tensor, m_meta: float) -> torch.Tensor:
    """f_meta = 1 - tanh^2(m_meta * |W_h|): how much of an update towards zero a hidden weight keeps."""
    return 1.0 - torch.tanh(m_meta * hidden.abs()).square()


class MetaplasticAdam(torch.optim.Optimizer):
    """Adam on the hidden real weights W_h of a binary network (binary weights sign(W_h)), with metaplasticity.

    Paper slug: continual-binary (baseline). Adam's update u = -lr * m_hat / (sqrt(v_hat) + eps) is applied
    as is when it moves W_h away from zero; when it would decrease |W_h| (sign(u) != sign(W_h), i.e. a step
    towards a sign flip) it is multiplied by f_meta = 1 - tanh^2(m_meta * |W_h|), so large hidden weights
    consolidate. ``m_meta = 0`` is plain Adam. ``m_meta``, ``lr``, ``betas``, ``eps`` and ``weight_decay``
    (L2 added to the gradient) are read per param group: give real-valued, non-binary parameters
    (biases, norms) their own group with ``m_meta=0``.

    >>> layer = BinaryLinear(16, 4, estimator="ste", binarize_act=False, scale=None)  # gradkit.nn.binary
    >>> opt = MetaplasticAdam(layer.parameters(), lr=5e-3, m_meta=1.3)
    >>> layer(torch.randn(8, 16)).sum().backward(); opt.step()
    """

    def __init__(self, params: Any, lr: float = 5e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 m_meta: float = 1.3, weight_decay: float = 0.0) -> None:
        defaults = _check_hparams(dict(lr=lr, betas=betas, eps=eps, m_meta=m_meta, weight_decay=weight_decay))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _check_hparams({k: param_group[k] for k in ("lr", "betas", "eps", "m_meta", "weight_decay") if k in param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("MetaplasticAdam does not support sparse gradients")
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                st["exp_avg"].mul_(b1).add_(g, alpha=1.0 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
                t = st["step"]
                step_size = group["lr"] / (1.0 - b1 ** t)
                denom = (st["exp_avg_sq"] / (1.0 - b2 ** t)).sqrt_().add_(group["eps"])
                direction = st["exp_avg"]
                if group["m_meta"] > 0:
                    # the update is -step_size * exp_avg / denom: it shrinks |W_h| where sign(W_h) * exp_avg > 0
                    towards_zero = torch.sign(p) * direction > 0
                    direction = torch.where(towards_zero, direction * metaplastic_factor(p, group["m_meta"]),
                                            direction)
                p.addcdiv_(direction, denom, value=-step_size)
        return loss


def _check_hparams(h: dict) -> dict:
    if "lr" in h:
        real_scalar("lr", h["lr"], nonneg=True)
    if "eps" in h:
        real_scalar("eps", h["eps"], nonneg=True)
    if "m_meta" in h:
        real_scalar("m_meta", h["m_meta"], nonneg=True)
    if "weight_decay" in h:
        real_scalar("weight_decay", h["weight_decay"], nonneg=True)
    if "betas" in h:
        b = h["betas"]
        ok = isinstance(b, (tuple, list)) and len(b) == 2 and all(
            not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and 0.0 <= x < 1.0 for x in b)
        if not ok:
            raise ArgumentError(f"betas must be a pair of numbers in [0, 1), got {b!r}")
    return h
