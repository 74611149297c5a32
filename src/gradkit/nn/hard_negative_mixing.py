"""MoCHi: hard negatives synthesised in feature space by mixing the hardest queue entries, and MoCo's
InfoNCE over a queue with them appended (paper slug: hard-negative-mixing).

For a query q (unit norm) and a queue of unit keys n_1..n_K, keep the N keys with the largest q.n (Q_N), then

    type 1 (s of them):   h  = normalize(alpha * n_i + (1 - alpha) * n_j),  n_i, n_j ~ U(Q_N), alpha ~ U(0, 1)
    type 2 (s' of them):  h' = normalize(beta * q + (1 - beta) * n_j),      n_j ~ U(Q_N),       beta ~ U(0, beta_max)

and the loss is the cross-entropy of the logits [q.k, q.n_1..q.n_K, q.h.., q.h'..] / tau with target 0.
Synthetic negatives are constants (no gradient flows through them into q) and are never enqueued.
Everything is batched (top-k and gather), no Python loop over the queries.

>>> q = F.normalize(torch.randn(16, 32), dim=1); queue = F.normalize(torch.randn(1024, 32), dim=1)
>>> hard_negative_mix(q, queue, n_hard=64, s=64, s_prime=16).shape
torch.Size([16, 80, 32])
>>> loss = InfoNCEWithMixing(tau=0.2, n_hard=64, s=64, s_prime=16)(q, q, queue)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _native
from ..functional import queue_info_nce as _fused
from .._validate import ArgumentError, nonneg_int, optional_generator, positive, positive_int, real_in, tensor

__all__ = ["hard_negative_mix", "queue_logits", "queue_info_nce_loss", "InfoNCEWithMixing"]


def _queue_tensor(queue) -> Tensor:
    keys = getattr(queue, "keys", queue)  # a MemoryQueue or its (K, d) tensor
    return tensor("queue", keys, floating=True)


def _check_queue(q: Tensor, queue: Tensor) -> None:
    tensor("q", q, floating=True)
    if q.dim() != 2:
        raise ArgumentError(f"q must be a (B, d) matrix of query embeddings, got shape {tuple(q.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ArgumentError(f"queue must be a (K, {q.shape[1]}) matrix (width d={q.shape[1]} like q), got shape "
                            f"{tuple(queue.shape)}")


_PAIR_BLOCK = 2 ** 16  # elements of one block of gathered key rows in _mix_norms (256 kB in float32: cache-sized)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _indices(top: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """(B, N) queue indices of the hardest keys -> (B, count) of them drawn uniformly with replacement per query."""
    dev = generator.device if generator is not None else top.device
    pick = torch.randint(0, top.shape[1], (top.shape[0], count), generator=generator, device=dev).to(top.device)
    return top.gather(1, pick)


def _check_n_hard(keys: Tensor, n_hard: int) -> None:
    if n_hard > keys.shape[0]:
        raise ArgumentError(f"n_hard must be <= the queue size {keys.shape[0]}, got {n_hard}")


def _check_mix(keys: Tensor, n_hard: int, s: int, s_prime: int, beta_max: float) -> tuple[int, int, int, float]:
    n_hard = positive_int("n_hard", n_hard)
    _check_n_hard(keys, n_hard)
    return n_hard, nonneg_int("s", s), nonneg_int("s_prime", s_prime), real_in("beta_max", beta_max, 0.0, 0.5)


def _hardest(sim: Tensor, n_hard: int) -> Tensor:
    """The column indices of the ``n_hard`` largest entries of each row of ``sim`` (B, K), in no set order.
    On the CPU in float32, one native call (a radix selection per row, :mod:`gradkit._native`; increasing
    order): the same sets as ``torch.topk`` but for ties."""
    lib = _native.native() if sim.dtype == torch.float32 and sim.dim() == 2 and sim.shape[1] < 2 ** 31 else None
    if lib is not None and _native.usable(sim):
        rows, n = sim.shape
        out = torch.empty(rows, n_hard, dtype=torch.long)
        scratch = torch.empty(3 * n, dtype=torch.int32)
        lib.gk_rows_topk(sim.data_ptr(), rows, n, n_hard, scratch.data_ptr(), out.data_ptr())
        return out
    return sim.topk(n_hard, dim=1, sorted=False).indices


def _draw(sim: Tensor, n_hard: int, s: int, s_prime: int, beta_max: float, generator: torch.Generator | None):
    """The random choices of one mixing, from the (B, K) similarities q.n: queue indices i, j (B, s) and weights
    alpha (B, s) of the type-1 mixes, indices j2 and weights beta (B, s') of the type-2 mixes."""
    top = _hardest(sim, n_hard)  # (B, N): the hardest keys of each query
    b = sim.shape[0]
    alpha = _uniform((b, s), generator, sim)
    i, j = _indices(top, s, generator), _indices(top, s, generator)
    beta = beta_max * _uniform((b, s_prime), generator, sim)
    return i, j, alpha, _indices(top, s_prime, generator), beta


def _mix(q: Tensor, keys: Tensor, sim: Tensor, n_hard: int, s: int, s_prime: int, beta_max: float,
         generator: torch.Generator | None) -> Tensor:
    """The synthetic negatives as vectors (B, s + s', d) (validated arguments, no grad)."""
    i, j, alpha, j2, beta = _draw(sim, n_hard, s, s_prime, beta_max, generator)
    alpha, beta = alpha[..., None], beta[..., None]
    mix1 = alpha * keys[i] + (1 - alpha) * keys[j]
    mix2 = beta * q[:, None] + (1 - beta) * keys[j2]
    return F.normalize(torch.cat([mix1, mix2], dim=1), dim=2)


def _mix_norms(table: Tensor, i: Tensor, j: Tensor, w: Tensor) -> Tensor:
    """||w table[i] + (1 - w) table[j]|| for index and weight tensors of one shape, in blocks of pairs that stay
    in cache (the gathered rows are never built for the whole batch at once: on CPU this is several times faster
    at (128, 1024) pairs of 128-d keys)."""
    fi, fj, fw = i.reshape(-1), j.reshape(-1), w.reshape(-1, 1)
    out = torch.empty(fi.shape, dtype=table.dtype, device=table.device)
    block = max(1, _PAIR_BLOCK // table.shape[1])
    for a in range(0, len(fi), block):  # a few blocks of pairs (one for the digits claim, 256 at ImageNet-100's)
        b = slice(a, a + block)
        ti, tj = table.index_select(0, fi[b]), table.index_select(0, fj[b])
        out[b] = torch.linalg.vector_norm(tj.add_(ti.sub_(tj).mul_(fw[b])), dim=1)  # w ti + (1 - w) tj
    return out.view(i.shape)


def _mixed_logits(q: Tensor, keys: Tensor, l_neg: Tensor, n_hard: int, s: int, s_prime: int, beta_max: float,
                  generator: torch.Generator | None) -> Tensor:
    """q.h for the synthetic negatives of :func:`_mix` (same draws), without building the (B, S, d) vectors.

    With c = q.n from ``l_neg`` (differentiable in q) and the mixes' norms computed without grad,
    q.h = (alpha c_i + (1 - alpha) c_j) / ||alpha n_i + (1 - alpha) n_j|| and
    q.h' = (beta q.q + (1 - beta) c_j) / ||beta q + (1 - beta) n_j||, whose gradient in q is h (resp. h'),
    as if the synthetic negatives were constants. Only the type-1 norms need a d-dim product per pair; the
    type-2 norms follow from beta^2 ||q||^2 + (1 - beta)^2 ||n_j||^2 + 2 beta (1 - beta) c_j.
    """
    sim = l_neg.detach()
    i, j, alpha, j2, beta = _draw(sim, n_hard, s, s_prime, beta_max, generator)
    with torch.no_grad():
        norm1 = _mix_norms(keys, i, j, alpha)
        sq2 = keys.index_select(0, j2.reshape(-1)).pow(2).sum(1).view(j2.shape)  # ||n_j||^2
        qq = q.detach().pow(2).sum(1, keepdim=True)
        b2 = 1 - beta
        norm2 = (beta * beta * qq + b2 * b2 * sq2 + 2 * beta * b2 * sim.gather(1, j2)).clamp_min(0).sqrt()
        norm = torch.cat([norm1, norm2], dim=1).clamp_min(1e-12)  # F.normalize's floor
    c = l_neg.gather(1, torch.cat([i, j, j2], dim=1))  # one gather: one (B, K) buffer in backward
    c_i, c_j, c_j2 = c.split([s, s, s_prime], dim=1)
    l1 = alpha * c_i + (1 - alpha) * c_j
    l2 = beta * (q * q.detach()).sum(1, keepdim=True) + b2 * c_j2
    return torch.cat([l1, l2], dim=1) / norm


@torch.no_grad()
def hard_negative_mix(q: Tensor, queue, n_hard: int = 64, s: int = 64, s_prime: int = 32, beta_max: float = 0.5,
                      generator: torch.Generator | None = None) -> Tensor:
    """Synthetic hard negatives per query: (B, s + s', d), the s type-1 mixes first (see the module docstring).

    q: (B, d) unit queries; queue: (K, d) unit keys or a ``MemoryQueue``; n_hard: N <= K, the hardest keys
    mixed; beta_max in [0, 0.5]: beta ~ U(0, beta_max) is the query's share in a type-2 mix.
    Returns unit rows without grad.

    >>> q = F.normalize(torch.randn(4, 8), dim=1)
    >>> hard_negative_mix(q, F.normalize(torch.randn(32, 8), dim=1), n_hard=8, s=3, s_prime=2).shape
    torch.Size([4, 5, 8])
    """
    keys = _queue_tensor(queue)
    _check_queue(q, keys)
    n_hard, s, s_prime, beta_max = _check_mix(keys, n_hard, s, s_prime, beta_max)
    optional_generator(generator)
    q = q.detach()
    keys = keys.detach().to(q.dtype)
    return _mix(q, keys, q @ keys.T, n_hard, s, s_prime, beta_max, generator)


def _check_synthetic(q: Tensor, synthetic: Tensor) -> None:
    tensor("synthetic", synthetic, floating=True)
    if synthetic.dim() != 3 or synthetic.shape[0] != q.shape[0] or synthetic.shape[2] != q.shape[1]:
        raise ArgumentError(f"synthetic must be a (B, S, d) tensor with B={q.shape[0]} and d={q.shape[1]}, got "
                            f"shape {tuple(synthetic.shape)}")


def _logits(q: Tensor, k: Tensor, l_neg: Tensor, tau: float, synthetic: Tensor | None) -> Tensor:
    parts = [(q * k.detach()).sum(1, keepdim=True), l_neg]
    if synthetic is not None:
        parts.append(torch.einsum("bd,bsd->bs", q, synthetic.detach().to(q.dtype)))
    return torch.cat(parts, dim=1) / tau


def _check_key(q: Tensor, k: Tensor) -> None:
    tensor("k", k, floating=True)
    if k.shape != q.shape:
        raise ArgumentError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")


def queue_logits(q: Tensor, k: Tensor, queue, tau: float = 0.2, synthetic: Tensor | None = None) -> Tensor:
    """MoCo's logits [q.k, q.n_1..q.n_K, q.h_1..q.h_S] / tau: (B, 1 + K + S); the positive is column 0.

    q, k: (B, d) (used as given: normalise them first); queue: (K, d) or a ``MemoryQueue`` (no gradient);
    synthetic: optional (B, S, d) per-query negatives (no gradient).

    >>> q = F.normalize(torch.randn(4, 8), dim=1)
    >>> queue_logits(q, q, torch.zeros(10, 8)).shape
    torch.Size([4, 11])
    """
    keys = _queue_tensor(queue)
    _check_queue(q, keys)
    _check_key(q, k)
    tau = positive("tau", tau)
    if synthetic is not None:
        _check_synthetic(q, synthetic)
    return _logits(q, k, q @ keys.detach().to(q.dtype).T, tau, synthetic)


def queue_info_nce_loss(q: Tensor, k: Tensor, queue, tau: float = 0.2, synthetic: Tensor | None = None) -> Tensor:
    """MoCo's InfoNCE: cross-entropy of :func:`queue_logits` with target 0 (the positive key). Returns a 0-dim tensor.

    The key is detached (it comes from the momentum encoder); gradients reach only q.

    >>> q = torch.eye(4)
    >>> bool(queue_info_nce_loss(q, q, -q, tau=0.1) < 0.01)
    True
    """
    logits = queue_logits(q, k, queue, tau, synthetic)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class InfoNCEWithMixing(nn.Module):
    """InfoNCE over a queue with MoCHi's synthetic hard negatives appended (MoCHi(N, s, s') = (n_hard, s, s_prime)).

    ``forward(q, k, queue)`` L2-normalises q and k, mixes ``s + s_prime`` negatives per query (once ``step`` has
    reached ``start_step``; before that, and always with s = s' = 0, it is plain MoCo InfoNCE) and returns the
    loss. ``step`` counts the forwards in training mode. ``last_stats`` gives the last batch's diagnostics:
    ``proxy_acc`` (% of queries whose positive logit is the largest, synthetic negatives included),
    ``proxy_acc_queue`` (queue negatives only), ``synthetic_mass`` (share of the negatives' softmax mass on the
    synthetic negatives) and ``synthetic_share`` (their share of the negatives' count).

    >>> loss_fn = InfoNCEWithMixing(tau=0.2, n_hard=16, s=16, s_prime=4)
    >>> q = torch.randn(8, 32); loss = loss_fn(q, q + 0.1 * torch.randn(8, 32), F.normalize(torch.randn(64, 32), dim=1))
    >>> sorted(loss_fn.last_stats)
    ['proxy_acc', 'proxy_acc_queue', 'synthetic_mass', 'synthetic_share']
    """

    def __init__(self, tau: float = 0.2, n_hard: int = 64, s: int = 64, s_prime: int = 32, beta_max: float = 0.5,
                 start_step: int = 0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.tau = positive("tau", tau)
        self.n_hard = positive_int("n_hard", n_hard)
        self.s, self.s_prime = nonneg_int("s", s), nonneg_int("s_prime", s_prime)
        self.beta_max = real_in("beta_max", beta_max, 0.0, 0.5)
        self.start_step = nonneg_int("start_step", start_step)
        self.generator = optional_generator(generator)
        self.step = 0
        self._last: tuple[list[Tensor], int, float] | None = None  # the last forward's detached logits (before
        # the temperature: positive, queue, synthetic), K and tau

    @property
    def mixing(self) -> bool:
        """Whether the next forward appends synthetic negatives."""
        return self.s + self.s_prime > 0 and self.step >= self.start_step

    def forward(self, q: Tensor, k: Tensor, queue) -> Tensor:
        keys = _queue_tensor(queue)
        _check_queue(q, keys)
        _check_key(q, k)
        q = F.normalize(q, dim=1)
        keys = keys.detach().to(q.dtype)
        l_neg = q @ keys.T  # shared by the ranking and the logits
        mixing = self.mixing
        if mixing:  # (the other mixing arguments are checked by the constructor)
            _check_n_hard(keys, self.n_hard)
        if _fused.usable(q, k, l_neg, keys):  # one native call each way (k normalised there), no (B, 1 + K + S)
            # logits built
            mix = _fused.Mixing(self.n_hard, self.s, self.s_prime, self.beta_max, self.generator) if mixing else None
            loss, pos, syn, _ = _fused.queue_info_nce(q, k, l_neg, keys, self.tau, mix)
            parts = [pos[:, None], l_neg.detach(), syn]
        else:
            k = F.normalize(k.detach(), dim=1)
            parts = [(q * k).sum(1, keepdim=True), l_neg]
            if mixing:
                parts.append(_mixed_logits(q, keys, l_neg, self.n_hard, self.s, self.s_prime, self.beta_max,
                                           self.generator))
            logits = torch.cat(parts, dim=1) / self.tau
            loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
            parts = [t.detach() for t in parts]
        if self.training:
            self.step += 1
        self._last = (parts, keys.shape[0], self.tau)
        return loss

    @property
    def last_stats(self) -> dict[str, float]:
        """Diagnostics of the last forward (computed on access; empty before the first forward)."""
        if self._last is None:
            return {}
        parts, n_queue, tau = self._last
        logits = torch.cat(parts, dim=1) / tau
        p_neg = logits.softmax(1)[:, 1:]
        n_syn = p_neg.shape[1] - n_queue
        neg_mass = p_neg.sum(1).clamp_min(torch.finfo(p_neg.dtype).tiny)
        return {"proxy_acc": 100.0 * float((logits.argmax(1) == 0).float().mean()),
                "proxy_acc_queue": 100.0 * float((logits[:, :1 + n_queue].argmax(1) == 0).float().mean()),
                "synthetic_mass": float((p_neg[:, n_queue:].sum(1) / neg_mass).mean()),
                "synthetic_share": n_syn / p_neg.shape[1]}

    def extra_repr(self) -> str:
        return (f"tau={self.tau:g}, n_hard={self.n_hard}, s={self.s}, s_prime={self.s_prime}, "
                f"beta_max={self.beta_max:g}, start_step={self.start_step}")
