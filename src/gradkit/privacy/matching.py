"""Gradient matching: the victim's parameter gradients, distances between gradient lists, image priors.

Used by every gradient-inversion attack (dia, gifd, hyperfl). The cosine distance is taken over the
concatenation of all tensors (one angle for the whole model), as in Inverting Gradients:

    cosine:  1 - <g, t> / (||g|| ||t|| + 1e-8)        l2:  sum_k ||g_k - t_k||^2
    TV(x)  = mean |x[..., i+1, j] - x[..., i, j]| + mean |x[..., i, j+1] - x[..., i, j]|

>>> g_true = model_gradients(model, x, y)                      # what a client shares
>>> d = gradient_distance(model_gradients(model, x_hat, y, create_graph=True), g_true)
>>> d.backward()                                               # gradient w.r.t. x_hat (double backward)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import choice, is_int

__all__ = ["model_gradients", "check_gradients", "gradient_distance", "total_variation", "infer_labels", "COSTS"]

COSTS = ("cosine", "l2")


def _params(model: nn.Module, params: Sequence[Tensor] | None) -> list[Tensor]:
    if params is None:
        return [p for p in model.parameters() if p.requires_grad]
    out = list(params)
    for i, p in enumerate(out):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
    return out


def model_gradients(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable | None = None,
                    params: Sequence[Tensor] | None = None, create_graph: bool = False) -> list[Tensor]:
    """Gradients of ``loss_fn(model(x), y)`` (default: mean cross-entropy) w.r.t. ``params``.

    ``params`` defaults to every parameter of ``model`` that requires grad, in ``model.parameters()`` order.
    With ``create_graph=True`` the result is differentiable (for gradient-matching attacks).
    """
    ps = _params(model, params)
    if not ps:
        raise ValueError("the model has no parameters that require grad")
    loss = (loss_fn or F.cross_entropy)(model(x), y)
    grads = torch.autograd.grad(loss, ps, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, ps)]


def check_gradients(target_grads: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """``target_grads`` as a list after checking it matches ``params`` one to one (count, shape, finite)."""
    if isinstance(target_grads, Tensor):
        raise TypeError("target_grads must be a sequence of tensors (one per parameter), got a single tensor")
    grads = list(target_grads)
    params = list(params)
    if len(grads) != len(params):
        raise ValueError(f"target_grads must hold one tensor per model parameter ({len(params)}), got {len(grads)}")
    for i, (g, p) in enumerate(zip(grads, params)):
        if not isinstance(g, Tensor):
            raise TypeError(f"target_grads[{i}] must be a tensor, got {type(g).__name__}")
        if g.shape != p.shape:
            raise ValueError(f"target_grads[{i}] has shape {tuple(g.shape)}, but the parameter it belongs to has "
                             f"shape {tuple(p.shape)}")
        if not torch.isfinite(g).all():
            raise ValueError(f"target_grads[{i}] holds non-finite values")
    return [g.detach().to(device=p.device, dtype=p.dtype) for g, p in zip(grads, params)]


def gradient_distance(grads: Sequence[Tensor], target: Sequence[Tensor], cost: str = "cosine") -> Tensor:
    """Distance between two gradient lists: ``cosine`` (over the concatenation) or squared ``l2``."""
    choice("cost", cost, COSTS)
    grads, target = list(grads), list(target)
    if len(grads) != len(target) or not grads:
        raise ValueError(f"grads and target must be non-empty lists of equal length, got {len(grads)} and "
                         f"{len(target)}")
    if cost == "l2":
        return sum(((g - t) ** 2).sum() for g, t in zip(grads, target))
    dot = sum((g * t).sum() for g, t in zip(grads, target))
    # clamped before the root: an all-zero candidate gradient (dead ReLUs) must not give a NaN derivative
    gn = sum((g * g).sum() for g in grads).clamp_min(1e-30).sqrt()
    tn = sum((t * t).sum() for t in target).clamp_min(1e-30).sqrt()
    return 1 - dot / (gn * tn + 1e-8)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation over the last two dimensions (mean absolute neighbour differences)."""
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (..., H, W), got shape {tuple(x.shape)}")
    tv = x.new_zeros(())
    if x.shape[-2] > 1:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    if x.shape[-1] > 1:
        tv = tv + (x[..., 1:] - x[..., :-1]).abs().mean()
    return tv


def infer_labels(last_weight_grad: Tensor, n: int) -> Tensor:
    """Labels of a batch of ``n`` from the last linear layer's weight gradient (iDLG / GIFD trick).

    For cross-entropy, row c of dL/dW is (p_c - [y=c]) h summed over the batch; with non-negative
    features h the true classes are the rows with the most negative sums. Exact for batch 1 with
    non-negative features; for larger batches it assumes distinct labels.
    """
    if not isinstance(last_weight_grad, Tensor) or last_weight_grad.dim() != 2:
        raise ValueError("last_weight_grad must be the (classes, features) weight gradient of the last linear "
                         f"layer, got {getattr(last_weight_grad, 'shape', type(last_weight_grad).__name__)}")
    classes = last_weight_grad.shape[0]
    if not is_int(n, low=1, high=classes):
        raise ValueError(f"n must be an int in [1, {classes}] (labels are inferred as distinct classes), got {n!r}")
    return torch.argsort(last_weight_grad.detach().sum(dim=1), stable=True)[:n]
