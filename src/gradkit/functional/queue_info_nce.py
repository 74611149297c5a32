"""MoCo's InfoNCE over a queue, with MoCHi's synthetic negatives, as one autograd Function over native CPU
kernels (paper slug: hard-negative-mixing; the module is :mod:`gradkit.nn.hard_negative_mixing`).

For unit queries q (B, d), keys k (B, d) from the momentum encoder (normalised here) and the similarities l = q.n (B, K) to the
queue, MoCHi(N, s, s') takes the N keys of largest l per query, draws s type-1 mixes (keys i, j uniform over
those N, alpha ~ U(0, 1)) and s' type-2 mixes (key j2, beta ~ U(0, beta_max)), and the loss is the mean
cross-entropy, with target 0, of the logits

    [q.k, l_1..l_K, (alpha l_i + (1 - alpha) l_j) / ||alpha n_i + (1 - alpha) n_j||,
     (beta q.q + (1 - beta) l_j2) / ||beta q + (1 - beta) n_j2||] / tau

with the norms of the mixes held constant, so that the gradient in q of a synthetic logit is its synthetic
vector (MoCHi's negatives carry no gradient) and k gets none. :func:`queue_info_nce` computes it without
materialising the (B, 1 + K + S) logits or the synthetic vectors:

- forward, per query, with its row of l in cache: the selection of the N hardest (a radix selection over the
  entries above a sampled threshold), the draws (a counter-based hash keyed by one 64-bit number taken from
  the generator, so a seeded generator fixes them), the synthetic logits (one pass over the mixed key rows for
  the norms), then the row's log-sum-exp;
- backward: the gradient of l written once (softmax weights, with the synthetic logits' weights added into the
  columns of the keys they mix), which the matrix product l = q @ keys.T turns into q's gradient.

Plain PyTorch makes about ten passes over the logits for the same loss (concatenation, division, log-softmax
and their gradients). Float32 CPU tensors only (:func:`usable`); the module keeps a PyTorch path, with
``torch.topk`` and ``torch.randint`` draws, for everything else, and the tests compare the two given the same
draws.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _native
from .._validate import ArgumentError, nonneg_int, optional_generator, positive, positive_int, real_in

__all__ = ["Draws", "Mixing", "QueueInfoNCE", "queue_info_nce", "usable"]


def usable(*tensors: Tensor) -> bool:
    """Whether :func:`queue_info_nce` runs here: float32 matrices, contiguous, on the CPU, the kernels built."""
    return all(t.dtype == torch.float32 and t.dim() == 2 for t in tensors) and _native.usable(*tensors)


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class Mixing(NamedTuple):
    """MoCHi(n_hard, s, s_prime) with type-2 weights beta ~ U(0, beta_max) (validated by the caller)."""
    n_hard: int
    s: int
    s_prime: int
    beta_max: float
    generator: torch.Generator | None = None


class Draws(NamedTuple):
    """The random choices of one mixing: key indices i, j and weights alpha (B, s) of the type-1 mixes, key
    indices j2 and weights beta (B, s') of the type-2 mixes."""
    i: Tensor
    j: Tensor
    alpha: Tensor
    j2: Tensor
    beta: Tensor


class QueueInfoNCE(NamedTuple):
    """:func:`queue_info_nce`'s result: the loss (0-dim, differentiable), the positive logits q.k (B,) and the
    synthetic logits (B, s + s') before the temperature (no grad), and the draws (None without mixing)."""
    loss: Tensor
    pos: Tensor
    synthetic: Tensor
    draws: Draws | None


def _seed(generator: torch.Generator | None) -> int:
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev))


class _QueueInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, lneg, keys, inv_tau, n_hard, s, s2, beta_max, seed, out):  # type: ignore[override]
        lib = _native.native()
        b, n_keys = lneg.shape
        d, S = q.shape[1], s + s2
        qd = q.detach()
        pos, lse = torch.empty(b, dtype=torch.float32), torch.empty(b, dtype=torch.float32)
        if S:
            syn, norm = torch.empty(b, S, dtype=torch.float32), torch.empty(b, S, dtype=torch.float32)
            i, j, j2 = (torch.empty(b, n, dtype=torch.long) for n in (s, s, s2))
            alpha, beta = torch.empty(b, s, dtype=torch.float32), torch.empty(b, s2, dtype=torch.float32)
            scratch, top = torch.empty(3 * n_keys, dtype=torch.int32), torch.empty(n_hard, dtype=torch.long)
        else:  # nothing is drawn: one empty stands for every buffer of the mixing
            syn = torch.empty(b, 0, dtype=torch.float32)
            norm = alpha = beta = scratch = syn
            i = j = j2 = top = torch.empty(b, 0, dtype=torch.long)
        loss = lib.gk_info_nce_fwd(_ptr(qd), _ptr(k), d, _ptr(lneg), b, n_keys, _ptr(keys), n_hard, s, s2, beta_max,
                                   seed, _ptr(scratch), _ptr(top), _ptr(i), _ptr(j), _ptr(alpha), _ptr(j2),
                                   _ptr(beta), _ptr(syn), _ptr(norm), inv_tau, _ptr(pos), _ptr(lse))
        ctx.save_for_backward(qd, k, lneg, syn, norm, pos, lse, i, j, alpha, j2, beta)
        ctx.inv_tau, ctx.s, ctx.s2 = inv_tau, s, s2
        out.extend([pos, syn, Draws(i, j, alpha, j2, beta) if S else None])  # without grad, outside the graph
        return torch.full((), loss, dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        qd, k, lneg, syn, norm, pos, lse, i, j, alpha, j2, beta = ctx.saved_tensors
        b, n_keys = lneg.shape
        grad_l = torch.empty_like(lneg)
        dq = torch.empty_like(qd)
        _native.native().gk_info_nce_bwd(float(g) / b, _ptr(qd), _ptr(k), qd.shape[1], _ptr(pos), _ptr(lneg), b,
                                         n_keys, _ptr(syn), _ptr(norm), _ptr(lse), ctx.inv_tau, _ptr(i), _ptr(j),
                                         _ptr(alpha), ctx.s, _ptr(j2), _ptr(beta), ctx.s2, _ptr(grad_l),
                                         _ptr(dq))
        return dq, None, grad_l, None, None, None, None, None, None, None, None


def _check(q: Tensor, k: Tensor, lneg: Tensor, keys: Tensor, tau: float, mixing: Mixing | None) -> None:
    """Clear errors for what the kernels cannot take (they read raw memory: a wrong shape would read past it)."""
    mats = {"q": q, "k": k, "lneg": lneg, "keys": keys}
    for name, t in mats.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 2 or t.device.type != "cpu":
            got = f"{t.dtype} {t.dim()}-d on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ArgumentError(f"{name} must be a float32 matrix on the CPU (elsewhere use InfoNCEWithMixing, "
                                f"which falls back to PyTorch), got {got}")
    if not (q.is_contiguous() and lneg.is_contiguous()):
        raise ArgumentError("q and lneg must be contiguous")
    b, d = q.shape
    if k.shape != q.shape or lneg.shape[0] != b or keys.shape[1] != d or lneg.shape[1] != keys.shape[0]:
        raise ArgumentError(f"q and k must be (B, d), lneg (B, K) and keys (K, d); got q {tuple(q.shape)}, "
                            f"k {tuple(k.shape)}, lneg {tuple(lneg.shape)}, keys {tuple(keys.shape)}")
    positive("tau", tau)
    if _native.native() is None:
        raise ArgumentError("the native kernels are not available here (no C compiler, or GRADKIT_NATIVE=0); "
                            "InfoNCEWithMixing falls back to PyTorch")
    if mixing is not None:
        if positive_int("n_hard", mixing.n_hard) > keys.shape[0]:
            raise ArgumentError(f"n_hard must be <= the number of keys {keys.shape[0]}, got {mixing.n_hard}")
        nonneg_int("s", mixing.s)
        nonneg_int("s_prime", mixing.s_prime)
        real_in("beta_max", mixing.beta_max, 0.0, 0.5)
        optional_generator(mixing.generator)


def queue_info_nce(q: Tensor, k: Tensor, lneg: Tensor, keys: Tensor, tau: float,
                   mixing: Mixing | None = None) -> QueueInfoNCE:
    """The loss described in the module docstring, with the positive and synthetic logits for diagnostics and
    the draws made.

    q (B, d) with grad, unit rows; k (B, d), normalised here (no grad); lneg = q @ keys.T (B, K), differentiable,
    the path by which most of q's gradient flows; keys (K, d); tau > 0; mixing: MoCHi's parameters (n_hard <= K, s, s' >= 0,
    beta_max in [0, 0.5]), or None for plain MoCo. All float32 on the CPU with the kernels built (:func:`usable`);
    anything else raises ``ValueError``.
    """
    _check(q, k, lneg, keys, tau, mixing)
    if mixing is None:
        mixing = Mixing(1, 0, 0, 0.0)
    seed = _seed(mixing.generator) if mixing.s + mixing.s_prime else 0
    out: list = []
    loss = _QueueInfoNCE.apply(q, k.detach().contiguous(), lneg, keys.detach().contiguous(), 1.0 / tau,
                               mixing.n_hard, mixing.s, mixing.s_prime, float(mixing.beta_max), seed, out)
    return QueueInfoNCE(loss, *out)
