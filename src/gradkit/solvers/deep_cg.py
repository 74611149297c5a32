"""Deep conjugate direction method: a network proposes search directions for an SPD solve (paper slug: deep-cg).

Kaneda et al., "A Deep Conjugate Direction Method for Iteratively Solving Linear Systems" (ICML 2023,
arXiv 2205.10763). A network f approximates the action of A^-1 up to an unknown scale; its output on the
normalised residual is A-orthogonalised against the last k directions and an exact line search is taken::

    q_j = f(r_j / ||r_j||);   q_j -= sum_{i in last k} (q_j.A p_i / p_i.A p_i) p_i;   p_j = q_j
    alpha_j = p_j.r_j / p_j.A p_j,   x_{j+1} = x_j + alpha_j p_j,   r_{j+1} = b - A x_{j+1}

Because alpha is the exact minimiser of ||x - x*||_A along p_j, the A-norm of the error never increases,
whatever f outputs, and the scale of f does not matter. With f = identity and k >= 1 this is CG.
f is trained without solutions by the scale-invariant residual loss (one optimally scaled step)::

    L(q; b) = || b - (q.b / q.A q) A q ||^2          (q = f(b), averaged over a batch)

on right-hand sides built from Ritz vectors of A with the low end of the spectrum boosted
(:func:`ritz_rhs_dataset`). The solver follows :mod:`gradkit.solvers.krylov`'s convention and result type.

>>> A = poisson2d(32)                                  # gradkit.data.poisson2d
>>> net = DCDMNet2d()                                  # gradkit.nn.deep_cg, float32
>>> res = DeepConjugateDirection(net, k=2).solve(A, b, grid=(32, 32))   # b: (1024,) float64
>>> res.iterations, res.residuals                      # same SolveResult as krylov.cg
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, nonneg_int, positive, positive_int, real_scalar, tensor
from .krylov import NotSPDError, SolveResult, as_operator, begin_solve

Direction = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------ direction maps
def _grid(grid: Any, n: int) -> tuple[int, ...]:
    if grid is None:
        return ()
    if not isinstance(grid, (tuple, list)) or not grid or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ArgumentError(f"grid must be a tuple of positive ints (the grid shape of the unknowns), got {grid!r}")
    if int(np.prod(grid)) != n:
        raise ArgumentError(f"grid {tuple(grid)} holds {int(np.prod(grid))} unknowns but the system has n = {n}")
    return tuple(grid)


def apply_direction(direction: Direction | nn.Module, R: Tensor, grid: tuple[int, ...] = ()) -> Tensor:
    """Run a direction map on the (n, k) block ``R``, one column per right-hand side; returns (n, k) in R's dtype.

    With ``grid`` (e.g. ``(N, N)``) each column is reshaped to a (1, *grid) image and the batch
    (k, 1, *grid) is passed to the network; without it the network gets (k, n) rows. An ``nn.Module``
    runs in its own parameter dtype; no autograd graph is recorded; the output is cast back to R's dtype.
    """
    k = R.shape[1]
    inp = R.T.reshape(k, 1, *grid) if grid else R.T
    with torch.no_grad():
        if isinstance(direction, nn.Module):
            p = next(direction.parameters(), None)
            out = direction(inp.to(p.dtype if p is not None else R.dtype))
        else:
            out = direction(inp)
    if not isinstance(out, Tensor) or out.numel() != R.numel():
        raise ArgumentError(f"the direction network must return one value per unknown, input shape "
                            f"{tuple(inp.shape)}, got {tuple(out.shape) if isinstance(out, Tensor) else type(out)}")
    return out.reshape(k, -1).T.to(R.dtype)


# ------------------------------------------------------------------------------------------ the solver
def dcdm(A: Any, b: Tensor, direction: Direction | nn.Module, *, k: int = 2, x0: Tensor | None = None,
         tol: float = 1e-6, maxiter: int | None = None, grid: tuple[int, ...] | None = None,
         recompute_residual: bool = True, callback: Callable[[Tensor], None] | None = None,
         check: bool = True) -> SolveResult:
    """Deep conjugate direction solve of the SPD system ``A x = b`` (paper slug: deep-cg).

    direction: the network f (an ``nn.Module`` or a callable on (k_rhs, 1, *grid) or (k_rhs, n) batches).
    k: how many previous directions each new one is A-orthogonalised against (the paper uses 2; 0 gives
    a steepest-descent-like method; k >= iterations gives full conjugation). A column stops when
    ``||b - A x|| <= tol ||b||``. recompute_residual: ``r = b - A x`` each step (one extra product, as the
    paper's code) instead of the recurrence ``r -= alpha A p``. A direction with ``p.r ~ 0`` is replaced
    by the residual itself (a restart, the history of that column cleared). ``callback(x)`` after every
    iteration. Returns a :class:`~gradkit.solvers.krylov.SolveResult`.
    """
    if not (isinstance(direction, nn.Module) or callable(direction)):
        raise ArgumentError(f"direction must be an nn.Module or a callable, got {type(direction).__name__}")
    k = nonneg_int("k", k)
    boolean("recompute_residual", recompute_residual)
    st = begin_solve(A, b, x0, tol, maxiter, callback, check)
    op, B, X, R, rn, target, done, iters = st.op, st.B, st.X, st.R, st.rn, st.target, st.done, st.iters
    shape = _grid(grid, op.n)
    m = B.shape[1]
    P = torch.zeros(k, *B.shape, dtype=B.dtype, device=B.device)     # cyclic buffer of directions
    AP = torch.zeros_like(P)
    pAp = torch.ones(k, m, dtype=B.dtype, device=B.device)
    eps = torch.finfo(B.dtype).eps
    for it in range(1, st.maxiter + 1):
        if bool(done.all()):
            break
        idx = (~done).nonzero().squeeze(1)
        Ra = R[:, idx]
        ra = rn[idx]
        Q = apply_direction(direction, Ra / ra, shape)
        for j in range(k):
            Pj, APj = P[j][:, idx], AP[j][:, idx]
            Q = Q - Pj * ((Q * APj).sum(0) / pAp[j, idx])
        qr = (Q * Ra).sum(0)
        degenerate = ~torch.isfinite(qr) | (qr.abs() <= 1e3 * eps * Q.norm(dim=0) * ra)
        if bool(degenerate.any()):   # restart these columns from the residual, forgetting their history
            Q = torch.where(degenerate, Ra, Q)
            qr = torch.where(degenerate, (Ra * Ra).sum(0), qr)
            cols = idx[degenerate]
            P[:, :, cols] = 0
            AP[:, :, cols] = 0
            pAp[:, cols] = 1
        AQ = op(Q)
        qAq = (Q * AQ).sum(0)
        if bool((qAq <= 0).any()):
            j = int((qAq <= 0).nonzero()[0])
            raise NotSPDError(f"A is not positive definite: q.A q = {float(qAq[j]):.3g} <= 0 at iteration {it}")
        alpha = qr / qAq
        X[:, idx] = X[:, idx] + alpha * Q
        if recompute_residual:
            R[:, idx] = B[:, idx] - op(X[:, idx])
        else:
            R[:, idx] = Ra - alpha * AQ
        rn = rn.clone()
        rn[idx] = R[:, idx].norm(dim=0)
        iters[idx] += 1
        if k:
            slot = (it - 1) % k
            P[slot][:, idx] = Q
            AP[slot][:, idx] = AQ
            pAp[slot, idx] = qAq
        newly = ~done & (rn <= target)
        if bool(newly.any()) and not recompute_residual:   # confirm on the true residual
            rt = (B - op(X)).norm(dim=0)
            rn = torch.where(newly, rt, rn)
            newly = newly & (rt <= target)
        done = done | newly
        st.history.append(rn.clone())
        if callback is not None:
            callback(X[:, 0] if st.single else X)
    st.X, st.iters, st.done = X, iters, done
    return st.result()


class DeepConjugateDirection:
    """The deep conjugate direction solver (paper slug: deep-cg) with :func:`dcdm`'s settings stored.

    ``DeepConjugateDirection(net, k=2, tol=1e-6, max_iter=200).solve(A, b, grid=(N, N))`` -> SolveResult.
    A fully convolutional net trained on one grid can be applied to others: pass their ``grid``.
    """

    def __init__(self, direction_net: Direction | nn.Module, k: int = 2, tol: float = 1e-6, max_iter: int = 200,
                 recompute_residual: bool = True, grid: tuple[int, ...] | None = None) -> None:
        if not (isinstance(direction_net, nn.Module) or callable(direction_net)):
            raise ArgumentError(f"direction_net must be an nn.Module or a callable, got "
                                f"{type(direction_net).__name__}")
        self.direction_net = direction_net
        self.k = nonneg_int("k", k)
        self.tol = positive("tol", tol)
        self.max_iter = positive_int("max_iter", max_iter)
        self.recompute_residual = boolean("recompute_residual", recompute_residual)
        self.grid = grid

    def solve(self, A: Any, b: Tensor, x0: Tensor | None = None, *, tol: float | None = None,
              maxiter: int | None = None, grid: tuple[int, ...] | None = None,
              callback: Callable[[Tensor], None] | None = None) -> SolveResult:
        """Solve ``A x = b``; ``tol``, ``maxiter`` and ``grid`` default to the solver's."""
        return dcdm(A, b, self.direction_net, k=self.k, x0=x0, tol=self.tol if tol is None else tol,
                    maxiter=self.max_iter if maxiter is None else maxiter,
                    grid=self.grid if grid is None else grid, recompute_residual=self.recompute_residual,
                    callback=callback)

    def __repr__(self) -> str:
        return (f"DeepConjugateDirection(k={self.k}, tol={self.tol:g}, max_iter={self.max_iter}, "
                f"recompute_residual={self.recompute_residual})")


# ------------------------------------------------------------------------------------------ training
def scale_invariant_residual_loss(A: Any, b: Tensor, q: Tensor, reduction: str = "mean") -> Tensor:
    """``|| b - (q.b / q.A q) A q ||^2`` per right-hand side (paper slug: deep-cg): the residual after one
    optimally scaled step along q. Unchanged when q is multiplied by any c != 0.

    b, q: (n,) or (batch, n) rows (q may be image-shaped, (batch, 1, *grid): it is flattened per row).
    A: as for :func:`~gradkit.solvers.krylov.cg` (matrix or callable on (n, batch) columns), in q's dtype.
    reduction: ``"mean"`` over the batch (default), ``"sum"`` or ``"none"``. Differentiable in q (and b).
    """
    tensor("b", b, floating=True, min_dim=1)
    tensor("q", q, floating=True, min_dim=1)
    if reduction not in ("mean", "sum", "none"):
        raise ArgumentError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    single = b.dim() == 1
    Bm = b[None] if single else b.reshape(b.shape[0], -1)
    Qm = q.reshape(1, -1) if single else q.reshape(q.shape[0], -1)
    if Qm.shape != Bm.shape:
        raise ArgumentError(f"q must hold one direction per right-hand side of b, shape {tuple(Bm.shape)}, got "
                            f"{tuple(q.shape)}")
    op = as_operator(A, Bm.shape[1])
    if op.n != Bm.shape[1]:
        raise ArgumentError(f"b has {Bm.shape[1]} unknowns per row but A is {op.n} x {op.n}")
    AQ = op(Qm.T).T
    scale = (Qm * Bm).sum(1, keepdim=True) / (Qm * AQ).sum(1, keepdim=True)
    per = (Bm - scale * AQ).pow(2).sum(1)
    if reduction == "none":
        return per[0] if single else per
    return per.mean() if reduction == "mean" else per.sum()


def lanczos_ritz(A: Any, m: int, *, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ritz pairs of SPD ``A`` from ``m`` Lanczos steps with full reorthogonalisation, started at ``A xi``,
    ``xi ~ N(0, I)``: ``(theta, V)``, theta ascending (m',), V (n, m') orthonormal (float64 numpy).
    Stops early (m' < m) when the Krylov space is exhausted."""
    m = positive_int("m", m)
    op = as_operator(A, n)
    rng = np.random.default_rng(seed)
    dtype = op.matrix.dtype if op.matrix is not None else torch.float64

    def mv(v: np.ndarray) -> np.ndarray:
        return op(torch.from_numpy(v)[:, None].to(dtype)).double().cpu().numpy()[:, 0]

    w = mv(rng.standard_normal(op.n))
    Wm = np.zeros((op.n, min(m, op.n)))
    alphas, betas = [], []
    w = w / np.linalg.norm(w)
    for j in range(Wm.shape[1]):
        Wm[:, j] = w
        u = mv(w)
        a = float(w @ u)
        u = u - Wm[:, :j + 1] @ (Wm[:, :j + 1].T @ u)   # full reorthogonalisation (twice is enough)
        u = u - Wm[:, :j + 1] @ (Wm[:, :j + 1].T @ u)
        alphas.append(a)
        beta = float(np.linalg.norm(u))
        if j + 1 == Wm.shape[1] or beta <= 1e-12 * max(abs(a), 1.0):
            break
        betas.append(beta)
        w = u / beta
    t = len(alphas)
    T = np.diag(alphas) + np.diag(betas[:t - 1], 1) + np.diag(betas[:t - 1], -1)
    theta, Q0 = np.linalg.eigh(T)
    return theta, Wm[:, :t] @ Q0


def ritz_rhs_dataset(A: Any, m: int, n_samples: int, theta: int, *, low_boost: float = 9.0,
                     exact_eig: bool = False, eigenpairs: tuple[Tensor, Tensor] | None = None, seed: int = 0,
                     n: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Training right-hand sides from Ritz vectors of A, low end boosted (paper slug: deep-cg).

    ``b = sum_j c_j v_j / ||.||`` over m eigen/Ritz pairs in ascending order (values < 1e-8 dropped: a
    null space), with ``c_j = low_boost * N(0, 1)`` for the first ``m/2 + theta`` and ``N(0, 1)`` for the
    rest. Pairs come from ``eigenpairs`` (``(lam, V)``, e.g. :func:`gradkit.data.poisson2d.poisson2d_eigenpairs`),
    else from a dense ``eigh`` (``exact_eig=True``, n <= 4096), else from :func:`lanczos_ritz` with m steps.
    With exact pairs and m < n, m pairs evenly spaced in index over the spectrum are used. Returns
    (n_samples, n) unit rows of ``dtype``; deterministic given ``seed``.
    """
    m = positive_int("m", m)
    n_samples = positive_int("n_samples", n_samples)
    theta = nonneg_int("theta", theta)
    low_boost = real_scalar("low_boost", low_boost, nonneg=True)
    boolean("exact_eig", exact_eig)
    if eigenpairs is not None:
        lam, V = eigenpairs
        tensor("eigenpairs[0]", lam, floating=True, finite=True)
        tensor("eigenpairs[1]", V, floating=True, finite=True)
        if V.dim() != 2 or lam.dim() != 1 or V.shape[1] != lam.shape[0]:
            raise ArgumentError(f"eigenpairs must be (lam (m,), V (n, m)), got shapes {tuple(lam.shape)} and "
                                f"{tuple(V.shape)}")
        lam, V = lam.double().cpu().numpy(), V.double().cpu().numpy()
        exact = True
    elif exact_eig:
        op = as_operator(A, n)
        if op.n > 4096:
            raise ArgumentError(f"exact_eig needs a dense eigendecomposition: n must be <= 4096, got {op.n}")
        dense = op(torch.eye(op.n, dtype=op.matrix.dtype if op.matrix is not None else torch.float64))
        lam, V = np.linalg.eigh(dense.double().cpu().numpy())
        exact = True
    else:
        lam, V = lanczos_ritz(A, m, n=n, seed=seed)
        exact = False
    order = np.argsort(lam, kind="stable")
    lam, V = lam[order], V[:, order]
    keep = lam >= 1e-8
    lam, V = lam[keep], V[:, keep]
    if exact and V.shape[1] > m:
        pick = np.unique(np.round(np.linspace(0, V.shape[1] - 1, m)).astype(int))
        V = V[:, pick]
    count = V.shape[1]
    if count == 0:
        raise ArgumentError("A has no eigenvalue >= 1e-8: no Ritz vectors to build right-hand sides from")
    low = min(count, count // 2 + theta)
    rng = np.random.default_rng(seed)
    out = np.empty((n_samples, V.shape[0]))
    for s in range(0, n_samples, 1024):
        e = min(n_samples, s + 1024)
        C = rng.standard_normal((e - s, count))
        C[:, :low] *= low_boost
        Bs = C @ V.T
        out[s:e] = Bs / np.linalg.norm(Bs, axis=1, keepdims=True)
    return torch.from_numpy(out).to(dtype)
