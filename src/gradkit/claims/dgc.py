"""DGC claim: top-k gradient exchange with momentum correction matches dense SGD (paper slug: dgc).

Protocol (spec ``papers/dgc.md``): scikit-learn digits (standardised, fixed 1437/360 split), MLP 64-128-10,
N = 4 data-parallel workers simulated in one process (:class:`gradkit.distributed.simulate.DataParallelSimulator`;
worker k trains on rows k, k+4, ... with its own batches of 32), lr 0.1, momentum 0.9, 30 epochs. Arms, each
from the same seed (same init, same batch streams):

- ``dense``: all-reduce of the full gradient, SGD momentum 0.9 (baseline);
- ``topk``: gradient dropping, top-k of a local residual with no momentum correction/masking, SGD momentum
  0.9 on the aggregated sparse gradient (baseline);
- ``dgc``: DGC (momentum correction, momentum factor masking, official per-tensor selection, plain SGD);
- ``topk_d0.001`` / ``dgc_d0.001``: the same two at density 0.001 (reported, not in the pass rule).

Sparse arms use final density d = 0.01 and the paper's exponential warm-up (25%, 6.25%, 1.56%, 0.39% over
the first 4 epochs; the baseline ``topk`` gets the same schedule so only the DGC fixes differ); biases are
sent densely (official code). Compression ratios count every byte a worker sends: fp32 values + int32
indices of the compressed tensors plus the dense biases, over the run and at the final density (steady).
Smoke: 2 workers, 3 epochs, no warm-up.
"""
from __future__ import annotations

import torch

from ..data import TensorBatches, load_digits_split
from ..data.bundled import Split
from ..distributed.dgc import DGCCompressor
from ..distributed.simulate import CompressorAggregator, DataParallelSimulator, MeanAggregator, shard
from ..distributed.train_dgc import build_model
from ..engine import accuracy, cpu_threads, fit, seed_everything
from .base import Claim, Primary, RunContext, RunOutput, register, run_arms
from .criteria import AllOf, AtLeast, Drop, Gain

SLUG = "dgc"
OURS, BASELINE, NAIVE = "dgc", "dense", "topk"
ARMS = ("dense", "topk", "dgc", "topk_d0.001", "dgc_d0.001")
DENSITY, LOW_DENSITY = 0.01, 0.001
HIDDEN, BATCH, LR, MOMENTUM = 128, 32, 0.1, 0.9
WARMUP = ("paper", 4)


def _arm_density(arm: str) -> float:
    return LOW_DENSITY if arm.endswith("_d0.001") else DENSITY


def _train_arm(arm: str, split: Split, workers: int, epochs: int, warmup, ctx: RunContext) -> tuple[dict, dict]:
    gen = seed_everything(ctx.seed)
    model = build_model(split.num_features, HIDDEN, split.num_classes).to(ctx.device)
    if arm == "dense":
        agg, opt_momentum = MeanAggregator(), MOMENTUM
    else:
        naive = arm.startswith("topk")
        comps = [DGCCompressor(density=_arm_density(arm), momentum=0.0 if naive else MOMENTUM, world_size=workers,
                               momentum_masking=not naive, warmup=warmup) for _ in range(workers)]
        agg, opt_momentum = CompressorAggregator(comps, mode="tensor"), (MOMENTUM if naive else 0.0)
    sim = DataParallelSimulator(model, agg, workers)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=opt_momentum)
    loaders = [TensorBatches(split.x_train[idx], split.y_train[idx], batch_size=BATCH, shuffle=True, generator=gen)
               for idx in (shard(len(split.x_train), r, workers) for r in range(workers))]
    ratios: list[float] = []

    def evaluate(m):
        ratios.append(agg.compression_ratio())
        return {"test_acc": accuracy(m, split.x_test, split.y_test)}

    hist = fit(model, opt, sim.batches(loaders), epochs=epochs, compute_loss=sim.compute_loss,
               before_step=sim.before_step, on_epoch_start=sim.set_epoch, evaluate=evaluate,
               progress=ctx.progress, desc=f"{SLUG}/{arm}")
    complete = len(hist.records) == epochs
    losses = hist.series("train_loss")
    metrics = {
        "test_acc": hist.last("test_acc") if complete else float("nan"),
        "train_loss": losses[-1],
        "first_loss": losses[0],
        "ratio": agg.compression_ratio(),
        "ratio_steady": agg.compression_ratio(steady=True),
    }
    metrics["ratio_steady_sparse_only"] = (agg.compressors[0].compression_ratio(sparse_only=True)
                                           if isinstance(agg, CompressorAggregator) else 1.0)
    curves = {"test_acc": hist.series("test_acc"), "train_loss": losses, "ratio": ratios}
    return metrics, curves


def run(ctx: RunContext) -> RunOutput:
    workers = ctx.pick(smoke=2, quick=4, full=4)
    epochs = ctx.pick(smoke=3, quick=30, full=60)
    warmup = ctx.pick(smoke=None, quick=WARMUP, full=WARMUP)
    split = load_digits_split().to(ctx.device)
    with cpu_threads(1, ctx.device):
        metrics, curves, seconds = run_arms(ARMS, lambda arm: _train_arm(arm, split, workers, epochs, warmup, ctx))
    info = {"workers": workers, "epochs": epochs, "batch_per_worker": BATCH, "lr": LR, "momentum": MOMENTUM,
            "density": DENSITY, "low_density": LOW_DENSITY, "warmup": list(warmup) if warmup else None,
            "hidden": HIDDEN, "selection": "per tensor, exact top-k; biases dense",
            "bytes": "fp32 values + int32 indices + dense biases (fp32)", "seconds_per_arm": seconds}
    return RunOutput(metrics=metrics, data=split.name, curves=curves, info=info)


def _criterion() -> AllOf:
    return AllOf(
        Drop(metric="test_acc", ours=OURS, baseline=BASELINE, at_most=1.0),
        Gain(metric="test_acc", ours=OURS, baseline=NAIVE, at_least=0.0),
        AtLeast(metric="ratio_steady", arm=OURS, value=40.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Deep Gradient Compression: Reducing the Communication Bandwidth for Distributed Training",
    arxiv="1712.01887",
    statement="With momentum correction, momentum factor masking and warm-up, exchanging only the top 1% of "
              "accumulated gradient entries (4 simulated workers) trains a digits MLP within 1 point of dense "
              "momentum SGD, at least as well as naive top-k gradient dropping, at a steady-state compression "
              "ratio of at least 40x (all bytes: fp32 values + int32 indices + dense biases).",
    paper_figure="99.9% of the gradient exchange is redundant: 270x-600x compression without accuracy loss "
                 "(ResNet-50/ImageNet 97 MB -> 0.35 MB, 277x; AlexNet 597x); ResNet-110/CIFAR-10 and "
                 "ResNet-50/ImageNet top-1 match the dense baseline, plain gradient dropping loses ~1 point.",
    criterion=_criterion(),
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%"),
    run=run,
    uses=(
        "gradkit.distributed.dgc.DGCCompressor",
        "gradkit.distributed.dgc.warmup_density",
        "gradkit.distributed.dgc.select_topk",
        "gradkit.distributed.simulate.DataParallelSimulator",
        "gradkit.distributed.simulate.CompressorAggregator",
        "gradkit.distributed.simulate.MeanAggregator",
        "gradkit.distributed.dgc_hook.dgc_comm_hook",
    ),
    notes="Laptop-scale check in an in-process 4-worker simulator; the real multi-process DDP hook is checked "
          "by the test suite (2 gloo processes reproduce the simulator's parameters exactly). Biases are sent "
          "densely as in the official code; on a 64-128-10 MLP they are ~40% of the bytes at d = 0.01, which "
          "caps the whole-model ratio near 29x (the compressed tensors alone reach ~50x: "
          "ratio_steady_sparse_only). The spec's 40x bound assumed negligible dense tensors and is kept "
          "as written. No learning-rate warm-up (the paper also warms up the learning rate).",
    plots=("test_acc", "ratio"),
))
