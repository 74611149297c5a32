"""DGC claim: top-k gradient exchange with momentum correction matches dense SGD (paper slug: dgc).

Lin et al., "Deep Gradient Compression: Reducing the Communication Bandwidth for Distributed Training",
ICLR 2018 (arXiv 1712.01887). Bundled data: scikit-learn digits (standardised, fixed 1437/360 split), an
MLP with one hidden layer, data-parallel workers simulated in one process
(:class:`gradkit.distributed.simulate.DataParallelSimulator`; worker k trains on rows k, k + workers, ...
with its own batches). Arms, each from the same seed (same init, same batch streams):

- ``dense``: all-reduce of the full gradient, SGD with momentum (baseline);
- ``topk``: gradient dropping, top-k of a local residual with no momentum correction/masking, SGD with
  momentum on the aggregated sparse gradient (baseline);
- ``dgc``: DGC (momentum correction, momentum factor masking, official per-tensor selection, plain SGD);
- ``topk_d0.001`` / ``dgc_d0.001``: the same two at ``low_density`` (reported, not in the pass rule).

Sparse arms use the final ``density`` and the paper's exponential warm-up (25%, 6.25%, 1.56%, 0.39% over
the first ``warmup_epochs``; the baseline ``topk`` gets the same schedule so only the DGC fixes differ);
biases are sent densely (official code). Compression ratios count every byte a worker sends: fp32 values +
int32 indices of the compressed tensors plus the dense biases, over the run and at the final density
(steady). ``gradkit show dgc`` prints the protocol.

With ``--data-root`` the ``fashion_mnist`` variant runs the paper's regime instead: a model whose weights
dominate (MLP 784-256-10, biases 0.1% of the parameters), the paper's density of 0.1% after the same
warm-up, a step learning-rate decay (x0.1 at 50% and 75% of the epochs), fixed subsets of Fashion-MNIST,
and the arms dense / topk / dgc. Why it can discriminate: there naive top-k loses several points to dense
(the control, top-k standing in for DGC, fails the 1-point rule), and the whole-model bytes ratio can reach
the paper's 270x because dense tensors no longer dominate the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data import TensorBatches, load_digits_split
from ...data.bundled import Split
from ...distributed.dgc import DGCCompressor
from ...distributed.simulate import CompressorAggregator, DataParallelSimulator, MeanAggregator, shard
from ...distributed.train_dgc import build_model
from ...engine import accuracy, fit
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, AtLeast, Drop, Gain

SLUG = "dgc"
OURS, BASELINE, NAIVE = "dgc", "dense", "topk"
ARMS = ("dense", "topk", "dgc", "topk_d0.001", "dgc_d0.001")


@dataclass(frozen=True)
class DgcProtocol(Protocol):
    """Digits MLP, simulated data-parallel workers, dense vs naive top-k vs DGC."""

    workers: int = scaled(smoke=2, quick=4)
    epochs: int = scaled(smoke=3, quick=30, full=60)
    density: float = 0.01  # final density of the sparse arms
    low_density: float = 0.001  # the *_d0.001 arms
    warmup: str = scaled(smoke="none", quick="paper")  # density warm-up: paper | official | none
    warmup_epochs: int = 4
    hidden: int = 128
    batch: int = 32  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    lr_decay: bool = False  # x0.1 at 50% and 75% of the epochs (the paper's CIFAR schedule)


@dataclass(frozen=True)
class FashionProtocol(DgcProtocol):
    """Fashion-MNIST (fixed subsets), MLP 784-256-10 (weights are 99.9% of the parameters), at the paper's
    density of 0.1% and its step learning-rate decay."""

    n_train: int = scaled(smoke=1000, quick=10000, full=60000)
    n_test: int = scaled(smoke=1000, quick=5000, full=10000)
    hidden: int = 256
    density: float = 0.001
    epochs: int = scaled(smoke=2, quick=12, full=40)
    lr_decay: bool = True


def _arm_density(arm: str, p: DgcProtocol) -> float:
    return p.low_density if arm.endswith("_d0.001") else p.density


def train_arm(ctx: ArmContext) -> ArmResult:
    """One arm (``dense``, ``topk``, ``dgc`` or a ``_d0.001`` variant) on ``ctx.data``."""
    p, split, arm, workers = ctx.p, ctx.data, ctx.arm, ctx.p.workers
    warmup = None if p.warmup == "none" else (p.warmup, p.warmup_epochs)
    model = build_model(split.num_features, p.hidden, split.num_classes).to(ctx.device)
    if arm == "dense":
        agg, opt_momentum = MeanAggregator(), p.momentum
    else:
        naive = arm.startswith("topk")
        comps = [DGCCompressor(density=_arm_density(arm, p), momentum=0.0 if naive else p.momentum,
                               world_size=workers, momentum_masking=not naive, warmup=warmup)
                 for _ in range(workers)]
        agg, opt_momentum = CompressorAggregator(comps, mode="tensor"), (p.momentum if naive else 0.0)
    sim = DataParallelSimulator(model, agg, workers)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=opt_momentum)
    loaders = [TensorBatches(split.x_train[idx], split.y_train[idx], batch_size=p.batch, shuffle=True,
                             generator=ctx.generator)
               for idx in (shard(len(split.x_train), r, workers) for r in range(workers))]
    ratios: list[float] = []

    def evaluate(m):
        ratios.append(agg.compression_ratio())
        return {"test_acc": accuracy(m, split.x_test, split.y_test)}

    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[p.epochs // 2, (3 * p.epochs) // 4], gamma=0.1)
             if p.lr_decay else None)
    hist = fit(model, opt, sim.batches(loaders), epochs=p.epochs, compute_loss=sim.compute_loss,
               before_step=sim.before_step, on_epoch_start=sim.set_epoch, evaluate=evaluate, scheduler=sched,
               progress=ctx.progress, desc=f"{SLUG}/{arm}")
    complete = len(hist.records) == p.epochs
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
    return ArmResult(metrics, curves)


def _setup(ctx: ArmContext) -> Split:
    return load_digits_split().to(ctx.device)


def _fashion_setup(ctx: ArmContext) -> Split:
    from ...data import readers  # lazy: only the real-data variant needs it

    root, p = ctx.data_root, ctx.p
    split = readers.fixed_subset_split(readers.load_fashion_mnist(root, "train"),
                                       readers.load_fashion_mnist(root, "test"), p.n_train, p.n_test,
                                       "fashion_mnist")
    flat = Split(split.x_train.flatten(1), split.y_train, split.x_test.flatten(1), split.y_test, split.name)
    return flat.to(ctx.device)


def _fashion_criterion() -> AllOf:
    return AllOf(
        Drop(metric="test_acc", ours=OURS, baseline=BASELINE, at_most=1.0),
        Gain(metric="test_acc", ours=OURS, baseline=NAIVE, at_least=0.0),
        AtLeast(metric="ratio_steady", arm=OURS, value=270.0),  # the paper's lowest whole-model ratio
    )


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    out.info.update({"selection": "per tensor, exact top-k; biases dense",
                     "bytes": "fp32 values + int32 indices + dense biases (fp32)"})


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
              "accumulated gradient entries (simulated data-parallel workers) trains a digits MLP within 1 "
              "point of dense momentum SGD, at least as well as naive top-k gradient dropping, at a "
              "steady-state compression ratio of at least 40x (all bytes: fp32 values + int32 indices + "
              "dense biases).",
    paper_figure="99.9% of the gradient exchange is redundant: 270x-600x compression without accuracy loss "
                 "(ResNet-50/ImageNet 97 MB -> 0.35 MB, 277x; AlexNet 597x); ResNet-110/CIFAR-10 and "
                 "ResNet-50/ImageNet top-1 match the dense baseline, plain gradient dropping loses ~1 point.",
    protocol=DgcProtocol,
    data="digits",
    setup=_setup,
    arms={arm: train_arm for arm in ARMS},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%", ceiling=100.0),
    control={OURS: NAIVE},
    control_note="naive top-k gradient dropping (no momentum correction or masking) in place of DGC",
    uses=(
        "gradkit.distributed.dgc.DGCCompressor",
        "gradkit.distributed.dgc.warmup_density",
        "gradkit.distributed.dgc.select_topk",
        "gradkit.distributed.simulate.DataParallelSimulator",
        "gradkit.distributed.simulate.CompressorAggregator",
        "gradkit.distributed.simulate.MeanAggregator",
        "gradkit.distributed.dgc_hook.dgc_comm_hook",
    ),
    notes="Laptop-scale check in an in-process multi-worker simulator; the real multi-process DDP hook is "
          "checked by the test suite (2 gloo processes reproduce the simulator's parameters exactly). Biases "
          "are sent densely as in the official code; on this small MLP they are ~40% of the bytes at the "
          "default density, which caps the whole-model ratio near 29x (the compressed tensors alone reach "
          "~50x: ratio_steady_sparse_only). The 40x bound assumes negligible dense tensors (as in the "
          "paper's large networks) and is kept as it stands. No learning-rate warm-up (the paper also warms "
          "up the learning rate).",
    scale_note=(
        "Our digits MLP is about 40% biases by bytes, which caps any sparsifier's byte ratio near 29x against "
        "the 40x required. The fashion_mnist variant (--data-root) settles the bytes question: on a "
        "weight-dominated MLP at the paper's 0.1% density the whole-model ratio is 302x, inside the paper's "
        "270-600x, and DGC beats naive top-k by 4.3 points (83.3 vs 79.0, 6 seeds), but it stays 2.0 points "
        "below dense (85.3) after 12 epochs, so the 1-point rule fails there too."
    ),
    variants=(
        Variant(name="fashion_mnist",
                description="fashion_mnist/: dense vs naive top-k vs DGC at the paper's density 0.1% on an "
                            "MLP 784-256-10 (weights dominate), with a step learning-rate decay; the bytes "
                            "ratio must reach the paper's 270x",
                protocol=FashionProtocol, setup=_fashion_setup, arms={arm: train_arm for arm in ARMS[:3]},
                criterion=_fashion_criterion()),
    ),
    plots=("test_acc", "ratio"),
    bounds={"test_acc": (0.0, 100.0)},
))
