"""A one-layer softmax attention model with a linear head, the model of the attention-SVM analysis
(paper slug: transformers-svm).

For a sequence ``X_i`` (T x d) and a query ``z_i`` (d_z)::

    f(X_i) = v^T X_i^T softmax(X_i W z_i),     token scores s_it = x_it^T W z_i

with ``W`` trained directly (``parametrization="W"``, a d x d_z matrix) or as ``W = K Q^T``
(``parametrization="KQ"``, K: d x m, Q: d_z x m). The head ``v`` is fixed (a buffer) when given, as in the
paper's experiments; without one it is a trainable parameter. Self-attention takes the query from the
sequence itself (``z_i = x_{i, query_index}``) when ``forward`` gets no ``z``. The output is computed as
``u_m + sum_t a_t (u_t - u_m)`` (``u_t = v^T x_t``, ``m`` the top-scoring token), equal to ``v^T X^T a`` but
with gradients that stay accurate when the softmax saturates (the regime of the paper's analysis, where
``||W||`` grows without bound). After each forward,
``attention_weights`` holds the (n, T) softmax (detached) and ``scores`` the (n, T) token scores.

Example::

    model = SingleLayerAttention(10, head=v)                   # W = 0 at start, v fixed
    f = model(X, z)                                             # (n,) outputs
    loss = torch.nn.functional.softplus(-Y * f).mean()          # logistic loss l(u) = log(1 + e^-u)
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _validate as V

__all__ = ["SingleLayerAttention"]

PARAMETRIZATIONS = ("W", "KQ")


class SingleLayerAttention(nn.Module):
    """``f(X) = v^T X^T softmax(X W z)`` with ``W`` or ``W = K Q^T`` trainable (see the module docstring).

    d: token dimension; parametrization: ``"W"`` or ``"KQ"``; m: the inner dimension of K and Q (default
    d_z); head: the fixed head ``v`` (d,), or None for a trainable one (initialised N(0, 0.01^2));
    d_query: query dimension d_z (default d); init_std: standard deviation of the initial W (default 0: the
    paper's W(0) = 0) or of K and Q (default 0.01); query_index: the token used as query in self-attention;
    generator: for the random initialisation; dtype/device: of the parameters.
    """

    def __init__(self, d: int, parametrization: str = "W", m: int | None = None, head: torch.Tensor | None = None,
                 *, d_query: int | None = None, init_std: float | None = None, query_index: int = -1,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.d = V.positive_int("d", d)
        self.parametrization = V.choice("parametrization", parametrization, PARAMETRIZATIONS)
        self.d_query = self.d if d_query is None else V.positive_int("d_query", d_query)
        if m is not None and parametrization == "W":
            raise V.ArgumentError(f"m is the inner dimension of K and Q: only with parametrization='KQ', got m={m!r}")
        self.m = self.d_query if m is None else V.positive_int("m", m)
        std = (0.0 if parametrization == "W" else 0.01) if init_std is None else V.real_scalar(
            "init_std", init_std, nonneg=True)
        self.query_index = V.integer("query_index", query_index)
        V.optional_generator(generator)
        kw = {"dtype": dtype if dtype is not None else torch.get_default_dtype(), "device": device}

        def init(*shape: int) -> nn.Parameter:
            t = torch.randn(*shape, generator=generator, dtype=kw["dtype"]).to(device) * std if std > 0 else \
                torch.zeros(*shape, **kw)
            return nn.Parameter(t)

        if parametrization == "W":
            self.W = init(self.d, self.d_query)
        else:
            self.K = init(self.d, self.m)
            self.Q = init(self.d_query, self.m)
        if head is None:
            self.v = nn.Parameter(torch.randn(self.d, generator=generator, dtype=kw["dtype"]).to(device) * 0.01)
        else:
            V.tensor("head", head, floating=True, finite=True)
            if tuple(head.shape) != (self.d,):
                raise V.ArgumentError(f"head must have shape ({self.d},) (the token dimension d), got "
                                      f"{tuple(head.shape)}")
            self.register_buffer("v", head.detach().clone().to(**kw))
        self.attention_weights: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def combined_weight(self) -> torch.Tensor:
        """The d x d_z matrix ``W`` of the scores ``x^T W z`` (``K Q^T`` for the KQ parametrization), with grad."""
        return self.W if self.parametrization == "W" else self.K @ self.Q.T

    def forward(self, X: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """X: (n, T, d); z: (n, d_z) queries, or None for self-attention. Returns f(X): (n,)."""
        if not isinstance(X, torch.Tensor) or X.dim() != 3 or X.shape[2] != self.d:
            raise V.ArgumentError(f"X must be a tensor of shape (n, T, {self.d}), got "
                                  f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
        if z is None:
            if self.d_query != self.d:
                raise V.ArgumentError(f"z is needed: self-attention (z=None) takes the query from X, which needs "
                                      f"d_query == d, got d_query={self.d_query} and d={self.d}")
            T = X.shape[1]
            if not -T <= self.query_index < T:
                raise V.ArgumentError(f"query_index must be in [{-T}, {T - 1}] for sequences of {T} tokens, got "
                                      f"{self.query_index}")
            z = X[:, self.query_index]
        elif not isinstance(z, torch.Tensor) or tuple(z.shape) != (X.shape[0], self.d_query):
            raise V.ArgumentError(f"z must be a tensor of shape ({X.shape[0]}, {self.d_query}), got "
                                  f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        scores = torch.einsum("ntd,de,ne->nt", X, self.combined_weight(), z)
        attn = torch.softmax(scores, dim=1)
        self.scores, self.attention_weights = scores.detach(), attn.detach()
        # f = u_m + sum_t a_t (u_t - u_m), u_t = v^T x_t, m = argmax_t s_t: the same value as sum_t a_t u_t, but
        # the softmax backward a_t (g_t - sum a g) no longer cancels at m when the softmax saturates (a_m = 1
        # in float arithmetic), so the gradient keeps its relative accuracy at large ||W||
        u = X @ self.v
        u_m = u.gather(1, scores.detach().argmax(dim=1, keepdim=True))
        return u_m.squeeze(1) + (attn * (u - u_m)).sum(dim=1)

    def extra_repr(self) -> str:
        s = f"d={self.d}, d_query={self.d_query}, parametrization={self.parametrization!r}"
        return s + (f", m={self.m}" if self.parametrization == "KQ" else "")
