"""Procedural token sequences: a random sparse k-th order Markov "language" (used by peri-ln).

Each context (the previous ``order`` tokens) allows ``successors`` distinct next tokens, drawn once
from a table generator seeded with ``table_seed``; the next token is uniform over them, so the
next-token cross-entropy floor is ln(successors) once a full context is visible.

>>> lang = MarkovLanguage(vocab=16, order=2, successors=4, table_seed=0)
>>> seqs = lang.sample(8, 33, generator=torch.Generator().manual_seed(0))   # (8, 33) int64
>>> x, y = seqs[:, :-1], seqs[:, 1:]                                         # next-token pairs
"""
from __future__ import annotations

import math

import torch

from .._validate import nonneg_int, positive_int


class MarkovLanguage:
    """A sparse random ``order``-th order Markov chain over ``vocab`` tokens (peri-ln's claim data).

    P(x_t | x_{t-order..t-1}) = 1/successors on the context's ``successors`` allowed tokens, else 0;
    the first ``order`` tokens are uniform over the vocabulary. ``table`` has shape
    (vocab**order, successors).
    """

    def __init__(self, vocab: int = 16, order: int = 2, successors: int = 4, table_seed: int = 0) -> None:
        self.vocab = positive_int("vocab", vocab)
        self.order = positive_int("order", order)
        self.successors = positive_int("successors", successors)
        if successors > vocab:
            raise ValueError(f"successors must be <= vocab={vocab}, got {successors}")
        table_seed = nonneg_int("table_seed", table_seed)
        n_ctx = vocab ** order
        if n_ctx > 10_000_000:
            raise ValueError(f"vocab**order must be <= 1e7 contexts, got {n_ctx}")
        g = torch.Generator().manual_seed(table_seed)
        self.table = torch.rand(n_ctx, vocab, generator=g).argsort(dim=1)[:, :successors].contiguous()

    @property
    def entropy_floor(self) -> float:
        """ln(successors): the cross-entropy of the true next-token distribution (full context)."""
        return math.log(self.successors)

    def sample(self, n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` sequences of ``length`` tokens (int64, on CPU)."""
        n, length = positive_int("n", n), positive_int("length", length)
        seq = torch.empty(n, length, dtype=torch.long)
        k = min(self.order, length)
        seq[:, :k] = torch.randint(0, self.vocab, (n, k), generator=generator)
        choice = torch.randint(0, self.successors, (n, max(length - k, 0)), generator=generator)
        for t in range(k, length):
            ctx = torch.zeros(n, dtype=torch.long)
            for j in range(self.order):
                ctx = ctx * self.vocab + seq[:, t - self.order + j]
            seq[:, t] = self.table[ctx, choice[:, t - k]]
        return seq

    def __repr__(self) -> str:
        return f"MarkovLanguage(vocab={self.vocab}, order={self.order}, successors={self.successors})"


__all__ = ["MarkovLanguage"]
