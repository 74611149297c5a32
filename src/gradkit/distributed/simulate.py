"""In-process N-worker data-parallel training: each worker's gradient, one aggregation rule (paper slug: dgc).

In synchronous data-parallel SGD every replica holds the same parameters, so one model stands for all N
workers: per step, worker k's gradient g_k is computed on its own batch, an aggregator turns
``[g_0, ..., g_{N-1}]`` into the update written to ``p.grad``, and the optimizer steps once. Any
compressor fits behind the :class:`Aggregator` interface; :class:`MeanAggregator` is the dense
all-reduce, :class:`CompressorAggregator` drives one :class:`~gradkit.distributed.dgc.DGCCompressor`
per worker (per-tensor selection as in the official code, or ``mode="flat"``: one top-k over all
compressible tensors, which is what the DDP hook does with a single bucket).

Plugs into :func:`gradkit.engine.fit`::

    sim = DataParallelSimulator(model, CompressorAggregator([DGCCompressor(0.01, world_size=4) for _ in range(4)]))
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), sim.batches(shards), epochs=3,
        compute_loss=sim.compute_loss, before_step=sim.before_step, on_epoch_start=sim.set_epoch)

Buffers (BatchNorm statistics) are shared by the simulated workers, unlike separate processes.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data import TensorBatches
from .dgc import DGCCompressor

__all__ = ["Aggregator", "MeanAggregator", "CompressorAggregator", "DataParallelSimulator", "shard"]


class Aggregator:
    """Turns per-worker gradients into the update: ``aggregate(grads[worker][param], params) -> [update]``."""

    def aggregate(self, grads: Sequence[Sequence[torch.Tensor]], params: Sequence[nn.Parameter],
                  names: Sequence[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        pass

    def compression_ratio(self, steady: bool = False) -> float:
        return 1.0


class MeanAggregator(Aggregator):
    """Dense all-reduce: the mean of the workers' gradients (compression ratio 1)."""

    def aggregate(self, grads, params, names):
        n = len(grads)
        return [sum(g[i] for g in grads) / n for i in range(len(params))]


class CompressorAggregator(Aggregator):
    """One compressor per worker (DGC or gradient dropping); receiver side as every worker computes it.

    mode: ``"tensor"`` compresses each tensor with ``dim() >= min_dim`` on its own (official code);
    ``"flat"`` compresses all of them as one flat vector in parameter order (a single DDP bucket).
    The dense tensors are averaged and get the compressors' momentum after averaging. A worker's NaN/inf
    gradient raises ValueError naming the parameter (nothing is averaged).
    """

    def __init__(self, compressors: Sequence[DGCCompressor], mode: str = "tensor") -> None:
        compressors = list(compressors)
        if not compressors:
            raise ValueError("compressors must hold one compressor per worker, got none")
        n = len(compressors)
        for i, c in enumerate(compressors):
            if not isinstance(c, DGCCompressor):
                raise TypeError(f"compressors[{i}] must be a DGCCompressor, got {type(c).__name__}")
            if c.world_size != n:
                raise ValueError(f"compressors[{i}].world_size is {c.world_size} but {n} workers are simulated")
        if len({id(c) for c in compressors}) != n:
            raise ValueError("each worker needs its own compressor (the same object was given twice)")
        if mode not in ("tensor", "flat"):
            raise ValueError(f"mode must be 'tensor' or 'flat', got {mode!r}")
        self.compressors = compressors
        self.mode = mode

    @property
    def world_size(self) -> int:
        return len(self.compressors)

    def set_epoch(self, epoch: int) -> None:
        for c in self.compressors:
            c.set_epoch(epoch)

    def compression_ratio(self, steady: bool = False) -> float:
        """Worker 0's ratio (every worker sends the same number of bytes)."""
        return self.compressors[0].compression_ratio(steady)

    def aggregate(self, grads, params, names):
        if len(grads) != self.world_size:
            raise ValueError(f"got gradients of {len(grads)} workers, expected {self.world_size}")
        c0 = self.compressors[0]
        sparse = [i for i, p in enumerate(params) if c0.compressible(p)]
        dense = [i for i, p in enumerate(params) if not c0.compressible(p)]
        out: list[torch.Tensor | None] = [None] * len(params)
        if self.mode == "tensor":
            for i in sparse:
                parts = [c.compress(names[i], g[i]) for c, g in zip(self.compressors, grads)]
                out[i] = c0.decompress(parts, params[i].shape)
        elif sparse:
            keys = [names[i] for i in sparse]
            parts = [c.compress_group(keys, [g[i] for i in sparse]) for c, g in zip(self.compressors, grads)]
            flat = c0.decompress(parts, parts[0].numel)
            pos = 0
            for i in sparse:
                n = params[i].numel()
                out[i] = flat[pos:pos + n].view(params[i].shape)
                pos += n
        for i in dense:
            avg = sum(c.send_dense(g[i], names[i]) for c, g in zip(self.compressors, grads)) / self.world_size
            updates = [c.dense_momentum(names[i], avg) for c in self.compressors]
            out[i] = updates[0]
        return out  # type: ignore[return-value]


def shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Row indices of worker ``rank``'s shard: ``rank, rank + N, ...``, cut so every shard has n // N rows."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if n < world_size:
        raise ValueError(f"cannot shard {n} rows over {world_size} workers")
    return torch.arange(rank, n, world_size)[: n // world_size]


class DataParallelSimulator:
    """N data-parallel workers in one process around one model (paper slug: dgc).

    update = aggregator.aggregate([grad(loss(model(x_k), y_k)) for k in workers]) -> p.grad; optimizer.step().

    Use :meth:`batches` (one batch iterable per worker, zipped), :meth:`compute_loss` and
    :meth:`before_step` with :func:`gradkit.engine.fit`. The logged loss is the mean of the workers' losses.

    >>> sim = DataParallelSimulator(model, MeanAggregator(), world_size=2)
    >>> fit(model, opt, sim.batches(loaders), epochs=1, compute_loss=sim.compute_loss, before_step=sim.before_step)
    """

    def __init__(self, model: nn.Module, aggregator: Aggregator, world_size: int | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator, got {type(aggregator).__name__}")
        agg_ws = getattr(aggregator, "world_size", None)
        if world_size is None:
            world_size = agg_ws
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if agg_ws is not None and agg_ws != world_size:
            raise ValueError(f"world_size is {world_size} but the aggregator has {agg_ws} workers")
        self.model = model
        self.aggregator = aggregator
        self.world_size = world_size
        self.loss_fn = loss_fn
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._stash: list[list[torch.Tensor]] = []

    def batches(self, loaders: Sequence[Iterable]) -> Callable[[int], Iterable]:
        """Zip one batch iterable per worker (each must yield the same number of batches)."""
        loaders = list(loaders)
        if len(loaders) != self.world_size:
            raise ValueError(f"need one batch iterable per worker ({self.world_size}), got {len(loaders)}")

        def gen(epoch: int):
            its = [iter(ld) for ld in loaders]
            while True:
                batch = []
                for r, it in enumerate(its):
                    try:
                        batch.append(next(it))
                    except StopIteration:
                        if r == 0 and all(_exhausted(i) for i in its[1:]):
                            return
                        raise ValueError("workers' batch iterables have different lengths") from None
                yield tuple(batch)

        return gen

    @staticmethod
    def tensor_loaders(x: torch.Tensor, y: torch.Tensor, world_size: int, batch_size: int, shuffle: bool = True,
                       generator: torch.Generator | None = None) -> list[TensorBatches]:
        """Per-worker :class:`TensorBatches` over :func:`shard` of (x, y)."""
        return [TensorBatches(x[idx], y[idx], batch_size=batch_size, shuffle=shuffle, generator=generator)
                for idx in (shard(len(x), r, world_size) for r in range(world_size))]

    def compute_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Gradients of workers 1..N-1 are stashed; the returned loss backpropagates worker 0's."""
        if len(batch) != self.world_size:
            raise ValueError(f"expected a batch per worker ({self.world_size}), got {len(batch)}")
        x0, y0 = batch[0]
        loss0 = self.loss_fn(model(x0), y0)
        self._stash = []
        total = loss0.detach()
        for x, y in batch[1:]:
            loss = self.loss_fn(model(x), y)
            gs = torch.autograd.grad(loss, self.params, allow_unused=True)
            self._stash.append([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, gs)])
            total = total + loss.detach()
        mean = total / self.world_size
        return loss0 + (mean - loss0.detach())

    def before_step(self, step: int) -> None:
        """Aggregate [worker 0 grads (p.grad)] + stashed grads into p.grad."""
        g0 = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        grads = [g0] + self._stash
        self._stash = []
        updates = self.aggregator.aggregate(grads, self.params, self.names)
        for p, u in zip(self.params, updates):
            if p.grad is None:
                p.grad = u.detach().clone()
            else:
                p.grad.copy_(u)

    def set_epoch(self, epoch: int) -> None:
        self.aggregator.set_epoch(epoch)


def _exhausted(it) -> bool:
    try:
        next(it)
    except StopIteration:
        return True
    return False
