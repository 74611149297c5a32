"""Claim ``gifd``: searching a generator's intermediate feature domains (GIFD) reconstructs victim images from
their gradients better than searching its latent space only, above all out of the generator's distribution.

Fang, Chen, Wang, Wang, Xia, "GIFD: A Generative Gradient Inversion Method with Feature Domain Optimization",
ICCV 2023 (arXiv 2308.04699). Protocol (spec ``papers/gifd.md``), laptop scale:

- Prior: a small VAE (decoder = :func:`gradkit.generative.small_generator`, stages z 16, 32x2x2, 32x4x4,
  16x8x8, image 1x8x8) trained with :func:`gradkit.generative.train_small_generator` on the scikit-learn
  digits 0-4 of the fixed train split (values /16 in [0, 1]); trained once per process (fixed seed 0) and
  shared by every seed.
- Victims per seed: 2 in-distribution images (digits 0-4, test split) and 2 out-of-distribution images
  (digits 5-9), each attacked through its own randomly initialised small CNN (conv 8 - conv 16 stride 2 -
  FC 10, LeakyReLU, no BatchNorm), batch 1, cross-entropy gradient of all parameters shared, labels inferred
  from the last layer's weight gradient (iDLG).
- Arms, same budget (400 gradient-matching iterations, 1 restart, same z0 for latent and GIFD): ``pixel``
  (Inverting Gradients, preset "ig"), ``latent`` (latent-only search, preset "latent"), ``gifd`` (4 stages x 100
  iterations, relative l1 radii 0.1/0.25/0.4, stage picked by the gradient loss only).
- Metric: PSNR/SSIM/MSE to the true image. Pass: mean PSNR gifd >= latent + 1 dB on OOD victims and >= latent
  - 0.3 dB in distribution. gifd vs pixel is reported only.
- ``--data-root``: MNIST 28x28; prior trained on 5,000 MNIST digits 0-4; per seed 1 MNIST 0-4 victim (in
  distribution), 1 MNIST 5-9 victim and 1 Fashion-MNIST victim (out of distribution).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch
from torch import nn

from ..data.real import data_folder
from ..engine import cpu_threads, seed_everything
from ..generative.layered import LayeredGenerator, train_small_generator
from ..privacy import (PRESETS, GradientInversion, LatentSpace, PixelSpace, infer_labels, model_gradients,
                       reconstruction_metrics)
from ..privacy.gifd import GIFD
from .base import Claim, Primary, RunContext, RunOutput, register, run_arms
from .criteria import AllOf, Drop, Gain

SLUG = "gifd"
ARMS = ("pixel", "latent", "gifd")
LATENT_DIM = 16


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
    from ..data import load_digits_images_split

    s = load_digits_images_split()
    return s.x_train, s.y_train, s.x_test, s.y_test


@functools.lru_cache(maxsize=2)
def _mnist(root: str) -> dict:
    from ..data.readers import load_fashion_mnist, load_mnist

    path = data_folder(root, "mnist/ and fashion_mnist/")
    xtr, ytr = load_mnist(path, "train")
    xte, yte = load_mnist(path, "test")
    fte, fyte = load_fashion_mnist(path, "test")

    def t(a):
        return torch.tensor(a.astype(np.float32) / 255.0)[:, None]

    return {"x_train": t(xtr[:20000]), "y_train": torch.tensor(ytr[:20000].astype(np.int64)),
            "x_test": t(xte), "y_test": torch.tensor(yte.astype(np.int64)), "f_test": t(fte[:2000]),
            "fy_test": torch.tensor(fyte[:2000].astype(np.int64))}


_PRIORS: dict = {}


def _prior(ctx: RunContext, images: torch.Tensor, epochs: int, key: tuple) -> LayeredGenerator:
    """The VAE decoder, trained once per (data, scale, device) with seed 0 and shared by every seed."""
    key = key + (ctx.scale, str(ctx.device))
    if key not in _PRIORS:
        _PRIORS.clear()
        _PRIORS[key] = train_small_generator(images.to(ctx.device), latent_dim=LATENT_DIM, epochs=epochs,
                                             batch_size=64, lr=2e-3, seed=0, progress=ctx.progress,
                                             desc=f"{SLUG}/prior")
    return _PRIORS[key]


def _pick(rng: np.random.RandomState, idx: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in rng.choice(idx, size=k, replace=False)]


def _victim_images(ctx: RunContext):
    """(prior images, prior epochs, prior key, victims [(kind, image (1,1,H,W), label (1,))], image size, name)."""
    rng = np.random.RandomState(ctx.seed)
    if ctx.data_root is None:
        xtr, ytr, xte, yte = _digits()
        n_id, n_ood = ctx.pick(smoke=(1, 1), quick=(2, 2), full=(4, 4))
        id_idx = _pick(rng, np.nonzero((yte < 5).numpy())[0], n_id)
        ood_idx = _pick(rng, np.nonzero((yte >= 5).numpy())[0], n_ood)
        victims = [("id", xte[i:i + 1], yte[i:i + 1]) for i in id_idx]
        victims += [("ood", xte[i:i + 1], yte[i:i + 1]) for i in ood_idx]
        epochs = ctx.pick(smoke=6, quick=40, full=80)
        return xtr[ytr < 5], epochs, ("digits",), victims, 8, "digits"
    data = _mnist(str(ctx.data_root))
    prior = data["x_train"][data["y_train"] < 5][:5000]
    xte, yte, fte, fyte = data["x_test"], data["y_test"], data["f_test"], data["fy_test"]
    (i_id,) = _pick(rng, np.nonzero((yte < 5).numpy())[0], 1)
    (i_ood,) = _pick(rng, np.nonzero((yte >= 5).numpy())[0], 1)
    i_f = int(rng.randint(len(fte)))
    victims = [("id", xte[i_id:i_id + 1], yte[i_id:i_id + 1]), ("ood_mnist", xte[i_ood:i_ood + 1], yte[i_ood:i_ood + 1]),
               ("ood_fashion", fte[i_f:i_f + 1], fyte[i_f:i_f + 1])]
    epochs = ctx.pick(smoke=1, quick=6, full=20)
    return prior, epochs, ("mnist", str(ctx.data_root)), victims, 28, "mnist+fashion"


# ------------------------------------------------------------------------------------ the run
def run(ctx: RunContext) -> RunOutput:
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _best_of(runs):
    """The run with the lowest gradient-matching loss (restarts), ties to the first."""
    return min(runs, key=lambda r: (r.match_loss if math.isfinite(r.match_loss) else math.inf))


def _run(ctx: RunContext) -> RunOutput:
    t_start = time.perf_counter()
    dev = ctx.device
    prior_images, prior_epochs, prior_key, victims, size, data_name = _victim_images(ctx)
    gen = _prior(ctx, prior_images, prior_epochs, prior_key)
    t_prior = time.perf_counter() - t_start

    stages = ctx.pick(smoke=(0, 1, 2), quick=(0, 1, 2, 3), full=(0, 1, 2, 3))
    per_stage = ctx.pick(smoke=50, quick=100, full=250)
    restarts = ctx.pick(smoke=1, quick=1, full=2)
    budget = per_stage * len(stages)
    rho = ctx.pick(smoke=(0.1, 0.25), quick=(0.1, 0.25, 0.4), full=(0.1, 0.25, 0.4))

    # victims: a fresh random-init model per victim, its shared gradient and the inferred label
    seed_everything(ctx.seed)
    setups = []
    for v, (kind, x, y) in enumerate(victims):
        torch.manual_seed(ctx.seed * 1000 + v)
        model = VictimCNN(size).to(dev).eval()
        x, y = x.to(dev), y.to(dev)
        grads = [g.detach() for g in model_gradients(model, x, y)]
        labels = infer_labels(grads[-2], 1)
        setups.append((kind, x, y, model, grads, labels))
    label_acc = 100.0 * float(np.mean([int(s[5][0] == s[2][0]) for s in setups]))

    pixel_preset = dataclasses.replace(PRESETS.get("ig"), iters=budget)
    latent_preset = dataclasses.replace(PRESETS.get("latent"), iters=budget)
    results: dict[str, list] = {}
    extra: dict[str, list] = {}
    iter_seconds: dict[str, float] = {}

    def attack(arm: str):
        seed_everything(ctx.seed)
        out, more = [], []
        t0 = time.perf_counter()
        for v, (kind, x, y, model, grads, labels) in enumerate(setups):
            g = torch.Generator().manual_seed(ctx.seed * 1000 + v)
            z0 = torch.randn(restarts, 1, LATENT_DIM, generator=g).to(dev)
            if arm == "pixel":
                runs = [GradientInversion(model, pixel_preset).run(
                    grads, labels, PixelSpace(tuple(x.shape), init="rand", generator=g, device=dev))
                    for _ in range(restarts)]
                res = _best_of(runs)
                out.append((res.x, res.match_loss, res.history[:-1]))
            elif arm == "latent":
                runs = [GradientInversion(model, latent_preset).run(grads, labels, LatentSpace(gen, z0[r]))
                        for r in range(restarts)]
                res = _best_of(runs)
                out.append((res.x, res.match_loss, res.history[:-1]))
            else:
                res = GIFD(model, gen, stages=stages, steps_per_stage=per_stage, rho=rho,
                           restarts=restarts).run(grads, labels, z0=z0)
                hist = [h for sr in res.stage_results for h in sr.history[:-1]]
                out.append((res.x, res.match_loss, hist))
                more.append(res)
        iter_seconds[arm] = (time.perf_counter() - t0) / (budget * restarts * len(setups))
        results[arm], extra[arm] = out, more

    def score(arm: str):
        attack(arm)
        m: dict[str, float] = {}
        groups = {"id": [i for i, s in enumerate(setups) if s[0] == "id"],
                  "ood": [i for i, s in enumerate(setups) if s[0].startswith("ood")]}
        if data_name != "digits":
            groups.update({k: [i for i, s in enumerate(setups) if s[0] == k] for k in ("ood_mnist", "ood_fashion")})
        for gname, idx in groups.items():
            rm = [reconstruction_metrics(setups[i][1], results[arm][i][0]) for i in idx]
            m[f"psnr_{gname}"] = float(np.mean([r["psnr"] for r in rm]))
            m[f"ssim_{gname}"] = float(np.mean([r["ssim"] for r in rm]))
            m[f"mse_{gname}"] = float(np.mean([r["mse"] for r in rm]))
            m[f"grad_loss_{gname}"] = float(np.mean([results[arm][i][1] for i in idx]))
            if arm == "gifd":
                m[f"stage_{gname}"] = float(np.mean([extra[arm][i].stage for i in idx]))
                for j, k in enumerate(stages):
                    m[f"psnr_{gname}_stage{k}"] = float(np.mean(
                        [reconstruction_metrics(setups[i][1], extra[arm][i].stage_images[j])["psnr"] for i in idx]))
        if arm == "gifd":
            m["l1_ratio_max"] = float(max(max(r.l1_ratio) for r in extra[arm]))
        curves = {}
        for gname in ("id", "ood"):
            hs = [results[arm][i][2] for i in groups[gname]]
            n = min(len(h) for h in hs)
            curves[f"match_loss_{gname}"] = [float(np.mean([h[t] for h in hs])) for t in range(n)]
        return m, curves

    metrics, curves, seconds = run_arms(ARMS, score)

    # per-iteration cost as a ratio to one forward+backward of the victim
    kind, x, y, model, grads, labels = setups[0]
    timings = []
    for _ in range(ctx.pick(smoke=5, quick=30, full=50)):
        t0 = time.perf_counter()
        model_gradients(model, x, y)
        timings.append(time.perf_counter() - t0)
    fwd_bwd = float(np.median(timings))

    def grid(kinds):
        idx = [i for i, s in enumerate(setups) if s[0] in kinds][:6]
        rows = {"original": [setups[i][1][0, 0].cpu().numpy().round(4).tolist() for i in idx]}
        for arm in ARMS:
            rows[arm] = [results[arm][i][0][0, 0].clamp(0, 1).cpu().numpy().round(4).tolist() for i in idx]
        return rows

    images = {"in-distribution": grid(("id",)),
              "out-of-distribution": grid(("ood", "ood_mnist", "ood_fashion"))}
    info = {
        "victims": [s[0] for s in setups], "victim_labels": [int(s[2][0]) for s in setups],
        "label_inference_acc": label_acc, "prior_epochs": prior_epochs, "prior_images": int(len(prior_images)),
        "stages": list(stages), "steps_per_stage": per_stage, "budget_per_arm": budget, "restarts": restarts,
        "rho": list(rho), "selected_stages": [int(r.stage) for r in extra["gifd"]],
        "stage_losses": [[float(v) for v in r.stage_losses] for r in extra["gifd"]],
        "seconds_prior": round(t_prior, 3), "seconds_per_arm": seconds,
        "victim_fwd_bwd_ms": round(1e3 * fwd_bwd, 4),
        "iter_ms": {a: round(1e3 * s, 4) for a, s in iter_seconds.items()},
        "iter_cost_ratio": {a: round(s / fwd_bwd, 3) for a, s in iter_seconds.items()},
        "images": images,
        "curve_axes": {c: {"xlabel": "attack iteration", "x": list(range(1, budget + 1))}
                       for c in ("match_loss_id", "match_loss_ood")},
        "seconds_total": round(time.perf_counter() - t_start, 3),
    }
    return RunOutput(metrics=metrics, data=data_name, curves=curves, info=info)


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
                 "and under defenses; deeper feature domains give better fidelity up to a point (exact table values "
                 "unconfirmed in the spec).",
    criterion=_criterion(),
    data_criteria={"mnist+fashion": _criterion()},
    primary=Primary(metric="psnr_ood", ours="gifd", baseline="latent", unit="dB"),
    run=run,
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
    real_data="MNIST and Fashion-MNIST (mnist/, fashion_mnist/ under --data-root): 28x28, prior (VAE decoder) "
              "trained on 5,000 MNIST digits 0-4; per seed one MNIST 0-4 victim (in distribution), one MNIST 5-9 "
              "and one Fashion-MNIST victim (out of distribution); same arms and pass rule.",
    notes="Laptop-scale stand-in for BigGAN/StyleGAN2 + ResNet-18: an in-library VAE decoder (no downloaded GAN) "
          "and a random-init small CNN victim, batch 1. Feature radii are relative (r_k = rho_k ||h_k^init||_1, "
          "rho 0.1/0.25/0.4 with depth) because the official absolute radii only fit BigGAN/StyleGAN feature "
          "sizes. No KLD term on z (BigGAN-specific); the spherical projection keeps ||z|| at its start value. "
          "Each stage starts from the previous stage's best iterate, so the per-stage gradient loss never rises "
          "and the deepest stage is usually selected. The victim's FC weight gradient exposes its features "
          "exactly at batch 1, so pixel-space IG is very strong on 8x8 images (reported, not part of the rule). "
          "info['iter_cost_ratio'] gives each attack's cost per iteration relative to one forward+backward of "
          "the victim.",
    plots=("match_loss_ood", "match_loss_id"),
))
