"""Iterates of classical least-squares solvers: Newton-Schulz pseudo-inverse and gradient descent (icl-newton).

The reference algorithms of Fu, Chen, Jia, Sharan, "Transformers Learn Higher-Order Optimization Methods for
In-Context Learning" (arXiv 2310.17086): a transformer's layers are compared with k steps of these
iterations run on the in-context least-squares problem min_w ||X w - y||^2 (X: m x d, y: m).

    Newton-Schulz, direct form:  M_0 = alpha X^T,  M_{k+1} = M_k (2 I - X M_k)            -> X^+
    Newton-Schulz, gram form:    S = X^T X,  M_0 = alpha S,  M_{k+1} = 2 M_k - M_k S M_k  -> S^+  (X^+ = S^+ X^T)
                                 (the paper's "Iterative Newton"; w_k = M_k X^T y)
    alpha = safety * 2 / ||A A^T||   with A = X (direct) or S (gram); Frobenius norm by default
    gradient descent:            w_0 = 0,  w_{k+1} = w_k - eta X^T (X w_k - y)

Both Newton forms converge quadratically, (I - M_k S) = (I - M_0 S)^(2^k) on the range of X^T (gram form:
(I - M_k S) = (I - alpha S^2)^(2^k)); GD converges linearly, (1 - eta s)^k per eigenvalue s of S. Everything
is batched over leading dimensions, and zero rows of X (padding) leave every iterate unchanged.

>>> X, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
>>> w = newton_iterates(X, y, steps=12)[-1]             # 12 Newton steps: the least-squares solution
>>> torch.allclose(w, torch.linalg.pinv(X) @ y)
True
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._validate import ArgumentError, choice, is_int, positive_int, real_in, tensor

FORMS = ("direct", "gram")
NORMS = ("frobenius", "spectral")
DEFAULT_SAFETY = 0.95


def _matrix(name: str, X: Tensor) -> Tensor:
    X = tensor(name, X, floating=True, min_dim=2)
    if X.shape[-1] == 0 or X.shape[-2] == 0:
        raise ArgumentError(f"{name} must have at least one row and one column, got shape {tuple(X.shape)}")
    return X


def _targets(X: Tensor, y: Tensor) -> Tensor:
    y = tensor("y", y, floating=True, min_dim=1)
    if y.shape != X.shape[:-1]:
        raise ArgumentError(f"y must have shape X.shape[:-1] = {tuple(X.shape[:-1])}, got {tuple(y.shape)}")
    return y


def _per_matrix(name: str, value: float | Tensor, X: Tensor) -> Tensor:
    """A positive scalar or a tensor of per-matrix scalars (shape X.shape[:-2]) as a tensor of that shape."""
    batch = X.shape[:-2]
    if isinstance(value, Tensor):
        if not value.is_floating_point() or value.shape not in (batch, torch.Size()):
            raise ArgumentError(f"{name} must be a number or a floating tensor of shape {tuple(batch)}, got "
                                f"dtype {value.dtype} and shape {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise ArgumentError(f"{name} must be finite and >= 0 everywhere, got {value}")
        return value.to(X.dtype).expand(batch)
    v = real_in(name, value, 0.0, low_open=True)
    return torch.full(batch, v, dtype=X.dtype, device=X.device)


def newton_alpha(X: Tensor, form: str = "direct", norm: str = "frobenius", safety: float = DEFAULT_SAFETY) -> Tensor:
    """Initial scale of the Newton-Schulz iteration: ``alpha = safety * 2 / ||A A^T||`` per matrix (icl-newton).

    A = X for the direct form, A = S = X^T X for the gram form. The iteration converges when the spectrum of
    I - alpha A^T A lies in (-1, 1] on the range of A^T, i.e. 0 < alpha < 2 / lambda_max(A^T A); the
    Frobenius norm (the official code's choice) bounds lambda_max from above, and ``safety`` < 1 keeps rank-1
    matrices (one in-context example) strictly inside: with safety = 1 their iterate M_1 is exactly 0 and the
    iteration stalls. ``norm="spectral"`` with ``safety=1`` is the paper's printed alpha (on the boundary).
    A zero matrix gets alpha = 0 (every iterate is then 0). Returns a tensor of shape ``X.shape[:-2]``.

    >>> newton_alpha(torch.eye(3), form="gram", safety=1.0)     # S = I, ||S S^T||_F = sqrt(3)
    tensor(1.1547)
    """
    X = _matrix("X", X)
    choice("form", form, FORMS)
    choice("norm", norm, NORMS)
    safety = real_in("safety", safety, 0.0, 1.0, low_open=True)
    s2 = torch.linalg.svdvals(X).square()          # eigenvalues of S = X^T X (and of X X^T)
    if form == "gram":
        s2 = s2.square()                           # eigenvalues of S S^T = S^2
    size = s2.square().sum(-1).sqrt() if norm == "frobenius" else s2.amax(-1)
    return torch.where(size > 0, safety * 2.0 / size.clamp_min(torch.finfo(size.dtype).tiny), torch.zeros_like(size))


def _alpha(X: Tensor, form: str, alpha: float | Tensor | None) -> Tensor:
    if alpha is None:
        return newton_alpha(X, form)
    return _per_matrix("alpha", alpha, X)


def _gram_iterates(S: Tensor, alpha: Tensor, steps: int) -> list[Tensor]:
    M = alpha[..., None, None] * S
    out = []
    for _ in range(steps):
        M = 2 * M - M @ S @ M
        out.append(M)
    return out


def _direct_iterates(X: Tensor, alpha: Tensor, steps: int) -> list[Tensor]:
    Xt = X.transpose(-1, -2)
    M = alpha[..., None, None] * Xt
    out = []
    for _ in range(steps):
        M = 2 * M - M @ (X @ M)
        out.append(M)
    return out


def newton_schulz_pinv(X: Tensor, steps: int, *, form: str = "direct", alpha: float | Tensor | None = None,
                       return_all: bool = False) -> Tensor:
    """The pseudo-inverse X^+ (shape ``(..., d, m)``) after ``steps`` Newton-Schulz iterations (icl-newton).

    form ``"direct"`` iterates M_{k+1} = M_k (2 I - X M_k) from M_0 = alpha X^T; ``"gram"`` (the paper's
    Iterative Newton) iterates M_{k+1} = 2 M_k - M_k S M_k on S = X^T X from M_0 = alpha S and returns
    M_k X^T. ``alpha``: a positive number, a tensor of per-matrix values (shape ``X.shape[:-2]``), or None for
    :func:`newton_alpha` of the form. ``return_all``: the iterates k = 1..steps stacked on a new dim -3.

    On rank-deficient X the gram iterate M_k doubles the round-off left in the null space of S at every step
    (M_k itself leaves S^+ after about 30 steps); the product M_k X^T returned here cancels most of it (about
    1e-8 after 80 steps in float64), while the direct form stays exact for any number of steps.

    >>> X = torch.randn(6, 3, dtype=torch.float64)
    >>> torch.allclose(newton_schulz_pinv(X, 40), torch.linalg.pinv(X))
    True
    """
    X = _matrix("X", X)
    steps = positive_int("steps", steps)
    choice("form", form, FORMS)
    a = _alpha(X, form, alpha)
    if form == "direct":
        its = _direct_iterates(X, a, steps)
    else:
        Xt = X.transpose(-1, -2)
        its = [M @ Xt for M in _gram_iterates(Xt @ X, a, steps)]
    return torch.stack(its, dim=-3) if return_all else its[-1]


def newton_iterates(X: Tensor, y: Tensor, steps: int, *, form: str = "direct",
                    alpha: float | Tensor | None = None) -> Tensor:
    """Least-squares estimates w_k = M_k X^T y (gram) or M_k y (direct) for k = 1..steps (icl-newton).

    X: ``(..., m, d)``, y: ``(..., m)``; returns ``(..., steps, d)``. The forms and ``alpha`` are those of
    :func:`newton_schulz_pinv`; the gram form never builds the ``(d, m)`` pseudo-inverse.
    """
    X = _matrix("X", X)
    y = _targets(X, y)
    steps = positive_int("steps", steps)
    choice("form", form, FORMS)
    a = _alpha(X, form, alpha)
    if form == "direct":
        ws = [(M @ y[..., None])[..., 0] for M in _direct_iterates(X, a, steps)]
    else:
        Xt = X.transpose(-1, -2)
        b = Xt @ y[..., None]
        ws = [(M @ b)[..., 0] for M in _gram_iterates(Xt @ X, a, steps)]
    return torch.stack(ws, dim=-2)


def _steps_grid(steps_grid: Sequence[int]) -> list[int]:
    try:
        grid = list(steps_grid)
    except TypeError:
        raise ArgumentError(f"steps_grid must be a sequence of ints, got {type(steps_grid).__name__}") from None
    if not grid or not all(is_int(k, low=0) for k in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ArgumentError(f"steps_grid must be a non-empty, strictly increasing sequence of ints >= 0, got {grid!r}")
    return [int(k) for k in grid]


def inverse_spectral_lr(X: Tensor, scale: float = 1.0) -> Tensor:
    """Per-matrix step size ``scale / lambda_max(X^T X)`` (0 for a zero matrix), shape ``X.shape[:-2]`` (icl-newton).

    GD converges for eta < 2 / lambda_max; ``scale=1`` is a safe, conditioning-independent choice.
    """
    X = _matrix("X", X)
    scale = real_in("scale", scale, 0.0, 2.0, low_open=True, high_open=True)
    lam = torch.linalg.svdvals(X)[..., 0].square()
    return torch.where(lam > 0, scale / lam.clamp_min(torch.finfo(lam.dtype).tiny), torch.zeros_like(lam))


def gd_iterates(X: Tensor, y: Tensor, lr: float | Tensor | None = None,
                steps_grid: Sequence[int] = tuple(2 ** j for j in range(13))) -> Tensor:
    """Gradient-descent estimates w_k on 1/2 ||X w - y||^2 from w_0 = 0, at every k of ``steps_grid`` (icl-newton).

    w_{k+1} = w_k - lr X^T (X w_k - y) (the official code's update: no 1/m). ``lr``: a number (the code uses
    0.01), a tensor of per-problem values (shape ``X.shape[:-2]``), or None for ``1 / lambda_max(X^T X)`` per
    problem (:func:`inverse_spectral_lr`). ``steps_grid``: increasing step counts (default 1, 2, 4, ..., 4096);
    returns ``(..., len(steps_grid), d)``.

    >>> X, y = torch.randn(8, 3), torch.randn(8)
    >>> gd_iterates(X, y, lr=0.01, steps_grid=[1, 10, 100]).shape
    torch.Size([3, 3])
    """
    X = _matrix("X", X)
    y = _targets(X, y)
    grid = _steps_grid(steps_grid)
    eta = inverse_spectral_lr(X) if lr is None else _per_matrix("lr", lr, X)
    Xt = X.transpose(-1, -2)
    S, b = Xt @ X, (Xt @ y[..., None])[..., 0]
    eS, eb = eta[..., None, None] * S, eta[..., None] * b
    w = torch.zeros_like(b)
    out, k = [], 0
    for target in grid:
        for _ in range(target - k):
            w = w - (eS @ w[..., None])[..., 0] + eb
        k = target
        out.append(w)
    return torch.stack(out, dim=-2)


def min_norm_lstsq(X: Tensor, y: Tensor) -> Tensor:
    """The minimum-norm least-squares solution X^+ y, shape ``(..., d)`` (the OLS reference of icl-newton)."""
    X = _matrix("X", X)
    y = _targets(X, y)
    return (torch.linalg.pinv(X) @ y[..., None])[..., 0]
