"""Darcy flow ``-div(a grad u) = f`` on the unit square (or interval) with zero Dirichlet data, generated in
code (paper slug: mgno).

The coefficient is a thresholded Gaussian random field (the FNO recipe): ``psi ~ N(0, (-Laplace + tau^2)^(-alpha))``
sampled as a cosine series with coefficient std ``(pi^2 |k|^2 + tau^2)^(-alpha/2)`` (mean mode zero), and
``a = high where psi >= 0 else low``. The solution is the 5-point (3-point in 1-D) conservative finite-difference
solution on ``size`` interior nodes per axis (spacing ``h = 1 / (size + 1)``), with harmonic means of ``a`` on
interior faces and ``a`` of the node on boundary faces, solved by ``scipy.sparse.linalg.spsolve``::

    (A u)_i = sum over faces (i, j) of a_ij (u_i - u_j) / h^2,  u_j = 0 outside the domain

>>> a = np.full((15, 15), 2.0)
>>> u = darcy_solve(a)                        # -2 Laplace u = 1
>>> u.shape
(15, 15)
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .._cache import cache_dir
from .._validate import ArgumentError, choice, integer, nonneg_int, positive, positive_int
from .bundled import Split

__all__ = ["gaussian_random_field", "darcy_solve", "darcy_coefficients", "darcy_split"]


def gaussian_random_field(n_samples: int, size: int, *, dim: int = 2, alpha: float = 2.0, tau: float = 3.0,
                          seed: int = 0) -> np.ndarray:
    """``n_samples`` fields ``psi ~ N(0, (-Laplace + tau^2)^(-alpha))`` (Neumann cosine series, mean mode zero)
    sampled at the ``size`` cell centres per axis of the unit square (``dim=2``) or interval (``dim=1``).

    Returns a float64 array of shape ``(n_samples, size[, size])``.
    """
    from scipy.fft import idctn

    n_samples, size = positive_int("n_samples", n_samples), integer("size", size, low=2)
    dim = choice("dim", dim, (1, 2))
    alpha, tau = positive("alpha", alpha), positive("tau", tau)
    rng = np.random.default_rng(nonneg_int("seed", seed))
    k = np.arange(size, dtype=np.float64)
    k2 = k**2 if dim == 1 else k[:, None] ** 2 + k[None, :] ** 2
    std = (np.pi**2 * k2 + tau**2) ** (-alpha / 2.0)
    std.flat[0] = 0.0
    xi = rng.standard_normal((n_samples,) + (size,) * dim) * std
    return idctn(xi, type=2, axes=tuple(range(1, dim + 1)))


def darcy_coefficients(n_samples: int, size: int, *, dim: int = 2, high: float = 12.0, low: float = 3.0,
                       seed: int = 0) -> np.ndarray:
    """Piecewise-constant coefficients ``a = high if psi >= 0 else low`` of :func:`gaussian_random_field` fields."""
    positive("high", high), positive("low", low)
    psi = gaussian_random_field(n_samples, size, dim=dim, seed=seed)
    return np.where(psi >= 0.0, float(high), float(low))


def _faces(a: np.ndarray, axis: int) -> np.ndarray:
    """Face coefficients along ``axis``: the node's value on the two boundary faces, harmonic means inside."""
    lo, hi = np.take(a, [0], axis=axis), np.take(a, [-1], axis=axis)
    a0, a1 = np.delete(a, -1, axis=axis), np.delete(a, 0, axis=axis)
    return np.concatenate([lo, 2.0 * a0 * a1 / (a0 + a1), hi], axis=axis)


def darcy_solve(a: np.ndarray, f: float | np.ndarray = 1.0) -> np.ndarray:
    """Solve ``-div(a grad u) = f``, ``u = 0`` on the boundary, for one coefficient field ``a`` of shape
    ``(n,)`` or ``(n, n)`` given at the interior nodes (spacing ``1 / (n + 1)``); returns ``u`` of ``a``'s shape.

    f: a number or an array of ``a``'s shape. Uses the conservative FD stencil of the module docstring.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    a = np.asarray(a, dtype=np.float64)
    if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[0] != a.shape[1]) or a.shape[0] < 2:
        raise ArgumentError(f"a must have shape (n,) or (n, n) with n >= 2, got {a.shape}")
    if not np.all(np.isfinite(a)) or not np.all(a > 0):
        raise ArgumentError("a must be finite and > 0 everywhere (a diffusion coefficient)")
    rhs = np.broadcast_to(np.asarray(f, dtype=np.float64), a.shape) if np.ndim(f) == 0 else np.asarray(f, float)
    if rhs.shape != a.shape or not np.all(np.isfinite(rhs)):
        raise ArgumentError(f"f must be a finite number or a finite array of shape {a.shape}, got "
                            f"{'shape ' + str(rhs.shape) if rhs.shape != a.shape else 'non-finite values'}")
    n = a.shape[0]
    h2 = 1.0 / (n + 1) ** 2
    if a.ndim == 1:
        fx = _faces(a, 0)
        mat = sp.diags([fx[:-1] + fx[1:], -fx[1:-1], -fx[1:-1]], [0, -1, 1], format="csc")
    else:
        fx, fy = _faces(a, 0), _faces(a, 1)
        diag = (fx[:-1] + fx[1:] + fy[:, :-1] + fy[:, 1:]).ravel()
        along0 = fx[1:-1].ravel()  # (i, j) - (i + 1, j)
        along1 = np.concatenate([fy[:, 1:-1], np.zeros((n, 1))], axis=1).ravel()[:-1]  # (i, j) - (i, j + 1)
        mat = sp.diags([diag, -along0, -along0, -along1, -along1], [0, -n, n, -1, 1], format="csc")
    u = spsolve(mat / h2, rhs.ravel())
    return np.asarray(u).reshape(a.shape)


def _generate(n: int, size: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a = darcy_coefficients(n, size, dim=dim, seed=seed)
    u = np.stack([darcy_solve(ai) for ai in a])
    return a, u


def darcy_split(n_train: int, n_test: int, size: int = 32, *, dim: int = 2, seed: int = 0, cache: bool = True
                ) -> Split:
    """A train/test set of Darcy problems: ``x`` = coefficient ``a`` and ``y`` = solution ``u``, each float32
    of shape ``(N, 1, size[, size])``; the first ``n_train`` draws of the seed's stream train, the rest test.

    Generated once (about 5 ms per 32x32 problem) and cached under the gradkit cache directory.

    >>> s = darcy_split(4, 2, size=8, cache=False)
    >>> s.x_train.shape, s.y_test.shape
    (torch.Size([4, 1, 8, 8]), torch.Size([2, 1, 8, 8]))
    """
    n_train, n_test = positive_int("n_train", n_train), positive_int("n_test", n_test)
    size, dim, seed = integer("size", size, low=2), choice("dim", dim, (1, 2)), nonneg_int("seed", seed)
    path = cache_dir() / f"darcy{dim}d-s{size}-n{n_train}+{n_test}-seed{seed}-v1.npz"
    a = u = None
    if cache:
        try:
            with np.load(path) as z:
                a, u = z["a"], z["u"]
        except (OSError, KeyError, ValueError):
            a = u = None
    if a is None:
        a, u = _generate(n_train + n_test, size, dim, seed)
        if cache:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
                np.savez(tmp, a=a, u=u)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache only costs time
    x = torch.tensor(a, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(u, dtype=torch.float32).unsqueeze(1)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:], name=f"darcy{dim}d-{size}")
