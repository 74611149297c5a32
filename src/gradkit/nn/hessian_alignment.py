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
also trains the featurizer. Helpers: :func:`hessian_gradient_product`, :func:`hutchinson_diag`,
:func:`head_hessian` (the exact Hessian, for checks and small heads), :func:`risk_variance` (the
V-REx penalty) and :func:`penalty_anneal` (the IRM-style warm-up of the penalty weight).
"""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._validate import real_scalar

__all__ = ["HessianAlignment", "hessian_gradient_product", "hutchinson_diag", "head_hessian",
           "risk_variance", "penalty_anneal", "METHODS"]

METHODS = ("hgp", "hutchinson", "exact_diag")
REDUCTIONS = ("mean", "sum")


# ------------------------------------------------------------------------------------ validation
def _params(params: Tensor | Iterable[Tensor], name: str = "params") -> list[Tensor]:
    """Distinct floating-point tensors that require grad, from a tensor or an iterable of tensors."""
    if isinstance(params, Tensor):
        items = [params]
    else:
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"{name} must be a tensor or an iterable of tensors, "
                            f"got {type(params).__name__}") from None
    out: list[Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(items):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"{name}[{i}] must be a floating-point tensor, got dtype {p.dtype}")
        if not p.requires_grad:
            raise ValueError(f"{name}[{i}] (shape {tuple(p.shape)}) does not require grad")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError(f"{name} is empty: pass the classifier head's parameters")
    return out


def _scalar_loss(loss: object, name: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} must be a scalar torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one-element) loss, got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise ValueError(f"{name} must be a floating-point loss, got dtype {loss.dtype}")
    if not loss.requires_grad:
        raise ValueError(f"{name} does not require grad: compute it from the model's outputs "
                         "(outside torch.no_grad) so that it depends on the head parameters")
    return loss.reshape(())


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} must be finite, got {t.detach().reshape(-1)[0].item()!r}")


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _grad(outputs, params: list[Tensor], what: str, **kw) -> tuple[Tensor, ...]:
    """``torch.autograd.grad`` that names the head parameter a loss does not depend on."""
    grads = torch.autograd.grad(outputs, params, allow_unused=True, **kw)
    for i, g in enumerate(grads):
        if g is None:
            raise ValueError(f"{what} does not depend on params[{i}] (shape "
                             f"{tuple(params[i].shape)}): pass only parameters the loss uses")
    return grads


def _loss_grads(loss: Tensor, params: list[Tensor], name: str) -> tuple[Tensor, ...]:
    return _grad(loss, params, name, create_graph=True)


def _graph_grads(grads: Sequence[Tensor], params: list[Tensor]) -> list[Tensor]:
    if isinstance(grads, Tensor):
        grads = [grads]
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"grads must have one tensor per parameter: got {len(grads)} grads for "
                         f"{len(params)} params")
    for i, (g, p) in enumerate(zip(grads, params)):
        if not isinstance(g, Tensor):
            raise TypeError(f"grads[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, expected {tuple(p.shape)} "
                             f"like params[{i}]")
        if not g.requires_grad:
            raise ValueError(f"grads[{i}] has no graph: compute the gradients with "
                             "torch.autograd.grad(loss, params, create_graph=True)")
    return grads


# -------------------------------------------------------------------------- curvature products
@torch.enable_grad()
def hessian_gradient_product(loss: Tensor, params: Tensor | Iterable[Tensor],
                             create_graph: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """Hessian-gradient product ``H g`` of a loss w.r.t. ``params``, and the gradient ``g`` itself.

    Paper slug: ``hessian-alignment`` (HGP). ``H g = grad (1/2)||g||^2 = ||g|| grad ||g||`` with
    ``g = grad loss``: one extra backward, no Hessian formed, no NaN at ``g = 0``. ``g`` is always
    built with a graph; with ``create_graph=True`` (default) ``H g`` is differentiable too.

    Example::

        >>> hg, g = hessian_gradient_product(loss, model.head.parameters())
        >>> penalty = sum((a - b).pow(2).sum() for a, b in zip(hg, hg_other))
        >>> penalty.backward()
    """
    plist = _params(params)
    loss = _scalar_loss(loss, "loss")
    g = _loss_grads(loss, plist, "loss")
    return list(_hgp_from_grads(g, plist, create_graph)), list(g)


def _hgp_from_grads(grads: Sequence[Tensor], params: list[Tensor], create_graph: bool) -> tuple[Tensor, ...]:
    half_sq = 0.5 * sum((g * g).sum() for g in grads)
    return _grad(half_sq, params, "the gradient norm", create_graph=create_graph, retain_graph=True)


def _rademacher(params: list[Tensor], n: int, generator: torch.Generator | None) -> list[Tensor]:
    """``n`` Rademacher (+-1) probes per parameter, shape ``(n, *p.shape)``, in p's dtype and device."""
    out = []
    for p in params:
        dev = p.device if generator is None else generator.device
        z = torch.randint(0, 2, (n, *p.shape), generator=generator, device=dev).to(p.dtype).mul_(2).sub_(1)
        out.append(z.to(p.device, non_blocking=True))
    return out


def _diag_from_probes(grads: Sequence[Tensor], params: list[Tensor], probes: list[Tensor],
                      create_graph: bool, vectorize: bool) -> list[Tensor]:
    """``(1/K) sum_k z_k * (H z_k)`` for probes ``z`` of shape ``(K, *p.shape)``."""
    k = probes[0].shape[0]
    if vectorize:
        try:
            hz = _grad(list(grads), params, "the gradients", grad_outputs=probes,
                       retain_graph=True, create_graph=create_graph, is_grads_batched=True)
        except RuntimeError as e:
            raise RuntimeError(f"batched Hessian-vector products failed ({e}); "
                               "pass vectorize=False to loop over the probes") from e
        return [(z * h).mean(0) for z, h in zip(probes, hz)]
    acc = [torch.zeros_like(p) for p in params]
    for i in range(k):
        hz = _grad(list(grads), params, "the gradients", grad_outputs=[z[i] for z in probes],
                   retain_graph=True, create_graph=create_graph)
        acc = [a + z[i] * h for a, z, h in zip(acc, probes, hz)]
    return [a / k for a in acc]


@torch.enable_grad()
def hutchinson_diag(grads: Sequence[Tensor], params: Tensor | Iterable[Tensor], n_samples: int = 100,
                    generator: torch.Generator | None = None, create_graph: bool = True,
                    vectorize: bool = True) -> list[Tensor]:
    """Hutchinson estimate of the Hessian diagonal from gradients that carry a graph.

    Paper slug: ``hessian-alignment``. ``diag(H) ~ (1/K) sum_k z_k * (H z_k)`` with ``K = n_samples``
    Rademacher probes ``z_k`` (unbiased: ``E[z z^T] = I``) and ``H z = grad <g, z>``. ``grads`` must
    come from ``torch.autograd.grad(loss, params, create_graph=True)``. ``vectorize=True`` computes
    all ``K`` products in one batched call (``is_grads_batched``, much faster); ``False`` loops and
    gives the same numbers for the same ``generator``. Cost: ``K`` Hessian-vector products.

    Example::

        >>> g = torch.autograd.grad(loss, head.parameters(), create_graph=True)
        >>> d = hutchinson_diag(g, head.parameters(), n_samples=100)   # one tensor per parameter
        >>> penalty = sum((a - b).pow(2).sum() for a, b in zip(d, d_other))
    """
    plist = _params(params)
    glist = _graph_grads(grads, plist)
    k = _int("n_samples", n_samples, 1)
    _check_generator(generator)
    return _diag_from_probes(glist, plist, _rademacher(plist, k, generator), create_graph, bool(vectorize))


def _hessian_from_grads(grads: Sequence[Tensor], params: list[Tensor], create_graph: bool) -> Tensor:
    """The ``(P, P)`` Hessian from gradients with a graph: P Hessian-vector products in one batched call."""
    sizes = [p.numel() for p in params]
    eye = torch.eye(sum(sizes), dtype=params[0].dtype, device=params[0].device)
    probes = [blk.reshape(-1, *p.shape) for blk, p in zip(eye.split(sizes, dim=1), params)]
    rows = _grad(list(grads), params, "the gradients", grad_outputs=probes, retain_graph=True,
                 create_graph=create_graph, is_grads_batched=True)
    return torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)  # row i = (H e_i)^T


def _exact_diag(grads: Sequence[Tensor], params: list[Tensor], create_graph: bool) -> list[Tensor]:
    """Exact Hessian diagonal (P Hessian-vector products)."""
    d = torch.diagonal(_hessian_from_grads(grads, params, create_graph))
    return [x.reshape(p.shape) for x, p in zip(d.split([p.numel() for p in params]), params)]


@torch.enable_grad()
def head_hessian(loss: Tensor, params: Tensor | Iterable[Tensor], create_graph: bool = False) -> Tensor:
    """The exact Hessian ``(P, P)`` of a loss w.r.t. ``params`` (flattened in order), by P batched HVPs.

    Paper slug: ``hessian-alignment``. Meant for small heads (the paper's theory bounds the transfer
    measure by ``||H_S - H_T||_2`` of the head Hessians) and for checking the estimators.

    Example::

        >>> hs = head_hessian(loss_src, head.parameters())
        >>> ht = head_hessian(loss_tgt, head.parameters())
        >>> gap = torch.linalg.matrix_norm(hs - ht, ord=2)
    """
    plist = _params(params)
    loss = _scalar_loss(loss, "loss")
    return _hessian_from_grads(_loss_grads(loss, plist, "loss"), plist, create_graph)


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
        self.params = _params(head_params, "head_params")
        self.alpha = real_scalar("alpha", alpha, nonneg=True, tensor_ok=False)
        self.beta = real_scalar("beta", beta, nonneg=True, tensor_ok=False)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.n_samples = _int("n_samples", n_samples, 1)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        _check_generator(generator)
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
        losses = [_scalar_loss(l, f"domain_losses[{i}]") for i, l in enumerate(domain_losses)]
        if self.check_finite:
            for i, l in enumerate(losses):
                _check_finite(l, f"domain_losses[{i}]")
        return losses

    def _curvature(self, grads: Sequence[Tensor], create_graph: bool,
                   probes: list[Tensor] | None) -> list[Tensor]:
        if self.method == "hgp":
            return list(_hgp_from_grads(grads, self.params, create_graph))
        if self.method == "exact_diag":
            return _exact_diag(grads, self.params, create_graph)
        if probes is None:
            probes = _rademacher(self.params, self.n_samples, self.generator)
        return _diag_from_probes(grads, self.params, probes, create_graph, self.vectorize)

    @torch.enable_grad()
    def __call__(self, domain_losses: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        losses = self._domain_losses(domain_losses)
        need_h = self.alpha > 0
        grads = [_loss_grads(l, self.params, f"domain_losses[{i}]") for i, l in enumerate(losses)]
        # the pooled gradient is the mean of the domain gradients (linearity): no extra backward
        g_bar = [torch.stack(gs).mean(0) for gs in zip(*grads)]
        g_bar_ref = [g.detach() for g in g_bar] if self.detach_mean else g_bar
        grad_terms = torch.stack([sum((g - m).pow(2).sum() for g, m in zip(ge, g_bar_ref)) for ge in grads])
        if need_h:
            shared = (_rademacher(self.params, self.n_samples, self.generator)
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
    step = _int("step", step, 0)
    anneal_iters = _int("anneal_iters", anneal_iters, 0)
    weight = real_scalar("weight", weight, nonneg=True, tensor_ok=False)
    initial = real_scalar("initial", initial, nonneg=True, tensor_ok=False)
    w = initial if step < anneal_iters else weight
    s = 1.0 / w if rescale and w > 1.0 else 1.0
    return w, s

