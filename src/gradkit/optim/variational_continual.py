"""The variational continual-learning objective for field-binary networks (paper slug: ``continual-binary``).

The posterior of task t-1 is the prior of task t: minimise  data loss + kl_weight * KL(q_theta || q_ref).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._validate import choice, real_scalar
from ..nn.field_binary import field_kl, field_modules

__all__ = ["VariationalContinual", "REFERENCES"]

REFERENCES = ("task", "step")


class VariationalContinual:
    """Keeps the KL reference fields of a field-binary model and returns the KL term to add to the loss.

    Paper slug: continual-binary. Objective for task t (minimised over the fields theta):
    L_t = data loss + kl_weight * KL(q_theta || q_ref), KL the exact binary KL of
    :func:`gradkit.nn.field_binary.field_kl` (gradient beta^2 (theta - theta_ref) sigma: confident
    weights, sigma -> 0, become hard to move).

    reference="task": theta_ref is the previous task's posterior (call :meth:`end_task` at each task
    boundary); the first task's reference is theta = 0, the uniform prior. With a mean data loss over
    |D_t| examples, ``kl_weight = 1 / |D_t|`` adds one KL per epoch (the variational free energy per example).
    reference="step": theta_ref is the fields before the last optimiser step (call :meth:`before_step` just
    before ``optimizer.step()``, e.g. from ``fit(before_step=...)``): the online prior of the official
    deep-network code, whose KL gradient is beta^2 sigma (theta_t - theta_{t-1}).

    >>> net = nn.Sequential(FieldBinaryLinear(8, 4))          # from gradkit.nn.field_binary
    >>> vc = VariationalContinual(net, reference="task", kl_weight=1e-2)
    >>> loss = net(torch.randn(16, 8)).square().mean() + vc.penalty()
    >>> vc.end_task()                                          # task boundary: posterior -> prior
    """

    def __init__(self, model: nn.Module, reference: str = "task", kl_weight: float = 1.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.layers = field_modules(model)
        if not self.layers:
            raise ValueError("model has no FieldBinaryLinear layers (gradkit.nn.field_binary)")
        self.reference = choice("reference", reference, REFERENCES)
        self.kl_weight = real_scalar("kl_weight", kl_weight, nonneg=True)
        self.tasks_done = 0
        if reference == "task":
            self.reference_thetas = [torch.zeros_like(m.theta, requires_grad=False) for m in self.layers]
        else:
            self.reference_thetas = self._snapshot()

    def _snapshot(self) -> list[Tensor]:
        return [m.theta.detach().clone() for m in self.layers]

    def kl(self) -> Tensor:
        """KL(q_theta || q_ref) summed over every binary weight, each layer at its own beta."""
        total = self.layers[0].theta.new_zeros(())
        for m, ref in zip(self.layers, self.reference_thetas):
            total = total + field_kl(m.theta, ref, beta=m.beta)
        return total

    def penalty(self) -> Tensor:
        """kl_weight * KL(q_theta || q_ref): add it to the data loss before ``backward``."""
        return self.kl_weight * self.kl()

    def before_step(self, step: Any = None) -> None:
        """With reference="step": remember the fields the coming optimiser step starts from (else nothing)."""
        if self.reference == "step":
            self.reference_thetas = self._snapshot()

    def end_task(self) -> None:
        """With reference="task": the current fields (the task's posterior) become the next task's prior."""
        self.tasks_done += 1
        if self.reference == "task":
            self.reference_thetas = self._snapshot()

    def __repr__(self) -> str:
        return (f"VariationalContinual(layers={len(self.layers)}, reference={self.reference!r}, "
                f"kl_weight={self.kl_weight:.4g}, tasks_done={self.tasks_done})")

