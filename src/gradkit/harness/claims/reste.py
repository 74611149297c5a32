"""ReSTE claim: the estimating-error / gradient-stability equilibrium on a binary MLP (paper slug: reste).

Data: scikit-learn digits (standardised, fixed 1437/360 split); with ``--data-root``, MNIST. Model: an
MLP whose middle layer is binary in weights and activations (first and last layers full precision,
BatchNorm after each of the first two layers), trained with SGD momentum and a cosine schedule to 0.
Arms, each from the same seed: the clipped STE (clip 1, the official baseline) and ReSTE with the
official cosine power schedule ending at ``o_end`` in {1, 2, 3, 5} (``o_end = 3``, the paper's default,
is ours). Gradient stability is measured after every backward and averaged per epoch; the claim uses
its mean over the last ``gs_window`` epochs. The numbers are the protocol's (:class:`ReSTEProtocol`,
``gradkit show reste``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...data import Split, TensorBatches, load_digits_split
from ...data.real import data_folder, mnist_split
from ...engine import accuracy, fit
from ...nn.binary import BinaryLinear, set_estimator_param
from ...probes.binary import estimating_error, gradient_stability
from ...schedules.reste import reste_power
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, Drop, Monotonic

SLUG = "reste"
O_ENDS = (1.0, 2.0, 3.0, 5.0)
ARMS = ("ste",) + tuple(f"reste_o{int(o)}" for o in O_ENDS)
OURS, BASELINE = "reste_o3", "ste"
INNER = 0.1  # ReSTE's inner interval |w| <= INNER, where its slope is a constant (the library default)


@dataclass(frozen=True)
class ReSTEProtocol(Protocol):
    """Binary MLP on scikit-learn digits: SGD momentum, cosine schedule to 0."""

    epochs: int = scaled(smoke=3, quick=40, full=100)
    hidden: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    gs_window: int = 10  # last epochs averaged for the gradient-stability metric


@dataclass(frozen=True)
class MnistProtocol(ReSTEProtocol):
    """The same arms on the first ``n_train`` MNIST training images, tested on the first ``n_test``."""

    epochs: int = scaled(smoke=2, quick=8, full=40)
    n_train: int = scaled(smoke=1000, quick=6000, full=60000)
    n_test: int = scaled(smoke=1000, quick=10000, full=10000)


def build_model(n_in: int, n_out: int, estimator: str, hidden: int = 256) -> nn.Sequential:
    """``n_in``-hidden-hidden-``n_out`` MLP: full-precision first/last layers, binary middle layer."""
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.BatchNorm1d(hidden),
        BinaryLinear(hidden, hidden, estimator=estimator, binarize_act=True, scale="mean_abs"),
        nn.BatchNorm1d(hidden),
        nn.Linear(hidden, n_out),
    )


def _digits_setup(ctx: ArmContext) -> Split:
    return load_digits_split().to(ctx.device)


def _mnist_setup(ctx: ArmContext) -> Split:
    root = data_folder(ctx.data_root, "mnist/")
    return mnist_split(root, n_train=ctx.p.n_train, n_test=ctx.p.n_test).to(ctx.device)


def _train_arm(ctx: ArmContext) -> ArmResult:
    """One arm: ``ste`` (clipped STE) or ``reste_o<k>`` (ReSTE, o scheduled from 1 to k)."""
    p, split, arm = ctx.p, ctx.data, ctx.arm
    o_end = None if arm == "ste" else float(arm.removeprefix("reste_o"))
    model = build_model(split.num_features, split.num_classes, "ste" if o_end is None else "reste",
                        p.hidden).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs)
    batches = TensorBatches(split.x_train, split.y_train, batch_size=p.batch_size, shuffle=True,
                            generator=ctx.generator)
    step_gs: list[float] = []
    state = {"o": 1.0}

    def on_epoch_start(epoch: int) -> None:
        if o_end is not None:
            state["o"] = reste_power(epoch / p.epochs, o_end)
            if set_estimator_param(model, o=state["o"]) != 1:
                raise RuntimeError("expected exactly one binary layer to schedule")

    def before_step(step: int) -> None:
        step_gs.append(gradient_stability(model))

    def evaluate(m: nn.Module) -> dict[str, float]:
        gs = sum(step_gs) / max(len(step_gs), 1)
        step_gs.clear()
        return {"test_acc": accuracy(m, split.x_test, split.y_test), "gs": gs, "o": state["o"]}

    hist = fit(model, opt, batches, epochs=p.epochs, before_step=before_step, on_epoch_start=on_epoch_start,
               evaluate=evaluate, scheduler=sched, progress=ctx.progress, desc=f"{SLUG}/{arm}")
    gs_series = hist.series("gs")
    window = gs_series[-p.gs_window:]
    metrics = {
        "test_acc": hist.last("test_acc"),
        "train_loss": hist.last("train_loss"),
        "gs": sum(window) / max(len(window), 1) if len(hist.records) == p.epochs else float("nan"),
        "ee": estimating_error(model, 1.0 if o_end is None else o_end),
        "ee_o1": estimating_error(model, 1.0),
        "ee_o3": estimating_error(model, 3.0),
        "o_last": state["o"],
        # share of the binary layer's latent weights in ReSTE's inner region |w| <= INNER (constant slope)
        "w_inner_frac": float((model[2].weight.detach().abs() <= INNER).float().mean()),
    }
    curves = {"test_acc": hist.series("test_acc"), "gs": gs_series, "train_loss": hist.series("train_loss"),
              "o": hist.series("o")}
    return ArmResult(metrics, curves)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    split = ctx.data
    out.info.update({
        "n_train": len(split.y_train), "n_test": len(split.y_test),
        "reste": {"t": 1.5, "interval": INNER, "schedule": "o = 1 + (o_end-1)(1 - cos(pi/2 e/E))"},
        "ste_clip": 1.0,
    })


def _criterion() -> AllOf:
    return AllOf(
        Monotonic(metric="gs", arms=tuple(f"reste_o{int(o)}" for o in O_ENDS), increasing=True),
        Drop(metric="test_acc", ours=OURS, baseline=BASELINE, at_most=1.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Estimator Meets Equilibrium Perspective: A Rectified Straight Through Estimator for Binary "
          "Neural Networks Training",
    arxiv="2308.06689",
    statement="ReSTE's power o trades estimating error for gradient stability: gradient instability "
              "(Var|dL/dw|) rises monotonically with o_end in {1,2,3,5}, and ReSTE (o_end=3) trains a binary "
              "MLP at least as well as the clipped STE (within 1 point of test accuracy).",
    paper_figure="CIFAR-10 1W/1A top-1: ResNet-20 86.75%, ResNet-18 92.63%, VGG-small 92.55%; ImageNet 1W/1A "
                 "ResNet-18 60.88%, ResNet-34 65.05%. Equilibrium ablation: as o grows, estimating error falls "
                 "and gradient instability rises; intermediate o_end (3) gives the best accuracy.",
    protocol=ReSTEProtocol,
    data="digits",
    setup=_digits_setup,
    arms={arm: _train_arm for arm in ARMS},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%", ceiling=100.0),
    control={OURS: "reste_o1"},
    control_note="ReSTE with its power schedule off, o held at 1, stands in for o_end = 3",
    variants=(
        Variant(name="mnist", description="mnist/: the same binary MLP (784 inputs) on MNIST",
                protocol=MnistProtocol, setup=_mnist_setup),
    ),
    threads=None,
    uses=(
        "gradkit.functional.straight_through.ReSTESign",
        "gradkit.functional.straight_through.reste_sign",
        "gradkit.functional.straight_through.ste_sign",
        "gradkit.nn.binary.BinaryLinear",
        "gradkit.nn.binary.set_estimator_param",
        "gradkit.schedules.reste.reste_power",
        "gradkit.probes.binary.estimating_error",
        "gradkit.probes.binary.gradient_stability",
    ),
    notes="Laptop-scale check of the equilibrium, not of the paper's CIFAR/ImageNet accuracies: the paper's "
          "+1-2 point gains are not resolvable on 360 test digits (1 point = ~4 images), so accuracy is "
          "checked as non-inferiority (drop <= 1 point). The binary layer's latent weights stay in ReSTE's "
          "inner region |w| <= 0.1 (reported as w_inner_frac), where the ReSTE slope is the "
          "constant 0.1^(1/o-1): on weights ReSTE is then exactly a rescale of the STE gradient (visible under "
          "SGD, cancelled by Adam), so the GS ordering over o_end largely reflects that rescale; ReSTE's "
          "power-shaped slope only acts on the activations here. EE falling with o holds for any fixed "
          "weights and is reported (ee, ee_o1, ee_o3) as a sanity check only. GS is the mean of the "
          "per-step gradient stability over the last gs_window epochs (all epochs when there are fewer).",
    plots=("test_acc", "gs"),
    bounds={"test_acc": (0.0, 100.0), "w_inner_frac": (0.0, 1.0), "gs": (0.0, float("inf")),
            "train_loss": (0.0, float("inf")), "ee": (0.0, float("inf")), "ee_o1": (0.0, float("inf")),
            "ee_o3": (0.0, float("inf")), "o_last": (1.0, 5.0)},
))
