"""Deep Gradient Compression as a DDP communication hook (paper slug: dgc).

Per bucket and rank: the bucket's compressible gradients (``dim() >= min_dim``) are compressed as ONE flat
vector (momentum correction, residual accumulation, top-k with k = ceil(d * numel), momentum factor
masking), values and indices are all-gathered, scatter-added and divided by N; the other gradients (biases,
norm parameters) are all-reduced densely, averaged, and get their momentum after averaging::

    G_bucket = (1/N) sum_k scatter(top_k(v_k), idx_k)        v_k <- v_k + (m*u_k + g_k)

State (u, v) lives per PARAMETER (keyed by the parameter or by its name), so DDP's bucket rebuild after
iteration 0 cannot misalign residuals. Use ``torch.optim.SGD(momentum=0)``: the momentum lives in the
compressor. Weight decay: add it to the loss or the gradient (it is then compressed with it); the
official code's separate weight-decay momentum is not part of the hook. Every rank must call
``state.set_epoch(e)`` every epoch (warm-up). Before any data moves, ranks exchange a small header (k,
sizes, epoch) so that disagreeing ranks all raise the same clear error instead of exchanging garbage.

>>> state = DGCHookState(DGCCompressor(density=0.001, world_size=dist.get_world_size()), module=ddp_model)
>>> ddp_model.register_comm_hook(state, dgc_comm_hook)
>>> opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1, momentum=0.0)
"""
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .dgc import DGCCompressor, SparseGrad

__all__ = ["DGCHookState", "dgc_comm_hook", "DGCHookError"]


class DGCHookError(RuntimeError):
    """The ranks disagree (sizes, density, epoch) or a received bucket is malformed."""


class DGCHookState:
    """State of :func:`dgc_comm_hook` on one rank: the compressor, the group, parameter keys, counters.

    module: the (DDP-wrapped) model; when given, state is keyed by parameter name (so
    ``compressor.state_dict()`` is portable) and local clipping is scaled per bucket by
    sqrt(numel_bucket / numel_total); otherwise keys are the parameter tensors themselves.
    """

    def __init__(self, compressor: DGCCompressor, process_group: Any = None, module: nn.Module | None = None) -> None:
        if not isinstance(compressor, DGCCompressor):
            raise TypeError(f"compressor must be a DGCCompressor, got {type(compressor).__name__}")
        self.compressor = compressor
        self.process_group = process_group
        self.iteration = 0
        self.bytes_header = 0   # the per-bucket consistency header (not in the compressor's counters)
        self._names: dict[int, str] = {}
        self._total_compressible = 0
        if module is not None:
            if not isinstance(module, nn.Module):
                raise TypeError(f"module must be an nn.Module or None, got {type(module).__name__}")
            for name, p in module.named_parameters():
                if name.startswith("module."):
                    name = name[len("module."):]
                self._names[id(p)] = name
                if p.requires_grad and compressor.compressible(p):
                    self._total_compressible += p.numel()

    def key(self, p: torch.Tensor) -> Any:
        return self._names.get(id(p), p)

    def set_epoch(self, epoch: int) -> float:
        """Apply the compressor's warm-up density for ``epoch``; call it on every rank."""
        return self.compressor.set_epoch(epoch)

    def compression_ratio(self) -> float:
        """Dense bytes / bytes this rank sent, the hook's 40-byte header per bucket and step included."""
        c = self.compressor
        sent = c.bytes_sent + self.bytes_header
        return c.bytes_dense / sent if sent else float("nan")


def _gather(t: torch.Tensor, world: int, group: Any) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def dgc_comm_hook(state: DGCHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: DGC-compressed exchange of one bucket (see the module docstring).

    (No ``from __future__ import annotations`` in this module: DDP checks these annotations at runtime.)
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    comp = state.compressor
    if comp.world_size != world:
        raise DGCHookError(f"compressor.world_size is {comp.world_size} but the process group has {world} ranks")
    buf = bucket.buffer()
    params = list(bucket.parameters())
    views = list(bucket.gradients())
    if len(views) != len(params) or sum(v.numel() for v in views) != buf.numel():
        raise DGCHookError(f"unexpected bucket layout: {len(params)} parameters, {len(views)} gradients, "
                           f"{sum(v.numel() for v in views)} entries in views vs {buf.numel()} in the buffer")
    offsets, off = [], 0
    for v in views:
        offsets.append(off)
        off += v.numel()
    sparse_ids = [i for i, p in enumerate(params) if comp.compressible(p)]
    dense_ids = [i for i, p in enumerate(params) if not comp.compressible(p)]
    n_sparse = sum(views[i].numel() for i in sparse_ids)
    n_dense = sum(views[i].numel() for i in dense_ids)
    k = comp.k_for(n_sparse) if n_sparse else 0

    header = torch.tensor([k, n_sparse, n_dense, comp.epoch, state.iteration], dtype=torch.int64, device=buf.device)
    headers = _gather(header, world, group)
    state.bytes_header += header.numel() * header.element_size()
    for r, h in enumerate(headers):
        if not torch.equal(h, header):
            raise DGCHookError(
                f"rank {dist.get_rank(group)} and rank {r} disagree on bucket {bucket.index()}: "
                f"(k, compressed numel, dense numel, epoch, iteration) = {header.tolist()} vs {h.tolist()}; "
                "same model, density and set_epoch calls are needed on every rank")

    out = torch.empty_like(buf)
    if sparse_ids:
        keys = [state.key(params[i]) for i in sparse_ids]
        scale = math.sqrt(n_sparse / state._total_compressible) if state._total_compressible else 1.0
        sg = comp.compress_group(keys, [views[i] for i in sparse_ids], clip_scale=min(1.0, scale))
        values = _gather(sg.values, world, group)
        indices = _gather(sg.indices, world, group)
        try:
            parts = [SparseGrad(v, i, n_sparse, torch.Size([n_sparse]), sg.coding) for v, i in zip(values, indices)]
            flat = comp.decompress(parts, n_sparse)
        except ValueError as e:
            raise DGCHookError(f"bucket {bucket.index()}: {e}") from e
        pos = 0
        for i in sparse_ids:
            n = views[i].numel()
            out[offsets[i]:offsets[i] + n] = flat[pos:pos + n]
            pos += n
    if dense_ids:
        dense = torch.cat([comp.send_dense(views[i]).reshape(-1) for i in dense_ids])
        dist.all_reduce(dense, group=group)
        if not bool(torch.isfinite(dense).all()):
            raise DGCHookError(f"bucket {bucket.index()}: non-finite values in the dense all-reduce")
        dense.div_(world)
        pos = 0
        for i in dense_ids:
            n = views[i].numel()
            avg = dense[pos:pos + n].view(views[i].shape)
            out[offsets[i]:offsets[i] + n] = comp.dense_momentum(state.key(params[i]), avg).reshape(-1)
            pos += n
    if bucket.is_last():
        state.iteration += 1
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(out)
    return fut
