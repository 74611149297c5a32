"""Per-layer signal-to-noise ratio of mini-batch gradients over an epoch: drift vs diffusion (info-plane).

Shwartz-Ziv & Tishby (2017) follow, for each weight matrix W_l, the mini-batch gradients g_b of one
epoch: early the mean dominates its batch-to-batch fluctuation (drift), later the fluctuation
dominates (diffusion), and they place the onset of compression at the crossover::

    mean_norm = || mean_b g_b ||_F     std_norm = || std_b g_b ||_F     ratio = mean_norm / std_norm

(std element-wise over the epoch's batches, population form; the paper plots both norms divided by
||W_l||_F, ``weight_norm`` here.) Running moments (Welford), so no gradient is kept.

>>> snr = GradientSNR(model)                                    # every weight matrix (dim >= 2)
>>> fit(model, opt, batches, epochs=100, before_step=snr.before_step, on_epoch_end=snr.on_epoch_end)
>>> snr.history["0.weight"]["ratio"]                            # one value per epoch
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .._validate import ArgumentError

__all__ = ["GradientSNR", "SNRStats"]


@dataclass(frozen=True)
class SNRStats:
    """One parameter's gradient statistics over one epoch (norms are Frobenius norms)."""

    mean_norm: float
    std_norm: float
    ratio: float  # mean_norm / std_norm (inf when every batch gave the same gradient)
    weight_norm: float
    batches: int


class GradientSNR:
    """Mean and fluctuation of each selected parameter's mini-batch gradients per epoch (info-plane).

    Call :meth:`accumulate` after every ``backward()`` (it reads ``.grad``; with ``gradkit.engine.fit``
    pass ``before_step=snr.before_step``) and :meth:`end_epoch` at the end of an epoch (``fit``'s
    ``on_epoch_end=snr.on_epoch_end``), which returns ``{name: SNRStats}`` and appends them to
    :attr:`history`. param_filter: ``f(name, param) -> bool`` choosing the parameters (default: the
    trainable ones with at least 2 dims, i.e. weight matrices and kernels). No hooks are installed.

    >>> snr = GradientSNR(model)
    >>> for x, y in batches: opt.zero_grad(); loss(model(x), y).backward(); snr.accumulate(); opt.step()
    >>> snr.end_epoch()["0.weight"].ratio
    """

    def __init__(self, model: nn.Module, param_filter: Callable[[str, torch.Tensor], bool] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        if param_filter is not None and not callable(param_filter):
            raise ArgumentError(f"param_filter must be callable(name, param) -> bool or None, got "
                                f"{type(param_filter).__name__}")
        keep = param_filter or (lambda name, p: p.dim() >= 2)
        self.params: dict[str, torch.Tensor] = {n: p for n, p in model.named_parameters()
                                                if p.requires_grad and keep(n, p)}
        if not self.params:
            raise ArgumentError("param_filter selected no trainable parameter of the model")
        self.history: dict[str, dict[str, list[float]]] = {
            n: {"mean_norm": [], "std_norm": [], "ratio": [], "weight_norm": []} for n in self.params}
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._mean: list[torch.Tensor] | None = None
        self._m2: list[torch.Tensor] | None = None

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the current ``.grad`` of every selected parameter to this epoch's running moments."""
        grads = []
        for name, p in self.params.items():
            if p.grad is None:
                raise RuntimeError(f"parameter {name!r} has no .grad: call accumulate() after backward()")
            grads.append(p.grad.detach().to(torch.promote_types(p.grad.dtype, torch.float32)))
        self._count += 1
        if self._mean is None:
            self._mean = [g.clone() for g in grads]
            self._m2 = [torch.zeros_like(g) for g in grads]
            return
        # Welford: delta = g - mean; mean += delta / n; m2 += delta * (g - mean)
        delta = torch._foreach_sub(grads, self._mean)
        torch._foreach_add_(self._mean, delta, alpha=1.0 / self._count)
        torch._foreach_addcmul_(self._m2, delta, torch._foreach_sub(grads, self._mean))

    def before_step(self, step: int) -> None:
        """``gradkit.engine.fit``'s ``before_step`` hook: :meth:`accumulate`."""
        self.accumulate()

    @torch.no_grad()
    def end_epoch(self) -> dict[str, SNRStats]:
        """The epoch's statistics per parameter (appended to :attr:`history`); starts a new epoch."""
        if self._count < 2:
            raise RuntimeError(f"end_epoch needs the gradients of at least 2 batches to measure their spread, "
                               f"got {self._count}")
        out = {}
        for (name, p), mu, m2 in zip(self.params.items(), self._mean, self._m2):
            mean_norm = float(torch.linalg.vector_norm(mu))
            std_norm = float(torch.linalg.vector_norm((m2 / self._count).clamp_(min=0.0).sqrt_()))
            ratio = mean_norm / std_norm if std_norm > 0 else float("inf")
            st = SNRStats(mean_norm, std_norm, ratio, float(torch.linalg.vector_norm(p.detach().float())),
                          self._count)
            out[name] = st
            h = self.history[name]
            for k in ("mean_norm", "std_norm", "ratio", "weight_norm"):
                h[k].append(getattr(st, k))
        self._reset()
        return out

    def on_epoch_end(self, epoch: int, history: Any = None) -> None:
        """``gradkit.engine.fit``'s ``on_epoch_end`` hook: :meth:`end_epoch`."""
        self.end_epoch()
