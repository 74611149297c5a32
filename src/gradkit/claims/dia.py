"""Claim ``dia``: dropout does not stop gradient inversion once the masks are modelled (DIA vs IG).

Scheliga, Mäder, Seeland, "Dropout is NOT All You Need to Prevent Gradient Leakage", AAAI 2023
(arXiv 2208.06163). Protocol (spec ``papers/dia.md``), per seed and dropout rate p:

- scikit-learn digits scaled to [0, 1] (8x8 images); the victim images are drawn by the seed (the same
  images for every p); victim batch 1, labels known (as in the official code).
- Victim: MLP 64-128-128-10, GELU, MaskableDropout after each hidden activation, no biases (the paper's
  example config), random init seeded by the seed (the same weights for every p). The client gradient is
  taken in train mode with freshly drawn Bernoulli(1 - p) masks.
- Arms (each 400 iterations, Adam lr 0.1, signed data gradient, TV 1e-5, cosine over all parameters,
  pixels clamped to [0, 1], best-matching iterate kept; the same random init for every arm):
  ``ig_p*`` Inverting Gradients as in the paper's code (attacker model in eval mode: no dropout),
  ``dia_p*`` DIA (masks optimised jointly, mask regularizer 1e-4, Bernoulli init), ``whitebox_p*`` IG with
  the client's true masks replayed (upper bound). Informative: ``ig_train_p50`` (attacker in train mode, a
  fresh mask every iteration; first image only) and ``dia_p0`` (p = 0: DIA falls back to IG; first image).
- Metrics per arm: medians over the seed's images of MSE, PSNR, SSIM and the best matching loss; DIA
  arms also report the recovered masks' mean and their agreement with the true masks.
- ``--data-root``: MNIST test images (28x28 in [0, 1]), MLP 784-128-128-10, p = 0.5, 2 images per seed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from ..data.real import data_folder
from ..engine import cpu_threads, seed_everything
from ..nn.maskable_dropout import DropoutMLP
from ..privacy.dia import DIA_IG_PRESET, DIA_IG_TRAIN_PRESET, DIA_PRESET, DropoutInversionAttack, client_gradients
from ..privacy.inversion import GradientInversion, PixelSpace
from ..privacy.metrics import mse, psnr, ssim
from .base import Claim, Primary, RunContext, RunOutput, register
from .criteria import AllOf, AtLeast, Gain

SLUG = "dia"
CURVE_EVERY = 5


def _tag(p: float) -> str:
    return f"p{int(round(p * 100))}"


def _images(data_root) -> tuple[torch.Tensor, torch.Tensor, str]:
    """All candidate victim images (N, 1, H, W) in [0, 1], their labels and the data set's name."""
    if data_root is None:
        from ..data import digits_images

        x, y = digits_images()
        return x, y, "digits"
    root = data_folder(data_root, "mnist/")
    from ..data.readers import load_mnist

    xs, ys = load_mnist(root, "test")
    x = torch.from_numpy(xs.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(ys.astype(np.int64)), "mnist"


def _gen(*key: int) -> torch.Generator:
    s = 0
    for k in key:
        s = (s * 1_000_003 + int(k)) % (2**62)
    return torch.Generator().manual_seed(s)


def _running_best(history: list[float], length: int) -> list[float]:
    out, best = [], float("inf")
    for v in history:
        best = min(best, v)
        out.append(best)
    out += [best] * (length - len(out))
    return out[:length]


def _summary(records: list[dict]) -> dict[str, float]:
    med = lambda k: float(statistics.median(r[k] for r in records))  # noqa: E731
    out = {"mse": med("mse"), "psnr": med("psnr"), "ssim": med("ssim"), "match_loss": med("match_loss"),
           "mse_mean": float(np.mean([r["mse"] for r in records])), "images": float(len(records))}
    if "mask_mean" in records[0]:
        out["mask_mean"] = float(np.mean([r["mask_mean"] for r in records]))
        out["mask_agreement"] = float(np.mean([r["mask_agreement"] for r in records]))
    return out


def _score(x: torch.Tensor, res, **extra) -> dict:
    xh = res.x.to(x.device, x.dtype)
    return {"mse": float(mse(x, xh)[0]), "psnr": float(psnr(x, xh)[0]), "ssim": float(ssim(x, xh)[0]),
            "match_loss": float(res.match_loss), "x_hat": xh[0, 0].cpu(), "history": res.history, **extra}


def _mask_stats(snap: dict, true_masks) -> dict:
    est = [snap[f"mask{i}"] for i in range(len(snap))]
    total = sum(m.numel() for m in est)
    mean = float(sum(m.sum() for m in est) / total)
    agree = float(sum(((m >= 0.5).to(t.dtype) == t).sum() for m, t in zip(est, true_masks)) / total)
    return {"mask_mean": mean, "mask_agreement": agree}


def run(ctx: RunContext) -> RunOutput:
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    t_start = time.perf_counter()
    real = ctx.data_root is not None
    images, labels, data_name = _images(ctx.data_root)
    iters = ctx.pick(smoke=150, quick=400, full=2000)
    if real:
        rates, n_img, widths = (0.5,), ctx.pick(smoke=1, quick=2, full=8), (128, 128)
    else:
        rates = ctx.pick(smoke=(0.25, 0.5), quick=(0.25, 0.5), full=(0.1, 0.25, 0.5, 0.75))
        n_img = ctx.pick(smoke=2, quick=3, full=8)
        widths = ctx.pick(smoke=(64, 64), quick=(128, 128), full=(128, 128))
    extras = not real and ctx.scale != "smoke"  # ig_train at p=0.5 and the p=0 fallback, one image each
    dev = ctx.device
    seed_everything(ctx.seed)
    idx = np.random.RandomState(ctx.seed).choice(len(images), n_img, replace=False)
    xs, ys = images[idx].to(dev), labels[idx].to(dev)
    shape = (1, *xs.shape[1:])
    in_features = int(np.prod(xs.shape[1:]))
    presets = {"dia": replace(DIA_PRESET, iters=iters), "ig": replace(DIA_IG_PRESET, iters=iters),
               "ig_train": replace(DIA_IG_TRAIN_PRESET, iters=iters)}

    records: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}

    def attack(arm: str, fn, k: int, x: torch.Tensor, **extra_stats) -> None:
        seed_everything(ctx.seed)
        space = PixelSpace(shape, init="randn", clamp=(0.0, 1.0), generator=_gen(ctx.seed, 1, k), device=dev)
        t0 = time.perf_counter()
        res = fn(space)
        seconds[arm] = seconds.get(arm, 0.0) + time.perf_counter() - t0
        rec = _score(x, res)
        if "true_masks" in extra_stats:
            rec.update(_mask_stats(res.snapshots["extra0"], extra_stats["true_masks"]))
        records.setdefault(arm, []).append(rec)

    for pi, p in enumerate(list(rates) + ([0.0] if extras else [])):
        tag = _tag(p)
        torch.manual_seed(ctx.seed)  # the same victim weights for every p
        model = DropoutMLP(in_features, widths, 10, p=p, bias=False).to(dev)
        dia = DropoutInversionAttack(model, preset=presets["dia"])
        ig = GradientInversion(model, preset=presets["ig"])
        ig_train = GradientInversion(model, preset=presets["ig_train"])
        for k in range(n_img if p > 0 else 1):
            x, y = xs[k:k + 1], ys[k:k + 1]
            grads, true_masks = client_gradients(model, x, y, generator=_gen(ctx.seed, 2, pi, k))
            if p == 0:  # DIA without active dropout is IG (fallback), reported once
                attack(f"dia_{tag}", lambda s: dia.run(grads, y, s), k, x)
                continue
            attack(f"ig_{tag}", lambda s: ig.run(grads, y, s), k, x)
            attack(f"dia_{tag}", lambda s: dia.run(grads, y, s, generator=_gen(ctx.seed, 3, pi, k)), k, x,
                   true_masks=true_masks)
            attack(f"whitebox_{tag}", lambda s: dia.run_white_box(grads, y, s, true_masks), k, x)
            if extras and p == 0.5 and k == 0:
                attack(f"ig_train_{tag}", lambda s: ig_train.run(grads, y, s), k, x)

    metrics = {arm: _summary(recs) for arm, recs in records.items()}
    n_pts = iters // CURVE_EVERY + 1
    curves = {"log10_match_loss": {}}
    for arm, recs in records.items():
        runs = [_running_best(r["history"], iters + 1) for r in recs]
        med = [float(statistics.median(col)) for col in zip(*runs)]
        pts = med[::CURVE_EVERY][:n_pts]
        curves["log10_match_loss"][arm] = [round(float(np.log10(max(v, 1e-12))), 5) for v in pts]
    grids = {}
    for p in rates:
        tag = _tag(p)
        grid = {"original": [np.round(xs[k, 0].cpu().numpy(), 4).tolist() for k in range(n_img)]}
        for name in ("ig", "dia", "whitebox"):
            grid[name] = [np.round(r["x_hat"].numpy().clip(0, 1), 4).tolist() for r in records[f"{name}_{tag}"]]
        grids[f"reconstructions_{tag}"] = grid
    info = {
        "images": grids,
        "iterations": iters, "victim_images": [int(i) for i in idx], "labels": [int(v) for v in ys.cpu()],
        "rates": list(rates), "mlp": [in_features, *widths, 10], "activation": "GELU", "bias": False,
        "per_image": {arm: {k: [round(r[k], 8) for r in recs] for k in ("mse", "psnr", "match_loss")}
                      for arm, recs in records.items()},
        "curve_axes": {"log10_match_loss": {
            "xlabel": "attack iteration (log10 of the best matching loss so far, median over images)",
            "x": list(range(0, iters + 1, CURVE_EVERY))[:n_pts]}},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "seconds_per_iteration": {k: round(v / (len(records[k]) * iters), 6) for k, v in seconds.items()},
        "seconds_total": round(time.perf_counter() - t_start, 3),
    }
    return RunOutput(metrics=metrics, data=data_name, curves=curves, info=info)


def _criterion(rates) -> AllOf:
    checks = []
    for p in rates:
        t = _tag(p)
        checks.append(Gain(metric="psnr", ours=f"dia_{t}", baseline=f"ig_{t}", at_least=10.0))
    for p in rates:
        checks.append(AtLeast(metric="psnr", arm=f"dia_{_tag(p)}", value=25.0))
    return AllOf(*checks)


CLAIM = register(Claim(
    slug=SLUG,
    title="Dropout is NOT All You Need to Prevent Gradient Leakage",
    arxiv="2208.06163",
    statement="With the client's dropout masks optimised jointly with the data, gradient inversion of a dropout "
              "MLP recovers the victim image: the median MSE of DIA is <= 0.1x that of Inverting Gradients "
              "(median PSNR >= 10 dB higher) at p = 0.25 and p = 0.5, and DIA's median PSNR is >= 25 dB.",
    paper_figure="IG fails as soon as dropout is active while DIA reconstructs with high fidelity for every "
                 "dropout rate tested; demo (ViT, CIFAR-10, p=0.5, batch 1): MSE IG ~3.5 vs DIA ~0.014 per "
                 "image (normalized space).",
    criterion=_criterion((0.25, 0.5)),
    data_criteria={"mnist": _criterion((0.5,))},
    primary=Primary(metric="mse", ours="dia_p50", baseline="ig_p50", unit="MSE"),
    run=run,
    uses=(
        "gradkit.nn.maskable_dropout.MaskableDropout",
        "gradkit.nn.maskable_dropout.DropoutMLP",
        "gradkit.privacy.dia.DropoutInversionAttack",
        "gradkit.privacy.dia.DropoutMaskSpace",
        "gradkit.privacy.dia.client_gradients",
        "gradkit.privacy.dia.DIAPreset",
        "gradkit.privacy.GradientInversion",
        "gradkit.privacy.PixelSpace",
        "gradkit.privacy.metrics.psnr",
    ),
    real_data="MNIST test images (mnist/ under --data-root): 28x28 in [0, 1], MLP 784-128-128-10, p = 0.5, "
              "2 victim images per seed, same arms (IG, DIA, white-box) and pass rule.",
    notes="Laptop-scale stand-in for the paper's MNIST/CIFAR-10/ImageNet MLP and ViT experiments: 8x8 digits, "
          "a randomly initialised GELU MLP without biases (the paper's example config), batch 1, labels known, "
          "400 iterations instead of the official 20k (the official ReduceLROnPlateau(0.1, patience 800) and "
          "4000-iteration early-stop patience would not act within 400 iterations). Metrics are medians over each seed's images; the criterion "
          "averages them over seeds. 'PSNR(DIA) >= PSNR(IG) + 10 dB' on median PSNR is the spec's 'median "
          "MSE(DIA) <= 0.1 x median MSE(IG)' (PSNR = -10 log10 MSE on [0, 1] images), averaged over seeds in "
          "log space. PSNR is capped at 100 dB. mask_agreement: fraction of mask entries where the recovered "
          "mask thresholded at 0.5 equals the client's mask. ig_train_p50 (attacker in train mode) and dia_p0 "
          "(no dropout: DIA is IG) run on the first image only and are informative.",
    plots=("log10_match_loss",),
))
