"""Claim ``input-gradients``: input gradients of standard models do not highlight the discriminative features;
those of adversarially trained (PGD) models do.

Shah, Jain, Netrapalli, "Do Input Gradients Highlight Discriminative Features?", NeurIPS 2021 (arXiv
2102.12781). Two arms per run, trained from the same seed: ``standard`` (baseline) and ``robust`` (PGD
adversarial training, ours). Protocol (spec ``papers/input-gradients.md``), one seed per run:

1. Synthetic (official notebook): d = 10, x = y * e_j, one-hidden-layer ReLU net, SGD lr 0.1, standard vs
   l_inf PGD training (eps 0.45, 8 steps of 0.25 * eps, no random start, clamp to [-1, 1]). Metrics: the
   top-1 / bottom-1 hit rates Pr[argmax_i |g_i| = j], Pr[argmin_i |g_i| = j] of the loss gradient on 1,000
   test points, and AQ(k=1) = top-1 hit - bottom-1 hit.
2. BlockDigits: 16x8 images, an 8x8 digit (0 vs 1) over/under a fixed checkerboard, MLP 128-64-2,
   standard vs l_inf PGD (eps 0.1, 10 steps, random start, clamp [0, 1]); metric: mean fraction of
   |loss gradient| mass in the digit block on the test images.
3. DiffROAR on scikit-learn digits (64-d standardised, MLP 64-64-10), standard vs l2-PGD (eps 1.0, 7 steps)
   model: |loss gradient| attributions of the ORIGINAL model on train and test sets, top-k / bottom-k
   masks (k in 10, 20, 40 % kept, rest = training mean, random tie-breaking), a fresh model retrained on
   each masked train set, DiffROAR = Acc(top) - Acc(bottom) on the masked test set.
``--data-root``: BlockMNIST (56x28, MNIST 0 vs 1, 5,000 train / 1,000 test, MLP 1568-256-2, l_inf PGD eps
0.3, 10 steps); only the block-mass check runs.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..data import TensorBatches, load_digits_split
from ..data.blocks import block_digits, block_region_mask, signal_coordinate_synthetic
from ..data.real import data_folder
from ..engine import accuracy, cpu_threads, fit, seed_everything
from ..probes.input_gradients import (
    attribution_mask, diffroar, gradient_mass_in_region, input_gradient, n_kept, top_hit_rate,
)
from ..robustness.pgd import PGD, pgd_train, robust_accuracy
from .base import Claim, Primary, RunContext, RunOutput, register, run_arms
from .criteria import AllOf, AtLeast, AtMost, Gain

SLUG = "input-gradients"
OURS, BASELINE = "robust", "standard"
ARMS = (BASELINE, OURS)
KS = (0.1, 0.2, 0.4)


def mlp(sizes) -> nn.Sequential:
    """Flatten + ReLU MLP with the given layer sizes, e.g. (128, 64, 2)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _train(model, x, y, *, epochs, batch_size, lr, gen, attack=None, opt="adam", ctx=None, desc="", evaluate=None):
    """Standard (attack None) or PGD adversarial training through the engine's ``fit``."""
    optim = (torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam"
             else torch.optim.SGD(model.parameters(), lr=lr))
    batches = TensorBatches(x, y, batch_size=batch_size, shuffle=True, generator=gen)
    kw = dict(epochs=epochs, evaluate=evaluate, desc=desc)
    if ctx is not None:
        kw["progress"] = ctx.progress
    if attack is None:
        return fit(model, optim, batches, **kw)
    return pgd_train(model, optim, batches, attack=attack, generator=gen, **kw)


# ------------------------------------------------------------------------------------ the three parts
def synthetic_part(arm: str, ctx: RunContext, dev) -> tuple[dict, dict]:
    width = ctx.pick(smoke=256, quick=2000, full=25000)
    epochs = ctx.pick(smoke=10, quick=100, full=1500)
    n_train = ctx.pick(smoke=2000, quick=2000, full=10000)
    bs = ctx.pick(smoke=50, quick=50, full=250)
    xtr, ytr, _ = signal_coordinate_synthetic(10, n_train, seed=ctx.seed)
    xte, yte, jte = signal_coordinate_synthetic(10, 1000, seed=ctx.seed + 7919)
    xtr, ytr, xte, yte, jte = (t.to(dev) for t in (xtr, ytr, xte, yte, jte))
    gen = seed_everything(ctx.seed)
    model = mlp((10, width, 2)).to(dev)
    attack = PGD(eps=0.45, norm="linf", steps=8, step_size=0.25 * 0.45, random_start=False, clamp=(-1.0, 1.0))
    hist = _train(model, xtr, ytr, epochs=epochs, batch_size=bs, lr=0.1, gen=gen, opt="sgd", ctx=ctx,
                  attack=attack if arm == OURS else None, desc=f"{SLUG}/synthetic/{arm}")
    model.eval()
    a = input_gradient(model, xte, yte, target="loss")
    top, bot = top_hit_rate(a, jte, "top"), top_hit_rate(a, jte, "bottom")
    m = {"syn_top1_hit": top, "syn_bottom1_hit": bot, "syn_aq_k1": top - bot,
         "syn_test_acc": accuracy(model, xte, yte), "syn_robust_acc": robust_accuracy(model, xte, yte, attack)}
    return m, {"syn_train_loss": hist.series("train_loss")}


def _block_mass(model, x, y, region) -> float:
    g = input_gradient(model, x, y, target="loss", internal_batch_size=512)
    return float(torch.nanmean(gradient_mass_in_region(g, region)))


def block_data(ctx: RunContext):
    """(split, signal block of the test images, block height, width, MLP sizes, PGD eps, epochs, batch, name)."""
    if ctx.data_root is None:
        split, _, s_te = block_digits(seed=ctx.seed)
        return split, s_te, 8, 8, (128, 64, 2), 0.1, ctx.pick(smoke=3, quick=30, full=60), 32, "block-digits"
    from ..data.blocks import block_mnist

    root = data_folder(ctx.data_root, "mnist/")
    n_tr, n_te = ctx.pick(smoke=500, quick=5000, full=5000), ctx.pick(smoke=200, quick=1000, full=1000)
    split, _, s_te = block_mnist(root, n_train=n_tr, n_test=n_te, seed=ctx.seed)
    return split, s_te, 28, 28, (1568, 256, 2), 0.3, ctx.pick(smoke=1, quick=8, full=20), 64, "block-mnist"


def block_part(arm: str, ctx: RunContext, dev, data=None) -> tuple[dict, dict, str]:
    split, s_te, h, w, sizes, eps, epochs, bs, name = block_data(ctx) if data is None else data
    gen = seed_everything(ctx.seed)
    split = split.to(dev)
    region = block_region_mask(s_te, h, w).to(dev)
    model = mlp(sizes).to(dev)
    attack = PGD(eps=eps, norm="linf", steps=10, step_size=2.5 * eps / 10, random_start=True, clamp=(0.0, 1.0))
    hist = _train(model, split.x_train, split.y_train, epochs=epochs, batch_size=bs, lr=1e-3, gen=gen, ctx=ctx,
                  attack=attack if arm == OURS else None, desc=f"{SLUG}/{name}/{arm}")
    model.eval()
    m = {"block_signal_mass": _block_mass(model, split.x_test, split.y_test, region),
         "block_test_acc": accuracy(model, split.x_test, split.y_test),
         "block_robust_acc": robust_accuracy(model, split.x_test, split.y_test, attack)}
    return m, {"block_train_loss": hist.series("train_loss")}, name


def diffroar_part(arm: str, ctx: RunContext, dev) -> tuple[dict, dict]:
    split = load_digits_split().to(dev)
    epochs = ctx.pick(smoke=2, quick=20, full=40)
    eps = 1.0
    attack = PGD(eps=eps, norm="l2", steps=7, step_size=2.5 * eps / 7, random_start=True)
    gen = seed_everything(ctx.seed)
    model = mlp((64, 64, 10)).to(dev)
    _train(model, split.x_train, split.y_train, epochs=epochs, batch_size=64, lr=1e-3, gen=gen, ctx=ctx,
           attack=attack if arm == OURS else None, desc=f"{SLUG}/digits/{arm}")
    model.eval()
    a_tr = input_gradient(model, split.x_train, split.y_train, target="loss")
    a_te = input_gradient(model, split.x_test, split.y_test, target="loss")

    def train_fn(m, x, y, s):  # the same (standard) recipe for every retraining, from scratch
        _train(m.to(dev), x, y, epochs=epochs, batch_size=64, lr=1e-3, gen=torch.Generator().manual_seed(s))

    res = diffroar(lambda: mlp((64, 64, 10)).to(dev), train_fn, lambda m, x, y: accuracy(m, x, y),
                   split.x_train, split.y_train, split.x_test, split.y_test, a_tr, a_te, ks=KS,
                   seeds=(ctx.seed,), mask_seed=ctx.seed)
    m = {"digits_test_acc": accuracy(model, split.x_test, split.y_test),
         "digits_robust_acc": robust_accuracy(model, split.x_test, split.y_test, attack)}
    for k in KS:
        tag = f"k{round(100 * k)}"
        m[f"diffroar_{tag}"] = res.diffroar[k]
        m[f"acc_top_{tag}"] = res.acc_top[k]
        m[f"acc_bottom_{tag}"] = res.acc_bottom[k]
    return m, {"diffroar": [res.diffroar[k] for k in KS]}


# ------------------------------------------------------------------------------------ smoke checks
def toy_checks(seed: int, dev) -> dict[str, float]:
    """Spec smoke checks: exact mask sizes; DiffROAR of a random vs the true-feature attribution on a toy
    problem (feature 0 = label signal, feature 1 = pure noise; k = 50%)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(3, 64)
    counts = [int(attribution_mask(x, torch.rand(3, 64, generator=g), k, keep, fill=0.0).sum(1).max())
              - n_kept(k, 64) for k in (0.05, 0.37, 0.5) for keep in ("top", "bottom")]

    def toy(n):
        y = torch.randint(0, 2, (n,), generator=g)
        return torch.stack([(2.0 * y - 1) + 0.3 * torch.randn(n, generator=g), torch.randn(n, generator=g)], 1), y

    xtr, ytr = toy(400)
    xte, yte = toy(2000)
    xtr, ytr, xte, yte = (t.to(dev) for t in (xtr, ytr, xte, yte))

    def train_fn(m, xx, yy, s):
        _train(m, xx, yy, epochs=10, batch_size=50, lr=0.05, gen=torch.Generator().manual_seed(s))

    true_tr = torch.tensor([1.0, 0.0], device=dev).expand(400, 2)
    true_te = torch.tensor([1.0, 0.0], device=dev).expand(2000, 2)
    rand_tr = torch.rand(400, 2, generator=g).to(dev)
    rand_te = torch.rand(2000, 2, generator=g).to(dev)
    kw = dict(ks=(0.5,), seeds=(seed,), mask_seed=seed)
    lin = lambda: nn.Linear(2, 2).to(dev)  # noqa: E731
    acc = lambda m, xx, yy: accuracy(m, xx, yy)  # noqa: E731
    d_true = diffroar(lin, train_fn, acc, xtr, ytr, xte, yte, true_tr, true_te, **kw).diffroar[0.5]
    d_rand = diffroar(lin, train_fn, acc, xtr, ytr, xte, yte, rand_tr, rand_te, **kw).diffroar[0.5]
    return {"mask_count_max_abs_err": float(max(abs(c) for c in counts)),
            "toy_diffroar_true_feature": d_true, "toy_diffroar_random": d_rand}


# ------------------------------------------------------------------------------------ the run
def run(ctx: RunContext) -> RunOutput:
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    t0 = time.perf_counter()
    dev = ctx.device
    real = ctx.data_root is not None
    data_name = "block-digits"
    part_seconds: dict[str, dict[str, float]] = {}
    blocks = block_data(ctx)  # loaded once, shared by both arms

    def train_arm(arm):
        nonlocal data_name
        metrics: dict[str, float] = {}
        curves: dict[str, list[float]] = {}
        times = {}
        parts = [] if real else [("synthetic", synthetic_part), ("diffroar", diffroar_part)]
        for part, fn in parts:
            t = time.perf_counter()
            m, c = fn(arm, ctx, dev)
            metrics.update(m)
            curves.update(c)
            times[part] = time.perf_counter() - t
        t = time.perf_counter()
        m, c, data_name = block_part(arm, ctx, dev, blocks)
        metrics.update(m)
        curves.update(c)
        times["blocks"] = time.perf_counter() - t
        part_seconds[arm] = {k: round(v, 3) for k, v in times.items()}
        return metrics, curves

    metrics, curves, seconds = run_arms(ARMS, train_arm)
    info = {"seconds_per_arm": seconds, "seconds_per_part": part_seconds, "ks_percent": [round(100 * k) for k in KS],
            "settings": {"synthetic": "d=10, width " + str(ctx.pick(smoke=256, quick=2000, full=25000))
                         + ", SGD lr 0.1, batch " + str(ctx.pick(smoke=50, quick=50, full=250)),
                         "blocks": "MLP, Adam 1e-3, linf PGD 10 steps", "diffroar": "MLP 64-64-10, Adam 1e-3, "
                         "l2 PGD eps 1.0 7 steps"}}
    if not real:
        info["checks"] = toy_checks(ctx.seed, dev)
        info["curve_axes"] = {"diffroar": {"xlabel": "% of features kept", "x": [round(100 * k) for k in KS]}}
    info["seconds_total"] = round(time.perf_counter() - t0, 3)
    return RunOutput(metrics=metrics, data=data_name, curves=curves, info=info)


def _criterion() -> AllOf:
    return AllOf(
        AtLeast(metric="syn_top1_hit", arm=OURS, value=0.9),
        AtMost(metric="syn_top1_hit", arm=BASELINE, value=0.5),
        # strictly greater: 0.001 is one test point of 1,000
        Gain(metric="syn_bottom1_hit", ours=BASELINE, baseline=OURS, at_least=0.001),
        Gain(metric="block_signal_mass", ours=OURS, baseline=BASELINE, at_least=0.15),
        # strictly greater: one of 360 test points is 0.28 points, divided by 3 seeds ~0.09
        Gain(metric="diffroar_k10", ours=OURS, baseline=BASELINE, at_least=0.01),
        Gain(metric="diffroar_k20", ours=OURS, baseline=BASELINE, at_least=0.01),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Do Input Gradients Highlight Discriminative Features?",
    arxiv="2102.12781",
    statement="Input gradients of adversarially (PGD) trained models highlight the discriminative features and "
              "those of standard models do not: on x = y*e_j synthetic data the robust model's largest |gradient| "
              "is the signal coordinate (hit rate >= 0.9) while the standard model's is not (<= 0.5) and its "
              "smallest |gradient| hits the signal more often than the robust model's; on BlockDigits the robust "
              "model puts >= 15 points more of its |gradient| mass on the digit block; DiffROAR on digits is "
              "higher for the robust model at 10% and 20% of features kept.",
    paper_figure="Synthetic (official notebook): AQ(k=1) = -0.521 standard vs 1.000 robust FCN; CIFAR-10 / "
                 "ImageNet-10 / SVHN: DiffROAR <= 0 for standard models at small k, clearly > 0 for l2/linf-robust "
                 "models (Fig. 2/3); BlockMNIST: standard gradients leak onto the null block, robust ones focus on "
                 "the digit.",
    criterion=_criterion(),
    data_criteria={"block-mnist": Gain(metric="block_signal_mass", ours=OURS, baseline=BASELINE, at_least=0.15)},
    primary=Primary(metric="block_signal_mass", ours=OURS, baseline=BASELINE, unit="fraction"),
    run=run,
    uses=(
        "gradkit.probes.input_gradients.input_gradient",
        "gradkit.probes.input_gradients.InputGradient",
        "gradkit.probes.input_gradients.attribution_mask",
        "gradkit.probes.input_gradients.diffroar",
        "gradkit.probes.input_gradients.gradient_mass_in_region",
        "gradkit.probes.input_gradients.top_hit_rate",
        "gradkit.robustness.pgd.PGD",
        "gradkit.robustness.pgd.pgd_train",
        "gradkit.robustness.pgd.robust_accuracy",
        "gradkit.data.blocks.block_digits",
        "gradkit.data.blocks.block_mnist",
        "gradkit.data.blocks.signal_coordinate_synthetic",
    ),
    real_data="MNIST (mnist/ under --data-root): BlockMNIST 56x28 (digit 0 vs 1 over/under a fixed 4-px "
              "checkerboard), 5,000 train / 1,000 test, MLP 1568-256-2, standard vs linf PGD (eps 0.3, 10 steps); "
              "only the block-mass check runs.",
    notes="Quick-scale synthetic deviates from the spec for the CPU budget: batch 50 on 2,000 "
          "training points (spec batch 250 on 10,000; width 2000 as in the spec) for 100 epochs, i.e. the same 4,000 SGD steps at "
          "a fifth of the cost (the data has only 20 distinct points, so n does not change the distribution); "
          "with batch 250 the PGD model had not fit after 40 epochs (top-1 hit 0.42). AQ(k=1) is taken as "
          "top-1 hit - bottom-1 hit (unconfirmed reading of the notebook's AQ). Block mass uses the loss "
          "gradient on test images (rows with an all-zero gradient are skipped). DiffROAR: one retraining per "
          "k and mask per seed (the seed mean is over the claim's seeds); the l2 eps 1.0 (standardised "
          "features) and the Adam recipes are our choices (unconfirmed in the spec). The sign of the standard "
          "model's DiffROAR is reported without a criterion (measured: positive on 8x8 digits, no inversion). "
          "Measured caveat: after 4,000 steps the PGD synthetic net is only ~59-86% accurate on clean data "
          "(its adversarial loss is still near ln 2; the notebook trained 500 epochs with a decaying lr), yet its "
          "largest |gradient| is the signal coordinate on every test point. Smoke checks in info['checks'].",
    plots=("diffroar", "syn_train_loss"),
))
