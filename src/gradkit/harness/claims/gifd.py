"""Claim ``gifd``: searching a generator's intermediate feature domains (GIFD) reconstructs victim images from
their gradients better than searching its latent space only, above all out of the generator's distribution.

Fang, Chen, Wang, Wang, Xia, "GIFD: A Generative Gradient Inversion Method with Feature Domain Optimization",
ICCV 2023 (arXiv 2308.04699). Laptop scale:

- Prior: a small VAE (decoder = :func:`gradkit.generative.small_generator`) trained with
  :func:`gradkit.generative.train_small_generator` on the scikit-learn digits 0-4 of the fixed train split
  (values /16 in [0, 1]); trained once per process (fixed seed) and shared by every seed.
- Victims per seed: in-distribution images (digits 0-4, test split) and out-of-distribution images (digits
  5-9), each attacked through its own randomly initialised small CNN (:class:`VictimCNN`), batch 1,
  cross-entropy gradient of all parameters shared, labels inferred from the last layer's weight gradient (iDLG).
- Arms, same budget (gradient-matching iterations, restarts, same z0 for latent and GIFD): ``pixel``
  (Inverting Gradients, preset "ig"), ``latent`` (latent-only search, preset "latent"), ``gifd`` (stages x
  iterations per stage, relative l1 radii growing with depth, stage picked by the gradient loss only).
- Metric: PSNR/SSIM/MSE to the true image. Pass: mean PSNR gifd >= latent + 1 dB on OOD victims and >= latent
  - 0.3 dB in distribution. gifd vs pixel is reported only.
- ``--data-root``: MNIST 28x28; prior trained on MNIST digits 0-4; per seed MNIST 0-4 victims (in
  distribution), MNIST 5-9 and Fashion-MNIST victims (out of distribution).

Every number is a field of :class:`GifdProtocol` / :class:`MnistProtocol` (``gradkit show gifd``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...data.real import data_folder
from ...generative.layered import LayeredGenerator, train_small_generator
from ...privacy import (PRESETS, GradientInversion, LatentSpace, PixelSpace, infer_labels, model_gradients,
                       reconstruction_metrics)
from ...privacy.gifd import GIFD
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, Drop, Gain

SLUG = "gifd"
ARMS = ("pixel", "latent", "gifd")
GROUPS = ("id", "ood", "ood_mnist", "ood_fashion")  # victim groups a run may report


# ------------------------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class _Attack(Protocol):
    latent_dim: int = 16
    prior_batch: int = 64
    prior_lr: float = 2e-3
    prior_seed: int = 0  # the prior is trained once with this seed and shared by every run seed
    stages: tuple[int, ...] = scaled(smoke=(0, 1, 2), quick=(0, 1, 2, 3))  # GIFD's generator stages, in order
    steps_per_stage: int = scaled(smoke=50, quick=100, full=250)  # budget of every arm = this x len(stages)
    restarts: int = scaled(smoke=1, quick=1, full=2)
    rho: tuple[float, ...] = scaled(smoke=(0.1, 0.25), quick=(0.1, 0.25, 0.4))  # relative l1 radii per feature stage
    timing_repeats: int = scaled(smoke=5, quick=30, full=50)  # victim forward+backward timings (cost ratio)


@dataclass(frozen=True)
class GifdProtocol(_Attack):
    """Digits 8x8: prior on digits 0-4, victims from the test split."""

    prior_epochs: int = scaled(smoke=6, quick=40, full=80)
    n_id: int = scaled(smoke=1, quick=2, full=4)  # in-distribution victims (digits 0-4)
    n_ood: int = scaled(smoke=1, quick=2, full=4)  # out-of-distribution victims (digits 5-9)


@dataclass(frozen=True)
class MnistProtocol(_Attack):
    """MNIST 28x28: prior on MNIST digits 0-4; MNIST 0-4, MNIST 5-9 and Fashion-MNIST victims."""

    prior_epochs: int = scaled(smoke=1, quick=6, full=20)
    n_prior: int = 5000  # prior images: the first MNIST training digits 0-4
    n_id: int = 1
    n_ood: int = 1  # MNIST 5-9 victims
    n_fashion: int = 1  # Fashion-MNIST victims
    fashion_pool: int = 2000  # Fashion-MNIST victims are drawn from the first test images


# ------------------------------------------------------------------------------------ model
class VictimCNN(nn.Module):
    """The attacked model: conv 8 (3x3) - conv 16 (3x3, stride 2) - FC, LeakyReLU, no BatchNorm."""

    def __init__(self, image_size: int, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.LeakyReLU(0.2)
        side = (image_size + 1) // 2
        self.fc = nn.Linear(16 * side * side, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv2(self.act(self.conv1(x)))).flatten(1))


# ------------------------------------------------------------------------------------ data and prior
@functools.lru_cache(maxsize=2)
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn digits in [0, 1] as (N, 1, 8, 8) with the same fixed 1437/360 split as load_digits_split."""
    from ...data import load_digits_images_split

    s = load_digits_images_split()
    return s.x_train, s.y_train, s.x_test, s.y_test


@functools.lru_cache(maxsize=2)
def _mnist(root: str, fashion_pool: int) -> dict:
    from ...data.readers import load_fashion_mnist, load_mnist

    path = data_folder(root, "mnist/ and fashion_mnist/")
    xtr, ytr = load_mnist(path, "train")
    xte, yte = load_mnist(path, "test")
    fte, fyte = load_fashion_mnist(path, "test")

    def t(a):
        return torch.tensor(a.astype(np.float32) / 255.0)[:, None]

    return {"x_train": t(xtr[:20000]), "y_train": torch.tensor(ytr[:20000].astype(np.int64)),
            "x_test": t(xte), "y_test": torch.tensor(yte.astype(np.int64)), "f_test": t(fte[:fashion_pool]),
            "fy_test": torch.tensor(fyte[:fashion_pool].astype(np.int64))}


_PRIORS: dict = {}


def _prior(ctx: ArmContext, images: torch.Tensor, key: tuple) -> LayeredGenerator:
    """The VAE decoder, trained once per (data, prior settings, device) and shared by every seed."""
    p = ctx.p
    key = key + (p.latent_dim, p.prior_epochs, p.prior_batch, p.prior_lr, p.prior_seed, str(ctx.device))
    if key not in _PRIORS:
        _PRIORS.clear()
        _PRIORS[key] = train_small_generator(images.to(ctx.device), latent_dim=p.latent_dim, epochs=p.prior_epochs,
                                             batch_size=p.prior_batch, lr=p.prior_lr, seed=p.prior_seed,
                                             progress=ctx.progress, desc=f"{SLUG}/prior")
    return _PRIORS[key]


def _pick(rng: np.random.RandomState, idx: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in rng.choice(idx, size=k, replace=False)]


def digits_victims(p: GifdProtocol, seed: int):
    """(prior images, prior key, victims [(kind, image (1,1,H,W), label (1,))], image size) on digits 8x8."""
    rng = np.random.RandomState(seed)
    xtr, ytr, xte, yte = _digits()
    id_idx = _pick(rng, np.nonzero((yte < 5).numpy())[0], p.n_id)
    ood_idx = _pick(rng, np.nonzero((yte >= 5).numpy())[0], p.n_ood)
    victims = [("id", xte[i:i + 1], yte[i:i + 1]) for i in id_idx]
    victims += [("ood", xte[i:i + 1], yte[i:i + 1]) for i in ood_idx]
    return xtr[ytr < 5], ("digits",), victims, 8


def mnist_victims(p: MnistProtocol, seed: int, data_root):
    """The same for MNIST 28x28: MNIST 0-4 (id), MNIST 5-9 (ood_mnist) and Fashion-MNIST (ood_fashion) victims."""
    rng = np.random.RandomState(seed)
    data = _mnist(str(data_root), p.fashion_pool)
    prior = data["x_train"][data["y_train"] < 5][:p.n_prior]
    xte, yte, fte, fyte = data["x_test"], data["y_test"], data["f_test"], data["fy_test"]
    id_idx = _pick(rng, np.nonzero((yte < 5).numpy())[0], p.n_id)
    ood_idx = _pick(rng, np.nonzero((yte >= 5).numpy())[0], p.n_ood)
    f_idx = [int(rng.randint(len(fte))) for _ in range(p.n_fashion)]
    victims = [("id", xte[i:i + 1], yte[i:i + 1]) for i in id_idx]
    victims += [("ood_mnist", xte[i:i + 1], yte[i:i + 1]) for i in ood_idx]
    victims += [("ood_fashion", fte[i:i + 1], fyte[i:i + 1]) for i in f_idx]
    return prior, ("mnist", str(data_root), p.n_prior), victims, 28


# ------------------------------------------------------------------------------------ set-up
def _victim_setups(ctx: ArmContext, prior_images, key, victims, size) -> dict:
    """The prior, and per victim a fresh random-init model, its shared gradient and the inferred label."""
    gen = _prior(ctx, prior_images, key)
    setups = []
    for v, (kind, x, y) in enumerate(victims):
        torch.manual_seed(ctx.seed * 1000 + v)
        model = VictimCNN(size).to(ctx.device).eval()
        x, y = x.to(ctx.device), y.to(ctx.device)
        grads = [g.detach() for g in model_gradients(model, x, y)]
        labels = infer_labels(grads[-2], 1)
        setups.append((kind, x, y, model, grads, labels))
    return {"gen": gen, "setups": setups, "n_prior": int(len(prior_images))}


def _digits_setup(ctx: ArmContext) -> dict:
    return _victim_setups(ctx, *digits_victims(ctx.p, ctx.seed))


def _mnist_setup(ctx: ArmContext) -> dict:
    return _victim_setups(ctx, *mnist_victims(ctx.p, ctx.seed, ctx.data_root))


# ------------------------------------------------------------------------------------ arms
def _best_of(runs):
    """The run with the lowest gradient-matching loss (restarts), ties to the first."""
    return min(runs, key=lambda r: (r.match_loss if math.isfinite(r.match_loss) else math.inf))


def _groups(setups) -> dict[str, list[int]]:
    groups = {"id": [i for i, s in enumerate(setups) if s[0] == "id"],
              "ood": [i for i, s in enumerate(setups) if s[0].startswith("ood")]}
    kinds = {s[0] for s in setups}
    groups.update({k: [i for i, s in enumerate(setups) if s[0] == k] for k in ("ood_mnist", "ood_fashion") if k in kinds})
    return groups


def _attack(ctx: ArmContext) -> ArmResult:
    """One attack on every victim at the same budget; PSNR/SSIM/MSE and gradient loss per victim group."""
    p, arm, dev = ctx.p, ctx.arm, ctx.device
    gen, setups = ctx.data["gen"], ctx.data["setups"]
    budget = p.steps_per_stage * len(p.stages)
    out, more = [], []
    t0 = time.perf_counter()
    for v, (kind, x, y, model, grads, labels) in enumerate(setups):
        g = torch.Generator().manual_seed(ctx.seed * 1000 + v)
        z0 = torch.randn(p.restarts, 1, p.latent_dim, generator=g).to(dev)
        if arm == "pixel":
            preset = dataclasses.replace(PRESETS.get("ig"), iters=budget)
            runs = [GradientInversion(model, preset).run(
                grads, labels, PixelSpace(tuple(x.shape), init="rand", generator=g, device=dev))
                for _ in range(p.restarts)]
            res = _best_of(runs)
            out.append((res.x, res.match_loss, res.history[:-1]))
        elif arm == "latent":
            preset = dataclasses.replace(PRESETS.get("latent"), iters=budget)
            runs = [GradientInversion(model, preset).run(grads, labels, LatentSpace(gen, z0[r]))
                    for r in range(p.restarts)]
            res = _best_of(runs)
            out.append((res.x, res.match_loss, res.history[:-1]))
        else:
            res = GIFD(model, gen, stages=p.stages, steps_per_stage=p.steps_per_stage, rho=p.rho,
                       restarts=p.restarts).run(grads, labels, z0=z0)
            hist = [h for sr in res.stage_results for h in sr.history[:-1]]
            out.append((res.x, res.match_loss, hist))
            more.append(res)
    # the attack's own time per iteration (without scoring), for the cost ratio to a victim step
    iter_s = (time.perf_counter() - t0) / (budget * p.restarts * len(setups))
    ctx.shared[arm] = [o[0] for o in out]  # the reconstructions, for the image grids

    m: dict[str, float] = {}
    groups = _groups(setups)
    for gname, idx in groups.items():
        rm = [reconstruction_metrics(setups[i][1], out[i][0]) for i in idx]
        m[f"psnr_{gname}"] = float(np.mean([r["psnr"] for r in rm]))
        m[f"ssim_{gname}"] = float(np.mean([r["ssim"] for r in rm]))
        m[f"mse_{gname}"] = float(np.mean([r["mse"] for r in rm]))
        m[f"grad_loss_{gname}"] = float(np.mean([out[i][1] for i in idx]))
        if arm == "gifd":
            m[f"stage_{gname}"] = float(np.mean([more[i].stage for i in idx]))
            for j, k in enumerate(p.stages):
                m[f"psnr_{gname}_stage{k}"] = float(np.mean(
                    [reconstruction_metrics(setups[i][1], more[i].stage_images[j])["psnr"] for i in idx]))
    info: dict = {"iter_ms": round(1e3 * iter_s, 4)}
    if arm == "gifd":
        m["l1_ratio_max"] = float(max(max(r.l1_ratio) for r in more))
        info["selected_stages"] = [int(r.stage) for r in more]
        info["stage_losses"] = [[float(v) for v in r.stage_losses] for r in more]
    curves = {}
    for gname in ("id", "ood"):
        hs = [out[i][2] for i in groups[gname]]
        n = min(len(h) for h in hs)
        curves[f"match_loss_{gname}"] = [float(np.mean([h[t] for h in hs])) for t in range(n)]
    return ArmResult(m, curves, info)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p, setups = ctx.p, ctx.data["setups"]
    # per-iteration cost as a ratio to one forward+backward of the victim
    kind, x, y, model, grads, labels = setups[0]
    timings = []
    for _ in range(p.timing_repeats):
        t0 = time.perf_counter()
        model_gradients(model, x, y)
        timings.append(time.perf_counter() - t0)
    fwd_bwd = float(np.median(timings))
    iter_ms = {arm: a["iter_ms"] for arm, a in out.info.get("arms", {}).items() if "iter_ms" in a}

    def grid(kinds):
        idx = [i for i, s in enumerate(setups) if s[0] in kinds][:6]
        rows = {"original": [setups[i][1][0, 0].cpu().numpy().round(4).tolist() for i in idx]}
        for arm in ARMS:
            if arm in ctx.shared:
                rows[arm] = [ctx.shared[arm][i][0, 0].clamp(0, 1).cpu().numpy().round(4).tolist() for i in idx]
        return rows

    budget = p.steps_per_stage * len(p.stages)
    out.info.update({
        "victims": [s[0] for s in setups], "victim_labels": [int(s[2][0]) for s in setups],
        "label_inference_acc": 100.0 * float(np.mean([int(s[5][0] == s[2][0]) for s in setups])),
        "prior_images": ctx.data["n_prior"],
        "victim_fwd_bwd_ms": round(1e3 * fwd_bwd, 4),
        "iter_cost_ratio": {a: round(ms / (1e3 * fwd_bwd), 3) for a, ms in iter_ms.items()},
        "images": {"in-distribution": grid(("id",)),
                   "out-of-distribution": grid(("ood", "ood_mnist", "ood_fashion"))},
        "curve_axes": {c: {"xlabel": "attack iteration", "x": list(range(1, budget + 1))}
                       for c in ("match_loss_id", "match_loss_ood")},
    })


def _criterion() -> AllOf:
    return AllOf(
        Gain(metric="psnr_ood", ours="gifd", baseline="latent", at_least=1.0),
        Drop(metric="psnr_id", ours="gifd", baseline="latent", at_most=0.3),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="GIFD: A Generative Gradient Inversion Method with Feature Domain Optimization",
    arxiv="2308.04699",
    statement="Searching a generator's intermediate feature domains (l1-bounded, stage chosen by the gradient "
              "loss) reconstructs a victim's input from its shared gradient better than searching the latent "
              "only: mean PSNR >= latent + 1 dB on out-of-distribution victims and no worse than latent - 0.3 dB "
              "in distribution, at the same iteration budget.",
    paper_figure="GIFD beats IG, GGL and GIAS in PSNR/SSIM/LPIPS on ImageNet (BigGAN prior) and FFHQ (StyleGAN2), "
                 "batch 1 and larger, in and out of distribution (GAN trained on ImageNet, victims from FFHQ/CIFAR), "
                 "and under defenses; deeper feature domains give better fidelity up to a point.",
    protocol=GifdProtocol,
    data="digits",
    setup=_digits_setup,
    arms={arm: _attack for arm in ARMS},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="psnr_ood", ours="gifd", baseline="latent", unit="dB"),
    control_note="latent-only search (GIFD without its feature domains, same z0 and budget) stands in for GIFD",
    variants=(
        Variant(name="mnist+fashion",
                description="mnist/ + fashion_mnist/: 28x28, prior on MNIST digits 0-4; MNIST 0-4 victims in "
                            "distribution, MNIST 5-9 and Fashion-MNIST victims out of distribution",
                protocol=MnistProtocol, setup=_mnist_setup),
    ),
    uses=(
        "gradkit.privacy.gifd.GIFD",
        "gradkit.privacy.gifd.FeatureSpace",
        "gradkit.privacy.gifd.project_l1_ball",
        "gradkit.privacy.gifd.feature_radius",
        "gradkit.privacy.GradientInversion",
        "gradkit.privacy.LatentSpace",
        "gradkit.privacy.PixelSpace",
        "gradkit.privacy.infer_labels",
        "gradkit.privacy.reconstruction_metrics",
        "gradkit.generative.LayeredGenerator",
        "gradkit.generative.small_generator",
        "gradkit.generative.train_small_generator",
    ),
    notes="Laptop-scale stand-in for BigGAN/StyleGAN2 + ResNet-18: an in-library VAE decoder (no downloaded GAN) "
          "and a random-init small CNN victim, batch 1. Feature radii are relative (r_k = rho_k ||h_k^init||_1, "
          "growing with depth) because the official absolute radii only fit BigGAN/StyleGAN feature "
          "sizes. No KLD term on z (BigGAN-specific); the spherical projection keeps ||z|| at its start value. "
          "Each stage starts from the previous stage's best iterate, so the per-stage gradient loss never rises "
          "and the deepest stage is usually selected. The victim's FC weight gradient exposes its features "
          "exactly at batch 1, so pixel-space IG is very strong on 8x8 images (reported, not part of the rule). "
          "info['iter_cost_ratio'] gives each attack's cost per iteration relative to one forward+backward of "
          "the victim.",
    plots=("match_loss_ood", "match_loss_id"),
    bounds={**{f"psnr_{g}": (-math.inf, 100.0) for g in GROUPS}, **{f"ssim_{g}": (-1.0, 1.0) for g in GROUPS},
            **{f"mse_{g}": (0.0, math.inf) for g in GROUPS}},
))
