"""Hessian and gradient alignment across training domains (paper slug: ``hessian-alignment``).

Hemati, Zhang, Estiri, Chen, "Understanding Hessian Alignment for Domain Generalization", ICCV 2023
(arXiv 2308.11778). With ``theta_h`` the classifier head's parameters, ``R_e`` domain ``e``'s loss and
``R = mean_e R_e`` the pooled loss::

    g_e = grad_{theta_h} R_e                      g = grad_{theta_h} R  (= mean_e g_e)
    HGP:        h_e = H_e g_e = grad_{theta_h} (1/2)||g_e||^2   (= ||g_e|| grad ||g_e||)
    Hutchinson: h_e = diag(H_e) ~ (1/K) sum_k z_k * (H_e z_k),  z_k Rademacher,  H_e z = grad <g_e, z>
    penalty = (1/E) sum_e [ alpha ||h_e - sg(h)||^2 + beta ||g_e - sg(g)||^2 ],  h from R likewise
    loss    = R + penalty          (every parameter is trained; sg = stop-gradient, optional)

Only the head enters ``g`` and ``h``; the penalty is differentiated through them (create_graph), so it
also trains the featurizer. Helpers: :func:`risk_variance` (the V-REx penalty) and
:func:`penalty_anneal` (the IRM-style warm-up of the penalty weight). The Hessian-vector products
(:func:`hessian_gradient_product`, :func:`hutchinson_diag`, :func:`head_hessian`) live in
:mod:`gradkit.curvature.hessian` and are re-exported here.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._validate import choice, integer, optional_generator, real_scalar
from ..curvature.hessian import (differentiable_params, exact_hessian_diag, head_hessian, hessian_gradient_product,
                                 hgp_from_grads, hutchinson_diag, hutchinson_from_probes, loss_grads,
                                 rademacher_probes, scalar_loss)

__all__ = ["HessianAlignment", "hessian_gradient_product", "hutchinson_diag", "head_hessian",
           "risk_variance", "penalty_anneal", "METHODS"]

METHODS = ("hgp", "hutchinson", "exact_diag")
REDUCTIONS = ("mean", "sum")


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} must be finite, got {t.detach().reshape(-1)[0].item()!r}")


# ------------------------------------------------------------------------------- the regulariser
class HessianAlignment:
    """Penalty aligning head gradients and head Hessians across domains (paper slug: ``hessian-alignment``).

    ``penalty = red_e [ alpha ||h_e - h||^2 + beta ||g_e - g||^2 ]`` with ``g_e = grad R_e`` and
    ``h_e = H_e g_e`` (``method="hgp"``), a Hutchinson estimate of ``diag(H_e)`` with ``n_samples``
    Rademacher probes (``"hutchinson"``) or the exact ``diag(H_e)`` (``"exact_diag"``, ``P`` products
    for ``P`` head parameters: small heads only); ``g``/``h`` are the same quantities for the pooled
    loss ``R = mean_e R_e`` (``h = H g``, not the mean of the ``h_e``), stop-gradient when
    ``detach_mean``. ``red`` is the mean over domains (``reduction="mean"``, the paper's formula) or
    the sum (``"sum"``, the official Colored-MNIST script). Official DomainBed weights: HGP
    ``alpha=1e-4, beta=5e-3``; Hutchinson ``alpha=1e-3, beta=5e-3``, ``n_samples=300``.

    Hutchinson probes are shared by all domains (``shared_probes=True``): the pooled estimate is then
    exactly the mean of the domain estimates (``H z = mean_e H_e z``), which costs nothing extra and
    makes ``h_e - h`` an unbiased estimate of ``diag(H_e - H)``. ``shared_probes=False`` draws fresh
    probes for every domain and for the pooled loss, as the official code does.

    ``__call__(domain_losses)`` returns ``(penalty, stats)``; ``stats`` holds detached tensors
    ``grad_term`` and ``hessian_term`` (the reduced squared distances, before ``beta``/``alpha``;
    ``hessian_term`` is 0 when ``alpha=0``, where it is not computed). Compute each domain's loss
    from its own forward pass (no batch-norm statistics mixed); the call itself runs with grad
    enabled, so it also works inside ``torch.no_grad()`` on losses built outside it.

    Example::

        >>> reg = HessianAlignment(model.head.parameters(), alpha=1e-4, beta=5e-3, method="hgp")
        >>> losses = [F.cross_entropy(model(x), y) for x, y in domain_batches]
        >>> penalty, stats = reg(losses); (torch.stack(losses).mean() + penalty).backward()
    """

    def __init__(self, head_params: Tensor | Iterable[Tensor], alpha: float, beta: float,
                 method: str = "hgp", n_samples: int = 100, detach_mean: bool = True,
                 reduction: str = "mean", generator: torch.Generator | None = None,
                 shared_probes: bool = True, vectorize: bool = True, check_finite: bool = True) -> None:
        self.params = differentiable_params(head_params, "head_params")
        self.alpha = real_scalar("alpha", alpha, nonneg=True, tensor_ok=False)
        self.beta = real_scalar("beta", beta, nonneg=True, tensor_ok=False)
        self.method = choice("method", method, METHODS)
        self.n_samples = integer("n_samples", n_samples, low=1)
        self.reduction = choice("reduction", reduction, REDUCTIONS)
        optional_generator(generator)
        self.generator = generator
        self.detach_mean = bool(detach_mean)
        self.shared_probes = bool(shared_probes)
        self.vectorize = bool(vectorize)
        self.check_finite = bool(check_finite)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        extra = f", n_samples={self.n_samples}" if self.method == "hutchinson" else ""
        return (f"HessianAlignment(method={self.method!r}, alpha={self.alpha:g}, beta={self.beta:g}"
                f"{extra}, detach_mean={self.detach_mean}, reduction={self.reduction!r}, head_params={n})")

    def _domain_losses(self, domain_losses: Sequence[Tensor]) -> list[Tensor]:
        if isinstance(domain_losses, Tensor) or not isinstance(domain_losses, Sequence):
            raise TypeError("domain_losses must be a list of scalar loss tensors (one per domain), "
                            f"got {type(domain_losses).__name__}")
        if len(domain_losses) < 2:
            raise ValueError(f"domain_losses needs at least 2 domains, got {len(domain_losses)}")
        losses = [scalar_loss(l, f"domain_losses[{i}]") for i, l in enumerate(domain_losses)]
        if self.check_finite:
            for i, l in enumerate(losses):
                _check_finite(l, f"domain_losses[{i}]")
        return losses

    def _curvature(self, grads: Sequence[Tensor], create_graph: bool,
                   probes: list[Tensor] | None) -> list[Tensor]:
        if self.method == "hgp":
            return list(hgp_from_grads(grads, self.params, create_graph))
        if self.method == "exact_diag":
            return exact_hessian_diag(grads, self.params, create_graph)
        if probes is None:
            probes = rademacher_probes(self.params, self.n_samples, self.generator)
        return hutchinson_from_probes(grads, self.params, probes, create_graph, self.vectorize)

    @torch.enable_grad()
    def __call__(self, domain_losses: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        losses = self._domain_losses(domain_losses)
        need_h = self.alpha > 0
        grads = [loss_grads(l, self.params, f"domain_losses[{i}]") for i, l in enumerate(losses)]
        # the pooled gradient is the mean of the domain gradients (linearity): no extra backward
        g_bar = [torch.stack(gs).mean(0) for gs in zip(*grads)]
        g_bar_ref = [g.detach() for g in g_bar] if self.detach_mean else g_bar
        grad_terms = torch.stack([sum((g - m).pow(2).sum() for g, m in zip(ge, g_bar_ref)) for ge in grads])
        if need_h:
            shared = (rademacher_probes(self.params, self.n_samples, self.generator)
                      if self.method == "hutchinson" and self.shared_probes else None)
            h = [self._curvature(ge, True, shared) for ge in grads]
            if shared is not None or self.method == "exact_diag":
                # pooled diagonal (estimate) = mean of the domain ones, exactly, with shared probes
                h_bar = [torch.stack(hs).mean(0) for hs in zip(*h)]
            else:
                h_bar = self._curvature(g_bar, not self.detach_mean, None)
            if self.detach_mean:
                h_bar = [x.detach() for x in h_bar]
            hess_terms = torch.stack([sum((a - b).pow(2).sum() for a, b in zip(he, h_bar)) for he in h])
        else:  # alpha = 0: the curvature term is not computed (reported as 0)
            hess_terms = torch.zeros_like(grad_terms)
        reduce = torch.mean if self.reduction == "mean" else torch.sum
        grad_term, hess_term = reduce(grad_terms), reduce(hess_terms)
        penalty = self.beta * grad_term + self.alpha * hess_term
        return penalty, {"grad_term": grad_term.detach(), "hessian_term": hess_term.detach()}


# ------------------------------------------------------------------------- baselines, schedules
def risk_variance(domain_losses: Sequence[Tensor]) -> Tensor:
    """Variance of the domain risks, the V-REx penalty ``(1/E) sum_e (R_e - mean R)^2``.

    Paper slug: ``hessian-alignment`` (its V-REx baseline; Krueger et al. 2021). For two domains it
    equals ``(R_1 - R_2)^2 / 4``.

    Example::

        >>> losses = [F.cross_entropy(model(x), y) for x, y in domain_batches]
        >>> loss = torch.stack(losses).mean() + 10.0 * risk_variance(losses)
    """
    if isinstance(domain_losses, Tensor) or not isinstance(domain_losses, Sequence):
        raise TypeError("domain_losses must be a list of scalar loss tensors, "
                        f"got {type(domain_losses).__name__}")
    if len(domain_losses) < 2:
        raise ValueError(f"domain_losses needs at least 2 domains, got {len(domain_losses)}")
    vals = []
    for i, l in enumerate(domain_losses):
        if not isinstance(l, Tensor) or l.numel() != 1 or not l.is_floating_point():
            raise ValueError(f"domain_losses[{i}] must be a floating-point scalar tensor, got "
                             f"{type(l).__name__}{'' if not isinstance(l, Tensor) else tuple(l.shape)}")
        vals.append(l.reshape(()))
    r = torch.stack(vals)
    return (r - r.mean()).pow(2).mean()


def penalty_anneal(step: int, anneal_iters: int, weight: float, rescale: bool = True,
                   initial: float = 1.0) -> tuple[float, float]:
    """IRM-style penalty warm-up: ``(penalty_weight, loss_scale)`` at an optimizer step.

    Paper slug: ``hessian-alignment`` (the Colored-MNIST protocol shared with IRM, V-REx, Fishr)::

        w = initial if step < anneal_iters else weight
        loss = s * (risk + w * penalty),   s = 1 / w if rescale and w > 1 else 1

    Example::

        >>> w, s = penalty_anneal(step, anneal_iters=190, weight=91257.19)
        >>> loss = s * (risk + w * penalty)
    """
    step = integer("step", step, low=0)
    anneal_iters = integer("anneal_iters", anneal_iters, low=0)
    weight = real_scalar("weight", weight, nonneg=True, tensor_ok=False)
    initial = real_scalar("initial", initial, nonneg=True, tensor_ok=False)
    w = initial if step < anneal_iters else weight
    s = 1.0 / w if rescale and w > 1.0 else 1.0
    return w, s

