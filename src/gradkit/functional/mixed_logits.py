"""MoCHi's synthetic-negative logits as one autograd Function over native CPU kernels (paper slug:
hard-negative-mixing; the module is :mod:`gradkit.nn.hard_negative_mixing`).

For unit queries q (B, d), keys n (K, d) and the similarities c = q.n (B, K), the logits of s type-1 mixes
(keys i, j, weights alpha) and s' type-2 mixes (key j2, weight beta) per query are

    (alpha c_i + (1 - alpha) c_j) / ||alpha n_i + (1 - alpha) n_j||,   (beta q.q + (1 - beta) c_j2) / ||beta q + (1 - beta) n_j2||

with the norms held constant, so that the gradient in q of a logit is its synthetic vector (MoCHi's negatives
carry no gradient). :func:`mixed_logits` computes them in one pass that reads the key rows in place, and its
backward adds ``sum g / norm * (mix of key rows)`` to each query's gradient: no (B, K) gradient of the
gathered similarities and no per-op passes. Float32 CPU tensors only (:func:`usable`); the module keeps a
PyTorch path for everything else, and the tests compare the two.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _native

__all__ = ["mixed_logits", "usable"]


def usable(q: Tensor, sim: Tensor, keys: Tensor) -> bool:
    """Whether :func:`mixed_logits` runs here: float32, contiguous, on the CPU, the kernels built."""
    return (q.dtype == sim.dtype == keys.dtype == torch.float32 and q.dim() == sim.dim() == keys.dim() == 2
            and _native.usable(q, sim, keys))


class _MixedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, sim, keys, i, j, alpha, j2, beta):  # type: ignore[override]
        b, s, s2 = q.shape[0], i.shape[1], j2.shape[1]
        out = torch.empty(b, s + s2, dtype=torch.float32)
        norm = torch.empty(b, s + s2, dtype=torch.float32)
        qd = q.detach()
        _native.native().gk_mix_logits_fwd(sim.data_ptr(), b, sim.shape[1], keys.data_ptr(), keys.shape[1],
                                           qd.data_ptr(), i.data_ptr(), j.data_ptr(), alpha.data_ptr(), s,
                                           j2.data_ptr(), beta.data_ptr(), s2, out.data_ptr(), norm.data_ptr())
        ctx.save_for_backward(qd, keys, i, j, alpha, j2, beta, norm)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        qd, keys, i, j, alpha, j2, beta, norm = ctx.saved_tensors
        g = g.contiguous()
        dq = torch.zeros_like(qd)
        _native.native().gk_mix_logits_bwd(g.data_ptr(), norm.data_ptr(), keys.data_ptr(), keys.shape[1],
                                           qd.data_ptr(), i.data_ptr(), j.data_ptr(), alpha.data_ptr(), i.shape[1],
                                           j2.data_ptr(), beta.data_ptr(), j2.shape[1], qd.shape[0], dq.data_ptr())
        return dq, None, None, None, None, None, None, None


def mixed_logits(q: Tensor, sim: Tensor, keys: Tensor, i: Tensor, j: Tensor, alpha: Tensor, j2: Tensor,
                 beta: Tensor) -> Tensor:
    """The (B, s + s') synthetic logits (before the temperature) described in the module docstring.

    q (B, d) with grad; sim = q.n (B, K) without; keys (K, d); i, j, alpha: (B, s) int64 key indices and
    weights; j2, beta: (B, s'). Needs :func:`usable` (q, sim, keys); indices must lie in [0, K) (not checked:
    the caller draws them from a top-k of ``sim``).
    """
    i, j, j2 = (t.contiguous().long() for t in (i, j, j2))
    alpha, beta = alpha.contiguous().float(), beta.contiguous().float()
    return _MixedLogits.apply(q, sim.detach().contiguous(), keys.detach().contiguous(), i, j, alpha, j2, beta)
