"""TrAct claim: a TrAct first layer reaches the baseline's accuracy in fewer epochs (paper slug: tract).

Data: scikit-learn digits as 1x8x8 images, each image's contrast scaled about its own mean by a fixed
random factor (seed-independent), then standardised with one global mean/std (not per image, so contrast
differences remain); fixed 1437/360 split. With ``--data-root``: CIFAR-10 (the paper's data) when present,
else Fashion-MNIST, else MNIST, on fixed subsets. Small CNN Conv2d(c, w1, 3, pad 1) [first layer] -> ReLU -> Conv2d(w1, w2, 3)
-> ReLU -> MaxPool(2) -> Linear. SGD momentum, cosine to 0 over each run's own number of steps. Arms,
each from the same seed (same init and batch order): TrAct (first conv only) for E0 * {1, 2, 4} epochs
and the plain baseline for E0 * {1, 2, 4, 8} epochs. Metric: final test accuracy of each run. The numbers
are the protocol's (:class:`DigitsProtocol`, :class:`RealProtocol`, ``gradkit show tract``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...data import DataError, Split, TensorBatches
from ...engine import accuracy, fit
from ...nn.tract import tract
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllFinite, AllOf, AtLeastKOf, Criterion, Drop

SLUG = "tract"
CONTRAST = (0.3, 1.5)
TRACT_MULTS = (1, 2, 4)
BASE_MULTS = (1, 2, 4, 8)
ARMS = tuple(f"tract_x{k}" for k in TRACT_MULTS) + tuple(f"base_x{k}" for k in BASE_MULTS)
SPEEDUP_TOL = 0.3  # points: TrAct at E may trail the baseline at 2E by this much
SAME_BUDGET_TOL = 0.5  # points: TrAct at 4*E0 vs the baseline at 4*E0


@dataclass(frozen=True)
class TrActProtocol(Protocol):
    """What every data set shares: the epoch unit E0, TrAct's lambda, the optimiser and the CNN widths."""

    e0: int = scaled(smoke=1, quick=3, full=10)  # arm tract_xK / base_xK trains K * e0 epochs
    tract_lambda: float = 0.1
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 64
    widths: tuple[int, int] = (32, 64)  # channels of the two convs


@dataclass(frozen=True)
class DigitsProtocol(TrActProtocol):
    """Contrast-varied scikit-learn digits."""

    n_train: int | None = scaled(smoke=512, quick=None)  # a fixed training subset (None: all 1437 images)
    contrast: tuple[float, float] = CONTRAST  # per-image contrast factor range, fixed across seeds


@dataclass(frozen=True)
class RealProtocol(TrActProtocol):
    """CIFAR-10 (else Fashion-MNIST, else MNIST) on fixed, seed-independent subsets."""

    e0: int = scaled(smoke=1, quick=1, full=5)
    n_train: int = scaled(smoke=64, quick=1000, full=50_000)
    n_test: int = scaled(smoke=128, quick=1000, full=10_000)


# ------------------------------------------------------------------------------------------ data
def contrast_digits(test_size: int = 360, split_seed: int = 0, contrast: tuple[float, float] | None = CONTRAST
                    ) -> Split:
    """Digits as (N, 1, 8, 8) images: per-image contrast factor ~ U(contrast) about the image's mean, then
    one global mean/std from the training images. Split and factors depend on ``split_seed`` only."""
    from ...data import digits_images

    x01, labels = digits_images()
    imgs, target = x01[:, 0].double().numpy(), labels.numpy()
    rng = np.random.RandomState(split_seed)
    perm = rng.permutation(len(target))  # the same split as gradkit.data.load_digits_split
    if contrast is not None:
        c = np.random.RandomState(split_seed + 1).uniform(contrast[0], contrast[1], size=len(imgs))
        mean = imgs.mean(axis=(1, 2), keepdims=True)
        imgs = mean + c[:, None, None] * (imgs - mean)
    te, tr = perm[:test_size], perm[test_size:]
    mu, sd = imgs[tr].mean(), imgs[tr].std()
    x = torch.tensor((imgs - mu) / sd, dtype=torch.float32).unsqueeze(1)
    y = torch.from_numpy(target.astype(np.int64))
    return Split(x[tr], y[tr], x[te], y[te], name="digits")


def _real_images(root, n_train: int, n_test: int) -> Split:
    """CIFAR-10 (the paper's data) when under ``root``, else Fashion-MNIST, else MNIST; fixed subsets, one
    global mean/std. Fashion-MNIST comes before MNIST: a small CNN is still improving there after several
    epochs, where MNIST saturates like digits."""
    from ...data import readers  # lazy: only the real-data branch needs it

    errors = []
    for name, load in (("cifar10", readers.load_cifar10), ("fashion_mnist", readers.load_fashion_mnist),
                       ("mnist", readers.load_mnist)):
        try:
            (xtr, ytr), (xte, yte) = load(root, "train"), load(root, "test")
        except DataError as e:
            errors.append(str(e))
            continue
        if name == "cifar10":
            xtr, xte = xtr.transpose(0, 3, 1, 2), xte.transpose(0, 3, 1, 2)
        else:
            xtr, xte = xtr[:, None], xte[:, None]
        break
    else:
        raise DataError(f"tract needs CIFAR-10 (cifar-10-batches-py/), Fashion-MNIST (fashion_mnist/) or MNIST "
                        f"(mnist/) under --data-root {str(root)!r}: " + "; ".join(errors))
    return readers.fixed_subset_split((xtr, ytr), (xte, yte), n_train, n_test, name)


# ------------------------------------------------------------------------------------------ model
def build_cnn(in_channels: int, image_size: int, num_classes: int = 10,
              widths: tuple[int, int] = (32, 64)) -> nn.Sequential:
    """Conv(in,w1,3,pad 1) -> ReLU -> Conv(w1,w2,3) -> ReLU -> MaxPool(2) -> Linear(w2*s*s, classes)."""
    w1, w2 = widths
    s = (image_size - 2) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, w1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(w1, w2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(w2 * s * s, num_classes),
    )


def _digits_setup(ctx: ArmContext) -> Split:
    p = ctx.p
    split = contrast_digits(contrast=p.contrast)
    if p.n_train is not None:  # a fixed training subset keeps the smoke run within seconds
        split = Split(split.x_train[:p.n_train], split.y_train[:p.n_train], split.x_test, split.y_test, split.name)
    return split.to(ctx.device)


def _real_setup(ctx: ArmContext) -> Split:
    return _real_images(ctx.data_root, n_train=ctx.p.n_train, n_test=ctx.p.n_test).to(ctx.device)


def _train_arm(ctx: ArmContext) -> ArmResult:
    """``tract_xK`` (TrAct first layer) or ``base_xK`` (plain), trained for K * e0 epochs."""
    p, split, arm = ctx.p, ctx.data, ctx.arm
    use_tract, epochs = arm.startswith("tract"), p.e0 * int(arm.rsplit("_x", 1)[1])
    model = build_cnn(split.x_train.shape[1], split.x_train.shape[-1], split.num_classes, p.widths)
    if use_tract:
        model[0] = tract(model[0], lambda_=p.tract_lambda)  # the same initial weights as the baseline
    model.to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum)
    batches = TensorBatches(split.x_train, split.y_train, batch_size=p.batch_size, shuffle=True,
                            generator=ctx.generator)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(batches)))

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(m, split.x_test, split.y_test)}

    hist = fit(model, opt, batches, epochs=epochs, evaluate=evaluate, scheduler=sched, scheduler_every="step",
               progress=ctx.progress, desc=f"{SLUG}/{arm}")
    losses = hist.series("train_loss")
    metrics = {"test_acc": hist.last("test_acc"), "train_loss": hist.last("train_loss"),
               "first_epoch_loss": losses[0], "epochs": float(epochs)}
    return ArmResult(metrics, {"test_acc": hist.series("test_acc"), "train_loss": losses})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    split, m = ctx.data, out.metrics
    out.data = split.name  # the real-data variant falls back from CIFAR-10 to Fashion-MNIST to MNIST
    out.info.update({"n_train": len(split.y_train), "n_test": len(split.y_test),
                     "same_budget_gap_x1": m["tract_x1"]["test_acc"] - m["base_x1"]["test_acc"]})


# ------------------------------------------------------------------------------------------ criterion
def _criterion() -> Criterion:
    speedup = tuple(Drop(metric="test_acc", ours=f"tract_x{k}", baseline=f"base_x{2 * k}", at_most=SPEEDUP_TOL)
                    for k in TRACT_MULTS)
    return AllOf(
        AtLeastKOf(k=2, criteria=speedup),
        Drop(metric="test_acc", ours=f"tract_x{TRACT_MULTS[-1]}", baseline=f"base_x{TRACT_MULTS[-1]}",
             at_most=SAME_BUDGET_TOL),
        AllFinite(),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="TrAct: Making First-layer Pre-Activations Trainable",
    arxiv="2410.23970",
    statement=(
        "Training the first conv layer of a small CNN with TrAct (same lr, SGD, cosine) gives a >= 2x "
        "speed-up: for at least two of the budgets E in E0*{1, 2, 4} epochs, TrAct trained for E epochs "
        "reaches the baseline's test accuracy after 2E epochs (within 0.3 points, seed means), and TrAct at "
        "4*E0 epochs is not worse than the baseline at 4*E0 epochs by more than 0.5 points"
    ),
    paper_figure=(
        "Speed-ups of 1.25x-4x across CNNs and ViTs with SGD and Adam; CIFAR-10 ResNet-18: TrAct trained for N "
        "epochs matches the baseline trained for ~4N (100 vs 400 epochs; Fig. 1); ImageNet ResNet-50 / ViT: ~1.25x-2x"
    ),
    protocol=DigitsProtocol,
    data="digits",
    setup=_digits_setup,
    arms={arm: _train_arm for arm in ARMS},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="test_acc", ours="tract_x1", baseline="base_x2", unit="%", ceiling=100.0),
    control={f"tract_x{k}": f"base_x{k}" for k in TRACT_MULTS},
    control_note="the plain first layer at each TrAct budget stands in for TrAct",
    variants=(
        Variant(name="cifar10",
                description="cifar-10-batches-py/ (the paper's data), else fashion_mnist/, else mnist/: the "
                            "same arms on fixed train/test subsets (the run is stored under the data set it used)",
                protocol=RealProtocol, setup=_real_setup),
    ),
    uses=("gradkit.nn.tract.tract", "gradkit.nn.tract.TrActConv2d", "gradkit.functional.tract.TrActConv2dFn",
          "gradkit.functional.tract.tract_weight_grad"),
    notes=(
        "Arms tract_xK / base_xK train for K*e0 epochs, each with a cosine schedule over its own budget; "
        "speed-up checks pair tract_xK with base_x2K. Digits saturate near 98% within a few epochs, so the "
        "speed-up checks may pass at saturated budgets without showing a speed-up (the negative control, the "
        "plain net at TrAct's budgets, then passes too); the same-budget gap at E0 (info['same_budget_gap_x1'], "
        "tract_x1 - base_x1) is where the effect shows if anywhere. The per-image contrast factors (fixed "
        "across seeds) accentuate the brightness/contrast dependence TrAct removes. TrAct's wall-clock "
        "overhead at equal budgets is tract_xK vs base_xK in info['seconds_per_arm'] (machine-load "
        "dependent). The paper's CIFAR-10/ImageNet runs are not reproduced at this scale."
    ),
    scale_note=(
        "Digits saturate near 98%, so the epochs-to-match comparisons there sit within a point of each other. "
        "On Fashion-MNIST (--data-root; 1,000 training images, the baseline still improving from 71% at one "
        "epoch to 81% at eight) TrAct matches the baseline at equal budgets but is 1.6-4 points short of the "
        "baseline at twice its epochs: no speed-up on a one-channel task. The paper's gains are on RGB "
        "CIFAR-10 and ImageNet; a CIFAR-10 run (the variant reads it when present) would settle whether the "
        "effect needs them."
    ),
    plots=("test_acc", "train_loss"),
    bounds={"test_acc": (0.0, 100.0), "train_loss": (0.0, float("inf")), "first_epoch_loss": (0.0, float("inf")),
            "epochs": (1.0, float("inf"))},
))
