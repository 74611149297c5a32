"""EvoNorm claim: S0 beats BN-ReLU at batch 2; B0 and S0 match BN-ReLU at batch 64 (paper slug: evonorm).

Protocol (spec ``papers/evonorm.md``, shrunk laptop scale): scikit-learn digits (fixed 1437/360 split,
standardised) upsampled bilinearly 8x8 -> 16x16, one channel, random 1-pixel shifts as augmentation
(redrawn every epoch). Small ResNet: 3x3 stem conv 16 ch + norm-act, basic blocks 16 (stride 1),
32 (stride 2), 32 (stride 2), global average pool, linear. Block: ``relu(branch(x) + shortcut(x))``,
branch = conv-norm-act-conv-norm, projection shortcut = 1x1 conv-norm. The BN-ReLU model is built
first; EvoNorm arms are the same model after :func:`gradkit.nn.evonorm.replace_bn_relu` (BN-ReLU pairs
-> EvoNorm, BN-only -> affine-only EvoNorm, as the official ResNet); GN-ReLU uses GroupNorm(8). All
gammas start at 1 (the official ``init_zero`` of each branch's last norm is available as
``build_resnet(..., zero_init_last=True)`` but is off: it stalls every arm at these step budgets).
SGD momentum 0.9, weight decay 5e-4.

- small batch (main): batch 2, 1 epoch, lr 0.01 constant for the first half then cosine to 0;
  arms BN-ReLU, GN-ReLU, EvoNorm-S0 (groups 8).
- normal batch: batch 64, 5 epochs, lr 0.05, cosine to 0 per step; arms BN-ReLU, EvoNorm-B0, EvoNorm-S0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Split, TensorBatches, load_digits_split
from ..data.real import data_folder
from ..engine import accuracy, cpu_threads, fit, seed_everything
from ..nn.evonorm import replace_bn_relu
from .base import Claim, Primary, RunContext, RunOutput, register, run_arms
from .criteria import AllOf, Drop, Gain

SLUG = "evonorm"
GROUPS = 8
WIDTHS = (16, 32, 32)
SMALL_ARMS = ("bn_relu_b2", "gn_relu_b2", "s0_b2")
NORMAL_ARMS = ("bn_relu_b64", "b0_b64", "s0_b64")
ARMS = SMALL_ARMS + NORMAL_ARMS
OURS, BASELINE = "s0_b2", "bn_relu_b2"
LOSS_WINDOW = 20  # steps per point of the step-loss curve


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


def _bn(c: int, act: bool) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU()] if act else [nn.BatchNorm2d(c)]


def _gn(c: int, act: bool) -> list[nn.Module]:
    return [nn.GroupNorm(GROUPS, c), nn.ReLU()] if act else [nn.GroupNorm(GROUPS, c)]


def build_resnet(norm: str, in_ch: int = 1, n_classes: int = 10, widths: tuple[int, ...] = WIDTHS,
                 zero_init_last: bool = False) -> nn.Sequential:
    """Small ResNet of the claim; ``norm`` in {"bn", "gn", "b0", "s0"} (EvoNorms via replace_bn_relu).

    ``zero_init_last``: gamma of the last norm of every residual branch starts at 0 (official TF ResNet,
    ``init_zero=True``), for every norm alike. Off in the claim: at its ~100-700-step budgets it slowed
    every arm badly (seed 0: BN-ReLU at batch 64 fell from 97.5% to 41.4%).
    """
    factory = _gn if norm == "gn" else _bn
    layers: list[nn.Module] = [nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), *factory(widths[0], True)]
    c = widths[0]
    for i, w in enumerate(widths):
        layers.append(_Block(c, w, 1 if i == 0 else 2, factory))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes)]
    model = nn.Sequential(*layers)
    if norm in ("b0", "s0"):
        kw = {"groups": GROUPS} if norm == "s0" else {}
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
    from ..data.readers import load_usps

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


# ----------------------------------------------------------------------------------------- training
def _train_arm(arm: str, split: Split, batch: int, epochs: int, lr: float, warm_frac: float,
               ctx: RunContext) -> tuple[dict[str, float], dict[str, list[float]]]:
    norm = arm.split("_")[0]
    gen = seed_everything(ctx.seed)
    model = build_resnet(norm, split.x_train.shape[1], split.num_classes).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
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
        xs = random_shift(x_cpu, gen).to(ctx.device)
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
    metrics = {
        "test_acc": hist.last("test_acc") if finished else float("nan"),
        "train_loss": hist.last("train_loss"),
        "loss_first": float(np.mean(step_losses[:k])),
        "loss_last": float(np.mean(step_losses[-k:])),
    }
    w = LOSS_WINDOW
    curves = {"test_acc": hist.series("test_acc"),
              "step_loss": [float(np.mean(step_losses[i:i + w])) for i in range(0, len(step_losses), w)]}
    return metrics, curves


def run(ctx: RunContext) -> RunOutput:
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    if ctx.data_root is not None:
        root = data_folder(ctx.data_root, "usps/")
        split = _usps_images(root, ctx.pick(smoke=100, quick=1500, full=7291))
        regimes = [(SMALL_ARMS, 2, 1, 0.01, 0.5)]
    else:
        split = _digits_images()
        if ctx.scale == "smoke":  # 150 steps at batch 2; one short epoch at batch 64
            split = Split(split.x_train[:300], split.y_train[:300], split.x_test, split.y_test, split.name)
        regimes = [(SMALL_ARMS, 2, 1, 0.01, 0.5),
                   (NORMAL_ARMS, 64, ctx.pick(smoke=1, quick=5, full=15), 0.05, 0.0)]
    split = split.to(ctx.device)
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, float] = {}
    for arms, batch, epochs, lr, warm_frac in regimes:
        m, c, s = run_arms(arms, lambda arm: _train_arm(arm, split, batch, epochs, lr, warm_frac, ctx))
        metrics.update(m)
        seconds.update(s)
        for name, per_arm in c.items():
            curves.setdefault(name, {}).update(per_arm)
    info = {"n_train": len(split.y_train), "n_test": len(split.y_test), "widths": WIDTHS, "groups": GROUPS,
            "regimes": [{"arms": list(a), "batch": b, "epochs": e, "lr": lr,
                         "schedule": "constant then cosine" if wf else "cosine", "constant_frac": wf}
                        for a, b, e, lr, wf in regimes],
            "optimizer": "SGD(momentum=0.9, wd=5e-4)", "augmentation": "random 1-pixel shifts",
            "evonorm": {"eps": 1e-5, "b0_momentum": 0.1}, "seconds_per_arm": seconds}
    return RunOutput(metrics=metrics, data=split.name, curves=curves, info=info)


def _small_criterion() -> AllOf:
    return AllOf(
        Gain(metric="test_acc", ours=OURS, baseline=BASELINE, at_least=1.0),
        Drop(metric="test_acc", ours=OURS, baseline="gn_relu_b2", at_most=1.0),
    )


def _criterion() -> AllOf:
    return AllOf(
        *_small_criterion().criteria,
        Drop(metric="test_acc", ours="b0_b64", baseline="bn_relu_b64", at_most=1.5),
        Drop(metric="test_acc", ours="s0_b64", baseline="bn_relu_b64", at_most=1.5),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Evolving Normalization-Activation Layers",
    arxiv="2004.02967",
    statement="At batch 2, EvoNorm-S0 beats BN-ReLU by >= 1 point of test accuracy and is within 1 point of "
              "GN-ReLU; at batch 64, EvoNorm-B0 and EvoNorm-S0 are within 1.5 points of BN-ReLU (small ResNet "
              "on 16x16 digits).",
    paper_figure="EvoNorms beat BN-ReLU on 12 of 14 ImageNet model/training settings; small-batch regime: "
                 "EvoNorm-S0 outperforms BN-ReLU by 7.8 points (ResNet-50) and 7.3 points (MobileNetV2), and "
                 "is better than GN-ReLU.",
    criterion=_criterion(),
    data_criteria={"usps": _small_criterion()},
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%"),
    run=run,
    uses=(
        "gradkit.nn.evonorm.EvoNormB0",
        "gradkit.nn.evonorm.EvoNormS0",
        "gradkit.nn.evonorm.replace_bn_relu",
        "gradkit.nn.evonorm.evonorm_b0",
        "gradkit.nn.evonorm.evonorm_s0",
    ),
    real_data="USPS 16x16 (usps/ under --data-root): small-batch regime only (batch 2, 1 epoch) on the first "
              "1,500 training images, full 2,007-image test split; arms BN-ReLU, GN-ReLU, EvoNorm-S0.",
    notes="Laptop-scale check, shrunk from the spec's plan to fit 120 s: widths 16-32-32, 1 epoch at batch 2, "
          "5 epochs at batch 64. BN's batch statistics at batch 2 still pool N*H*W >= 32 values per channel, so "
          "BN may not degrade as on ImageNet (spec: report a fail with numbers rather than switch to batch 1). "
          "Tenths of a point are not resolvable on 360 test images (1 point = ~4 images), hence the 1.5-point "
          "non-inferiority margin at batch 64. EvoNorm eps 1e-5 and biased running variance follow the "
          "official TF code; the affine-only EvoNorm on the last norm of each branch and on the shortcut "
          "mirrors the official ResNet wiring. The official zero-init of each branch's last gamma is off (all "
          "arms): at 100-700 steps it stalled every arm (seed 0, batch 64: BN-ReLU 41%, B0 13%, S0 13%).",
    plots=("step_loss", "test_acc"),
))
