"""Normalised gradient descent: steps of fixed length along the gradient direction (paper slug:
transformers-svm, used there to follow the attention weights' direction quickly while their norm diverges).

    w <- w - lr * g / (||g|| + eps)          (a zero step where g = 0)

``||g||`` is taken over all parameters of a param group (``normalize="group"``, the default) or over each
parameter tensor separately (``normalize="tensor"``: K and Q of ``W = K Q^T`` each get a step of length lr,
as in the paper's code).

Example::

    opt = NormalizedGD(model.parameters(), lr=0.1)
    loss.backward(); opt.step()                          # the update has norm 0.1 (up to eps)
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .._validate import choice, real_scalar

__all__ = ["NormalizedGD"]

NORMALIZE = ("group", "tensor")


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The joint 2-norm of ``grads``, scaled by their largest entry so tiny or huge gradients neither
    underflow nor overflow when squared (float32 gradients of 1e-30 are common once a softmax saturates)."""
    scale = torch.stack([g.abs().max().to(grads[0].dtype) for g in grads]).max()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return safe * sum((g / safe).square().sum() for g in grads).sqrt()


def _step(p: torch.Tensor, norm: torch.Tensor, lr: float, eps: float) -> None:
    # a zero gradient (norm + eps == 0) gives a zero step: divide by 1 there instead of 0
    denom = norm + eps
    p.add_(p.grad / torch.where(denom > 0, denom, torch.ones_like(denom)), alpha=-lr)


class NormalizedGD(torch.optim.Optimizer):
    """``w <- w - lr * g / (||g|| + eps)``, the norm over the param group or per tensor (see the module docstring).

    lr: step length (>= 0); eps: added to the norm (>= 0; default 0: the step keeps length lr however small
    the gradient gets, as in the paper's saturated-softmax regime); a zero gradient gives a zero step, never NaN;
    normalize: ``"group"`` or ``"tensor"``. Parameters without a gradient are skipped (and left out of
    the group's norm). ``lr``, ``eps`` and ``normalize`` are read per param group.
    """

    def __init__(self, params: Any, lr: float, eps: float = 0.0, normalize: str = "group") -> None:
        lr = real_scalar("lr", lr, nonneg=True)
        eps = real_scalar("eps", eps, nonneg=True)
        choice("normalize", normalize, NORMALIZE)
        super().__init__(params, dict(lr=lr, eps=eps, normalize=normalize))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            lr, eps = group["lr"], group["eps"]
            if group["normalize"] == "group":
                norm = _norm([p.grad for p in ps])
                for p in ps:
                    _step(p, norm, lr, eps)
            else:
                for p in ps:
                    _step(p, _norm([p.grad]), lr, eps)
        return loss
