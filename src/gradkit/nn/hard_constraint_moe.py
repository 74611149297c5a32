"""Physics-informed hard constraints with a mixture of experts: each subdomain solves its own NLLS for the
coefficients of a learned basis (paper slug: pihc-moe).

Chalapathi, Du, Krishnapriyan, "Scaling physics-informed hard constraints with mixture-of-experts"
(ICLR 2024, arXiv 2402.13412). A network outputs N basis functions B(t, x) in R^N on a (t, x) grid; their
finite-difference terms (``fd_terms``: B, B_x, B_xx, B_t, computed on the full grid BEFORE partitioning, so
stencils at subdomain interfaces use their true neighbours) are split into K = k_t * k_x equal blocks.
Expert k solves

    w_k* = argmin_w || [ residual_fn(B_k w, B_shared w, data) ; ridge * w ] ||^2      (Levenberg-Marquardt)

where ``B_k w`` are the values of u and its derivative terms at P points sampled in block k, ``B_shared w``
those every expert sees (initial and boundary rows) and ``data`` targets such as u0. The output is
u = B_k w_k* on block k, stitched back to the grid; gradients reach B through the implicit function theorem
per expert (``gradkit.functional.implicit_nlls``). K = 1 is the single global hard constraint (PI-HC).

>>> def heat(loc, sh, data):                        # u_t = 0.1 u_xx with u(0, x) = u0(x), from the values B w
...     return torch.cat([loc["u_t"] - 0.1 * loc["u_xx"], sh["ic"] - data["u0"]], -1)
>>> moe = HardConstraintMoE(heat, experts=(1, 2))
>>> terms = fd_terms(torch.randn(3, 8, 8, 4, dtype=torch.float64), dx=1 / 7, dt=1 / 7)
>>> u = moe(terms, shared={"ic": terms["u"][:, 0]}, data={"u0": torch.rand(3, 8, dtype=torch.float64)})
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .._validate import (ArgumentError, choice, is_int, optional_generator, positive, positive_int, real_scalar,
                         tensor)
from ..functional.implicit_nlls import HESSIANS, implicit_nlls

__all__ = ["HardConstraintMoE", "fd_terms", "fd_second_derivative", "contract", "split_experts", "merge_experts",
           "solve_hard_constraint"]



def fd_second_derivative(f: Tensor, h: float, dim: int) -> Tensor:
    """Second derivative along ``dim`` by 2nd-order finite differences: central ``(f[i-1] - 2f[i] + f[i+1])/h^2``
    inside, the one-sided ``(2f0 - 5f1 + 4f2 - f3)/h^2`` at each edge (exact on cubics). Needs >= 4 points."""
    n = f.shape[dim]
    if n < 4:
        raise ArgumentError(f"a second derivative along dim {dim} needs at least 4 grid points, got {n}")
    fm = f.movedim(dim, 0)
    out = torch.empty_like(fm)
    out[1:-1] = fm[:-2] - 2 * fm[1:-1] + fm[2:]
    out[0] = 2 * fm[0] - 5 * fm[1] + 4 * fm[2] - fm[3]
    out[-1] = 2 * fm[-1] - 5 * fm[-2] + 4 * fm[-3] - fm[-4]
    return (out / (h * h)).movedim(0, dim)


def fd_terms(basis: Tensor, dx: float, dt: float) -> dict[str, Tensor]:
    """Finite-difference terms of basis functions on a (t, x) grid: ``basis`` (..., nt, nx, N) ->
    ``{"u": B, "u_x": dB/dx, "u_xx": d2B/dx2, "u_t": dB/dt}``, 2nd order everywhere (central inside,
    one-sided at the edges; ``torch.gradient`` with ``edge_order=2`` for first derivatives). Exact on quadratics.
    Derivatives are linear, so ``u_x = B_x w`` for ``u = B w``."""
    tensor("basis", basis, floating=True, min_dim=3)
    dx, dt = positive("dx", dx), positive("dt", dt)
    if basis.shape[-3] < 4 or basis.shape[-2] < 4:
        raise ArgumentError(f"basis must have shape (..., nt, nx, N) with nt, nx >= 4, got {tuple(basis.shape)}")
    (u_x,) = torch.gradient(basis, spacing=dx, dim=-2, edge_order=2)
    (u_t,) = torch.gradient(basis, spacing=dt, dim=-3, edge_order=2)
    return {"u": basis, "u_x": u_x, "u_xx": fd_second_derivative(basis, dx, -2), "u_t": u_t}


def contract(terms: Mapping[str, Tensor], omega: Tensor) -> dict[str, Tensor]:
    """Values of ``u = B w`` for every term: ``terms[k]`` (b, ..., N) and ``omega`` (b, N) -> (b, ...)."""
    w = omega.unsqueeze(-1)
    return {k: (v.reshape(v.shape[0], -1, v.shape[-1]) @ w).reshape(v.shape[:-1]) for k, v in terms.items()}


def _blocks(experts: Any) -> tuple[int, int]:
    if not (isinstance(experts, (tuple, list)) and len(experts) == 2 and all(is_int(e, low=1) for e in experts)):
        raise ArgumentError(f"experts must be a pair (k_t, k_x) of positive ints, got {experts!r}")
    return int(experts[0]), int(experts[1])


def split_experts(grid: Tensor, experts: tuple[int, int]) -> Tensor:
    """``grid`` (batch, nt, nx, *rest) -> (batch, K, nt/k_t * nx/k_x, *rest): K = k_t * k_x equal blocks, expert
    index ``i_t * k_x + i_x``, points of a block in row-major (t, x) order."""
    kt, kx = _blocks(experts)
    b, nt, nx, *rest = grid.shape
    if nt % kt or nx % kx:
        raise ArgumentError(f"experts={experts!r} must divide the grid (nt, nx) = ({nt}, {nx}) into equal blocks")
    g = grid.reshape(b, kt, nt // kt, kx, nx // kx, *rest).transpose(2, 3)
    return g.reshape(b, kt * kx, (nt // kt) * (nx // kx), *rest)


def merge_experts(blocks: Tensor, experts: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """The inverse of :func:`split_experts`: (batch, K, points, *rest) -> (batch, nt, nx, *rest)."""
    kt, kx = _blocks(experts)
    nt, nx = shape
    b, _, _, *rest = blocks.shape
    g = blocks.reshape(b, kt, kx, nt // kt, nx // kx, *rest).transpose(2, 3)
    return g.reshape(b, nt, nx, *rest)


def _flatten(d: Mapping[str, Tensor], what: str) -> tuple[list[str], list[Tensor]]:
    if not isinstance(d, Mapping):
        raise ArgumentError(f"{what} must be a dict of name -> tensor, got {type(d).__name__}")
    keys = list(d)
    for k in keys:
        tensor(f"{what}[{k!r}]", d[k], floating=True)
    return keys, [d[k] for k in keys]


def solve_hard_constraint(terms: Mapping[str, Tensor], residual_fn: Callable[[Tensor, Mapping[str, Tensor]], Tensor],
                          omega0: Tensor, *, ridge: float = 1e-4, hessian: str = "gn", iters: int = 20,
                          damping: float = 1e-3, gtol: float = 1e-10, return_info: bool = False):
    """``w* = argmin ||[residual_fn(w, terms); ridge w]||`` per row, differentiable in every tensor of ``terms``
    through the implicit function theorem. ``terms``: name -> (batch, ...) tensors; ``omega0`` (batch, N);
    ``residual_fn(w, terms) -> (batch, M)``. See :func:`gradkit.functional.implicit_nlls.implicit_nlls`."""
    keys, vals = _flatten(terms, "terms")
    if not callable(residual_fn):
        raise ArgumentError(f"residual_fn must be callable, got {type(residual_fn).__name__}")

    def flat_fn(w: Tensor, *theta: Tensor) -> Tensor:
        return residual_fn(w, dict(zip(keys, theta)))

    return implicit_nlls(flat_fn, omega0, *vals, iters=iters, ridge=ridge, damping=damping, gtol=gtol,
                         hessian=hessian, return_info=return_info)


def _value_jacobian(fn: Callable[[dict, dict], Tensor], terms_l: Mapping[str, Tensor], terms_s: Mapping[str, Tensor],
                    omega: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, J)`` of ``r(w) = fn(contract(terms_l, w), contract(terms_s, w))``: column i is the forward-mode
    product with the values' tangents ``terms[..., i]`` (u = B w is linear in w), vmapped over the columns."""
    vl, vs = contract(terms_l, omega), contract(terms_s, omega)
    tl = {k: v.movedim(-1, 0) for k, v in terms_l.items()}
    ts = {k: v.movedim(-1, 0) for k, v in terms_s.items()}

    def column(a: dict, b: dict) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(fn, (vl, vs), (a, b))

    try:
        rs, cols = torch.func.vmap(column)(tl, ts)
        return rs[0], cols.movedim(0, -1)
    except RuntimeError:  # an operation without a batching rule: one product per column
        pairs = [column({k: v[i] for k, v in tl.items()}, {k: v[i] for k, v in ts.items()})
                 for i in range(omega.shape[-1])]
        return pairs[0][0], torch.stack([c for _, c in pairs], dim=-1)


class HardConstraintMoE(nn.Module):
    """Hard constraints solved per subdomain (expert) on a learned basis; K = 1 is the global PI-HC layer.

    residual_fn(local, shared, data) -> (b, M), with b = batch * K rows (expert-major within each instance):
    ``local`` name -> (b, P) values of u = B w (and of its derivative terms) at the expert's P sampled points;
    ``shared`` name -> values of the ``shared`` basis terms given to :meth:`forward` (every expert sees all of
    them, e.g. the initial and boundary rows); ``data`` name -> the ``data`` tensors given to :meth:`forward`
    (targets such as u0), repeated for each expert. ``experts``: (k_t, k_x) blocks; ``points_per_expert``: P
    points sampled per block and forward pass (None: every point of the block); ``ridge``, ``hessian``,
    ``iters``, ``damping``, ``gtol``: the NLLS solve's; ``omega_init``: the start value of every coefficient.
    After each forward, ``last_info`` holds the solve's ``iterations`` and per-row ``optimality``.
    """

    def __init__(self, residual_fn: Callable[..., Tensor], experts: tuple[int, int] = (1, 4),
                 points_per_expert: int | None = None, *, ridge: float = 1e-4, hessian: str = "gn", iters: int = 20,
                 damping: float = 1e-3, gtol: float = 1e-10, omega_init: float = 0.0) -> None:
        super().__init__()
        if not callable(residual_fn):
            raise ArgumentError(f"residual_fn must be callable, got {type(residual_fn).__name__}")
        self.residual_fn = residual_fn
        self.experts = _blocks(experts)
        if points_per_expert is not None:
            positive_int("points_per_expert", points_per_expert)
        self.points_per_expert = points_per_expert
        self.ridge = real_scalar("ridge", ridge, nonneg=True)
        self.hessian = choice("hessian", hessian, HESSIANS)
        self.iters = positive_int("iters", iters)
        self.damping, self.gtol = positive("damping", damping), positive("gtol", gtol)
        self.omega_init = real_scalar("omega_init", omega_init)
        self.last_info: dict[str, Any] = {}

    @property
    def num_experts(self) -> int:
        return self.experts[0] * self.experts[1]

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, points_per_expert={self.points_per_expert}, ridge={self.ridge:g}, "
                f"hessian={self.hessian!r}, iters={self.iters}")

    def _points(self, where: Tensor | None, shape: tuple[int, int], device: torch.device,
                generator: torch.Generator | None) -> Tensor | None:
        """Per-expert point indices (K, P) into the block, or None for every point of every block."""
        p = self.points_per_expert
        k_exp = self.num_experts
        if where is None:
            pk = (shape[0] // self.experts[0]) * (shape[1] // self.experts[1])
            if p is None or p >= pk:
                return None
            return torch.randperm(pk, generator=generator)[:p].to(device).expand(k_exp, -1)
        tensor("where", where)
        if where.dtype != torch.bool or tuple(where.shape) != shape:
            raise ArgumentError(f"where must be a bool tensor of shape {shape}, got {where.dtype} of shape "
                                f"{tuple(where.shape)}")
        eligible = split_experts(where.cpu().unsqueeze(0), self.experts)[0]           # (K, Pk)
        counts = eligible.sum(1)
        take = int(counts.min()) if p is None else min(p, int(counts.min()))
        if take < 1:
            raise ArgumentError("where leaves an expert without points")
        rows = []
        for k in range(k_exp):
            ids = eligible[k].nonzero().squeeze(1)
            rows.append(ids[torch.randperm(len(ids), generator=generator)[:take]])
        return torch.stack(rows).to(device)

    def forward(self, terms: Mapping[str, Tensor], shared: Mapping[str, Tensor] | None = None,
                data: Mapping[str, Tensor] | None = None, generator: torch.Generator | None = None,
                where: Tensor | None = None) -> Tensor:
        """terms: name -> (batch, nt, nx, N) basis terms on the full grid (``"u"`` required, e.g. from
        :func:`fd_terms`); shared: name -> (batch, ..., N) basis terms every expert sees; data: name ->
        (batch, ...) tensors passed through; where: an optional (nt, nx) bool mask of the points the local
        (PDE) rows may use, e.g. ``t > 0`` (each expert then uses the same number of points, at most the
        fewest any block has). Returns u (batch, nt, nx) on the whole grid."""
        keys, vals = _flatten(terms, "terms")
        if "u" not in terms:
            raise ArgumentError(f"terms must contain 'u' (the basis itself), got keys {keys}")
        shape = tuple(terms["u"].shape)
        if len(shape) != 4:
            raise ArgumentError(f"terms['u'] must have shape (batch, nt, nx, N), got {shape}")
        for k, v in zip(keys, vals):
            if tuple(v.shape) != shape:
                raise ArgumentError(f"terms[{k!r}] must have the shape of terms['u'] {shape}, got {tuple(v.shape)}")
        batch, nt, nx, n = shape
        skeys, svals = _flatten(shared or {}, "shared")
        dkeys, dvals = _flatten(data or {}, "data")
        for what, ks, vs in (("shared", skeys, svals), ("data", dkeys, dvals)):
            for k, v in zip(ks, vs):
                if v.dim() == 0 or v.shape[0] != batch:
                    raise ArgumentError(f"{what}[{k!r}] must have the batch size {batch} as its first dim, got "
                                        f"shape {tuple(v.shape)}")
        for k, v in zip(skeys, svals):
            if v.shape[-1] != n:
                raise ArgumentError(f"shared[{k!r}] must end with the basis size N={n}, got shape {tuple(v.shape)}")
        generator = optional_generator(generator)
        k_exp = self.num_experts
        blocks = {k: split_experts(v, self.experts) for k, v in zip(keys, vals)}     # (batch, K, Pk, N)
        idx = self._points(where, (nt, nx), terms["u"].device, generator)
        local = blocks
        if idx is not None:   # (K, P) point indices per expert
            gather = idx.view(1, k_exp, -1, 1).expand(batch, -1, -1, n)
            local = {k: v.gather(2, gather) for k, v in blocks.items()}
        rows = batch * k_exp
        flat = [local[k].reshape(rows, -1, n) for k in keys] + [v.repeat_interleave(k_exp, dim=0) for v in svals]
        flat += [v.repeat_interleave(k_exp, dim=0) for v in dvals]
        nl, ns = len(keys), len(skeys)

        def unpack(theta: tuple) -> tuple[dict, dict, dict]:
            return (dict(zip(keys, theta[:nl])), dict(zip(skeys, theta[nl:nl + ns])),
                    dict(zip(dkeys, theta[nl + ns:])))

        def residual(w: Tensor, *theta: Tensor) -> Tensor:
            loc, sh, dat = unpack(theta)
            return self.residual_fn(contract(loc, w), contract(sh, w), dat)

        def jacobian(w: Tensor, *theta: Tensor) -> tuple[Tensor, Tensor]:
            loc, sh, dat = unpack(theta)
            return _value_jacobian(lambda a, b: self.residual_fn(a, b, dat), loc, sh, w)

        omega0 = torch.full((rows, n), self.omega_init, dtype=terms["u"].dtype, device=terms["u"].device)
        omega, info = implicit_nlls(residual, omega0, *flat, iters=self.iters, ridge=self.ridge, damping=self.damping,
                                    gtol=self.gtol, hessian=self.hessian, return_info=True, jacobian_fn=jacobian)
        self.last_info = info
        u_blocks = (blocks["u"] @ omega.reshape(batch, k_exp, n, 1)).squeeze(-1)      # (batch, K, Pk)
        return merge_experts(u_blocks, self.experts, (nt, nx))
