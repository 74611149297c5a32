"""Krylov solvers for symmetric positive definite systems: CG and preconditioned CG (paper slug: deep-cg).

The iterative-solver convention of :mod:`gradkit.solvers`::

    solve(A, b, *, x0=None, tol=1e-6, maxiter=None, M=None, callback=None) -> SolveResult

``A`` is a dense or sparse torch matrix (COO/CSR), a scipy sparse matrix, or a callable ``X -> A X`` on
(n, k) tensors. ``b`` is one right-hand side (n,) or k of them as columns (n, k), solved together with
per-column step lengths. Every solver stops a column on its unpreconditioned true residual,
``||b - A x|| <= tol * ||b||`` (relative; ``x0 = 0`` by default), and returns a :class:`SolveResult`
(solution, residual-norm history, iterations, converged flag; per column for (n, k) input).

Preconditioned CG (Hestenes-Stiefel with M ~ A^-1)::

    r0 = b - A x0,  z0 = M r0,  p0 = z0
    alpha_j = r_j.z_j / p_j.A p_j,   x_{j+1} = x_j + alpha_j p_j,   r_{j+1} = r_j - alpha_j A p_j
    z_{j+1} = M r_{j+1},   beta_j = r_{j+1}.z_{j+1} / r_j.z_j,   p_{j+1} = z_{j+1} + beta_j p_j

Preconditioners: :class:`IC0` (zero fill-in incomplete Cholesky, ``A ~ L L^T`` on the pattern of
``tril(A)``) and :func:`amg_preconditioner` (one smoothed-aggregation V-cycle; needs the optional
``pyamg``). A non-symmetric operator (checked exactly for matrices, by a random probe for callables) or
an indefinite one (``p.A p <= 0`` during the iteration) raises :class:`NotSPDError` instead of looping.

>>> A = poisson2d(16)                                      # from gradkit.data.poisson2d
>>> res = solve(A, torch.ones(256, dtype=torch.float64), tol=1e-8)
>>> res.converged, res.iterations, float(res.relative_residuals[-1]) <= 1e-8
(True, 28, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .._validate import ArgumentError, positive, positive_int, tensor
from ..data.poisson2d import scipy_to_torch_csr

Matvec = Callable[[Tensor], Tensor]


class NotSPDError(ArgumentError):
    """The operator (or the preconditioner) given to a CG-type solver is not symmetric positive definite."""


# ------------------------------------------------------------------------------------------ operators
def _is_scipy_sparse(A: Any) -> bool:
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy is a core dependency
        return False
    return sp.issparse(A)


@dataclass
class Operator:
    """A linear operator on (n, k) column blocks: ``matvec(X) = A X``; ``matrix`` is the explicit matrix
    (dense or sparse torch tensor) when there is one, else None."""

    n: int
    matvec: Matvec
    matrix: Tensor | None = None

    def __call__(self, X: Tensor) -> Tensor:
        return self.matvec(X)


def as_operator(A: Any, n: int | None = None, *, name: str = "A") -> Operator:
    """Wrap a dense/sparse torch matrix, a scipy sparse matrix or a callable as an :class:`Operator`.

    A callable must map an (n, k) tensor to an (n, k) tensor; ``n`` is then required (the solvers pass
    ``b.shape[0]``). Raises :class:`ArgumentError` for non-square matrices or other types.
    """
    if isinstance(A, Operator):
        return A
    if _is_scipy_sparse(A):
        A = scipy_to_torch_csr(A)
    if isinstance(A, Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ArgumentError(f"{name} must be a square matrix, got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            raise ArgumentError(f"{name} must be a floating-point matrix, got dtype {A.dtype}")
        M = A
        return Operator(A.shape[0], lambda X: M @ X, M)
    if callable(A):
        if n is None:
            raise ArgumentError(f"{name} is a callable: the size n of the system must be given")
        fn = A

        def matvec(X: Tensor) -> Tensor:
            Y = fn(X)
            if not isinstance(Y, Tensor) or Y.shape != X.shape:
                raise ArgumentError(f"{name}(X) must return a tensor of the shape of X {tuple(X.shape)}, got "
                                    f"{tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__}")
            return Y

        return Operator(int(n), matvec, None)
    raise ArgumentError(f"{name} must be a torch tensor (dense or sparse), a scipy sparse matrix or a callable "
                        f"X -> A X, got {type(A).__name__}")


def _max_abs(T: Tensor) -> float:
    if T.layout == torch.strided:
        return float(T.abs().max()) if T.numel() else 0.0
    v = T.to_sparse_coo().coalesce().values()
    return float(v.abs().max()) if v.numel() else 0.0


def check_spd(op: Operator, dtype: torch.dtype, device: torch.device, *, name: str = "A",
              generator: torch.Generator | None = None) -> None:
    """Raise :class:`NotSPDError` when ``op`` is visibly not SPD: not symmetric (exact test for a matrix,
    ``u.(A v) == v.(A u)`` for random u, v for a callable) or a diagonal entry <= 0 (matrices).
    Indefiniteness that passes these is caught by the solvers (``p.A p <= 0``)."""
    M = op.matrix
    if M is not None:
        scale = _max_abs(M)
        if M.layout == torch.strided:
            asym = float((M - M.mT).abs().max())
            diag = M.diagonal()
        else:
            C = M.to_sparse_coo().coalesce()
            asym = _max_abs((C - C.t()).coalesce())
            idx = C.indices()
            on = idx[0] == idx[1]
            diag = torch.zeros(op.n, dtype=C.dtype, device=C.device).index_add_(0, idx[0][on], C.values()[on])
        eps = torch.finfo(M.dtype).eps
        if asym > 100 * eps * max(scale, 1e-300):
            raise NotSPDError(f"{name} must be symmetric for a CG-type solver, got max |A - A^T| = {asym:.3g} "
                              f"(max |A| = {scale:.3g})")
        if op.n and float(diag.min()) <= 0:
            i = int(diag.argmin())
            raise NotSPDError(f"{name} must be positive definite for a CG-type solver, got diagonal entry "
                              f"A[{i}, {i}] = {float(diag[i]):.3g} <= 0")
        return
    gen = generator if generator is not None else torch.Generator().manual_seed(12345)
    U = torch.randn(op.n, 2, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    AU = op(U)
    lhs, rhs = float(U[:, 0] @ AU[:, 1]), float(U[:, 1] @ AU[:, 0])
    size = float(U[:, 0].norm() * AU[:, 1].norm() + U[:, 1].norm() * AU[:, 0].norm())
    if abs(lhs - rhs) > math.sqrt(torch.finfo(dtype).eps) * max(size, 1e-300):
        raise NotSPDError(f"{name} must be symmetric for a CG-type solver: u.(A v) = {lhs:.6g} but v.(A u) = "
                          f"{rhs:.6g} for random u, v")
    if float(U[:, 0] @ AU[:, 0]) <= 0:
        raise NotSPDError(f"{name} must be positive definite for a CG-type solver: u.(A u) = "
                          f"{float(U[:, 0] @ AU[:, 0]):.3g} <= 0 for a random u")


# ------------------------------------------------------------------------------------------ the result
@dataclass
class SolveResult:
    """Outcome of an iterative solve.

    x: the solution, shaped like ``b``. residuals: ``||b - A x_j||`` for j = 0..iterations, shape
    (iterations + 1,) for one right-hand side or (iterations + 1, k) for k columns (a converged column
    keeps its last value); the last row is the true residual of the returned ``x``. iterations and
    converged: an int and a bool for one right-hand side, (k,) tensors for k columns. b_norm: ``||b||``
    per column (a float for one right-hand side).
    """

    x: Tensor
    residuals: Tensor
    iterations: Any
    converged: Any
    b_norm: Any

    @property
    def relative_residuals(self) -> Tensor:
        """``residuals / ||b||`` (a zero right-hand side divides by 1)."""
        bn = torch.as_tensor(self.b_norm, dtype=self.residuals.dtype, device=self.residuals.device)
        return self.residuals / torch.where(bn > 0, bn, torch.ones_like(bn))


@dataclass
class SolveState:
    """The start of an iterative solve, shared by the solvers here: the operator, ``b`` and ``x`` as (n, k)
    blocks (``single``: ``b`` was one (n,) vector), the validated tolerance and iteration cap, the target
    residual norms ``tol ||b||``, the residual R = B - A X, its norms and their history, per-column iteration
    counts and convergence flags."""

    op: Operator
    B: Tensor
    X: Tensor
    single: bool
    tol: float
    maxiter: int
    bnorm: Tensor
    target: Tensor
    R: Tensor
    rn: Tensor
    history: list
    iters: Tensor
    done: Tensor

    def result(self) -> "SolveResult":
        """Pack the state into a :class:`SolveResult` shaped like the input ``b``."""
        res = torch.stack(self.history)
        if self.single:
            return SolveResult(self.X[:, 0], res[:, 0], int(self.iters[0]), bool(self.done[0]),
                               float(self.bnorm[0]))
        return SolveResult(self.X, res, self.iters, self.done, self.bnorm)


def begin_solve(A: Any, b: Tensor, x0: Tensor | None, tol: float, maxiter: int | None,
                callback: Any = None, check: bool = True) -> SolveState:
    """Validate the arguments every solver shares and compute the initial residual (see :class:`SolveState`).

    Raises :class:`ArgumentError` for a bad ``b``/``x0``/``tol``/``maxiter``/``callback`` and
    :class:`NotSPDError` when ``check`` finds A visibly not SPD (:func:`check_spd`).
    """
    op = as_operator(A, b.shape[0] if isinstance(b, Tensor) and b.dim() >= 1 else None)
    tensor("b", b, floating=True, finite=True)
    if b.dim() not in (1, 2):
        raise ArgumentError(f"b must have shape (n,) or (n, k), got {tuple(b.shape)}")
    if b.shape[0] != op.n:
        raise ArgumentError(f"b must have {op.n} rows to match A of size {op.n} x {op.n}, got shape {tuple(b.shape)}")
    if op.matrix is not None and op.matrix.dtype != b.dtype:
        raise ArgumentError(f"A and b must share a dtype, got {op.matrix.dtype} and {b.dtype}")
    tol = positive("tol", tol)
    maxiter = 10 * op.n if maxiter is None else positive_int("maxiter", maxiter)
    if callback is not None and not callable(callback):
        raise ArgumentError(f"callback must be callable or None, got {type(callback).__name__}")
    single = b.dim() == 1
    B = b[:, None] if single else b
    if x0 is None:
        X = torch.zeros_like(B)
    else:
        tensor("x0", x0, floating=True, finite=True)
        if x0.shape != b.shape:
            raise ArgumentError(f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
        X = (x0[:, None] if single else x0).to(B.dtype).clone()
    if check:
        check_spd(op, B.dtype, B.device)
    bnorm = B.norm(dim=0)
    target = tol * bnorm
    R = B - op(X)
    rn = R.norm(dim=0)
    return SolveState(op, B, X, single, tol, maxiter, bnorm, target, R, rn, [rn.clone()],
                      torch.zeros(B.shape[1], dtype=torch.long, device=B.device), rn <= target)


def _as_preconditioner(M: Any, n: int) -> Matvec | None:
    if M is None:
        return None
    return as_operator(M, n, name="M").matvec


# ------------------------------------------------------------------------------------------ CG / PCG
def _check_precond(rz: Tensor, done: Tensor, rn: Tensor, it: int) -> None:
    bad = ~done & (rz <= 0) & (rn > 0)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise NotSPDError(f"M is not positive definite: r.M r = {float(rz[j]):.3g} <= 0 at iteration {it} "
                          f"(column {j})")


def cg(A: Any, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-6, maxiter: int | None = None,
       M: Any = None, callback: Callable[[Tensor], None] | None = None, check: bool = True) -> SolveResult:
    """Conjugate gradients (preconditioned when ``M`` ~ A^-1 is given), batched over columns of ``b``.

    Stops a column when ``||b - A x|| <= tol ||b||``. The recurrence residual decides first; the true
    residual is then recomputed and the iteration resumes from it if round-off has drifted above the
    tolerance. ``callback(x)`` is called after every iteration with the current solution (shaped like
    ``b``). ``check``: test symmetry/positivity of A up front (see :func:`check_spd`). Raises
    :class:`NotSPDError` for a non-SPD A or M, :class:`ArgumentError` for bad arguments.
    """
    st = begin_solve(A, b, x0, tol, maxiter, callback, check)
    op, B, X, R, rn, target, done, iters = st.op, st.B, st.X, st.R, st.rn, st.target, st.done, st.iters
    precond = _as_preconditioner(M, op.n)
    Z = precond(R) if precond is not None else R
    rz = (R * Z).sum(0)
    if precond is not None:
        _check_precond(rz, done, rn, 0)
    P = Z.clone()
    tiny = torch.finfo(B.dtype).tiny
    for it in range(1, st.maxiter + 1):
        if bool(done.all()):
            break
        active = ~done
        AP = op(P)
        pAp = (P * AP).sum(0)
        pn2 = (P * P).sum(0)
        bad = active & (pAp <= 0) & (pn2 > tiny)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise NotSPDError(f"A is not positive definite: p.A p = {float(pAp[j]):.3g} <= 0 at iteration {it} "
                              f"(column {j})")
        safe = torch.where(active & (pAp > 0), pAp, torch.ones_like(pAp))
        alpha = torch.where(active & (pAp > 0), rz / safe, torch.zeros_like(rz))
        X = X + alpha * P
        R = R - alpha * AP
        rn = torch.where(active, R.norm(dim=0), rn)
        iters = iters + active.long()
        newly = active & (rn <= target)
        if bool(newly.any()):  # confirm on the true residual; resume from it where round-off drifted
            Rt = B - op(X)
            rt = Rt.norm(dim=0)
            R = torch.where(newly, Rt, R)
            rn = torch.where(newly, rt, rn)
            newly = newly & (rt <= target)
        done = done | newly
        st.history.append(rn.clone())
        if callback is not None:
            callback(X[:, 0] if st.single else X)
        Z = precond(R) if precond is not None else R
        rz_new = (R * Z).sum(0)
        if precond is not None:
            _check_precond(rz_new, done, rn, it)
        beta = torch.where(~done & (rz != 0), rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)),
                           torch.zeros_like(rz))
        P = Z + beta * P
        rz = rz_new
    st.X, st.iters, st.done = X, iters, done
    return st.result()


def solve(A: Any, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-6, maxiter: int | None = None,
          M: Any = None, callback: Callable[[Tensor], None] | None = None) -> SolveResult:
    """Solve the SPD system ``A x = b`` by (preconditioned) CG: :func:`cg` with its checks on. See the module."""
    return cg(A, b, x0=x0, tol=tol, maxiter=maxiter, M=M, callback=callback)


# ------------------------------------------------------------------------------------------ preconditioners
def _scipy_csr(A: Any, name: str):
    import scipy.sparse as sp

    if sp.issparse(A):
        return sp.csr_matrix(A, dtype=np.float64)
    if isinstance(A, Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ArgumentError(f"{name} must be a square matrix, got shape {tuple(A.shape)}")
        if A.layout == torch.strided:
            return sp.csr_matrix(A.detach().cpu().double().numpy())
        C = A.detach().to_sparse_coo().coalesce().cpu()
        i = C.indices().numpy()
        return sp.csr_matrix((C.values().double().numpy(), (i[0], i[1])), shape=tuple(A.shape))
    raise ArgumentError(f"{name} must be a torch or scipy sparse matrix (or a dense tensor), got "
                        f"{type(A).__name__}")


class _HostPreconditioner:
    """Applies a float64 numpy map ``(n, k) -> (n, k)`` to torch (n, k) or (n,) tensors on any device."""

    def _apply_np(self, R: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, R: Tensor) -> Tensor:
        out = self._apply_np(R.detach().cpu().double().numpy())
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=R.device, dtype=R.dtype)

    def apply_numpy(self, r: np.ndarray) -> np.ndarray:
        """The preconditioner on a numpy vector or (n, k) block (for scipy's ``cg(..., M=...)``)."""
        r = np.asarray(r, dtype=np.float64)
        return self._apply_np(r)

    def as_linear_operator(self, n: int):
        """A ``scipy.sparse.linalg.LinearOperator`` for scipy's solvers."""
        from scipy.sparse.linalg import LinearOperator

        return LinearOperator((n, n), matvec=self.apply_numpy, dtype=np.float64)


class IC0(_HostPreconditioner):
    """Zero fill-in incomplete Cholesky preconditioner ``M = (L L^T)^-1`` (paper slug: deep-cg, a baseline).

    L has the sparsity pattern of ``tril(A)``: for each row i and each stored j < i,
    ``l_ij = (a_ij - sum_{k<j} l_ik l_jk) / l_jj`` over the common pattern, ``l_ii = sqrt(a_ii - sum_k l_ik^2)``.
    For the 5-point stencil this is ``d_i^2 = a_ii - l_{i,i-1}^2 - l_{i,i-N}^2``. Applied by two sparse
    triangular solves with a prefactorised L (SuperLU, natural ordering, no pivoting), on the host in float64.
    Raises :class:`NotSPDError` when a pivot is not positive (A not SPD, or IC(0) breaks down).

    >>> M = IC0(poisson2d(32))
    >>> solve(poisson2d(32), b, M=M).iterations      # ~3x fewer than plain CG (b: (1024,) float64)
    """

    def __init__(self, A: Any) -> None:
        import scipy.sparse as sp
        from scipy.sparse.linalg import splu

        C = _scipy_csr(A, "A")
        n = C.shape[0]
        C.sort_indices()
        indptr, indices, data = C.indptr, C.indices, C.data
        rows: list[dict[int, float]] = []
        diag = np.zeros(n)
        for i in range(n):
            lo, hi = indptr[i], indptr[i + 1]
            cols, vals = indices[lo:hi], data[lo:hi]
            row: dict[int, float] = {}
            aii = 0.0
            for j, a in zip(cols.tolist(), vals.tolist()):
                if j < i:
                    s = a
                    rj = rows[j]
                    if len(rj) < len(row):
                        s -= sum(v * row[c] for c, v in rj.items() if c in row)
                    else:
                        s -= sum(v * rj[c] for c, v in row.items() if c in rj)
                    row[j] = s / diag[j]
                elif j == i:
                    aii = a
            d2 = aii - sum(v * v for v in row.values())
            if not d2 > 0:
                raise NotSPDError(f"IC(0) broke down at row {i}: pivot {d2:.3g} <= 0 (A must be SPD, e.g. an "
                                  "M-matrix, for IC(0) to exist)")
            diag[i] = math.sqrt(d2)
            rows.append(row)
        r_idx = [i for i, row in enumerate(rows) for _ in row] + list(range(n))
        c_idx = [c for row in rows for c in row] + list(range(n))
        vals = [v for row in rows for v in row.values()] + diag.tolist()
        self.L = sp.csc_matrix((vals, (r_idx, c_idx)), shape=(n, n))
        self.n = n
        self._lu = splu(self.L, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})

    def _apply_np(self, R: np.ndarray) -> np.ndarray:
        y = self._lu.solve(R)                 # L y = r
        return self._lu.solve(y, trans="T")   # L^T z = y


class AMGPreconditioner(_HostPreconditioner):
    """One V-cycle of pyamg's smoothed-aggregation AMG as a preconditioner (a baseline; needs ``pyamg``)."""

    def __init__(self, A: Any, cycle: str = "V", **kwargs: Any) -> None:
        try:
            import pyamg
        except ImportError as e:
            raise ImportError("amg_preconditioner needs the optional dependency pyamg "
                              "(pip install 'gradkit[amg]' or pip install pyamg)") from e
        C = _scipy_csr(A, "A")
        self.n = C.shape[0]
        self.hierarchy = pyamg.smoothed_aggregation_solver(C, **kwargs)
        self._M = self.hierarchy.aspreconditioner(cycle=cycle)

    def _apply_np(self, R: np.ndarray) -> np.ndarray:
        if R.ndim == 1:
            return self._M @ R
        return np.stack([self._M @ R[:, j] for j in range(R.shape[1])], axis=1)


def amg_preconditioner(A: Any, cycle: str = "V", **kwargs: Any) -> AMGPreconditioner:
    """Smoothed-aggregation AMG (pyamg) V-cycle preconditioner for :func:`cg`; ImportError without pyamg."""
    return AMGPreconditioner(A, cycle=cycle, **kwargs)
