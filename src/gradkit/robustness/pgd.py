"""Projected gradient descent (PGD) attacks and PGD adversarial training (Madry et al.; used by input-gradients).

Untargeted PGD maximises the loss inside a norm ball around x:

    delta_0 ~ U(ball) (random_start) or 0
    linf: delta <- clip_[-eps, eps](delta + step_size * sign(grad_delta L(f(x + delta), y)))
    l2:   delta <- proj_{||delta||_2 <= eps}(delta + step_size * g / ||g||_2)
    x_adv = clamp(x + delta, lo, hi)          (after every step, when ``clamp`` is given)

Adversarial training minimises E[L(f(x_adv), y)]; :func:`adversarial_loss` turns an attack into the
``compute_loss`` of :func:`gradkit.engine.fit`, so adversarial training runs in the one training loop.

>>> attack = PGD(eps=0.1, norm="linf", steps=8, step_size=0.025, clamp=(0.0, 1.0))
>>> x_adv = attack(model, x, y)                               # same shape as x, ||x_adv - x||_inf <= 0.1
>>> hist = pgd_train(model, opt, TensorBatches(x, y, batch_size=64), epochs=5, attack=attack)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import choice, nonneg_int, positive_int, real_scalar

NORMS = ("linf", "l2")
LossFn = Callable[[Tensor, Tensor], Tensor]


def _check_attack_args(eps, norm, steps, step_size, clamp) -> tuple[float, str, int, float, tuple | None]:
    eps = real_scalar("eps", eps, nonneg=True)
    choice("norm", norm, NORMS)
    steps = nonneg_int("steps", steps)
    step_size = 2.5 * eps / max(steps, 1) if step_size is None else real_scalar("step_size", step_size, nonneg=True)
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError(f"clamp must be None or a pair (lo, hi), got {clamp!r}")
        lo, hi = real_scalar("clamp[0]", clamp[0]), real_scalar("clamp[1]", clamp[1])
        if lo > hi:
            raise ValueError(f"clamp must satisfy lo <= hi, got {clamp!r}")
        clamp = (lo, hi)
    return eps, norm, steps, step_size, clamp


def _row_norm(t: Tensor) -> Tensor:
    """Per-example l2 norm shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    dev = x.device if generator is None else generator.device
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=dev)
        return ((2 * u - 1) * eps).to(x.device)
    # uniform in the l2 ball: gaussian direction, radius eps * U^(1/d)
    d = x[0].numel()
    g = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=dev)
    r = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype, device=dev) ** (1.0 / d)
    g = g / _row_norm(g).clamp_min(torch.finfo(x.dtype).tiny)
    return (g * (eps * r).reshape(-1, *([1] * (x.dim() - 1)))).to(x.device)


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _row_norm(delta)
    return delta * torch.clamp(eps / n.clamp_min(torch.finfo(delta.dtype).tiny), max=1.0)


def pgd_attack(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float, norm: str = "linf",
               steps: int = 10, step_size: float | None = None, random_start: bool = True,
               clamp: tuple[float, float] | None = None, loss_fn: LossFn | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Untargeted PGD adversarial examples in the ``norm`` ball of radius ``eps`` (input-gradients).

    linf step: delta + step_size * sign(g); l2 step: delta + step_size * g / ||g||; then projection onto
    the ball and ``clamp`` to the data range. ``step_size`` defaults to 2.5 * eps / steps. Only the
    input gradient is computed (``torch.autograd.grad``): parameters' ``.grad`` is never touched, and the
    model is used in whatever train/eval mode it is in. Returns a detached tensor shaped like ``x``.

    >>> x_adv = pgd_attack(model, x, y, eps=0.3, norm="linf", steps=10, clamp=(0.0, 1.0))
    >>> bool(((x_adv - x).abs() <= 0.3 + 1e-6).all())
    True
    """
    eps, norm, steps, step_size, clamp = _check_attack_args(eps, norm, steps, step_size, clamp)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating tensor of shape (N, ...), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must be a tensor with one entry per input ({x.shape[0]}), got "
                         f"{tuple(getattr(y, 'shape', ()))}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    x = x.detach()
    delta = _random_start(x, eps, norm, generator) if (random_start and eps > 0) else torch.zeros_like(x)
    if clamp is not None:
        delta = (x + delta).clamp(*clamp) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x + delta), y)
            (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                delta = delta + step_size * g.sign()
            else:
                delta = delta + step_size * g / _row_norm(g).clamp_min(torch.finfo(g.dtype).tiny)
            delta = _project(delta, eps, norm)
            if clamp is not None:
                delta = (x + delta).clamp(*clamp) - x
    return (x + delta).detach()


@dataclass(frozen=True)
class PGD:
    """A PGD attack preset: every knob an explicit field; ``attack(model, x, y)`` runs it (input-gradients).

    >>> attack = PGD(eps=0.45, norm="linf", steps=8, step_size=0.1125, random_start=False, clamp=(-1.0, 1.0))
    >>> x_adv = attack(model, x, y)
    """

    eps: float
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    clamp: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        _check_attack_args(self.eps, self.norm, self.steps, self.step_size, self.clamp)

    def __call__(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                 generator: torch.Generator | None = None, loss_fn: LossFn | None = None) -> Tensor:
        return pgd_attack(model, x, y, self.eps, self.norm, self.steps, self.step_size, self.random_start,
                          self.clamp, loss_fn=loss_fn, generator=generator)


def adversarial_loss(attack: PGD, loss_fn: LossFn | None = None,
                     generator: torch.Generator | None = None) -> Callable[[nn.Module, tuple], Tensor]:
    """``compute_loss`` for :func:`gradkit.engine.fit`: L(f(x_adv), y) with x_adv = attack(f, x, y) (input-gradients).

    >>> fit(model, opt, batches, epochs=10, compute_loss=adversarial_loss(PGD(eps=0.1)))
    """
    if not isinstance(attack, PGD):
        raise TypeError(f"attack must be a PGD preset, got {type(attack).__name__}")
    lf = F.cross_entropy if loss_fn is None else loss_fn

    def compute_loss(model: nn.Module, batch) -> Tensor:
        x, y = batch[0], batch[1]
        x_adv = attack(model, x, y, generator=generator, loss_fn=lf)
        return lf(model(x_adv), y)

    return compute_loss


def pgd_train(model: nn.Module, optimizer: torch.optim.Optimizer, batches, *, epochs: int, attack: PGD,
              loss_fn: LossFn | None = None, generator: torch.Generator | None = None, **fit_kwargs):
    """PGD adversarial training through :func:`gradkit.engine.fit`; returns its ``History`` (input-gradients).

    min_theta E[ max_{||delta|| <= eps} L(f_theta(x + delta), y) ], the inner max by ``attack``.
    ``fit_kwargs`` go to ``fit`` (evaluate, scheduler, progress, desc, ...).

    >>> hist = pgd_train(model, opt, TensorBatches(x, y, batch_size=64), epochs=5, attack=PGD(eps=0.1))
    """
    from ..engine import fit

    if "compute_loss" in fit_kwargs:
        raise ValueError("pgd_train sets compute_loss itself; pass loss_fn instead")
    return fit(model, optimizer, batches, epochs=epochs,
               compute_loss=adversarial_loss(attack, loss_fn=loss_fn, generator=generator), **fit_kwargs)


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: PGD, batch_size: int = 1024,
                    generator: torch.Generator | None = None) -> float:
    """Top-1 accuracy in percent on ``attack``'s adversarial examples (eval mode, restored) (input-gradients).

    >>> robust_accuracy(model, x_test, y_test, PGD(eps=0.1, steps=10))
    """
    if not isinstance(attack, PGD):
        raise TypeError(f"attack must be a PGD preset, got {type(attack).__name__}")
    batch_size = positive_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            xa = attack(model, xb, yb, generator=generator)
            with torch.no_grad():
                correct += int((model(xa).argmax(-1) == yb).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / max(len(x), 1)


__all__ = ["NORMS", "PGD", "pgd_attack", "adversarial_loss", "pgd_train", "robust_accuracy"]
