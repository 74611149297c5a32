"""The 2-D Poisson problem on the unit square: 5-point Laplacian, its exact eigenpairs and random right-hand sides.

Procedural SPD systems for iterative solvers (paper slug: deep-cg). On an N x N grid of interior nodes
(row-major: node (i, j) has index i * N + j), the 5-point Laplacian (unscaled by h^2) is::

    (A u)_ij = 4 u_ij - u_{i-1,j} - u_{i+1,j} - u_{i,j-1} - u_{i,j+1}      (Dirichlet: u = 0 off the grid)

With homogeneous Dirichlet boundaries its eigenpairs are known in closed form (k, l = 1..N)::

    lambda_kl = 4 - 2 cos(pi k / (N + 1)) - 2 cos(pi l / (N + 1))
    v_kl(i, j) = (2 / (N + 1)) sin(pi k (i + 1) / (N + 1)) sin(pi l (j + 1) / (N + 1))

The Neumann variant (``dirichlet=False``) counts only neighbours inside the grid on the diagonal; it is
singular (constants span its null space).

>>> A = poisson2d(8)                                     # torch sparse CSR, 64 x 64, float64
>>> lam, V = poisson2d_eigenpairs(8)                     # ascending eigenvalues, orthonormal columns
>>> b = smooth_random_rhs(8, 3, generator=torch.Generator().manual_seed(0))   # (64, 3), unit columns
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from .._validate import ArgumentError, boolean, choice, integer, optional_generator, positive_int, real_scalar

FORMATS = ("torch", "scipy")


def _grid_size(N) -> int:
    return integer("N", N, low=2)


def poisson2d(N: int, *, dirichlet: bool = True, format: str = "torch", dtype: torch.dtype = torch.float64):
    """The 5-point Laplacian on an N x N grid (n = N^2 unknowns) as a sparse matrix (paper slug: deep-cg).

    format: ``"torch"`` (a ``torch.sparse_csr_tensor`` of ``dtype``) or ``"scipy"`` (a float64
    ``scipy.sparse.csr_matrix``). dirichlet: zero values outside the grid (SPD) or zero-flux walls
    (symmetric positive semi-definite, constants in the null space).
    """
    N = _grid_size(N)
    boolean("dirichlet", dirichlet)
    choice("format", format, FORMATS)
    one = np.ones(N)
    T = sp.diags([-one[:-1], -one[:-1]], [-1, 1], shape=(N, N))   # 1-D neighbour coupling
    I = sp.identity(N)
    off = sp.kron(I, T) + sp.kron(T, I)
    if dirichlet:
        diag = np.full(N * N, 4.0)
    else:
        diag = -np.asarray(off.sum(axis=1)).ravel()               # number of in-grid neighbours
    A = (off + sp.diags(diag)).tocsr()
    A.sort_indices()
    if format == "scipy":
        return A
    return scipy_to_torch_csr(A, dtype)


def scipy_to_torch_csr(A, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A scipy sparse matrix as a ``torch.sparse_csr_tensor`` of ``dtype`` (torch's beta-state warning muted)."""
    if not sp.issparse(A):
        raise ArgumentError(f"A must be a scipy sparse matrix, got {type(A).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    A = sp.csr_matrix(A)
    A.sort_indices()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(torch.from_numpy(A.indptr.astype(np.int64)),
                                       torch.from_numpy(A.indices.astype(np.int64)),
                                       torch.from_numpy(np.asarray(A.data, dtype=np.float64)).to(dtype),
                                       size=A.shape, check_invariants=False)


def poisson2d_eigenpairs(N: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact eigenpairs of the Dirichlet 5-point Laplacian: ``(lam, V)``, lam ascending (n,), V (n, n) orthonormal.

    ``A V = V diag(lam)`` with the closed forms in the module docstring; no eigensolver is run.
    N is limited to 96 (V is dense: n^2 entries).
    """
    N = integer("N", N, low=2, high=96)
    t = np.arange(1, N + 1)
    S = math.sqrt(2.0 / (N + 1)) * np.sin(np.pi * np.outer(np.arange(1, N + 1), t) / (N + 1))  # S[i, k]
    mu = 2.0 - 2.0 * np.cos(np.pi * t / (N + 1))
    lam = (mu[:, None] + mu[None, :]).ravel()                    # index k * N + l
    V = np.kron(S, S)                                            # V[i * N + j, k * N + l] = S[i,k] S[j,l]
    order = np.argsort(lam, kind="stable")
    return torch.from_numpy(lam[order]).to(dtype), torch.from_numpy(V[:, order]).to(dtype)


def smooth_random_rhs(N: int, count: int, *, decay: float = 2.0, noise: float = 0.1,
                      generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``count`` random right-hand sides on an N x N grid as unit-norm columns, shape (N^2, count).

    Each is a smooth random field (sine-series coefficients ~ N(0, 1) * (k^2 + l^2)^(-decay / 2), i.e.
    amplitude decaying like |k|^-decay) normalised to unit norm, plus ``noise`` x white noise of unit norm,
    normalised again. Deterministic given ``generator``.
    """
    N = _grid_size(N)
    count = positive_int("count", count)
    decay = real_scalar("decay", decay, nonneg=True)
    noise = real_scalar("noise", noise, nonneg=True)
    optional_generator(generator)
    t = torch.arange(1, N + 1, dtype=torch.float64)
    S = torch.sin(math.pi * torch.outer(t, t) / (N + 1))             # S[i, k]
    amp = (t[:, None] ** 2 + t[None, :] ** 2) ** (-decay / 2.0)
    out = torch.empty(N * N, count, dtype=torch.float64)
    for c in range(count):
        coef = torch.randn(N, N, generator=generator, dtype=torch.float64) * amp
        field = S @ coef @ S.T                                         # sum_kl c_kl sin(k..) sin(l..)
        field = field.reshape(-1) / field.norm()
        white = torch.randn(N * N, generator=generator, dtype=torch.float64)
        b = field + noise * white / white.norm()
        out[:, c] = b / b.norm()
    return out.to(dtype)
