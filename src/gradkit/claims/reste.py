"""ReSTE claim: the estimating-error / gradient-stability equilibrium on a binary MLP (paper slug: reste).

Protocol (spec ``papers/reste.md``): scikit-learn digits (standardised, fixed 1437/360 split), MLP
64-256-256-10 whose middle layer is binary in weights and activations (first and last layers full
precision, BatchNorm after each of the first two layers), SGD momentum 0.9, lr 0.1, weight decay 1e-4,
cosine schedule to 0, batch 128. Arms, each from the same seed: clipped STE (clip 1, the official
baseline) and ReSTE with the official cosine power schedule ending at ``o_end`` in {1, 2, 3, 5}
(``o_end = 3``, the paper's default, is ours). Gradient stability is measured after every backward
and averaged per epoch; the claim uses its mean over the last 10 epochs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data import Split, TensorBatches, load_digits_split
from ..data.real import data_folder, mnist_split
from ..engine import accuracy, configure_cpu, fit, seed_everything
from ..nn.binary import BinaryLinear, set_estimator_param
from ..probes.binary import estimating_error, gradient_stability
from ..schedules.reste import reste_power
from .base import Claim, Primary, RunContext, RunOutput, register, run_arms
from .criteria import AllOf, Drop, Monotonic

SLUG = "reste"
O_ENDS = (1.0, 2.0, 3.0, 5.0)
ARMS = ("ste",) + tuple(f"reste_o{int(o)}" for o in O_ENDS)
OURS, BASELINE = "reste_o3", "ste"
HIDDEN = 256
GS_WINDOW = 10  # epochs averaged for the gradient-stability metric


def build_model(n_in: int, n_out: int, estimator: str, hidden: int = HIDDEN) -> nn.Sequential:
    """``n_in``-hidden-hidden-``n_out`` MLP: full-precision first/last layers, binary middle layer."""
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.BatchNorm1d(hidden),
        BinaryLinear(hidden, hidden, estimator=estimator, binarize_act=True, scale="mean_abs"),
        nn.BatchNorm1d(hidden),
        nn.Linear(hidden, n_out),
    )


def _train_arm(arm: str, split: Split, epochs: int, ctx: RunContext) -> tuple[dict, dict]:
    o_end = None if arm == "ste" else float(arm.removeprefix("reste_o"))
    gen = seed_everything(ctx.seed)
    model = build_model(split.num_features, split.num_classes, "ste" if o_end is None else "reste").to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    batches = TensorBatches(split.x_train, split.y_train, batch_size=128, shuffle=True, generator=gen)
    step_gs: list[float] = []
    state = {"o": 1.0}

    def on_epoch_start(epoch: int) -> None:
        if o_end is not None:
            state["o"] = reste_power(epoch / epochs, o_end)
            if set_estimator_param(model, o=state["o"]) != 1:
                raise RuntimeError("expected exactly one binary layer to schedule")

    def before_step(step: int) -> None:
        step_gs.append(gradient_stability(model))

    def evaluate(m: nn.Module) -> dict[str, float]:
        gs = sum(step_gs) / max(len(step_gs), 1)
        step_gs.clear()
        return {"test_acc": accuracy(m, split.x_test, split.y_test), "gs": gs, "o": state["o"]}

    hist = fit(model, opt, batches, epochs=epochs, before_step=before_step, on_epoch_start=on_epoch_start,
               evaluate=evaluate, scheduler=sched, progress=ctx.progress, desc=f"{SLUG}/{arm}")
    gs_series = hist.series("gs")
    window = gs_series[-GS_WINDOW:]
    metrics = {
        "test_acc": hist.last("test_acc"),
        "train_loss": hist.last("train_loss"),
        "gs": sum(window) / max(len(window), 1) if len(hist.records) == epochs else float("nan"),
        "ee": estimating_error(model, 1.0 if o_end is None else o_end),
        "ee_o1": estimating_error(model, 1.0),
        "ee_o3": estimating_error(model, 3.0),
        "o_last": state["o"],
        # share of the binary layer's latent weights in ReSTE's inner region |w| <= 0.1 (constant slope)
        "w_inner_frac": float((model[2].weight.detach().abs() <= 0.1).float().mean()),
    }
    curves = {"test_acc": hist.series("test_acc"), "gs": gs_series, "train_loss": hist.series("train_loss"),
              "o": hist.series("o")}
    return metrics, curves


def run(ctx: RunContext) -> RunOutput:
    configure_cpu()
    if ctx.data_root is not None:
        root = data_folder(ctx.data_root, "mnist/")
        split = mnist_split(root, n_train=ctx.pick(smoke=1000, quick=6000, full=60000),
                                   n_test=ctx.pick(smoke=1000, quick=10000, full=10000))
        epochs = ctx.pick(smoke=2, quick=8, full=40)
    else:
        split = load_digits_split()
        epochs = ctx.pick(smoke=3, quick=40, full=100)
    split = split.to(ctx.device)
    metrics, curves, seconds = run_arms(ARMS, lambda arm: _train_arm(arm, split, epochs, ctx))
    info = {"epochs": epochs, "n_train": len(split.y_train), "n_test": len(split.y_test), "hidden": HIDDEN,
            "optimizer": "SGD(lr=0.1, momentum=0.9, wd=1e-4), cosine", "batch_size": 128,
            "reste": {"t": 1.5, "interval": 0.1, "schedule": "o = 1 + (o_end-1)(1 - cos(pi/2 e/E))"},
            "ste_clip": 1.0, "gs_window_epochs": GS_WINDOW, "seconds_per_arm": seconds}
    return RunOutput(metrics=metrics, data=split.name, curves=curves, info=info)


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
    criterion=_criterion(),
    data_criteria={"mnist": _criterion()},
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%"),
    run=run,
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
    real_data="MNIST (mnist/ under --data-root): 784-256-256-10 binary MLP on the first 6,000 training "
              "images, all 10,000 test images, 8 epochs at quick scale (full: 60k/10k, 40 epochs).",
    notes="Laptop-scale check of the equilibrium, not of the paper's CIFAR/ImageNet accuracies: the paper's "
          "+1-2 point gains are not resolvable on 360 test digits (1 point = ~4 images), so accuracy is "
          "checked as non-inferiority (drop <= 1 point). The binary layer's latent weights stay in ReSTE's "
          "inner region |w| <= 0.1 (reported as w_inner_frac), where the ReSTE slope is the "
          "constant 0.1^(1/o-1): on weights ReSTE is then exactly a rescale of the STE gradient (visible under "
          "SGD, cancelled by Adam), so the GS ordering over o_end largely reflects that rescale; ReSTE's "
          "power-shaped slope only acts on the activations here. EE falling with o holds for any fixed "
          "weights and is reported (ee, ee_o1, ee_o3) as a sanity check only.",
    plots=("test_acc", "gs"),
))
