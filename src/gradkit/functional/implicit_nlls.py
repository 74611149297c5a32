"""A differentiable non-linear least-squares layer: Levenberg-Marquardt forward, implicit-function backward
(paper slug: pihc-moe).

Chalapathi, Du, Krishnapriyan, "Scaling physics-informed hard constraints with mixture-of-experts"
(ICLR 2024, arXiv 2402.13412). The layer returns, for every row ``b`` of a batch,

    w*(theta) = argmin_w  1/2 ||r(w, theta)||^2,   r = [ residual_fn(w, *theta) ;  ridge * w ]

found by a batched Levenberg-Marquardt iteration that keeps no autograd graph. The backward pass uses the
implicit function theorem on the optimality condition g(w*, theta) = J_w^T r = 0:

    dw*/dtheta = -H^-1 dg/dtheta,   H = dg/dw   ("exact": autograd Hessian of 1/2||r||^2;
                                                 "gn": Gauss-Newton J_w^T J_w, exact for zero residual)

so for an upstream gradient ``v_bar`` it solves ``H v = v_bar`` (one N x N system per row) and returns
``-(dg/dtheta)^T v`` through one vector-Jacobian product. With the exact Hessian this is the limit of the
gradient through infinitely many unrolled iterations (``unrolled_nlls`` gives the unrolled one for checks).

Rows are independent problems: ``residual_fn(w, *theta)`` maps ``w`` of shape (batch, N) to (batch, M), and row
``b`` of the output may depend on row ``b`` of ``w`` only. Every tensor the residual should be differentiated
with respect to must be passed in ``theta`` (tensors the function closes over get no gradient).

>>> A, y = torch.randn(3, 20, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 20, dtype=torch.float64)
>>> w = implicit_nlls(lambda w, A, y: (A @ w.unsqueeze(-1)).squeeze(-1) - y, torch.zeros(3, 4, dtype=A.dtype), A, y)
>>> w.sum().backward()          # IFT gradient into A
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .._validate import ArgumentError, choice, positive, positive_int, real_scalar, tensor

__all__ = ["ImplicitNLLS", "implicit_nlls", "unrolled_nlls", "lm_solve", "NLLSResult", "residual_jacobian",
           "optimality", "HESSIANS"]

HESSIANS = ("gn", "exact")

ResidualFn = Callable[..., Tensor]


@dataclass
class NLLSResult:
    """A Levenberg-Marquardt solve: the minimiser ``omega`` (batch, N); ``iterations`` run (a Python int, the
    same for every row: the loop stops when every row has converged); ``optimality`` per row,
    ``||J^T r|| / (||J||_F ||r||)`` at ``omega`` (0 when the residual vanishes); ``cost`` per iteration, the
    batch mean of 1/2 ||r||^2 (iteration 0 is the start); ``jacobian`` (batch, M, N) at ``omega`` (ridge rows
    included)."""

    omega: Tensor
    iterations: int
    optimality: Tensor
    cost: list[float]
    jacobian: Tensor | None = None


def _with_ridge(residual_fn: ResidualFn, ridge: float) -> ResidualFn:
    if ridge == 0.0:
        return residual_fn

    def full(w: Tensor, *theta: Tensor) -> Tensor:
        return torch.cat([residual_fn(w, *theta), ridge * w], dim=-1)

    return full


def _jac_with_ridge(jacobian_fn: Callable[..., tuple[Tensor, Tensor]] | None, ridge: float):
    if jacobian_fn is None or ridge == 0.0:
        return jacobian_fn

    def full(w: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor]:
        r, jac = jacobian_fn(w, *theta)
        eye = ridge * torch.eye(w.shape[-1], dtype=w.dtype, device=w.device).expand(w.shape[0], -1, -1)
        return torch.cat([r, ridge * w], dim=-1), torch.cat([jac, eye], dim=-2)

    return full


def residual_jacobian(residual_fn: ResidualFn, omega: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, J)`` with ``r = residual_fn(omega, *theta)`` (batch, M) and ``J = dr/domega`` (batch, M, N), by N
    forward-mode products (rows are independent problems, so one tangent per coordinate serves the batch),
    vmapped over the N tangents (a Python loop when ``residual_fn`` cannot be vmapped). Differentiable with
    respect to ``theta`` and ``omega`` when autograd is on."""
    n = omega.shape[-1]
    tangents = torch.eye(n, dtype=omega.dtype, device=omega.device).unsqueeze(1).expand(n, *omega.shape)

    def f(w: Tensor) -> Tensor:
        return residual_fn(w, *theta)

    def column(t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(f, (omega,), (t,))

    try:
        rs, cols = torch.func.vmap(column)(tangents)
        return rs[0], cols.movedim(0, -1)
    except RuntimeError:  # an operation without a batching rule: one product per coordinate
        pairs = [column(t) for t in tangents]
        return pairs[0][0], torch.stack([c for _, c in pairs], dim=-1)


def optimality(r: Tensor, jac: Tensor) -> Tensor:
    """First-order optimality per row: ``||J^T r|| / (||J||_F ||r||)`` (0 where ``r`` or ``J`` vanishes)."""
    g = (jac.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
    den = torch.linalg.vector_norm(jac, dim=(-2, -1)) * torch.linalg.vector_norm(r, dim=-1)
    return torch.where(den > 0, torch.linalg.vector_norm(g, dim=-1) / den.clamp_min(torch.finfo(r.dtype).tiny),
                       torch.zeros_like(den))


def _check_residual(r: Tensor, omega: Tensor) -> None:
    if not isinstance(r, Tensor) or r.dim() != 2 or r.shape[0] != omega.shape[0]:
        got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ArgumentError(f"residual_fn must return a tensor of shape (batch, M) = ({omega.shape[0]}, M) for "
                            f"omega of shape {tuple(omega.shape)}, got {got}")


def _lm(full_fn: ResidualFn, omega0: Tensor, theta: Sequence[Tensor], iters: int, damping: float, gtol: float,
        jac_fn: Callable[..., tuple[Tensor, Tensor]] | None = None) -> NLLSResult:
    """The Levenberg-Marquardt loop (differentiable when autograd is on: ``unrolled_nlls`` runs it so).

    Step ``(J^T J + mu * max(diag J^T J) I) d = -J^T r`` per row; a step that lowers the cost (up to rounding)
    is taken and ``mu`` shrinks by 3, else ``mu`` grows by 4 (per row). A row stops when its optimality is
    <= ``gtol``."""
    omega = omega0
    if jac_fn is None:
        def jac_fn(w: Tensor, *th: Tensor) -> tuple[Tensor, Tensor]:
            return residual_jacobian(full_fn, w, *th)
    r, jac = jac_fn(omega, *theta)
    _check_residual(r, omega)
    cost = 0.5 * (r * r).sum(-1)
    mu = torch.full_like(cost, damping)
    done = optimality(r.detach(), jac.detach()) <= gtol
    history = [float(cost.detach().mean())]
    it = 0
    n = omega.shape[-1]
    eye = torch.eye(n, dtype=omega.dtype, device=omega.device)
    while it < iters and not bool(done.all()):
        it += 1
        jt = jac.transpose(-1, -2)
        a = jt @ jac
        g = (jt @ r.unsqueeze(-1)).squeeze(-1)
        scale = a.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(a.dtype).tiny)
        step = torch.linalg.solve(a + (mu * scale)[:, None, None] * eye, -g)
        r_new, jac_new = jac_fn(omega + step, *theta)
        cost_new = 0.5 * (r_new * r_new).sum(-1)
        # (a step whose cost rises by no more than rounding is taken too: near the minimum the cost stalls at
        # its last bits while the gradient can still shrink)
        slack = 8 * torch.finfo(cost.dtype).eps * cost.detach().abs()
        accept = (cost_new.detach() <= cost.detach() + slack) & torch.isfinite(cost_new.detach()) & ~done
        omega = torch.where(accept[:, None], omega + step, omega)
        r = torch.where(accept[:, None], r_new, r)
        jac = torch.where(accept[:, None, None], jac_new, jac)
        cost = torch.where(accept, cost_new, cost)
        mu = torch.where(accept, (mu / 3).clamp_min(1e-15), (mu * 4).clamp_max(1e15))
        done = done | (optimality(r.detach(), jac.detach()) <= gtol)
        history.append(float(cost.detach().mean()))
    res = NLLSResult(omega, it, optimality(r.detach(), jac.detach()), history)
    res.jacobian = jac
    return res


def _check_common(omega0: Any, theta: Sequence[Any], iters: Any, ridge: Any, damping: Any, gtol: Any,
                  jacobian_fn: Any = None) -> None:
    if jacobian_fn is not None and not callable(jacobian_fn):
        raise ArgumentError(f"jacobian_fn must be callable or None, got {type(jacobian_fn).__name__}")
    tensor("omega0", omega0, floating=True, finite=True)
    if omega0.dim() != 2:
        raise ArgumentError(f"omega0 must have shape (batch, N), got shape {tuple(omega0.shape)}")
    for i, t in enumerate(theta):
        tensor(f"theta[{i}]", t)
    positive_int("iters", iters)
    real_scalar("ridge", ridge, nonneg=True)
    positive("damping", damping)
    positive("gtol", gtol)


def lm_solve(residual_fn: ResidualFn, omega0: Tensor, *theta: Tensor, iters: int = 20, ridge: float = 0.0,
             damping: float = 1e-3, gtol: float = 1e-10, jacobian_fn: Callable | None = None) -> NLLSResult:
    """Minimise ``1/2 ||[residual_fn(w, *theta); ridge * w]||^2`` per row by Levenberg-Marquardt, without
    gradients. ``iters``: at most this many steps (stops early when every row has optimality <= ``gtol``);
    ``damping``: the initial LM parameter, relative to the largest diagonal entry of J^T J;
    ``jacobian_fn(w, *theta) -> (r, J)``: a faster residual-and-Jacobian (without the ridge rows) where the
    structure allows one (default: :func:`residual_jacobian`)."""
    _check_common(omega0, theta, iters, ridge, damping, gtol, jacobian_fn)
    with torch.no_grad():
        return _lm(_with_ridge(residual_fn, float(ridge)), omega0.detach(), [t.detach() for t in theta], iters,
                   float(damping), float(gtol), _jac_with_ridge(jacobian_fn, float(ridge)))


class ImplicitNLLS(torch.autograd.Function):
    """``omega* = argmin ||[r(w, *theta); ridge w]||`` with the implicit-function-theorem backward (see module).

    ``apply(residual_fn, omega0, options, *theta)`` with
    ``options = (iters, ridge, damping, gtol, hessian, jacobian_fn)``;
    returns ``(omega, iterations, optimality, jacobian)``, the last three not differentiable. ``omega0`` gets no
    gradient (the minimiser does not depend on where the search started).
    """

    @staticmethod
    def forward(residual_fn: ResidualFn, omega0: Tensor, options: tuple, *theta: Tensor):  # type: ignore[override]
        iters, ridge, damping, gtol, _, jacobian_fn = options
        res = _lm(_with_ridge(residual_fn, ridge), omega0, theta, iters, damping, gtol,
                  _jac_with_ridge(jacobian_fn, ridge))
        its = torch.tensor(float(res.iterations), dtype=omega0.dtype, device=omega0.device)
        return res.omega, its, res.optimality, res.jacobian

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        residual_fn, _, options, *theta = inputs
        omega = output[0]
        ctx.residual_fn, ctx.options = residual_fn, options
        ctx.save_for_backward(omega, output[3], *theta)
        ctx.mark_non_differentiable(output[1], output[2], output[3])

    @staticmethod
    def backward(ctx: Any, grad_omega: Tensor, *_unused: Tensor):  # type: ignore[override]
        omega, jac, *theta = ctx.saved_tensors
        _, ridge, _, _, hessian, _ = ctx.options
        need = ctx.needs_input_grad[3:]
        none = (None, None, None)
        if grad_omega is None or not any(need):
            return none + (None,) * len(theta)
        full_fn = _with_ridge(ctx.residual_fn, ridge)
        with torch.enable_grad():
            w = omega.detach().requires_grad_(True)
            th = [t.detach().requires_grad_(bool(n)) for t, n in zip(theta, need)]
            r = full_fn(w, *th)
            (g,) = torch.autograd.grad(0.5 * (r * r).sum(), w, create_graph=True)
            if hessian == "exact":
                rows = [torch.autograd.grad(g[:, i].sum(), w, retain_graph=True)[0] for i in range(w.shape[-1])]
                h = torch.stack(rows, dim=-2)
            else:  # Gauss-Newton with the Jacobian the forward pass ended with
                h = jac.transpose(-1, -2) @ jac
            v = torch.linalg.solve(h.detach(), grad_omega)
            wanted = [t for t, n in zip(th, need) if n]
            grads = iter(torch.autograd.grad(g, wanted, grad_outputs=-v, allow_unused=True))
        out = [next(grads) if n else None for n in need]
        out = [torch.zeros_like(t) if n and o is None else o for t, n, o in zip(theta, need, out)]
        return none + tuple(out)


def implicit_nlls(residual_fn: ResidualFn, omega0: Tensor, *theta: Tensor, iters: int = 20, ridge: float = 0.0,
                  damping: float = 1e-3, gtol: float = 1e-10, hessian: str = "gn", return_info: bool = False,
                  jacobian_fn: Callable | None = None):
    """The NLLS minimiser ``omega*`` (batch, N) with the implicit backward (:class:`ImplicitNLLS`).

    hessian: ``"gn"`` (Gauss-Newton ``J^T J``, the ridge rows add ``ridge^2 I``) or ``"exact"`` (autograd Hessian
    of the cost; matches the unrolled gradient). ``return_info``: also return ``{"iterations", "optimality"}``.
    ``jacobian_fn``: see :func:`lm_solve` (used by the forward solve only; the backward differentiates
    ``residual_fn``).
    """
    _check_common(omega0, theta, iters, ridge, damping, gtol, jacobian_fn)
    choice("hessian", hessian, HESSIANS)
    if not callable(residual_fn):
        raise ArgumentError(f"residual_fn must be callable, got {type(residual_fn).__name__}")
    options = (int(iters), float(ridge), float(damping), float(gtol), hessian, jacobian_fn)
    omega, its, opt, _ = ImplicitNLLS.apply(residual_fn, omega0.detach(), options, *theta)
    if return_info:
        return omega, {"iterations": int(its.item()), "optimality": opt}
    return omega


def unrolled_nlls(residual_fn: ResidualFn, omega0: Tensor, *theta: Tensor, iters: int = 100, ridge: float = 0.0,
                  damping: float = 1e-3, gtol: float = 0.0) -> Tensor:
    """The same Levenberg-Marquardt loop run with autograd on: the gradient through ``iters`` unrolled steps
    (a reference for the implicit gradient; memory grows with ``iters``). ``gtol=0`` runs every step."""
    _check_common(omega0, theta, iters, ridge, damping, gtol if gtol > 0 else 1.0)
    return _lm(_with_ridge(residual_fn, float(ridge)), omega0, theta, int(iters), float(damping),
               float(gtol)).omega
