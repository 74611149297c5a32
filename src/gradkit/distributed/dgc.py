"""Deep Gradient Compression: a stateful top-k gradient compressor (paper slug: dgc, arXiv 1712.01887).

Per worker and per parameter tensor (or per flat group of tensors, as in a DDP bucket), every step::

    g <- clip(g, clip_norm * N^(-1/2))       local gradient clipping (optional)
    u <- m*u + g                             momentum correction (Nesterov: u <- m*(u + g); v <- v + u + g)
    v <- v + u                               accumulate the unsent velocity
    send the k = ceil(d * numel) entries of largest |v|  (values + indices)
    v[sent] <- 0 ; u[sent] <- 0              residual; momentum factor masking
    receiver: G = (1/N) sum_k scatter(values_k, indices_k);  w <- w - lr*G   (no optimizer momentum)

Tensors with ``dim() < min_dim`` (biases, norm parameters) are sent densely and get their momentum after
averaging (``u <- m*u + mean_k g_k``), as in the official code. The density ``d`` follows a warm-up schedule
(:func:`warmup_density`). Byte counters record what a worker really sends (values at their element size,
indices as int32 or int64) against the dense gradient.

Pure tensor code: no ``torch.distributed``; :mod:`gradkit.distributed.dgc_hook` and
:mod:`gradkit.distributed.simulate` move the pieces between workers. Bad input fails loudly:
:meth:`DGCCompressor.compress` rejects NaN/inf gradients (``ValueError`` naming the key) before any state
changes, and a key reused with another shape or dtype raises instead of silently restarting its residual.

>>> comp = DGCCompressor(density=0.01, momentum=0.9, world_size=1, warmup=None)
>>> sg = comp.compress("w", torch.randn(100, 100))           # 100 entries of largest |v|
>>> update = comp.decompress([sg], sg.shape)                   # the averaged sparse gradient
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import torch

from .. import _native
from .._validate import ArgumentError, is_int, nonneg_int, positive_int, real_scalar

__all__ = ["SparseGrad", "DGCCompressor", "warmup_density", "select_topk", "encode_block16", "decode_block16",
           "WARMUPS", "INDEX_CODINGS"]

WARMUPS = ("paper", "official")


BLOCK = 1 << 16


def encode_block16(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Pack SORTED flat indices as bytes: int32 counts per 65,536-entry block, then int16 low bits.

    Size ``4 * ceil(numel / 65536) + 2 * k`` bytes, fixed for fixed (numel, k), so ranks can all-gather it.
    """
    nblocks = max(1, -(-numel // BLOCK))
    lib = _native.native() if indices.dtype == torch.int64 else None
    if lib is not None and indices.dim() == 1 and _native.usable(indices):
        out = torch.empty(4 * nblocks + 2 * indices.numel(), dtype=torch.uint8)
        if lib.gk_encode_block16(indices.data_ptr(), indices.numel(), nblocks, out.data_ptr()) == 0:
            return out  # else an index out of range: the PyTorch path below raises
    idx = indices.long()
    # index_add_ instead of bincount: the same counts, but no device-to-host sync to size the output
    counts = torch.zeros(nblocks, dtype=torch.int32, device=idx.device).index_add_(
        0, idx >> 16, torch.ones(idx.shape, dtype=torch.int32, device=idx.device))
    low = ((idx & (BLOCK - 1)) - (BLOCK // 2)).to(torch.int16)
    return torch.cat([counts.view(torch.uint8), low.view(torch.uint8)])


def decode_block16(packed: torch.Tensor, numel: int, k: int, check: bool = True) -> torch.Tensor:
    """Inverse of :func:`encode_block16` (int64 indices); ValueError when the bytes cannot be a valid code.

    ``check=False`` skips the count check (a device-to-host sync): for trusted, already validated peers.
    """
    nblocks = max(1, -(-numel // BLOCK))
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != 4 * nblocks + 2 * k:
        raise ValueError(f"block16 indices must be {4 * nblocks + 2 * k} uint8 bytes for numel={numel}, k={k}, "
                         f"got {packed.numel()} of {packed.dtype}")
    counts = packed[: 4 * nblocks].clone().view(torch.int32).long()
    if check and (bool((counts < 0).any()) or int(counts.sum()) != k):
        raise ValueError(f"block16 block counts {counts.tolist()[:8]}... do not sum to k={k}")
    low = packed[4 * nblocks:].clone().view(torch.int16).long() + BLOCK // 2
    blocks = torch.repeat_interleave(torch.arange(nblocks, device=packed.device), counts, output_size=k)
    return blocks * BLOCK + low


@dataclass(frozen=True)
class SparseGrad:
    """What one worker sends for one tensor or group: ``values[i]`` belongs at the ``i``-th flat index.

    ``indices``: int32/int64 flat indices (``coding="int"``) or the packed bytes of :func:`encode_block16`
    (``coding="block16"``, values in index order). ``numel`` and ``shape`` describe the dense (flat group)
    tensor the indices address.
    """

    values: torch.Tensor
    indices: torch.Tensor
    numel: int
    shape: torch.Size
    coding: str = "int"

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: values at their element size plus the index payload."""
        return self.values.numel() * self.values.element_size() + self.indices.numel() * self.indices.element_size()

    def flat_indices(self, check: bool = True) -> torch.Tensor:
        """The flat int64 indices (decoded for block16); ValueError if they are malformed.

        ``check=False``: no data-dependent check (no device-to-host sync); for validated peers.
        """
        if self.coding == "block16":
            return decode_block16(self.indices, self.numel, self.values.numel(), check=check)
        if self.coding != "int" or self.indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be int32/int64 with coding 'int', got {self.indices.dtype} with "
                             f"coding {self.coding!r}")
        return self.indices.long()


def _check_density(name: str, d: Any) -> float:
    d = real_scalar(name, d, tensor_ok=False)
    if not 0.0 < d <= 1.0:
        raise ArgumentError(f"{name} must be in (0, 1], got {d!r}")
    return d


def _check_warmup(warmup: Any) -> Any:
    """None | ("paper", E) | ("official", E) | a sequence of per-epoch densities in (0, 1]."""
    if warmup is None:
        return None
    if (isinstance(warmup, (tuple, list)) and len(warmup) == 2 and isinstance(warmup[0], str)):
        kind, epochs = warmup
        if kind not in WARMUPS:
            raise ValueError(f"warmup kind must be one of {WARMUPS}, got {kind!r}")
        epochs = nonneg_int("warmup epochs", epochs)
        return (kind, epochs)
    if isinstance(warmup, (tuple, list)):
        return tuple(_check_density(f"warmup[{i}]", d) for i, d in enumerate(warmup))
    raise ValueError("warmup must be None, ('paper', epochs), ('official', epochs) or a list of densities, "
                     f"got {warmup!r}")


def warmup_density(epoch: int, final: float, warmup: Any = ("paper", 4)) -> float:
    """Density of epoch ``epoch`` (0-based) under a warm-up schedule ending at ``final``.

    paper (sec. 3.3): ``max(0.25^(e+1), final)`` for ``e < E`` (25%, 6.25%, 1.5625%, 0.39%, then final);
    official code: ``max(final^((e+1)/(E+1)), final)`` for ``e < E``; a list: its ``e``-th entry while
    ``e < len(list)``; None: ``final`` from the start.

    >>> [round(warmup_density(e, 0.001, ("paper", 4)), 5) for e in range(5)]
    [0.25, 0.0625, 0.01562, 0.00391, 0.001]
    """
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    final = _check_density("final", final)
    warmup = _check_warmup(warmup)
    if warmup is None:
        return final
    if isinstance(warmup[0], str):
        kind, epochs = warmup
        if epoch >= epochs:
            return final
        if kind == "paper":
            return max(0.25 ** (epoch + 1), final)
        return max(final ** ((epoch + 1) / (epochs + 1)), final)
    return warmup[epoch] if epoch < len(warmup) else final


def _exact_topk(a: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(a, k, sorted=False).indices


BLOCK_ROWS = 64  # row length of the blockwise exact top-k


def _blockwise_topk(a: torch.Tensor, k: int, c: int = BLOCK_ROWS, sync_free: bool | None = None,
                    rmax: torch.Tensor | None = None) -> torch.Tensor:
    """Exact top-k of a flat non-negative ``a`` through row maxima (needs k <= numel // c).

    Split ``a`` into rows of ``c`` (the tail is a short last row); take the k rows with the largest row
    maximum; R_k = the smallest of those maxima is <= the k-th largest entry T_k (those k rows hold k
    entries >= R_k), so every entry > R_k lies in those rows, and they also hold enough entries equal to
    T_k: a top-k set lies among their entries >= R_k. Cost: one pass over ``a`` plus small top-k's,
    instead of a top-k over all entries.

    ``sync_free`` (default: on for non-CPU tensors): skip the data-dependent filter ``>= R_k`` and take the
    top-k of all ``k * c`` candidate entries (a padded tail row scores -1): fixed shapes, so no
    device-to-host sync; the same top-k values, ties possibly broken differently. On CPU the filter is
    faster and stays the default.

    ``rmax``: the row maxima when already known (then ``a`` may be signed: its candidates are ranked by
    ``|a|``; :func:`gradkit._native` computes them in the pass that updates ``a``).
    """
    n = a.numel()
    rows = n // c
    main = rows * c
    signed = rmax is not None
    if rmax is None:
        rmax = a[:main].view(rows, c).amax(1)
        if main < n:
            rmax = torch.cat([rmax, a[main:].amax().view(1)])
    if sync_free is None:
        sync_free = a.device.type != "cpu"
    if not sync_free:
        found = _native_topk(a, k, rmax.contiguous(), c=c)
        if found is not None:
            return found[0]
    top = torch.topk(rmax, k, sorted=False)
    thr = top.values.min()
    cand = (top.indices.unsqueeze(1) * c + torch.arange(c, device=a.device)).reshape(-1)
    if sync_free:
        if main < n:  # the tail row is short: its missing entries score -1 (every |x| >= 0)
            valid = cand < n
            cand = torch.where(valid, cand, n - 1)
            ac = torch.where(valid, a[cand].abs() if signed else a[cand],
                             torch.full((), -1.0, dtype=a.dtype, device=a.device))
        else:
            ac = a[cand].abs() if signed else a[cand]
        return cand[torch.topk(ac, k, sorted=False).indices]
    if main < n:
        cand = cand[cand < n]
    ac = a[cand].abs() if signed else a[cand]
    keep = torch.nonzero(ac >= thr).view(-1)
    return _cut_to_k(a, cand[keep], ac[keep], k, signed)


def _native_topk(a: torch.Tensor, k: int, rmax: torch.Tensor, *, c: int = BLOCK_ROWS, u: torch.Tensor | None = None,
                 take: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`_blockwise_topk` in one native call: the indices, increasing, of a top-k set of ``|a|`` (flat
    float32, row maxima ``rmax`` of ``|a|`` over rows of ``c``), and with ``take`` their values, those
    entries of ``a`` (and of ``u``) then set to 0. None where the kernel cannot run (the caller falls back)."""
    lib = _native.native()
    if (lib is None or a.dtype != torch.float32 or rmax.dtype != torch.float32
            or not _native.usable(a, rmax, *([] if u is None else [u]))):
        return None
    idx = torch.empty(k, dtype=torch.int64)
    vals = torch.empty(k, dtype=torch.float32) if take else None
    cap = 2 * k + 2 * c  # the candidates number about k + c; ties may ask for more room
    while True:
        cand_val, cand_idx = torch.empty(cap, dtype=torch.float32), torch.empty(cap, dtype=torch.int64)
        got = lib.gk_dgc_topk(a.data_ptr(), None if u is None else u.data_ptr(), a.numel(), c, rmax.data_ptr(), k,
                              cand_val.data_ptr(), cand_idx.data_ptr(), cap, idx.data_ptr(),
                              None if vals is None else vals.data_ptr(), int(take))
        if got >= 0:
            return (idx, vals) if got == k else None
        cap = -got


def _cut_to_k(a: torch.Tensor, cand: torch.Tensor, ac: torch.Tensor | None, k: int, signed: bool) -> torch.Tensor:
    """The k of the candidate indices ``cand`` (a superset of a top-k set) with the largest entries; ``ac``:
    their magnitudes if already gathered."""
    if cand.numel() < k:  # NaN entries compare false: rank all entries instead, NaN first as torch.topk does
        return _exact_topk(a.abs() if signed else a, k)
    if cand.numel() > k:
        if ac is None:
            ac = a[cand].abs() if signed else a[cand]
        cand = cand[torch.topk(ac, k, sorted=False).indices]
    return cand


def select_topk(x: torch.Tensor, k: int, sample_ratio: float | None = None,
                generator: torch.Generator | None = None,
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Flat indices (int64, unique) of exactly ``k`` entries of largest ``|x|`` (ties broken arbitrarily).

    ``sample_ratio=None``: exact; ``torch.topk`` on small tensors, and on large sparse selections
    (numel >= 32768, k <= numel / 256) a blockwise exact top-k (top-k rows of 64 by their maxima, then the
    top-k of those rows' entries; 2-3x faster than ``torch.topk`` on 1M entries). Otherwise the official
    code's sampled threshold (data-dependent candidate counts: it syncs with the host; the exact
    selection does not, off the CPU): the threshold is
    the ``ceil(d*s + 2 sqrt(d*s)) + 1``-th largest |x| (official: ``ceil(d*s)``-th; the margin makes >= k
    candidates likely) among ``s = max(sample_ratio * numel, 2/d)`` strided samples (random offset),
    lowered by 0.8x while fewer than ``k`` entries pass (at most 10 tries, then exact top-k); the
    candidates are cut to exactly ``k`` by an exact top-k among them. The selected set is always an exact
    top-k set; sampling only makes it cheaper on large tensors. ``work``: optional scratch buffers
    (|x| with x's dtype, a bool mask; numel of x each) reused across calls to avoid re-allocation.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    n = x.numel()
    if not is_int(k, low=1, high=n):
        raise ValueError(f"k must be an int in [1, {n}] (numel of x), got {k!r}")
    if work is not None:
        a = torch.abs(x.detach().reshape(-1), out=work[0])
        mask = work[1]
    else:
        a = x.detach().reshape(-1).abs()
        mask = None
    if sample_ratio is None or k == n:
        if n >= 1 << 15 and 4 * k * BLOCK_ROWS <= n:
            return _blockwise_topk(a, k)
        return _exact_topk(a, k)
    d = k / n
    s = min(n, max(math.ceil(sample_ratio * n), math.ceil(2.0 / d)))
    stride = max(1, n // s)
    offset = int(torch.randint(stride, (1,), generator=generator).item()) if stride > 1 else 0
    sample = a[offset::stride]
    # the official code takes the ceil(d*s)-th sample; we need >= k candidates (fixed k for all-gather), so
    # the threshold is taken 2 binomial standard deviations lower: one pass usually suffices
    mean = d * sample.numel()
    ks = min(sample.numel(), max(1, math.ceil(mean + 2.0 * math.sqrt(mean)) + 1))
    thr = torch.topk(sample, ks, sorted=False).values.min()
    for _ in range(10):
        cand = torch.nonzero(torch.ge(a, thr, out=mask) if mask is not None else a >= thr).view(-1)
        c = cand.numel()
        if c >= k:
            if c == k:
                return cand
            return cand[_exact_topk(a[cand], k)]
        thr = thr * 0.8
    return _exact_topk(a, k)


INDEX_CODINGS = ("auto", "int32", "int64", "block16")


def _index_coding(spec: Any) -> str:
    if spec not in INDEX_CODINGS:
        raise ValueError(f"index_coding must be one of {INDEX_CODINGS}, got {spec!r}")
    return spec


class DGCCompressor:
    """Deep Gradient Compression state of ONE worker (paper slug: dgc, arXiv 1712.01887).

    u <- m*u + g ; v <- v + u ; send top-k of |v| ; v[sent] = u[sent] = 0 ; receiver G = sum_k sparse_k / N.

    density: final density d in (0, 1] (paper: 0.001). momentum: m in [0, 1) (0 with momentum_masking=False
    is gradient dropping: plain top-k with a residual; put momentum in the optimizer then). nesterov: the
    official ``u <- m*(u + g); v <- v + u + g``. clip_norm: local clipping threshold c (scaled by
    ``world_size^(-1/2)``; None = off). warmup: see :func:`warmup_density`; call :meth:`set_epoch` every
    epoch. min_dim: tensors with fewer dims are sent densely. sample_ratio: None = exact top-k, else the
    sampled threshold of :func:`select_topk` (official 0.01). index_coding: "auto" (int32 when the tensor has
    < 2^31 entries, else int64), "int32", "int64", or "block16" (int32 count per 65,536-entry block + int16
    low bits: 2 bytes per index, see :func:`encode_block16`). generator: draws the sampled threshold's
    random offset.

    State (``u``, ``v`` and the dense tensors' momentum) is keyed by whatever key the caller gives
    (parameter names: :class:`~gradkit.distributed.dgc_hook.DGCState` uses them), allocated lazily at a
    key's first use; a key keeps its shape and dtype (reusing it with another raises ValueError).
    :meth:`state_dict` / :meth:`load_state_dict` save and restore all of it (residuals, momenta, epoch,
    counters, the sampling generator), so a run saved mid-training continues bit-identically.

    >>> comp = DGCCompressor(density=0.01, world_size=2, warmup=None)
    >>> other = DGCCompressor(density=0.01, world_size=2, warmup=None)      # the second worker
    >>> a, b = comp.compress("w", torch.randn(50, 40)), other.compress("w", torch.randn(50, 40))
    >>> g = comp.decompress([a, b], (50, 40))     # (sparse_a + sparse_b) / 2
    """

    def __init__(self, density: float = 1e-3, momentum: float = 0.9, nesterov: bool = False,
                 clip_norm: float | None = None, world_size: int = 1, momentum_masking: bool = True,
                 warmup: Any = ("paper", 4), min_dim: int = 2, sample_ratio: float | None = None,
                 index_coding: str = "auto", generator: torch.Generator | None = None) -> None:
        self.final_density = _check_density("density", density)
        m = real_scalar("momentum", momentum, tensor_ok=False)
        if not 0.0 <= m < 1.0:
            raise ArgumentError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = m
        self.nesterov = bool(nesterov)
        if clip_norm is not None:
            clip_norm = real_scalar("clip_norm", clip_norm, tensor_ok=False)
            if clip_norm <= 0:
                raise ArgumentError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
        self.clip_norm = clip_norm
        self.world_size = positive_int("world_size", world_size)
        self.momentum_masking = bool(momentum_masking)
        self.warmup = _check_warmup(warmup)
        self.min_dim = nonneg_int("min_dim", min_dim)
        if sample_ratio is not None:
            sample_ratio = real_scalar("sample_ratio", sample_ratio, tensor_ok=False)
            if not 0.0 < sample_ratio <= 1.0:
                raise ArgumentError(f"sample_ratio must be in (0, 1] or None, got {sample_ratio!r}")
        self.sample_ratio = sample_ratio
        self.index_coding = _index_coding(index_coding)
        self.generator = generator
        self.u: dict[Hashable, torch.Tensor] = {}
        self.v: dict[Hashable, torch.Tensor] = {}
        self.dense_u: dict[Hashable, torch.Tensor] = {}
        self._work: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.epoch = 0
        self.density = warmup_density(0, self.final_density, self.warmup)
        self.reset_counters()

    # ------------------------------------------------------------------ schedule and counters
    def set_epoch(self, epoch: int) -> float:
        """Apply the warm-up density of ``epoch`` (every rank must call it alike); returns the density."""
        self.density = warmup_density(epoch, self.final_density, self.warmup)
        self.epoch = int(epoch)
        return self.density

    def reset_counters(self) -> None:
        self.bytes_dense = 0          # what a dense exchange of the same tensors would send
        self.bytes_sent = 0           # what this worker really sent (values + indices + dense tensors)
        self.bytes_dense_steady = 0   # the same, counted only at the final density (after warm-up)
        self.bytes_sent_steady = 0
        self.bytes_dense_steady_sparse = 0   # compressed tensors only (no dense biases), final density
        self.bytes_sent_steady_sparse = 0

    def _count(self, dense: int, sent: int, sparse: bool) -> None:
        self.bytes_dense += dense
        self.bytes_sent += sent
        if self.density == self.final_density:
            self.bytes_dense_steady += dense
            self.bytes_sent_steady += sent
            if sparse:
                self.bytes_dense_steady_sparse += dense
                self.bytes_sent_steady_sparse += sent

    def compression_ratio(self, steady: bool = False, sparse_only: bool = False) -> float:
        """Dense bytes / sent bytes over the run (``steady``: only steps at the final density;
        ``sparse_only``: steady state of the compressed tensors alone, dense biases left out)."""
        if sparse_only:
            d, s = self.bytes_dense_steady_sparse, self.bytes_sent_steady_sparse
        elif steady:
            d, s = self.bytes_dense_steady, self.bytes_sent_steady
        else:
            d, s = self.bytes_dense, self.bytes_sent
        return d / s if s else float("nan")

    def compressible(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is compressed (``t.dim() >= min_dim``) or sent densely."""
        return t.dim() >= self.min_dim

    def k_for(self, numel: int) -> int:
        """Entries sent for a tensor/group of ``numel`` entries at the current density."""
        return min(numel, max(1, math.ceil(self.density * numel - 1e-9)))

    def _work_for(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scratch buffers for |v| and the threshold mask (fresh 4 MB allocations cost page faults)."""
        key = (flat.numel(), flat.dtype, flat.device)
        w = self._work.get(key)
        if w is None:
            w = self._work[key] = (torch.empty_like(flat),
                                   torch.empty(flat.shape, dtype=torch.bool, device=flat.device))
        return w

    # ------------------------------------------------------------------ sender side
    def compress(self, key: Hashable, grad: torch.Tensor, clip_scale: float = 1.0, *,
                 check_finite: bool = True) -> SparseGrad:
        """Compress one tensor's local gradient (updates its u, v in place): the top-k of ``v + (m*u + g)``.

        Raises ValueError, before any state changes, when ``grad`` holds NaN/inf (``check_finite``; one
        device-to-host sync) or when ``key`` was used before with another shape or dtype.

        >>> comp = DGCCompressor(density=0.1, warmup=None)
        >>> sg = comp.compress("fc.weight", torch.randn(4, 5))        # 2 values + 2 int32 indices
        >>> comp.decompress([sg], sg.shape).count_nonzero()            # tensor(2)
        """
        sg = self.compress_group([key], [grad], clip_scale=clip_scale, check_finite=check_finite)
        return dataclasses.replace(sg, shape=grad.shape)

    def _check_finite(self, keys: Sequence[Hashable], grads: Sequence[torch.Tensor]) -> None:
        """ValueError naming the first key whose gradient has NaN/inf entries (one host sync when all is well)."""
        lib = _native.native()
        if lib is not None and all(g.dtype == torch.float32 for g in grads) and _native.usable(*grads):
            if all(lib.gk_all_finite(g.data_ptr(), g.numel()) for g in grads):
                return
        else:
            total = grads[0].sum() if len(grads) == 1 else sum(g.sum(dtype=torch.float32) for g in grads)
            if bool(torch.isfinite(total)):  # a sum is non-finite if any entry is (or, rarely, if it overflows)
                return
        for key, g in zip(keys, grads):
            if not bool(torch.isfinite(g).all()):
                nan, inf = int(torch.isnan(g).sum()), int(torch.isinf(g).sum())
                raise ValueError(f"gradient for {key!r} has non-finite entries ({nan} NaN, {inf} inf); nothing was "
                                 "compressed or sent (lower the learning rate, clip, or find the overflow)")

    def _state_for(self, key: Hashable, g: torch.Tensor, store: dict) -> torch.Tensor | None:
        """``store[key]`` checked against ``g`` (shape, dtype; moved to g's device), or None if new."""
        t = store.get(key)
        if t is None:
            return None
        if t.shape != g.shape:
            raise ValueError(f"key {key!r} was used with shape {tuple(t.shape)}, now got a gradient of shape "
                             f"{tuple(g.shape)}; use one key per tensor (expected shape {tuple(t.shape)})")
        if t.dtype != g.dtype:
            raise ValueError(f"key {key!r} holds {t.dtype} state, now got a {g.dtype} gradient (expected {t.dtype})")
        if t.device != g.device:
            t = store[key] = t.to(g.device)
        return t

    def compress_group(self, keys: Sequence[Hashable], grads: Sequence[torch.Tensor],
                       clip_scale: float = 1.0, *, check_finite: bool = True) -> SparseGrad:
        """Compress several tensors as ONE flat vector (a DDP bucket): top-k over their concatenation.

        ``clip_scale`` scales the local clipping threshold (the hook passes sqrt(group/total numel)).
        Indices address the concatenation of the flattened gradients in the given order. Errors as in
        :meth:`compress`; ``check_finite=False`` skips the NaN/inf check (and its host sync): the DDP hook
        checks at its validation iterations instead.
        """
        if len(keys) != len(grads) or not grads:
            raise ValueError(f"keys and grads must be non-empty and of equal length, got {len(keys)} and {len(grads)}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct, got {list(keys)!r}")
        for key, g in zip(keys, grads):
            if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                raise TypeError(f"grad for {key!r} must be a floating-point tensor")
        grads = [g.detach() for g in grads]
        for key, g in zip(keys, grads):
            self._state_for(key, g, self.u)
            self._state_for(key, g, self.v)
        if check_finite:
            self._check_finite(keys, grads)
        if self.clip_norm is not None:
            thr = self.clip_norm * clip_scale / math.sqrt(self.world_size)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = (thr / (norm + 1e-6)).clamp(max=1.0)
            grads = [g * coef for g in grads]
        m = self.momentum
        vs = []
        us = []
        idx = taken = None
        for key, g in zip(keys, grads):
            u = self.u.get(key)
            if u is None:
                u = self.u[key] = torch.zeros_like(g)
            v = self.v.get(key)
            if v is None:
                v = self.v[key] = torch.zeros_like(g)
            rmax = self._native_update(g, u, v) if len(grads) == 1 else None
            if rmax is not None:  # the fused pass below, and the exact top-k from its row maxima
                masked = u.view(-1) if self.momentum_masking else None
                taken = _native_topk(v.view(-1), self.k_for(v.numel()), rmax, u=masked, take=True)
                if taken is None:
                    idx = _blockwise_topk(v.reshape(-1), self.k_for(v.numel()), rmax=rmax)
            elif self.nesterov:
                u.add_(g).mul_(m)
                v.add_(u).add_(g)
            elif m == 0.0:
                u.copy_(g)
                v.add_(g)
            else:
                torch.add(g, u, alpha=m, out=u)  # u <- m*u + g in one pass
                v.add_(u)
            us.append(u)
            vs.append(v)
        flat = vs[0].reshape(-1) if len(vs) == 1 else torch.cat([v.reshape(-1) for v in vs])
        n = flat.numel()
        k = self.k_for(n)
        if taken is not None:  # sorted, values copied, v (and u) already zeroed at the indices
            idx, values = taken
        else:
            if idx is None:
                idx = select_topk(flat, k, self.sample_ratio, self.generator, self._work_for(flat))
            if self.index_coding == "block16":
                idx = torch.sort(idx).values
            values = flat[idx]  # a copy
            self._zero_sent(idx, us, vs, flat)
        shape = torch.Size([n]) if len(vs) > 1 else grads[0].shape
        if self.index_coding == "block16":
            sg = SparseGrad(values, encode_block16(idx, n), n, shape, "block16")
        else:
            big = self.index_coding == "int64" or (self.index_coding == "auto" and n >= 2**31)
            sg = SparseGrad(values, idx.to(torch.int64 if big else torch.int32), n, shape)
        self._count(n * flat.element_size(), sg.nbytes, sparse=True)
        return sg

    def _zero_sent(self, idx: torch.Tensor, us: list[torch.Tensor], vs: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Clear the sent entries of v (and of u with momentum masking) in each tensor of the group."""
        if len(vs) == 1:
            vs[0].view(-1)[idx] = 0
            if self.momentum_masking:
                us[0].view(-1)[idx] = 0
            return
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[idx] = True
        off = 0
        for u, v in zip(us, vs):
            part = mask[off:off + v.numel()].view(v.shape)
            v.masked_fill_(part, 0)
            if self.momentum_masking:
                u.masked_fill_(part, 0)
            off += v.numel()

    def _native_fits(self, g: torch.Tensor) -> bool:
        """Whether one tensor's update and exact selection can take the fused CPU kernel (float32, contiguous,
        sparse enough for the blockwise top-k, one thread: the kernel does not split the work)."""
        n = g.numel()
        return (self.sample_ratio is None and g.dtype == torch.float32 and 4 * self.k_for(n) * BLOCK_ROWS <= n
                and torch.get_num_threads() == 1)

    def _native_update(self, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """u, v updated as in the PyTorch path of :meth:`compress_group` by one fused pass, which returns the
        row maxima of |v| (rows of ``BLOCK_ROWS``); None, and nothing done, where the kernel does not apply."""
        if not self._native_fits(g) or not _native.usable(g, u, v):
            return None
        n = g.numel()
        rmax = torch.empty(-(-n // BLOCK_ROWS), dtype=torch.float32)
        mode = 2 if self.nesterov else 1 if self.momentum == 0.0 else 0
        _native.native().gk_dgc_update(g.data_ptr(), u.data_ptr(), v.data_ptr(), n, self.momentum, mode, BLOCK_ROWS,
                                       rmax.data_ptr())
        return rmax

    def send_dense(self, grad: torch.Tensor, key: Hashable = None, *, check_finite: bool = True) -> torch.Tensor:
        """A tensor sent densely (``dim() < min_dim``): counts its bytes and returns it unchanged.

        ValueError (naming ``key``) when it holds NaN/inf and ``check_finite`` (one host sync).
        """
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise TypeError(f"grad for {key!r} must be a floating-point tensor")
        if check_finite:
            self._check_finite([key], [grad.detach()])
        b = grad.numel() * grad.element_size()
        self._count(b, b, sparse=False)
        return grad

    # ------------------------------------------------------------------ receiver side
    def decompress(self, sparse: Sequence[SparseGrad], shape: Iterable[int] | int, *,
                   check: bool = True) -> torch.Tensor:
        """``(1/world_size) * sum_k scatter(values_k, indices_k)`` reshaped to ``shape``.

        Raises ValueError when the list does not hold one part per worker, or a part is malformed
        (indices out of range, sizes that disagree, non-finite values): nothing garbled is averaged.
        ``check=False`` skips the data-dependent checks (host syncs); the arithmetic is the same.
        """
        shape = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
        numel = shape.numel()
        if len(sparse) != self.world_size:
            raise ValueError(f"decompress expects one part per worker ({self.world_size}), got {len(sparse)}")
        out = None
        for r, s in enumerate(sparse):
            try:
                idx = s.flat_indices(check=check)
            except ValueError as e:
                raise ValueError(f"malformed part from worker {r}: {e}") from None
            if s.values.dim() != 1 or idx.shape != s.values.shape:
                raise ValueError(f"malformed part from worker {r}: values {tuple(s.values.shape)} and indices "
                                 f"{tuple(idx.shape)} must be 1-d of equal length")
            if check and idx.numel():
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= numel:
                    raise ValueError(f"malformed part from worker {r}: indices in [{lo}, {hi}] outside [0, {numel})")
            if check and not bool(torch.isfinite(s.values).all()):
                raise ValueError(f"malformed part from worker {r}: non-finite values")
            if out is None:
                out = s.values.new_zeros(numel)
            out.index_add_(0, idx, s.values.to(out.dtype))
        return out.div_(self.world_size).view(shape)

    def dense_momentum(self, key: Hashable, avg_grad: torch.Tensor) -> torch.Tensor:
        """Update direction of a densely averaged tensor: ``u <- m*u + G`` (Nesterov: ``G + m*u``)."""
        m = self.momentum
        if m == 0.0:
            return avg_grad
        u = self._state_for(key, avg_grad, self.dense_u)
        if u is None:
            u = self.dense_u[key] = avg_grad.detach().clone()
        else:
            u.mul_(m).add_(avg_grad)
        return avg_grad + m * u if self.nesterov else u.clone()

    # ------------------------------------------------------------------ state
    _COUNTERS = ("bytes_dense", "bytes_sent", "bytes_dense_steady", "bytes_sent_steady",
                 "bytes_dense_steady_sparse", "bytes_sent_steady_sparse")

    def state_dict(self) -> dict[str, Any]:
        """u, v, dense momentum (cloned, keyed as given), epoch, byte counters and the generator's state.

        Plain tensors, ints and dicts: ``torch.save`` / ``torch.load(weights_only=True)`` carry it.

        >>> a = DGCCompressor(density=0.1, warmup=None); a.compress("w", torch.randn(8, 8))
        >>> b = DGCCompressor(density=0.1, warmup=None); b.load_state_dict(a.state_dict())
        >>> g = torch.randn(8, 8); torch.equal(a.compress("w", g).values, b.compress("w", g).values)   # True
        """
        out = {"u": {k: t.clone() for k, t in self.u.items()}, "v": {k: t.clone() for k, t in self.v.items()},
               "dense_u": {k: t.clone() for k, t in self.dense_u.items()}, "epoch": self.epoch,
               "counters": {k: getattr(self, k) for k in self._COUNTERS}}
        if self.generator is not None:
            out["generator"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same constructor arguments assumed); KeyError/ValueError if malformed.

        Nothing changes when it raises. With ``sample_ratio`` and ``generator=None`` the sampled offsets come
        from torch's global RNG, whose state the caller saves (``torch.get_rng_state()``).
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        for name in ("u", "v", "dense_u", "epoch", "counters"):
            if name not in state:
                raise KeyError(f"state_dict misses {name!r}")
        for name in ("u", "v", "dense_u"):
            if not isinstance(state[name], dict) or not all(isinstance(t, torch.Tensor) for t in state[name].values()):
                raise ValueError(f"state_dict[{name!r}] must map keys to tensors")
        if set(state["u"]) != set(state["v"]):
            raise ValueError(f"state_dict['u'] and ['v'] must have the same keys, got {sorted(map(str, state['u']))} "
                             f"and {sorted(map(str, state['v']))}")
        for k, u in state["u"].items():
            v = state["v"][k]
            if u.shape != v.shape or u.dtype != v.dtype:
                raise ValueError(f"state for key {k!r}: u is {tuple(u.shape)} {u.dtype} but v is {tuple(v.shape)} "
                                 f"{v.dtype}; expected equal shapes and dtypes")
        unknown = set(state["counters"]) - set(self._COUNTERS)
        if unknown:
            raise ValueError(f"state_dict['counters'] has unknown entries {sorted(unknown)}")
        if "generator" in state and self.generator is None:
            raise ValueError("state_dict holds a generator state but this compressor has generator=None; "
                             "construct it with a torch.Generator to continue the same sampled thresholds")
        self.set_epoch(state["epoch"])
        self.u = {k: t.clone() for k, t in state["u"].items()}
        self.v = {k: t.clone() for k, t in state["v"].items()}
        self.dense_u = {k: t.clone() for k, t in state["dense_u"].items()}
        for k, val in state["counters"].items():
            setattr(self, k, int(val))
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (f"DGCCompressor(density={self.final_density:g}, momentum={self.momentum:g}, nesterov={self.nesterov}, "
                f"clip_norm={self.clip_norm}, world_size={self.world_size}, momentum_masking={self.momentum_masking}, "
                f"warmup={self.warmup}, min_dim={self.min_dim}, sample_ratio={self.sample_ratio})")
