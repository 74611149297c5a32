"""Fast gradient sign method (FGSM; Goodfellow et al.) as the one-step preset of PGD (boundary-tilting).

    linf: x_adv = clamp(x + s * eps * sign(grad_x L(f(x), y)))
    l2:   x_adv = clamp(x + s * eps * g / ||g||_2)           (the fast gradient method)
    s = +1 untargeted (y: true labels), -1 targeted (y: target labels)

The same code path as :func:`gradkit.robustness.pgd.pgd_attack` (one step, step size eps, no random
start), so the same checks apply: ``eps >= 0``, inputs inside ``clamp``, no silent train mode.

>>> x_adv = fgsm(model.eval(), x, y, eps=0.1, clamp=(0.0, 1.0))
>>> attack = FGSM(eps=0.1, clamp=(0.0, 1.0)); robust_accuracy(model, x, y, attack)
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .pgd import PGD, LossFn, pgd_attack


def FGSM(eps: float, norm: str = "linf", clamp: tuple[float, float] | None = None, targeted: bool = False) -> PGD:
    """A :class:`~gradkit.robustness.pgd.PGD` preset that is FGSM: one step of size ``eps``, no random start.

    >>> attack = FGSM(eps=0.1, clamp=(0.0, 1.0))
    >>> attack.steps, attack.step_size, attack.random_start
    (1, 0.1, False)
    """
    return PGD(eps=eps, norm=norm, steps=1, step_size=eps, random_start=False, clamp=clamp, targeted=targeted)


def fgsm(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float, norm: str = "linf",
         clamp: tuple[float, float] | None = None, loss_fn: LossFn | None = None, *, targeted: bool = False,
         train_mode: bool = False) -> Tensor:
    """FGSM adversarial examples (one signed-gradient step of size ``eps``; see the module docstring).

    >>> x_adv = fgsm(model.eval(), x, y, eps=0.1)
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
    True
    """
    return pgd_attack(model, x, y, eps, norm=norm, steps=1, step_size=eps, random_start=False, clamp=clamp,
                      loss_fn=loss_fn, targeted=targeted, train_mode=train_mode)


__all__ = ["FGSM", "fgsm"]
