"""Projected gradient descent (PGD) attacks and PGD adversarial training (Madry et al.; used by input-gradients,
boundary-tilting, contextual-fusion). The one gradient attacker of :mod:`gradkit.robustness`: FGSM is its
one-step preset, expectation over transformations (EOT) its ``transform`` option.

Untargeted PGD maximises the loss inside a norm ball around x (targeted PGD minimises it for target labels):

    delta_0 ~ U(ball) (random_start) or 0
    g = grad_delta (1/K) sum_k L(f(t_k(x + delta)), y)      (K = eot_samples draws of ``transform``; t = id)
    linf: delta <- clip_[-eps, eps](delta + s * step_size * sign(g))       s = +1 untargeted, -1 targeted
    l2:   delta <- proj_{||delta||_2 <= eps}(delta + s * step_size * g / ||g||_2)
    x_adv = clamp(x + delta, lo, hi)          (after every step, when ``clamp`` is given)

Bad input is an error, never silently repaired: ``eps < 0``; inputs outside the declared ``clamp`` range;
a model in train mode that has layers behaving differently in train mode (dropout, batch norm) unless
``train_mode=True`` says so (adversarial training does).

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

from .._validate import boolean, choice, nonneg_int, positive_int, real_scalar

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


# layers whose forward differs between train and eval mode
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def _check_mode(model: Callable[[Tensor], Tensor], train_mode: bool) -> None:
    if train_mode or not isinstance(model, nn.Module) or not model.training:
        return
    for name, m in model.named_modules():
        if m.training and isinstance(m, _MODE_DEPENDENT):
            raise ValueError(f"model is in train mode and its layer {name or type(m).__name__!r} "
                             f"({type(m).__name__}) behaves differently in train mode; call model.eval() "
                             f"before attacking, or pass train_mode=True to attack it in train mode on purpose")


def _check_range(x: Tensor, clamp: tuple[float, float] | None) -> None:
    if clamp is None or x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if lo < clamp[0] or hi > clamp[1]:
        raise ValueError(f"x must lie in the declared range clamp={clamp}, got values in [{lo:.6g}, {hi:.6g}]; "
                         f"pass the data's true range as clamp (or clamp=None) instead of clamping inputs")


def _check_transform(transform, eot_samples) -> int:
    eot_samples = positive_int("eot_samples", eot_samples)
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be None or a callable (x, generator) -> x, got "
                        f"{type(transform).__name__}")
    if transform is None and eot_samples != 1:
        raise ValueError(f"eot_samples must be 1 without a transform, got {eot_samples}")
    return eot_samples


def pgd_attack(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float, norm: str = "linf",
               steps: int = 10, step_size: float | None = None, random_start: bool = True,
               clamp: tuple[float, float] | None = None, loss_fn: LossFn | None = None,
               generator: torch.Generator | None = None, *, targeted: bool = False,
               transform: Callable[[Tensor, torch.Generator | None], Tensor] | None = None, eot_samples: int = 1,
               train_mode: bool = False) -> Tensor:
    """PGD adversarial examples in the ``norm`` ball of radius ``eps`` (input-gradients, boundary-tilting).

    linf step: delta + s * step_size * sign(g); l2 step: delta + s * step_size * g / ||g||; then projection
    onto the ball and ``clamp`` to the data range. s = +1 (untargeted: raise the loss of the true labels
    ``y``) or -1 (``targeted=True``: ``y`` are the target labels, their loss is lowered). ``step_size``
    defaults to 2.5 * eps / steps. With ``transform`` (a random map ``(x, generator) -> x``), g is the
    gradient of the loss averaged over ``eot_samples`` draws (expectation over transformations), computed
    in one batched forward of ``eot_samples * N`` inputs. Only the input gradient is computed
    (``torch.autograd.grad``): parameters' ``.grad`` is never touched.

    Errors: ``eps < 0``; ``x`` outside ``clamp``; an ``nn.Module`` in train mode with dropout / batch norm
    layers unless ``train_mode=True``. Returns a detached tensor shaped like ``x``.

    >>> x_adv = pgd_attack(model.eval(), x, y, eps=0.3, norm="linf", steps=10, clamp=(0.0, 1.0))
    >>> bool(((x_adv - x).abs() <= 0.3 + 1e-6).all())
    True
    """
    eps, norm, steps, step_size, clamp = _check_attack_args(eps, norm, steps, step_size, clamp)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating tensor of shape (N, ...), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"y must be a tensor with one entry per input ({x.shape[0]}), got "
                         f"{tuple(getattr(y, 'shape', ()))}")
    eot_samples = _check_transform(transform, eot_samples)
    _check_mode(model, boolean("train_mode", train_mode))
    sign = -1.0 if boolean("targeted", targeted) else 1.0
    _check_range(x, clamp)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    x = x.detach()
    y_rep = y if eot_samples == 1 else y.repeat(eot_samples, *([1] * (y.dim() - 1)))
    start = random_start and eps > 0
    delta = _random_start(x, eps, norm, generator) if start else torch.zeros_like(x)
    # per-coordinate bounds on delta: the data range (and, for linf, the ball): one in-place clamp per step
    if clamp is not None:
        r = eps if norm == "linf" else float("inf")
        lower, upper = (clamp[0] - x).clamp_(-r, 0.0), (clamp[1] - x).clamp_(0.0, r)
        if start:  # (zero lies inside the bounds: x is in range)
            delta = torch.clamp(delta, lower, upper)
    delta.requires_grad_(True)
    for _ in range(steps):
        with torch.enable_grad():
            xa = x + delta
            if transform is not None:
                xa = transform(xa if eot_samples == 1 else xa.repeat(eot_samples, *([1] * (x.dim() - 1))),
                               generator)
            loss = loss_fn(model(xa), y_rep)
            (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():  # in place: the step costs no allocations beyond the model's own
            if norm == "linf":
                delta.add_(g.sign_(), alpha=sign * step_size)
                if clamp is None:
                    delta.clamp_(-eps, eps)
            else:
                delta.add_(g.mul_((sign * step_size) / _row_norm(g).clamp_min_(torch.finfo(g.dtype).tiny)))
                delta.mul_(torch.clamp(eps / _row_norm(delta).clamp_min_(torch.finfo(g.dtype).tiny), max=1.0))
            if clamp is not None:
                torch.clamp(delta, lower, upper, out=delta)
    out = x + delta.detach()
    return out.clamp_(*clamp) if clamp is not None else out


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
    targeted: bool = False
    transform: Callable[[Tensor, torch.Generator | None], Tensor] | None = None
    eot_samples: int = 1

    def __post_init__(self) -> None:
        _check_attack_args(self.eps, self.norm, self.steps, self.step_size, self.clamp)
        boolean("targeted", self.targeted)
        _check_transform(self.transform, self.eot_samples)

    def __call__(self, model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                 generator: torch.Generator | None = None, loss_fn: LossFn | None = None, *,
                 train_mode: bool = False) -> Tensor:
        return pgd_attack(model, x, y, self.eps, self.norm, self.steps, self.step_size, self.random_start,
                          self.clamp, loss_fn=loss_fn, generator=generator, targeted=self.targeted,
                          transform=self.transform, eot_samples=self.eot_samples, train_mode=train_mode)


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
        x_adv = attack(model, x, y, generator=generator, loss_fn=lf, train_mode=True)  # training: on purpose
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
