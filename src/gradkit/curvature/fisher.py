"""Matrix-free inverse-Fisher-vector products from m stored gradients (paper slug: mfac).

M-FAC (Frantar, Kurtic, Alistarh, NeurIPS 2021, arXiv 2107.03356) approximates the Hessian by the
damped empirical Fisher of m gradients g_1..g_m in R^d (G = [g_1; ...; g_m], m x d)::

    F = damp * I + (1/m) sum_i g_i g_i^T

and multiplies by its inverse without forming the d x d matrix:

- :class:`EmpiricalFisherInverse` (static algorithm, fixed gradients; pruning): the Sherman-Morrison
  recursion ``v_i = F_{i-1}^{-1} g_i``, ``d_i = m + g_i^T v_i`` precomputed in O(d m^2), then
  ``F^{-1} x = x / damp - sum_i v_i (v_i^T x) / d_i`` in O(d m) and ``[F^{-1}]_qq`` in O(m).
  Optionally block-diagonal (``blocksize``), all blocks as one batch.
- :class:`SlidingFisherInverse` (dynamic algorithm, ring buffer of the last m gradients; the
  optimizer): Woodbury form ``F^{-1} x = x / damp - G^T (m I + K / damp)^{-1} G x / damp^2`` with
  ``K = G G^T`` and the m x m inverse updated in O(m^2) per replaced gradient, or the paper's
  triangular (LU / Sherman-Morrison) recursion refactored in O(m^3) per update (``method="mfac"``).

K and all m x m factors are float64 whatever the gradients' dtype: 1 / damp = 1e5 amplifies rounding.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._validate import is_int, positive, positive_int

__all__ = ["EmpiricalFisherInverse", "SlidingFisherInverse"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_damp(damp: Any) -> float:
    return positive("damp", damp)


def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _check_vec(name: str, x: Any, d: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"{name} must have last dimension d={d}, got shape {tuple(x.shape)}")
    return x


def _ldl_from_cholesky(a: Tensor) -> tuple[Tensor, Tensor]:
    """Unit-lower ``L`` and pivots ``p`` with ``A = L diag(p) L^T`` (the unpivoted LU of SPD ``A``).

    The unpivoted LU factor is ``U = diag(p) L^T``; computed from a Cholesky factor ``C`` (``L = C /
    diag(C)``, ``p = diag(C)^2``) because LU without pivoting is CUDA-only in PyTorch.
    """
    c = torch.linalg.cholesky(a)
    dc = torch.diagonal(c, dim1=-2, dim2=-1)
    return c / dc.unsqueeze(-2), dc * dc


class EmpiricalFisherInverse:
    """Inverse of the damped empirical Fisher of fixed gradients, matrix-free (paper slug: mfac).

    ``F = damp I + (1/m) sum_i g_i g_i^T`` (block-diagonal over contiguous blocks of ``blocksize``
    coordinates if given). Static M-FAC algorithm (``method="static"``)::

        v_i = g_i / damp - sum_{j<i} v_j (v_j^T g_i) / d_j,     d_i = m + g_i^T v_i
        F^{-1} x = x / damp - sum_i v_i (v_i^T x) / d_i,      [F^{-1}]_qq = 1/damp - sum_i v_iq^2 / d_i

    ``method="woodbury"`` computes the same factors from a Cholesky factor of ``m I + G G^T / damp``.
    Either way the result is stored as ``U`` (m x d rows ``v_i / sqrt(d_i)``), so ``F^{-1} = I / damp -
    U^T U``: O(d m^2) to build, O(d m) per product, O(m) per diagonal entry, m x d memory.

    Example::

        grads = torch.randn(16, 100, dtype=torch.float64)
        finv = EmpiricalFisherInverse(grads, damp=1e-3)
        x = finv.mul(torch.randn(100, dtype=torch.float64)); q = finv.diag()   # (100,), (100,)
    """

    def __init__(self, grads: Tensor, damp: float = 1e-5, blocksize: int | None = None,
                 method: str = "static", dtype: torch.dtype = torch.float64) -> None:
        if not isinstance(grads, Tensor):
            raise TypeError(f"grads must be a torch.Tensor of shape (m, d), got {type(grads).__name__}")
        if grads.dim() != 2 or grads.shape[0] < 1 or grads.shape[1] < 1:
            raise ValueError(f"grads must have shape (m, d) with m, d >= 1, got {tuple(grads.shape)}")
        if not grads.is_floating_point():
            raise TypeError(f"grads must be a floating-point tensor, got dtype {grads.dtype}")
        if not bool(torch.isfinite(grads).all()):
            raise ValueError("grads contains nan or inf")
        self.damp = _check_damp(damp)
        if method not in ("static", "woodbury"):
            raise ValueError(f"method must be 'static' or 'woodbury', got {method!r}")
        self.dtype = _check_dtype(dtype)
        self.m, self.d = grads.shape
        if blocksize is not None:
            positive_int("blocksize", blocksize)
        self.blocksize = self.d if blocksize is None or blocksize >= self.d else blocksize
        self.method = method
        self.nblocks = math.ceil(self.d / self.blocksize)
        g = grads.detach().to(self.dtype)
        pad = self.nblocks * self.blocksize - self.d
        if pad:
            g = torch.nn.functional.pad(g, (0, pad))  # zero coordinates: F = damp I there, no coupling
        g = g.reshape(self.m, self.nblocks, self.blocksize).transpose(0, 1).contiguous()  # (nb, m, bs)
        self.u = self._static(g) if method == "static" else self._woodbury(g)

    # ------------------------------------------------------------------------------- factorisations
    def _static(self, g: Tensor) -> Tensor:
        """The paper's Sherman-Morrison recursion, every block at once: rows v_i / sqrt(d_i)."""
        lam_inv = 1.0 / self.damp
        v = torch.empty_like(g)
        dd = torch.empty(g.shape[0], self.m, dtype=g.dtype, device=g.device)
        for i in range(self.m):
            gi = g[:, i]                                           # (nb, bs)
            vi = gi * lam_inv
            if i:
                coef = torch.einsum("nmb,nb->nm", v[:, :i], gi) / dd[:, :i]
                vi = vi - torch.einsum("nm,nmb->nb", coef, v[:, :i])
            v[:, i] = vi
            dd[:, i] = self.m + (gi * vi).sum(-1)
        return v / dd.sqrt().unsqueeze(-1)

    def _woodbury(self, g: Tensor) -> Tensor:
        """``U = C^{-1} G / damp`` with ``C C^T = m I + G G^T / damp`` (Cholesky, float64)."""
        k = g @ g.transpose(-1, -2)
        a = k / self.damp + self.m * torch.eye(self.m, dtype=g.dtype, device=g.device)
        c = torch.linalg.cholesky(a)
        return torch.linalg.solve_triangular(c, g, upper=False) / self.damp

    # ------------------------------------------------------------------------------------- queries
    def _blocks(self, x: Tensor) -> Tensor:
        pad = self.nblocks * self.blocksize - self.d
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], self.nblocks, self.blocksize)

    def mul(self, x: Tensor) -> Tensor:
        """``F^{-1} x`` for ``x`` of shape ``(..., d)`` in O(d m) per vector; returns ``x``'s dtype."""
        x = _check_vec("x", x, self.d)
        xb = self._blocks(x.detach().to(device=self.u.device, dtype=self.dtype))   # (..., nb, bs)
        coef = torch.einsum("nmb,...nb->...nm", self.u, xb)
        out = xb / self.damp - torch.einsum("...nm,nmb->...nb", coef, self.u)
        return out.reshape(*x.shape[:-1], -1)[..., : self.d].to(x.dtype)

    def diag(self) -> Tensor:
        """The diagonal of ``F^{-1}`` (length d, internal dtype), O(d m)."""
        dg = 1.0 / self.damp - (self.u * self.u).sum(1)
        return dg.reshape(-1)[: self.d]

    def entry(self, q: int) -> float:
        """One diagonal element ``[F^{-1}]_qq`` in O(m)."""
        if not is_int(q, low=-self.d, high=self.d - 1):
            raise IndexError(f"q must be an int in [-{self.d}, {self.d}), got {q!r}")
        q %= self.d
        col = self.u[q // self.blocksize, :, q % self.blocksize]
        return float(1.0 / self.damp - (col * col).sum())

    def dense(self) -> Tensor:
        """The d x d inverse as a dense matrix (for tests and tiny d only)."""
        eye = torch.eye(self.d, dtype=self.dtype, device=self.u.device)
        return self.mul(eye)

    def to(self, device: torch.device | str) -> "EmpiricalFisherInverse":
        """Move the stored factors to ``device`` (in place); returns self."""
        self.u = self.u.to(device)
        return self

    def __repr__(self) -> str:
        return (f"EmpiricalFisherInverse(m={self.m}, d={self.d}, damp={self.damp:g}, blocksize={self.blocksize}, "
                f"method={self.method!r}, dtype={self.dtype})")


class SlidingFisherInverse:
    """Inverse of the damped empirical Fisher of the last m gradients, as a ring buffer (paper slug: mfac).

    Dynamic M-FAC: the window ``G`` (m x d, starts as zeros) holds the latest m gradients; ``K = G G^T``
    (float64) gets one new row/column per :meth:`update` (O(d m)). With ``A = m I + K / damp``::

        F^{-1} x = x / damp - G^T A^{-1} G x / damp^2           (Woodbury)
        F^{-1} g_j = (m / damp) G^T A^{-1} e_j                   (a gradient in the window: no cancellation)

    ``method="woodbury"`` (default) keeps ``A^{-1}`` and updates it in O(m^2) per replaced gradient (remove
    the old row/column, border in the new one), refactoring it exactly every ``refresh`` updates (default
    m: amortised O(m^2)); a step costs O(d m + m^2). ``method="mfac"`` is the paper's recursion: the
    unpivoted LU ``A = L diag(p) L^T`` (``p_i = m + g_i^T F_{i-1}^{-1} g_i``) and the coefficients
    ``B = L^{-1} / damp`` (``F_{i-1}^{-1} g_i = sum_j B_ij g_j``) are refactored in O(m^3) per update,
    then ``F^{-1} x = x / damp - G^T B^T ((B G x) / p)``.

    Example::

        h = SlidingFisherInverse(m=8, d=100, damp=1e-4, dtype=torch.float64)
        u = h.update_mul(torch.randn(100, dtype=torch.float64))   # insert, then F^{-1} g
        y = h.mul(torch.randn(100, dtype=torch.float64))
    """

    def __init__(self, m: int, d: int, damp: float = 1e-5, method: str = "woodbury",
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 refresh: int | None = None) -> None:
        self.m = positive_int("m", m)
        self.d = positive_int("d", d)
        self.damp = _check_damp(damp)
        if method not in ("woodbury", "mfac"):
            raise ValueError(f"method must be 'woodbury' or 'mfac', got {method!r}")
        self.method = method
        self.dtype = _check_dtype(dtype)
        self.refresh = self.m if refresh is None else positive_int("refresh", refresh)
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.grads = torch.zeros(self.m, self.d, dtype=self.dtype, device=dev)
        self.dots = torch.zeros(self.m, self.m, dtype=torch.float64, device=dev)
        self.slot = 0          # where the next gradient goes
        self.count = 0         # gradients inserted so far
        self._since_refresh = 0
        self._refactor()

    @property
    def since_refresh(self) -> int:
        """Gradients inserted since the inverse was last refactorised from scratch."""
        return self._since_refresh

    # ------------------------------------------------------------------------------ factorisation
    def _a(self) -> Tensor:
        eye = torch.eye(self.m, dtype=torch.float64, device=self.dots.device)
        return self.dots / self.damp + self.m * eye

    def _refactor(self) -> None:
        a = self._a()
        if self.method == "woodbury":
            self.inv = torch.cholesky_inverse(torch.linalg.cholesky(a))
        else:
            low, self.pivots = _ldl_from_cholesky(a)
            eye = torch.eye(self.m, dtype=torch.float64, device=a.device)
            self.coef = torch.linalg.solve_triangular(low, eye, upper=False, unitriangular=True) / self.damp
        self._since_refresh = 0

    def _replace_inverse(self, i: int, k: Tensor) -> None:
        """O(m^2) update of ``A^{-1}`` when row/column ``i`` of K becomes ``k`` (``k`` is modified).

        Remove the old row/column: ``P = H - h h^T / h_i`` (``h = H e_i``) is the inverse of A without
        row/column i (row/column i of P vanish in exact arithmetic). Border in the new one, ``b = k / damp``
        with ``b_i = 0`` and ``s = m + k_i / damp - b^T P b`` (a Schur complement of the SPD A, so s >= m):
        ``H' = P + (P b)(P b)^T / s`` off row/column i, ``H'_{:,i} = -P b / s``, ``H'_ii = 1 / s``.
        """
        h = self.inv
        hi = h[:, i]
        p = torch.addr(h, hi, hi / hi[i], alpha=-1.0)
        kii = k[i] / self.damp + self.m
        b = k.mul_(1.0 / self.damp)
        b[i] = 0.0
        pb = p @ b
        pb[i] = 0.0
        s_inv = (kii - torch.dot(b, pb)).reciprocal()
        q = pb * s_inv
        new = torch.addr(p, q, pb)
        q.neg_()
        new[:, i] = q
        new[i, :] = q
        new[i, i] = s_inv
        self.inv = new

    # ------------------------------------------------------------------------------------- public
    def update(self, g: Tensor) -> None:
        """Insert gradient ``g`` (length d), replacing the oldest one: O(d m + m^2) (woodbury)."""
        self._insert(g)

    def _insert(self, g: Tensor) -> Tensor:
        g = _check_vec("g", g, self.d)
        if g.dim() != 1:
            raise ValueError(f"g must be a vector of length d={self.d}, got shape {tuple(g.shape)}")
        i = self.slot
        self.grads[i].copy_(g.detach())
        k = self.grads @ self.grads[i]
        if k.dtype != torch.float64:
            k = k.to(torch.float64)
        self.dots[i, :] = k
        self.dots[:, i] = k
        self.slot = (i + 1) % self.m
        self.count += 1
        self._since_refresh += 1
        if self.method == "woodbury" and self._since_refresh < self.refresh:
            self._replace_inverse(i, k.clone())
        else:
            self._refactor()
        return k

    def mul(self, x: Tensor) -> Tensor:
        """``F^{-1} x`` for ``x`` of shape ``(d,)`` or ``(n, d)``; O(d m + m^2) per vector."""
        x = _check_vec("x", x, self.d)
        if x.dim() > 2:
            raise ValueError(f"x must have shape (d,) or (n, d), got {tuple(x.shape)}")
        xs = x.detach().to(device=self.grads.device, dtype=self.dtype)
        gx = (xs @ self.grads.T).to(torch.float64)                          # (..., m)
        if self.method == "woodbury":
            c = gx @ self.inv / self.damp ** 2                              # inv symmetric
        else:
            y = gx @ self.coef.T                                            # y_i = g_i^T F_{i-1}^{-1} x
            c = (y / self.pivots) @ self.coef
        out = xs / self.damp - c.to(self.dtype) @ self.grads
        return out.to(x.dtype)

    def update_mul(self, g: Tensor) -> Tensor:
        """Insert ``g`` then return ``F^{-1} g`` (the M-FAC optimizer's order); O(d m + m^2) (woodbury)."""
        i = self.slot
        self._insert(g)
        if self.method == "woodbury":
            c = (self.inv[:, i] * (self.m / self.damp)).to(self.dtype)
            u = c @ self.grads
            return u if u.dtype == g.dtype else u.to(g.dtype)
        return self.mul(g)

    def dense(self) -> Tensor:
        """The d x d inverse as a dense matrix (for tests and tiny d only)."""
        return self.mul(torch.eye(self.d, dtype=self.dtype, device=self.grads.device))

    def to(self, device: torch.device | str) -> "SlidingFisherInverse":
        """Move the window and factors to ``device`` (in place); returns self."""
        for name in ("grads", "dots", "inv", "coef", "pivots"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        """Tensors and counters needed to resume (factors are recomputed on load)."""
        return {"grads": self.grads.clone(), "dots": self.dots.clone(), "slot": self.slot, "count": self.count,
                "inv": self.inv.clone() if self.method == "woodbury" else None,
                "since_refresh": self._since_refresh}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (keeps this object's device and dtypes)."""
        grads, dots = state["grads"], state["dots"]
        if tuple(grads.shape) != (self.m, self.d) or tuple(dots.shape) != (self.m, self.m):
            raise ValueError(f"state has grads {tuple(grads.shape)} and dots {tuple(dots.shape)}, expected "
                             f"({self.m}, {self.d}) and ({self.m}, {self.m})")
        self.grads.copy_(grads)
        self.dots.copy_(dots)
        self.slot, self.count = int(state["slot"]), int(state["count"])
        self._refactor()
        if self.method == "woodbury" and state.get("inv") is not None:
            # bit-identical resume: keep the incrementally updated inverse and its refresh phase
            self.inv = state["inv"].to(device=self.dots.device, dtype=torch.float64).clone()
            self._since_refresh = int(state.get("since_refresh", 0))

    def __repr__(self) -> str:
        return (f"SlidingFisherInverse(m={self.m}, d={self.d}, damp={self.damp:g}, method={self.method!r}, "
                f"dtype={self.dtype}, count={self.count})")
