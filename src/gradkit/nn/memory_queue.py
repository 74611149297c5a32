"""MoCo's memory queue of past keys and the momentum (EMA) update of the key encoder (paper slug:
hard-negative-mixing).

The queue holds the K most recent keys, first in first out; the key encoder follows the query encoder as

    theta_k <- m * theta_k + (1 - m) * theta_q

so the keys in the queue come from slowly changing encoders and stay comparable with the new queries.

>>> queue = MemoryQueue(dim=32, size=1024)
>>> queue.enqueue(torch.nn.functional.normalize(torch.randn(128, 32), dim=1))
>>> queue.keys.shape, queue.filled
(torch.Size([1024, 32]), 128)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import ArgumentError, optional_generator, positive_int, probability, tensor

__all__ = ["MemoryQueue", "momentum_update"]


class MemoryQueue(nn.Module):
    """A FIFO queue of ``size`` unit-norm keys of width ``dim``, stored as a buffer ``keys`` of shape (size, dim).

    The queue starts with random unit vectors (as in MoCo) so it can be used from the first step; ``filled``
    counts the real keys written so far (capped at ``size``). ``enqueue(keys)`` overwrites the oldest rows and
    wraps around; keys are detached, L2-normalised and cast to the queue's dtype. Being a module, it moves with ``.to(device)``
    and is saved in ``state_dict``.

    >>> q = MemoryQueue(8, 4)
    >>> q.enqueue(torch.eye(8)[:3]); q.enqueue(torch.eye(8)[3:6])
    >>> q.keys[:2].argmax(1).tolist(), q.ptr
    ([4, 5], 2)
    """

    keys: Tensor

    def __init__(self, dim: int, size: int, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.size = positive_int("size", size)
        optional_generator(generator)
        init = torch.randn(self.size, self.dim, generator=generator, dtype=dtype)
        self.register_buffer("keys", F.normalize(init, dim=1).to(device))
        self.ptr = 0
        self.filled = 0

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the rows of ``keys`` (B, dim) over the oldest entries; B may exceed ``size`` (the last ``size`` stay)."""
        tensor("keys", keys, floating=True)
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ArgumentError(f"keys must be a (B, {self.dim}) matrix for a queue of width dim={self.dim}, "
                                f"got shape {tuple(keys.shape)}")
        keys = keys.detach()[-self.size:]
        b = keys.shape[0]
        if self.ptr + b <= self.size and keys.dtype == self.keys.dtype and keys.device == self.keys.device:
            # no wrap: the normalised rows written straight into their slice (F.normalize's formula, in place)
            norm = torch.linalg.vector_norm(keys, dim=1, keepdim=True).clamp_min_(1e-12)
            torch.div(keys, norm, out=self.keys[self.ptr:self.ptr + b])
        elif self.ptr + b <= self.size:
            self.keys[self.ptr:self.ptr + b] = F.normalize(keys, dim=1).to(self.keys)
        else:
            keys = F.normalize(keys, dim=1).to(self.keys)
            idx = (self.ptr + torch.arange(b, device=self.keys.device)) % self.size
            self.keys[idx] = keys
        self.ptr = (self.ptr + b) % self.size
        self.filled = min(self.size, self.filled + b)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, filled={self.filled}"


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """EMA of ``online``'s parameters into ``target``'s in place: target <- m * target + (1 - m) * online.

    Buffers (e.g. BatchNorm statistics) are copied. ``m`` in [0, 1]; m = 0 copies, m = 1 freezes the target.

    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> momentum_update(a, b, 0.0); bool(torch.equal(a.weight, b.weight))
    True
    """
    m = probability("m", m)
    po, pt = list(online.parameters()), list(target.parameters())
    if len(po) != len(pt) or any(a.shape != b.shape for a, b in zip(po, pt)):
        raise ArgumentError("online and target must have the same parameter shapes, got "
                            f"{[tuple(p.shape) for p in po]} and {[tuple(p.shape) for p in pt]}")
    if pt:
        torch._foreach_lerp_(pt, po, 1.0 - m)  # one call for all parameters (a per-tensor loop on any device mix)
    for bo, bt in zip(online.buffers(), target.buffers()):
        bt.copy_(bo)
