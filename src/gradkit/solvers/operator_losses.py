"""Relative L^p and H^1 errors of predicted functions on a grid, the training losses of neural operators
(paper slug: mgno).

relative_lp_loss:  mean_i ||pred_i - target_i||_p / ||target_i||_p
relative_h1_loss:  mean_i sqrt(||e_i||^2 + ||grad e_i||^2) / sqrt(||y_i||^2 + ||grad y_i||^2),  e = pred - target,
gradients by forward differences on the unit cube (spacing 1/n along an axis of n points).

>>> y = torch.rand(4, 1, 16, 16) + 1
>>> float(relative_lp_loss(1.1 * y, y))  # doctest: +ELLIPSIS
0.1000...
"""
from __future__ import annotations

import torch

from .._validate import ArgumentError, choice, positive, tensor

__all__ = ["relative_lp_loss", "relative_h1_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _pair(pred: torch.Tensor, target: torch.Tensor, min_dim: int) -> None:
    tensor("pred", pred, floating=True, min_dim=min_dim)
    tensor("target", target, floating=True, min_dim=min_dim)
    if pred.shape != target.shape:
        raise ArgumentError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                            f"{tuple(target.shape)}")


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    return v.mean() if reduction == "mean" else v.sum() if reduction == "sum" else v


def relative_lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0, reduction: str = "mean"
                     ) -> torch.Tensor:
    """Per-sample relative L^p error ``||pred - target||_p / ||target||_p`` (over all non-batch dims).

    pred, target: (batch, ...) of the same shape; reduction: 'mean' | 'sum' | 'none' over the batch.
    """
    _pair(pred, target, 2)
    p = positive("p", p)
    choice("reduction", reduction, _REDUCTIONS)
    diff = (pred - target).flatten(1).norm(p=p, dim=1)
    ref = target.flatten(1).norm(p=p, dim=1)
    return _reduce(diff / ref, reduction)


def _sq_h1(e: torch.Tensor, spatial: int) -> torch.Tensor:
    total = e.flatten(1).pow(2).sum(1)
    for d in range(e.dim() - spatial, e.dim()):
        n = e.shape[d]
        total = total + (torch.diff(e, dim=d) * n).flatten(1).pow(2).sum(1)
    return total


def relative_h1_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-sample relative H^1 error with forward-difference gradients along every spatial axis.

    pred, target: (batch, channels, *spatial) of the same shape (1 to 3 spatial dims).
    """
    _pair(pred, target, 3)
    choice("reduction", reduction, _REDUCTIONS)
    spatial = pred.dim() - 2
    if spatial > 3:
        raise ArgumentError(f"pred must have 1 to 3 spatial dims after (batch, channels), got shape {tuple(pred.shape)}")
    num = _sq_h1(pred - target, spatial).sqrt()
    den = _sq_h1(target, spatial).sqrt()
    return _reduce(num / den, reduction)
