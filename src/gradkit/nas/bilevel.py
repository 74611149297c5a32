"""DARTS-style bi-level search: alternate an architecture step on a validation batch and a weight step on a
training batch, first or second order (paper slug: tanglenas).

    arch step:    alpha <- a_opt(grad_alpha L_val(w', alpha) + regulariser(alpha))
                  order 1: w' = w
                  order 2: w' = w - xi * grad_w L_train(w, alpha), xi = the weight optimiser's current lr, and
                           grad_alpha L_val(w', alpha) - xi * [grad_alpha L_train(w+, alpha) - grad_alpha
                           L_train(w-, alpha)] / (2 eps),  w+- = w +- eps * grad_w' L_val(w', alpha),
                           eps = 0.01 / ||grad_w' L_val(w', alpha)||   (finite-difference Hessian-vector product)
    weight step:  w <- w_opt(grad_w L_train(w, alpha))

The virtual step of order 2 is a plain gradient step (no momentum or weight decay), and the finite
difference is exact for losses quadratic in w. With a sampling ``ArchParams`` (drnas, gdas) every loss
evaluation draws a new sample, so order 2's finite difference is noisy there: use order 1 (as the papers do).

Example::

    searcher = BilevelSearcher(supernet, supernet.arch, torch.optim.SGD(supernet.weights(), lr=0.025),
                               torch.optim.Adam(supernet.arch.parameters(), lr=3e-4), order=1)
    losses = searcher.step((x_train, y_train), (x_val, y_val))      # {"train_loss": ..., "val_loss": ...}
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._validate import ArgumentError, choice, param_list, positive
from ..engine import default_loss


def _set_grads(params: list[torch.Tensor], grads: Iterable[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach()   # an unused parameter is left alone, as by backward()


class BilevelSearcher:
    """One bi-level search step at a time: ``step(train_batch, val_batch)`` (tanglenas; DARTS v1/v2).

    model: the supernet (its forward reads the architecture parameters); arch_params: an ``nn.Module``
    (e.g. :class:`gradkit.nas.arch.ArchParams`, or a container of them; every submodule with a
    ``regularizer()`` adds it to the architecture loss) or tensors; w_opt / a_opt: optimisers of the
    weights and of the architecture parameters (disjoint); order: 1 (first-order) or 2 (unrolled);
    loss_fn(model, batch): default cross-entropy of ``(x, y)``; eps: the finite-difference scale (0.01).
    """

    def __init__(self, model: nn.Module, arch_params: nn.Module | Iterable[torch.Tensor],
                 w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer, order: int = 1,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] = default_loss, eps: float = 0.01) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, opt in (("w_opt", w_opt), ("a_opt", a_opt)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise ArgumentError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        self.order = choice("order", order, (1, 2))
        self.eps = positive("eps", eps)
        if not callable(loss_fn):
            raise ArgumentError(f"loss_fn must be callable (model, batch) -> loss, got {type(loss_fn).__name__}")
        self.model, self.w_opt, self.a_opt, self.loss_fn = model, w_opt, a_opt, loss_fn
        self._reg_modules = [m for m in arch_params.modules() if callable(getattr(m, "regularizer", None))] \
            if isinstance(arch_params, nn.Module) else []
        self.alphas = param_list(arch_params.parameters() if isinstance(arch_params, nn.Module) else arch_params,
                                 "BilevelSearcher's arch_params")
        self.weights = param_list(w_opt.param_groups, "w_opt")
        a_ids = {id(p) for p in self.alphas}
        if any(id(p) in a_ids for p in self.weights):
            raise ArgumentError("w_opt must not hold architecture parameters: arch_params and w_opt's parameters "
                                "overlap")
        if {id(p) for p in param_list(a_opt.param_groups, "a_opt")} != a_ids:
            raise ArgumentError("a_opt must optimise exactly the architecture parameters (arch_params)")

    def _arch_loss(self, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        for m in self._reg_modules:
            loss = loss + m.regularizer()
        return loss

    def _alpha_grads_first(self, val_batch: Any) -> tuple[list, float]:
        loss = self._arch_loss(val_batch)
        return list(torch.autograd.grad(loss, self.alphas, allow_unused=True)), float(loss.detach())

    def _alpha_grads_second(self, train_batch: Any, val_batch: Any) -> tuple[list, float]:
        ws, alphas = self.weights, self.alphas
        xi = float(self.w_opt.param_groups[0]["lr"])
        g_train = torch.autograd.grad(self.loss_fn(self.model, train_batch), ws, allow_unused=True)
        backup = [w.detach().clone() for w in ws]
        try:
            with torch.no_grad():
                for w, g in zip(ws, g_train):
                    if g is not None:
                        w.sub_(xi * g)                                      # virtual step w'
            loss = self._arch_loss(val_batch)
            grads = torch.autograd.grad(loss, alphas + ws, allow_unused=True)
            d_alpha, d_w = grads[:len(alphas)], grads[len(alphas):]
            d_w = [torch.zeros_like(w) if g is None else g for w, g in zip(ws, d_w)]
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in d_w))
            eps = self.eps / max(float(norm), 1e-12)
            hvp = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for w, b, g in zip(ws, backup, d_w):
                        w.copy_(b + sign * eps * g)
                hvp.append(torch.autograd.grad(self.loss_fn(self.model, train_batch), alphas, allow_unused=True))
        finally:
            with torch.no_grad():
                for w, b in zip(ws, backup):
                    w.copy_(b)
        out = []
        for a, da, gp, gm in zip(alphas, d_alpha, *hvp):
            da = torch.zeros_like(a) if da is None else da
            h = (torch.zeros_like(a) if gp is None else gp) - (torch.zeros_like(a) if gm is None else gm)
            out.append(da - xi * h / (2 * eps))
        return out, float(loss.detach())

    def step(self, train_batch: Any, val_batch: Any) -> dict[str, float]:
        """One architecture step on ``val_batch``, then one weight step on ``train_batch``; returns both losses."""
        if self.order == 1:
            g_alpha, val_loss = self._alpha_grads_first(val_batch)
        else:
            g_alpha, val_loss = self._alpha_grads_second(train_batch, val_batch)
        self.a_opt.zero_grad(set_to_none=True)
        _set_grads(self.alphas, g_alpha)
        self.a_opt.step()
        loss = self.loss_fn(self.model, train_batch)
        g_w = torch.autograd.grad(loss, self.weights, allow_unused=True)
        self.w_opt.zero_grad(set_to_none=True)
        _set_grads(self.weights, g_w)
        self.w_opt.step()
        return {"train_loss": float(loss.detach()), "val_loss": val_loss}


__all__ = ["BilevelSearcher"]
