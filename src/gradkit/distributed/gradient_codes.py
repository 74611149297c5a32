"""Gradient codes (Tandon et al.): any ``n - s`` of ``n`` coded results decode a sum exactly (paper slug: sgc).

A worker's *task* is a linear combination ``sum_k coeffs[k] * grad(chunk_k)`` of chunk gradients (each
the SUM of per-sample gradients of the chunk); the master decodes the exact sum over all chunks from the
tasks that arrived. :class:`GradientCode` uses fractional repetition when ``(s+1) | n``, else the
cyclic-repetition construction. The sequential schemes built on it are in
:mod:`gradkit.distributed.coding_schemes`.

Example::

    code = GradientCode(4, 1); g = torch.randn(4, 3, dtype=torch.float64)
    c = code.encode(g)
    assert torch.allclose(code.decode({0: c[0], 3: c[3], 2: c[2]}), g.sum(0))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .._validate import integer

__all__ = [
    "CodingError", "DecodeError", "Task", "GradientCode", "fractional_repetition_code",
    "cyclic_repetition_code", "partition", "compute_task", "check_payloads",
]


class CodingError(ValueError):
    """A malformed input to a code or scheme: a bad result from a worker, a round out of order, a bad mask."""


class DecodeError(RuntimeError):
    """A job cannot be decoded (too few results) or the decoding system is inconsistent."""


# ---------------------------------------------------------------------------------------------- codes
def fractional_repetition_code(n: int, s: int) -> np.ndarray:
    """Encoding matrix (n x n) of the fractional repetition code (Tandon et al.; paper slug: sgc).

    Workers form ``n/(s+1)`` groups of ``s+1``; every worker of group k returns the plain sum of the
    group's ``s+1`` chunks: ``B[i, j] = 1`` iff ``j // (s+1) == i // (s+1)``. Requires ``(s+1) | n``.

    >>> fractional_repetition_code(4, 1)[0]
    array([1., 1., 0., 0.])
    """
    n = integer("n", n, low=1)
    s = integer("s", s, low=0, high=n - 1)
    if n % (s + 1):
        raise ValueError(f"fractional repetition needs (s+1) to divide n, got n={n}, s={s}")
    g = np.arange(n) // (s + 1)
    return (g[:, None] == g[None, :]).astype(np.float64)


def cyclic_repetition_code(n: int, s: int, seed: int = 0) -> np.ndarray:
    """Encoding matrix (n x n) of the cyclic repetition code (Tandon et al., Alg. 2; paper slug: sgc).

    Row i is supported on chunks ``i, i+1, ..., i+s (mod n)`` with ``B[i, i] = 1``; all rows lie in the
    null space of a random ``s x n`` matrix H with ``H 1 = 0``, so any ``n - s`` rows span ``1``:
    ``a^T B_F = 1^T`` has a solution for every survivor set ``|F| >= n - s``. Deterministic in ``seed``.

    >>> B = cyclic_repetition_code(5, 2); (B != 0).sum(1).tolist()
    [3, 3, 3, 3, 3]
    """
    n = integer("n", n, low=1)
    s = integer("s", s, low=0, high=n - 1)
    if s == 0:
        return np.eye(n)
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((s, n))
    H[:, -1] = -H[:, :-1].sum(1)
    B = np.zeros((n, n))
    for i in range(n):
        supp = [(i + k) % n for k in range(1, s + 1)]
        x = np.linalg.solve(H[:, supp], -H[:, i])
        B[i, i] = 1.0
        B[i, supp] = x
    return B


@dataclass(frozen=True)
class Task:
    """One unit of work for a worker: ``sum_k coeffs[k] * grad(chunks[k])`` for ``job`` (paper slug: sgc).

    ``kind`` is ``"coded"`` (a GC task), ``"d1"`` (an uncoded M-SGC piece; ``index`` = the worker's piece
    number) or ``"d2"`` (a coded M-SGC group task; ``index`` = the group).
    """

    job: int
    kind: str
    index: int
    chunks: tuple[int, ...]
    coeffs: tuple[float, ...]


class GradientCode:
    """An (n, s) gradient code: any ``n - s`` coded results decode ``sum_j g_j`` exactly (paper slug: sgc).

    Worker i returns ``c_i = sum_j B[i, j] g_j``; for survivors F the master solves ``a^T B_F = 1^T`` and
    returns ``sum_{i in F} a_i c_i = sum_j g_j``. Fractional repetition (0/1 coefficients, exact in any
    dtype) when ``(s+1) | n``, cyclic repetition otherwise.

    >>> code = GradientCode(4, 1); g = torch.randn(4, 3, dtype=torch.float64)
    >>> c = code.encode(g)                      # (4, 3): one coded row per worker
    >>> torch.allclose(code.decode({0: c[0], 3: c[3], 2: c[2]}), g.sum(0))
    True
    """

    def __init__(self, n: int, s: int, kind: str = "auto", seed: int = 0) -> None:
        self.n = integer("n", n, low=1)
        self.s = integer("s", s, low=0, high=self.n - 1)
        if kind not in ("auto", "frc", "cyclic"):
            raise ValueError(f"kind must be 'auto', 'frc' or 'cyclic', got {kind!r}")
        if kind == "auto":
            kind = "frc" if self.n % (self.s + 1) == 0 else "cyclic"
        self.kind = kind
        self.matrix = (fractional_repetition_code(self.n, self.s) if kind == "frc"
                       else cyclic_repetition_code(self.n, self.s, seed))
        self._support = [tuple(int(j) for j in np.flatnonzero(row)) for row in self.matrix]

    def __repr__(self) -> str:
        return f"GradientCode(n={self.n}, s={self.s}, kind={self.kind!r})"

    def support(self, worker: int) -> tuple[int, ...]:
        """Chunks that ``worker`` computes (``s + 1`` of them)."""
        return self._support[integer("worker", worker, low=0, high=self.n - 1)]

    def coefficients(self, worker: int) -> tuple[float, ...]:
        return tuple(float(self.matrix[worker, j]) for j in self.support(worker))

    def decoding_vector(self, survivors: Sequence[int]) -> tuple[list[int], np.ndarray]:
        """``(workers, a)`` with ``sum_k a[k] B[workers[k]] = 1``; raises DecodeError if fewer than n-s."""
        F = sorted({int(i) for i in survivors})
        if any(i < 0 or i >= self.n for i in F):
            raise CodingError(f"survivors must be worker ids in [0, {self.n - 1}], got {sorted(survivors)}")
        if len(F) < self.n - self.s:
            raise DecodeError(f"need results from at least n - s = {self.n - self.s} of {self.n} workers, "
                              f"got {len(F)} ({F})")
        if self.kind == "frc":
            first: dict[int, int] = {}
            for i in F:
                first.setdefault(i // (self.s + 1), i)
            workers = [first[g] for g in sorted(first)]
            return workers, np.ones(len(workers))
        Bf = self.matrix[F]
        a, *_ = np.linalg.lstsq(Bf.T, np.ones(self.n), rcond=None)
        resid = float(np.abs(Bf.T @ a - 1.0).max())
        if not resid <= 1e-9:
            raise DecodeError(f"decoding system for survivors {F} is inconsistent (residual {resid:.3g})")
        return F, a

    def encode(self, chunk_grads: torch.Tensor) -> torch.Tensor:
        """All n coded results from the n chunk gradients stacked on dim 0 (reference / tests)."""
        if not isinstance(chunk_grads, torch.Tensor) or chunk_grads.dim() < 1 or chunk_grads.shape[0] != self.n:
            shape = tuple(chunk_grads.shape) if isinstance(chunk_grads, torch.Tensor) else type(chunk_grads)
            raise CodingError(f"chunk_grads must be a tensor with {self.n} rows, got {shape}")
        Bm = torch.as_tensor(self.matrix, dtype=chunk_grads.dtype, device=chunk_grads.device)
        return torch.tensordot(Bm, chunk_grads, dims=1)

    def decode(self, results: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The exact sum of all chunk gradients from ``{worker: coded result}`` (>= n - s of them)."""
        check_payloads(results.items(), "result")
        workers, a = self.decoding_vector(list(results))
        out = None
        for w, coef in zip(workers, a):
            term = results[w] * float(coef)
            out = term if out is None else out + term
        return out


def check_payloads(items, what: str, shape: tuple | None = None) -> tuple | None:
    """Every payload of ``items`` (``(key, tensor)`` pairs) is a finite floating tensor of one shape.

    Returns the shape (``shape``, when given, is the one expected). Raises :class:`CodingError`.
    """
    for key, t in items:
        if not isinstance(t, torch.Tensor):
            raise CodingError(f"{what} {key}: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise CodingError(f"{what} {key}: expected a floating-point tensor, got dtype {t.dtype}")
        if shape is None:
            shape = tuple(t.shape)
        elif tuple(t.shape) != shape:
            raise CodingError(f"{what} {key}: shape {tuple(t.shape)} differs from the others' {shape}")
        if not bool(torch.isfinite(t).all()):
            raise CodingError(f"{what} {key}: contains non-finite values (NaN/inf); refusing to decode")
    return shape


def partition(num_samples: int, fractions: Sequence[float]) -> list[slice]:
    """Contiguous slices of ``range(num_samples)`` with sizes proportional to ``fractions`` (paper slug: sgc).

    Boundaries are ``round(cumsum(fractions) * num_samples)``, so the slices cover every sample once
    (some may be empty when chunks outnumber samples).

    >>> partition(10, [0.5, 0.25, 0.25])
    [slice(0, 5, None), slice(5, 8, None), slice(8, 10, None)]
    """
    num_samples = integer("num_samples", num_samples, low=0)
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or not np.isfinite(f).all() or (f < 0).any() or not abs(f.sum() - 1) < 1e-9:
        raise ValueError(f"fractions must be a non-empty 1-d list of non-negative numbers summing to 1, got {f}")
    bounds = np.concatenate([[0], np.rint(np.cumsum(f) * num_samples).astype(np.int64)])
    bounds[-1] = num_samples
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def compute_task(task: Task, chunk_grad: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """A worker's result for ``task``: ``sum_k coeffs[k] * chunk_grad(chunks[k])`` (paper slug: sgc)."""
    out = None
    for c, coef in zip(task.chunks, task.coeffs):
        g = chunk_grad(c)
        term = g if coef == 1.0 else g * coef
        out = term if out is None else out + term
    if out is None:
        raise CodingError(f"task {task} has no chunks")
    return out
