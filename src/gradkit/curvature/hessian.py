"""Hessian-vector products of a loss w.r.t. a few parameters: H g, Hutchinson's diag(H), the exact H.

Paper slug: ``hessian-alignment`` (Hemati et al., ICCV 2023, arXiv 2308.11778), whose penalty
:class:`gradkit.nn.HessianAlignment` is built on these; usable alone for any small set of parameters
(e.g. a classifier head). With ``g = grad_theta loss`` built with a graph::

    HGP:        H g = grad (1/2)||g||^2          (one extra backward, no Hessian formed)
    Hutchinson: diag(H) ~ (1/K) sum_k z_k * (H z_k),  z_k Rademacher,  H z = grad <g, z>
    exact:      H = [H e_1, ..., H e_P]          (P batched Hessian-vector products; small P only)

The ``*_from_grads`` / ``*_from_probes`` forms take gradients that already carry a graph, so several
products can share one first backward.

Example::

    hg, g = hessian_gradient_product(loss, head.parameters())
    d = hutchinson_diag(g, head.parameters(), n_samples=100)
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._validate import integer, optional_generator

__all__ = ["hessian_gradient_product", "hutchinson_diag", "head_hessian", "hgp_from_grads",
           "hutchinson_from_probes", "rademacher_probes", "hessian_from_grads", "exact_hessian_diag",
           "differentiable_params", "scalar_loss", "loss_grads"]


# ------------------------------------------------------------------------------------ arguments
def differentiable_params(params: Tensor | Iterable[Tensor], name: str = "params") -> list[Tensor]:
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


def scalar_loss(loss: object, name: str) -> Tensor:
    """``loss`` as a 0-dim floating tensor that requires grad; raises naming ``name`` otherwise."""
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


def _grad(outputs, params: list[Tensor], what: str, **kw) -> tuple[Tensor, ...]:
    """``torch.autograd.grad`` that names the head parameter a loss does not depend on."""
    grads = torch.autograd.grad(outputs, params, allow_unused=True, **kw)
    for i, g in enumerate(grads):
        if g is None:
            raise ValueError(f"{what} does not depend on params[{i}] (shape "
                             f"{tuple(params[i].shape)}): pass only parameters the loss uses")
    return grads


def loss_grads(loss: Tensor, params: list[Tensor], name: str) -> tuple[Tensor, ...]:
    """``grad loss`` w.r.t. ``params`` with a graph (``create_graph=True``), ready for Hessian products.

    Raises ``ValueError`` naming ``name`` and the parameter when the loss does not depend on one of them.
    """
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
    plist = differentiable_params(params)
    loss = scalar_loss(loss, "loss")
    g = loss_grads(loss, plist, "loss")
    return list(hgp_from_grads(g, plist, create_graph)), list(g)


def hgp_from_grads(grads: Sequence[Tensor], params: list[Tensor], create_graph: bool) -> tuple[Tensor, ...]:
    """``H g = grad (1/2)||g||^2`` from gradients ``g`` that carry a graph (e.g. from :func:`loss_grads`)."""
    half_sq = 0.5 * sum((g * g).sum() for g in grads)
    return _grad(half_sq, params, "the gradient norm", create_graph=create_graph, retain_graph=True)


def rademacher_probes(params: list[Tensor], n: int, generator: torch.Generator | None) -> list[Tensor]:
    """``n`` Rademacher (+-1) probes per parameter, shape ``(n, *p.shape)``, in p's dtype and device."""
    out = []
    for p in params:
        dev = p.device if generator is None else generator.device
        z = torch.randint(0, 2, (n, *p.shape), generator=generator, device=dev).to(p.dtype).mul_(2).sub_(1)
        out.append(z.to(p.device, non_blocking=True))
    return out


def hutchinson_from_probes(grads: Sequence[Tensor], params: list[Tensor], probes: list[Tensor],
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
    plist = differentiable_params(params)
    glist = _graph_grads(grads, plist)
    k = integer("n_samples", n_samples, low=1)
    optional_generator(generator)
    return hutchinson_from_probes(glist, plist, rademacher_probes(plist, k, generator), create_graph, bool(vectorize))


def hessian_from_grads(grads: Sequence[Tensor], params: list[Tensor], create_graph: bool) -> Tensor:
    """The ``(P, P)`` Hessian from gradients with a graph: P Hessian-vector products in one batched call."""
    sizes = [p.numel() for p in params]
    eye = torch.eye(sum(sizes), dtype=params[0].dtype, device=params[0].device)
    probes = [blk.reshape(-1, *p.shape) for blk, p in zip(eye.split(sizes, dim=1), params)]
    rows = _grad(list(grads), params, "the gradients", grad_outputs=probes, retain_graph=True,
                 create_graph=create_graph, is_grads_batched=True)
    return torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)  # row i = (H e_i)^T


def exact_hessian_diag(grads: Sequence[Tensor], params: list[Tensor], create_graph: bool) -> list[Tensor]:
    """Exact Hessian diagonal (P Hessian-vector products)."""
    d = torch.diagonal(hessian_from_grads(grads, params, create_graph))
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
    plist = differentiable_params(params)
    loss = scalar_loss(loss, "loss")
    return hessian_from_grads(loss_grads(loss, plist, "loss"), plist, create_graph)
