"""Train an MLP on scikit-learn digits with DGC under torch.distributed DDP (paper slug: dgc).

Run it as a user would (CPU, gloo)::

    torchrun --nproc_per_node 2 -m gradkit.distributed.train_dgc --epochs 5 --density 0.01
    python -m torch.distributed.run --nproc_per_node 2 -m gradkit.distributed.train_dgc --dense   # baseline

Every rank trains on its own shard (rows rank, rank+N, ...) with batches of ``--batch-size``; the gradient
exchange is :func:`gradkit.distributed.dgc_hook.dgc_hook` (momentum lives in the compressor, so the
optimizer is plain SGD) or, with ``--dense``, DDP's default all-reduce with SGD momentum. Rank 0 prints one
line per epoch and a final JSON line (test accuracy, compression ratios). :func:`train` is the per-rank
worker and is also used by the tests through :func:`gradkit.distributed.launch.run_workers`.
"""
from __future__ import annotations

import argparse
import itertools
import gc
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data import Split, TensorBatches, load_digits_split
from ..engine import accuracy, fit, seed_everything
from .dgc import DGCCompressor
from .dgc_hook import DGCState, dgc_hook
from .simulate import shard

__all__ = ["TrainConfig", "build_model", "train", "main"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one DGC data-parallel run (every rank uses the same)."""

    epochs: int = 5
    density: float = 0.01
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 32
    hidden: int = 128
    warmup: str = "paper"            # paper | official | none
    warmup_epochs: int = 4
    seed: int = 0
    dtype: str = "float32"           # float32 | float64
    shuffle: bool = True
    steps_per_epoch: int = 0         # 0: the whole shard
    dense: bool = False              # DDP's default all-reduce + SGD momentum (the baseline)
    sample_ratio: float = 0.0        # 0: exact top-k
    index_coding: str = "auto"
    bucket_cap_mb: float = 25.0
    quiet: bool = False


def build_model(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """The MLP n_in-hidden-n_out (ReLU) of the DGC examples and claim."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def _warmup(cfg: TrainConfig) -> Any:
    if cfg.warmup == "none":
        return None
    return (cfg.warmup, cfg.warmup_epochs)


def make_compressor(cfg: TrainConfig, world_size: int) -> DGCCompressor:
    return DGCCompressor(density=cfg.density, momentum=cfg.momentum, world_size=world_size, warmup=_warmup(cfg),
                         sample_ratio=cfg.sample_ratio or None, index_coding=cfg.index_coding)


def rank_batches(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int):
    """``f(epoch)``: rank's batches (its shard; shuffled per rank when cfg.shuffle; at most steps_per_epoch)."""
    idx = shard(len(x), rank, world_size)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    tb = TensorBatches(x[idx], y[idx], batch_size=cfg.batch_size, shuffle=cfg.shuffle, generator=gen)

    def batches(epoch: int):
        it = iter(tb)
        return itertools.islice(it, cfg.steps_per_epoch) if cfg.steps_per_epoch else it

    return batches


def train(rank: int, world_size: int, cfg: TrainConfig, split: Split | None = None) -> dict[str, Any]:
    """One rank of a DDP run (the process group must be initialised); returns results and final parameters.

    split: the data (default: :func:`gradkit.data.load_digits_split`; passing it spares each spawned
    worker the scikit-learn import).
    """
    if not dist.is_initialized():
        raise RuntimeError("train() needs an initialised torch.distributed process group (use torchrun)")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"rank/world_size {rank}/{world_size} disagree with the process group "
                         f"({dist.get_rank()}/{dist.get_world_size()})")
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    split = load_digits_split() if split is None else split
    xtr, xte = split.x_train.to(dtype), split.x_test.to(dtype)
    seed_everything(cfg.seed)
    model = build_model(split.num_features, cfg.hidden, split.num_classes).to(dtype)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
    state = None
    if cfg.dense:
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    else:
        state = DGCState(make_compressor(cfg, world_size), module=ddp)
        ddp.register_comm_hook(state, dgc_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.0)

    def on_epoch_start(epoch: int) -> None:
        if state is not None:
            state.set_epoch(epoch)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(m, xte, split.y_test)}

    def on_epoch_end(epoch: int, hist) -> None:
        if rank == 0 and not cfg.quiet:
            r = hist.records[-1]
            ratio = state.compressor.compression_ratio() if state is not None else 1.0
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {r['train_loss']:.4f}  test acc {r['test_acc']:.2f}%  "
                  f"compression {ratio:.1f}x", flush=True)

    hist = fit(ddp, opt, rank_batches(cfg, xtr, split.y_train, rank, world_size), epochs=cfg.epochs,
               on_epoch_start=on_epoch_start, evaluate=evaluate, on_epoch_end=on_epoch_end, desc=f"dgc/rank{rank}")
    comp = state.compressor if state is not None else None
    return {
        "rank": rank,
        "test_acc": hist.last("test_acc") if hist.records else float("nan"),
        "train_loss": hist.series("train_loss"),
        "ratio": comp.compression_ratio() if comp else 1.0,
        "ratio_steady": comp.compression_ratio(steady=True) if comp else 1.0,
        "ratio_with_header": state.compression_ratio() if state is not None else 1.0,
        "bytes_sent": comp.bytes_sent if comp else 0,
        "steps": hist.steps,
        "params": {n: p.detach().cpu().clone() for n, p in model.named_parameters()},
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradkit.distributed.train_dgc",
                                description="DGC data-parallel training on digits (start it with torchrun)")
    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--density", type=float, default=d.density, help="final density d in (0, 1]")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--warmup", choices=("paper", "official", "none"), default=d.warmup)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, help="0: the whole shard")
    p.add_argument("--sample-ratio", type=float, default=d.sample_ratio, help="0: exact top-k")
    p.add_argument("--index-coding", choices=("auto", "int32", "int64", "block16"), default=d.index_coding)
    p.add_argument("--dense", action="store_true", help="baseline: dense all-reduce + SGD momentum")
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    cfg = TrainConfig(shuffle=not args.no_shuffle, **kw)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("error: start this script with torchrun (RANK/WORLD_SIZE are not set), e.g.\n"
              "  torchrun --nproc_per_node 2 -m gradkit.distributed.train_dgc", file=sys.stderr)
        return 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    try:
        out = train(dist.get_rank(), dist.get_world_size(), cfg)
        if dist.get_rank() == 0:
            summary = {k: out[k] for k in ("test_acc", "ratio", "ratio_steady", "ratio_with_header", "steps")}
            summary["world_size"] = dist.get_world_size()
            summary["config"] = asdict(cfg)
            print(json.dumps(summary), flush=True)
        dist.barrier()  # no rank tears gloo down while a peer still has traffic in flight
    finally:
        gc.collect()  # the DDP reducer must go before its process group: freed later, gloo aborts at exit
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
