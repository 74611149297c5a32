"""Claim of gradient-noise: annealed gradient noise lets a 20-layer MLP train from a poor init.

A deep, narrow ReLU MLP (the paper's 20 hidden layers of 50 units) on digits (standardised, fixed 1437/360 split), plain SGD; five arms in one
run, all sharing the seed's init and batch order: init in {"simple": N(0, simple_std^2) weights, zero
biases; "good": Kaiming-normal, zero biases}, each without noise and with annealed noise
(``eta``, ``gamma``), plus a reported, unjudged simple-init arm at ``eta_high``. Metric: best test
accuracy over epochs (the paper's) and final training loss; a run whose training loss turns non-finite
stops there: its best test accuracy is the best it reached before diverging, its final metrics are NaN,
and ``diverged`` counts it (its mean over seeds is the arm's divergence rate). With ``--data-root`` (variant ``mnist``): the same arms on a
fixed random MNIST training subset (pixels /255, then standardised with one global mean/std), tested
on the 10,000 MNIST test images. The numbers are the protocol's (``gradkit show gradient-noise``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...data import Split, TensorBatches, load_digits_split
from ...data.real import mnist_split
from ...engine import accuracy, fit, mean_loss
from ...optim.gradient_noise import GradientNoise
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, Below, Drop, Gain

SLUG = "gradient-noise"
ARMS = {  # name -> (init, protocol field of its eta); None = no noise
    "simple": ("simple", None),
    "simple+noise": ("simple", "eta"),
    "good": ("good", None),
    "good+noise": ("good", "eta"),
    "simple+noise0.1": ("simple", "eta_high"),
}
NOISE_SEED_OFFSET = 7919  # noise generator seed = seed + offset (independent of the batch order)


@dataclass(frozen=True)
class GradientNoiseProtocol(Protocol):
    """Digits: a deep, narrow ReLU MLP, plain SGD, no clipping, noise on two inits."""

    epochs: int = scaled(smoke=3, quick=30, full=30)
    depth: int = 20
    width: int = 50
    batch: int = 32
    eta: float = 0.03  # the judged noisy arms
    eta_high: float = 0.1  # the reported, unjudged simple+noise0.1 arm
    gamma: float = 0.55
    simple_std: float = 0.1  # std of every weight at the simple init
    lr_simple: float = 0.1
    lr_good: float = 0.01


@dataclass(frozen=True)
class MnistProtocol(GradientNoiseProtocol):
    """MNIST: the digits protocol on a fixed random training subset of ``n_train`` images."""

    epochs: int = scaled(smoke=1, quick=6, full=20)
    n_train: int = scaled(smoke=2000, quick=10_000, full=60_000)


def make_mlp(n_in: int, n_out: int, depth: int = 20, width: int = 50) -> nn.Sequential:
    """``depth`` hidden Linear+ReLU layers of ``width`` units, then a linear output layer."""
    layers: list[nn.Module] = []
    d = n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


@torch.no_grad()
def init_mlp(model: nn.Module, init: str, simple_std: float = 0.1) -> None:
    """'simple': every weight N(0, simple_std^2); 'good': Kaiming-normal (fan_in, ReLU gain). Zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if init == "simple":
                nn.init.normal_(m.weight, 0.0, simple_std)
            elif init == "good":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                raise ValueError(f"init must be 'simple' or 'good', got {init!r}")
            nn.init.zeros_(m.bias)


def _noise_std_probe(gn: GradientNoise, at_steps: set[int], record: dict[int, list[float]]):
    """``before_step`` that applies the noise and, at the chosen steps, measures the noise added."""

    def before_step(step: int) -> None:
        if step not in at_steps:
            gn.apply()
            return
        grads = [p.grad.detach().clone() for p in gn.params if p.grad is not None]
        t = gn.step_count
        std = gn.apply()
        diff = torch.cat([(p.grad - g0).flatten().double()
                          for p, g0 in zip((p for p in gn.params if p.grad is not None), grads)])
        record[t] = [float(diff.std()), float(diff.mean()), std, diff.numel()]

    return before_step


def _digits_setup(ctx: ArmContext) -> Split:
    return load_digits_split().to(ctx.device)


def _mnist_setup(ctx: ArmContext) -> Split:
    return mnist_split(ctx.data_root, ctx.p.n_train, subset="random", normalise="global").to(ctx.device)


def train_arm(ctx: ArmContext) -> ArmResult:
    """One arm: build and initialise the MLP, train with plain SGD (plus noise for the noisy arms)."""
    p, split = ctx.p, ctx.data
    init, eta_field = ARMS[ctx.arm]
    eta = 0.0 if eta_field is None else getattr(p, eta_field)
    model = make_mlp(split.num_features, split.num_classes, p.depth, p.width)
    init_mlp(model, init, p.simple_std)
    model.to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr_simple if init == "simple" else p.lr_good)
    batches = TensorBatches(split.x_train, split.y_train, batch_size=p.batch, generator=ctx.generator)
    probe: dict[int, list[float]] = {}
    before_step = None
    if eta > 0:
        noise_gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed + NOISE_SEED_OFFSET)
        gn = GradientNoise(model.parameters(), eta=eta, gamma=p.gamma, generator=noise_gen)
        before_step = _noise_std_probe(gn, {0, len(batches) * p.epochs - 1}, probe)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(m, split.x_test, split.y_test)}

    hist = fit(model, opt, batches, epochs=p.epochs, before_step=before_step, evaluate=evaluate,
               progress=ctx.progress, desc=f"{SLUG}/{ctx.arm}")
    diverged = hist.diverged()
    nan = float("nan")
    metrics = {
        "best_test_acc": hist.best_before_divergence("test_acc"),
        "final_test_acc": nan if diverged else hist.last("test_acc"),
        "final_train_loss": nan if diverged else mean_loss(model, split.x_train, split.y_train),
        "diverged": float(diverged),
    }
    curves = {"test_acc": hist.series("test_acc"), "train_loss": hist.series("train_loss")}
    return ArmResult(metrics, curves, {"steps": hist.steps, "noise_probe": probe})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    out.info.update(n_train=len(ctx.data.y_train), n_test=len(ctx.data.y_test))


CRITERION = AllOf(
    Below(metric="best_test_acc", arm="simple", value=20.0, every_seed=True),
    Gain(metric="best_test_acc", ours="simple+noise", baseline="simple", at_least=20.0),
    Drop(metric="best_test_acc", ours="good+noise", baseline="good", at_most=3.0),
)

CLAIM = register(Claim(
    slug=SLUG,
    title="Adding Gradient Noise Improves Learning for Very Deep Networks",
    version=2,
    arxiv="1511.06807",
    statement=(
        "Annealed Gaussian gradient noise lets a 20-layer ReLU MLP trained with plain SGD from a poor "
        "Gaussian init escape chance level (noiseless < 20% best test accuracy in every seed, noisy "
        ">= +20 points), and costs at most 3 points from a good (Kaiming) init"
    ),
    paper_figure=(
        "MNIST, 20-layer x 50-unit ReLU MLP, SGD, simple init (N(0, 0.1^2)), no clipping: best test "
        "accuracy ~11% without noise vs ~90% with noise; good init: ~97% both ways (Table 1, "
        "approximate values)"
    ),
    protocol=GradientNoiseProtocol,
    data="digits",
    setup=_digits_setup,
    arms={arm: train_arm for arm in ARMS},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="best_test_acc", ours="simple+noise", baseline="simple", unit="%", ceiling=100.0),
    control={"simple+noise": "simple", "good+noise": "good"},
    control_note="the same inits and batch order with the noise off",
    variants=(
        Variant(name="mnist", description="mnist/ IDX files: the same arms on a fixed random MNIST "
                "training subset, tested on the 10,000 test images",
                protocol=MnistProtocol, setup=_mnist_setup),
    ),
    uses=("gradkit.optim.gradient_noise.GradientNoise", "gradkit.functional.noise.add_gradient_noise",
          "gradkit.schedules.noise.annealed_noise_std"),
    notes=(
        "Digits stand in for MNIST at quick scale, trained for far fewer updates than the paper; hence "
        "a larger eta than the paper's safe default and a larger learning rate for the simple init (the "
        "noise is too small to matter in so few updates at the good init's learning rate). The good "
        "init is Kaiming-normal, not the paper's Sussillo & Abbott init, at the smaller learning rate "
        "(the larger one was unstable without noise). No gradient clipping in any arm. A non-finite "
        "training loss stops that arm: best_test_acc keeps the best accuracy it reached before diverging "
        "(the paper judges the best test accuracy over training, which a later divergence does not undo), "
        "final_test_acc and final_train_loss are NaN, and diverged = 1 (its mean is the arm's divergence "
        "rate, shown per arm). final_train_loss is the "
        "cross-entropy over the whole training set after the last epoch. The simple+noise0.1 arm "
        "(eta_high) is reported but not judged (it learns faster but can diverge late). "
        "info['arms'][arm]['noise_probe'][t] = [empirical std, mean, sigma_t, count] of the noise "
        "added at step t. Protocol: gradkit show gradient-noise."
    ),
    scale_note=(
        "On seeds 11-13 the gain was +19.35 points against the +20 required, at the threshold for this "
        "training length; more seeds or the full-scale run would say whether the shortfall is seed noise."
    ),
    plots=("test_acc", "train_loss"),
    bounds={"best_test_acc": (0.0, 100.0), "final_test_acc": (0.0, 100.0),
            "final_train_loss": (0.0, math.inf), "diverged": (0.0, 1.0)},
))
