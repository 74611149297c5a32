"""EvoNorm claim: S0 beats BN-ReLU at batch 2; B0 and S0 match BN-ReLU at batch 64 (paper slug: evonorm).

Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020 (arXiv 2004.02967).
Scikit-learn digits (fixed split, standardised) upsampled bilinearly 8x8 -> 16x16, one channel, random
pixel shifts as augmentation (redrawn every epoch). Small ResNet: 3x3 stem conv + norm-act, three basic
blocks (the first at stride 1, the others at stride 2), global average pool, linear. Block:
``relu(branch(x) + shortcut(x))``, branch = conv-norm-act-conv-norm, projection shortcut = 1x1 conv-norm.
The BN-ReLU model is built first; EvoNorm arms are the same model after
:func:`gradkit.nn.evonorm.replace_bn_relu` (BN-ReLU pairs -> EvoNorm, BN-only -> affine-only EvoNorm, as
the official ResNet); GN-ReLU uses GroupNorm. All gammas start at 1. SGD with momentum and weight decay.

- small batch (main): arms ``bn_relu_b2``, ``gn_relu_b2``, ``s0_b2``; lr constant for a fraction of the
  steps, then cosine to 0.
- normal batch: arms ``bn_relu_b64``, ``b0_b64``, ``s0_b64``; lr cosine to 0 per step.
- ``--data-root`` with ``usps/``: the small-batch regime on USPS 16x16.

Equal tuning budgets: every arm trains once per learning-rate factor of its regime (batch 2: 0.3, 1 and 3
times the regime's lr; batch 64: 0.3, 1, 3 and 10 times) on the training images minus a 20% validation split,
and keeps the factor with the best validation accuracy; that model is the one tested (no refit).

Every number is a field of :class:`EvonormProtocol` (``gradkit show evonorm``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import Split, TensorBatches, load_digits_split
from ...data.real import data_folder
from ...engine import accuracy, fit, seed_everything
from ...nn.evonorm import replace_bn_relu
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, Drop, Gain
from .tuning import holdout, tune

SLUG = "evonorm"
SMALL_ARMS = ("bn_relu_b2", "gn_relu_b2", "s0_b2")
NORMAL_ARMS = ("bn_relu_b64", "b0_b64", "s0_b64")
ARMS = SMALL_ARMS + NORMAL_ARMS
OURS, BASELINE = "s0_b2", "bn_relu_b2"


# ----------------------------------------------------------------------------------------- protocol
@dataclass(frozen=True)
class _Common(Protocol):
    widths: tuple[int, ...] = (16, 32, 32)  # stem and block widths
    groups: int = 8  # GroupNorm and EvoNorm-S0 groups
    small_batch: int = 2
    small_epochs: int = 1
    small_lr: float = 0.01
    small_constant_frac: float = 0.5  # fraction of the steps at constant lr before the cosine
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 1  # random shift augmentation, pixels
    loss_window: int = 20  # steps per point of the step-loss curve
    # equal tuning budgets: every arm multiplies its regime's lr by each factor of the regime's grid, trains on the
    # training images minus a validation split, and keeps the factor with the best validation accuracy (that
    # model is tested).
    small_lr_factors: tuple[float, ...] = scaled(smoke=(1.0,), quick=(0.3, 1.0, 3.0))
    val_fraction: float = 0.2


@dataclass(frozen=True)
class EvonormProtocol(_Common):
    """Digits 16x16: the small-batch and the normal-batch regime."""

    n_train: int | None = scaled(smoke=300, quick=None)  # first n digits training images (None: all)
    normal_batch: int = 64
    normal_epochs: int = scaled(smoke=1, quick=5, full=15)
    normal_lr: float = 0.05
    # the batch-64 grid reaches 10x: at 3x the EvoNorm arms' validation accuracy was still rising
    normal_lr_factors: tuple[float, ...] = scaled(smoke=(1.0,), quick=(0.3, 1.0, 3.0, 10.0))
    normal_constant_frac: float = 0.0


@dataclass(frozen=True)
class UspsProtocol(_Common):
    """USPS 16x16: the small-batch regime only, on the first ``n_train`` training images."""

    n_train: int = scaled(smoke=100, quick=1500, full=7291)


# ----------------------------------------------------------------------------------------- model
class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int, bool], list[nn.Module]]) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), *norm(c_out, True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), *norm(c_out, False))
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), *norm(c_out, False))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


def build_resnet(norm: str, in_ch: int = 1, n_classes: int = 10, widths: tuple[int, ...] = (16, 32, 32),
                 groups: int = 8, zero_init_last: bool = False) -> nn.Sequential:
    """Small ResNet of the claim; ``norm`` in {"bn", "gn", "b0", "s0"} (EvoNorms via replace_bn_relu).

    ``groups``: of GroupNorm and EvoNorm-S0. ``zero_init_last``: gamma of the last norm of every residual
    branch starts at 0 (official TF ResNet, ``init_zero=True``), for every norm alike. Off in the claim:
    at its step budgets it slows every arm badly.
    """
    def bn(c: int, act: bool) -> list[nn.Module]:
        return [nn.BatchNorm2d(c), nn.ReLU()] if act else [nn.BatchNorm2d(c)]

    def gn(c: int, act: bool) -> list[nn.Module]:
        return [nn.GroupNorm(groups, c), nn.ReLU()] if act else [nn.GroupNorm(groups, c)]

    factory = gn if norm == "gn" else bn
    layers: list[nn.Module] = [nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), *factory(widths[0], True)]
    c = widths[0]
    for i, w in enumerate(widths):
        layers.append(_Block(c, w, 1 if i == 0 else 2, factory))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes)]
    model = nn.Sequential(*layers)
    if norm in ("b0", "s0"):
        kw = {"groups": groups} if norm == "s0" else {}
        replace_bn_relu(model, norm.upper(), **kw)
    elif norm not in ("bn", "gn"):
        raise ValueError(f"norm must be 'bn', 'gn', 'b0' or 's0', got {norm!r}")
    if zero_init_last:
        with torch.no_grad():
            for m in model:
                if isinstance(m, _Block):
                    m.branch[-1].weight.zero_()
    return model


# ----------------------------------------------------------------------------------------- data
def _digits_images() -> Split:
    s = load_digits_split()

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.reshape(-1, 1, 8, 8), size=(16, 16), mode="bilinear", align_corners=False)

    return Split(up(s.x_train), s.y_train, up(s.x_test), s.y_test, name="digits")


def _usps_images(root: Path, n_train: int) -> Split:
    from ...data.readers import load_usps

    d = load_usps(root)
    xtr = torch.tensor(d["x_train"][:n_train], dtype=torch.float32)
    xte = torch.tensor(d["x_test"], dtype=torch.float32)
    mu, sd = xtr.mean(), xtr.std()
    return Split(((xtr - mu) / sd).reshape(-1, 1, 16, 16), torch.tensor(d["y_train"][:n_train], dtype=torch.int64),
                 ((xte - mu) / sd).reshape(-1, 1, 16, 16), torch.tensor(d["y_test"], dtype=torch.int64), name="usps")


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift every image by its own random offset in [-max_shift, max_shift]^2 (zero padding)."""
    n, c, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _digits_setup(ctx: ArmContext) -> Split:
    split = _digits_images()
    n = ctx.p.n_train
    if n is not None:
        split = Split(split.x_train[:n], split.y_train[:n], split.x_test, split.y_test, split.name)
    return split.to(ctx.device)


def _usps_setup(ctx: ArmContext) -> Split:
    root = data_folder(ctx.data_root, "usps/")
    return _usps_images(root, ctx.p.n_train).to(ctx.device)


# ----------------------------------------------------------------------------------------- training
def _train(ctx: ArmContext) -> ArmResult:
    """One arm, its learning rate tuned: the regime's lr times each of its factors, chosen on a validation split."""
    p = ctx.p
    small = ctx.arm in SMALL_ARMS
    base_lr = p.small_lr if small else p.normal_lr
    factors = p.small_lr_factors if small else p.normal_lr_factors
    if len(factors) == 1:
        res = _train_once(ctx, ctx.data, base_lr * factors[0])
        res.metrics["lr"] = base_lr * factors[0]
        return res
    fit_split, val_split = holdout(ctx.data, p.val_fraction, seed=ctx.seed)
    runs: dict[float, ArmResult] = {}

    def trial(factor: float) -> float:
        runs[factor] = _train_once(ctx, fit_split, base_lr * factor, val=val_split)
        return runs[factor].metrics["val_acc"]

    tuned = tune(factors, trial)
    res = runs[tuned.value]
    res.metrics["lr"] = base_lr * tuned.value
    res.info["tuned"] = {**tuned.as_info(), "base_lr": base_lr,
                         "test_acc": [runs[f].metrics["test_acc"] for f in factors]}
    return res


def _train_once(ctx: ArmContext, split: Split, lr: float, val: Split | None = None) -> ArmResult:
    """One training run: the norm is the arm's prefix, the regime (batch, epochs, schedule) its suffix.

    Every run of an arm starts from the same seed (same init, same shuffles), whatever its learning rate."""
    p, arm = ctx.p, ctx.arm
    if arm in SMALL_ARMS:
        batch, epochs, warm_frac = p.small_batch, p.small_epochs, p.small_constant_frac
    else:
        batch, epochs, warm_frac = p.normal_batch, p.normal_epochs, p.normal_constant_frac
    norm = arm.split("_")[0]
    gen = seed_everything(ctx.seed)
    model = build_resnet(norm, split.x_train.shape[1], split.num_classes, widths=p.widths,
                         groups=p.groups).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)
    steps_per_epoch = math.ceil(len(split.y_train) / batch)
    total = steps_per_epoch * epochs
    warm = int(warm_frac * total)

    def lr_factor(step: int) -> float:
        if step < warm:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    x_cpu = split.x_train.cpu()

    def batches(epoch: int) -> TensorBatches:
        xs = random_shift(x_cpu, gen, p.max_shift).to(ctx.device)
        return TensorBatches(xs, split.y_train, batch_size=batch, shuffle=True, generator=gen)

    step_losses: list[float] = []

    def compute_loss(m: nn.Module, b) -> torch.Tensor:
        loss = F.cross_entropy(m(b[0]), b[1])
        step_losses.append(float(loss.detach()))
        return loss

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(m, split.x_test, split.y_test, batch_size=512)}

    hist = fit(model, opt, batches, epochs=epochs, compute_loss=compute_loss, evaluate=evaluate, scheduler=sched,
               scheduler_every="step", progress=ctx.progress, desc=f"{SLUG}/{arm}")
    k = max(1, len(step_losses) // 5)
    finished = len(hist.records) == epochs and math.isfinite(hist.last("train_loss"))
    nan = float("nan")
    metrics = {
        "test_acc": hist.last("test_acc") if finished else nan,  # a diverged run fails the criterion
        "train_loss": hist.last("train_loss"),
        "loss_first": float(np.mean(step_losses[:k])),
        "loss_last": float(np.mean(step_losses[-k:])),
    }
    if val is not None:
        metrics["val_acc"] = accuracy(model, val.x_test, val.y_test, batch_size=512) if finished else nan
    w = p.loss_window
    curves = {"test_acc": hist.series("test_acc"),
              "step_loss": [float(np.mean(step_losses[i:i + w])) for i in range(0, len(step_losses), w)]}
    return ArmResult(metrics, curves)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    out.info.update({"n_train": len(ctx.data.y_train), "n_test": len(ctx.data.y_test)})


SMALL_CRITERION = AllOf(
    Gain(metric="test_acc", ours=OURS, baseline=BASELINE, at_least=1.0),
    Drop(metric="test_acc", ours=OURS, baseline="gn_relu_b2", at_most=1.0),
)

CLAIM = register(Claim(
    slug=SLUG,
    version=2,  # 2: every arm's learning rate chosen on a validation split from its regime's grid
    title="Evolving Normalization-Activation Layers",
    arxiv="2004.02967",
    statement="At batch 2, EvoNorm-S0 beats BN-ReLU by >= 1 point of test accuracy and is within 1 point of "
              "GN-ReLU; at batch 64, EvoNorm-B0 and EvoNorm-S0 are within 1.5 points of BN-ReLU (small ResNet "
              "on 16x16 digits).",
    paper_figure="EvoNorms beat BN-ReLU on 12 of 14 ImageNet model/training settings; small-batch regime: "
                 "EvoNorm-S0 outperforms BN-ReLU by 7.8 points (ResNet-50) and 7.3 points (MobileNetV2), and "
                 "is better than GN-ReLU.",
    protocol=EvonormProtocol,
    data="digits",
    setup=_digits_setup,
    arms={arm: _train for arm in ARMS},
    finish=_finish,
    criterion=AllOf(
        *SMALL_CRITERION.criteria,
        Drop(metric="test_acc", ours="b0_b64", baseline="bn_relu_b64", at_most=1.5),
        Drop(metric="test_acc", ours="s0_b64", baseline="bn_relu_b64", at_most=1.5),
    ),
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%", ceiling=100.0),
    control={"s0_b2": "bn_relu_b2", "b0_b64": "bn_relu_b64", "s0_b64": "bn_relu_b64"},
    control_note="BN-ReLU stands in for every EvoNorm arm of its regime",
    variants=(
        Variant(name="usps", description="usps/: the small-batch regime on USPS 16x16 (full test split)",
                protocol=UspsProtocol, setup=_usps_setup, arms={arm: _train for arm in SMALL_ARMS},
                criterion=SMALL_CRITERION, control={"s0_b2": "bn_relu_b2"}),
    ),
    uses=(
        "gradkit.nn.evonorm.EvoNormB0",
        "gradkit.nn.evonorm.EvoNormS0",
        "gradkit.nn.evonorm.replace_bn_relu",
        "gradkit.nn.evonorm.evonorm_b0",
        "gradkit.nn.evonorm.evonorm_s0",
    ),
    notes="Laptop-scale check with a small ResNet and short training in both regimes (`gradkit show evonorm`). "
          "BN's batch statistics at batch 2 still pool N*H*W >= 32 values per channel, so BN may not "
          "degrade as on ImageNet; the paper's claim is checked at batch 2 as planned and a fail is reported "
          "with its numbers rather than switching to batch 1. Tenths of a point are not resolvable on 360 "
          "test images (1 point = ~4 images), hence the 1.5-point non-inferiority margin at batch 64. EvoNorm "
          "eps 1e-5 and biased running variance follow the official TF code; the affine-only EvoNorm on the "
          "last norm of each branch and on the shortcut mirrors the official ResNet wiring. The official "
          "zero-init of each branch's last gamma is off for all arms: at these step budgets it stalls every "
          "arm (BN-ReLU included).",
    scale_note=(
        "Every arm's learning rate is tuned on a validation split (batch 2: 0.3, 1, 3 x 0.01; batch 64: 0.3, 1, "
        "3, 10 x 0.05), and the chosen values lie inside the grids for the EvoNorm arms (S0 at batch 2 always "
        "picks 1x; at batch 64 both EvoNorms mostly pick 3x, and B0 diverges at 10x). Tuned, seeds 0-5: at "
        "batch 2 EvoNorm-S0 reaches 70.0% against BN-ReLU's 84.4%, the reverse of the paper, though above "
        "GN-ReLU's 66.7% as the paper finds; at batch 64 B0 reaches 86.5% and S0 85.3% against BN-ReLU's 97.2% "
        "after 5 epochs. The paper trains ImageNet ResNets for 90+ epochs; whether EvoNorms only catch up "
        "over such schedules is what a longer run would settle."
    ),
    plots=("step_loss", "test_acc"),
    bounds={"test_acc": (0.0, 100.0), "train_loss": (0.0, math.inf), "loss_first": (0.0, math.inf),
            "loss_last": (0.0, math.inf)},
))
