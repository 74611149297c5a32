"""Mesa claim: 8-bit saved activations cut a ViT's saved bytes ~4x at fp32 with accuracy parity (slug: mesa).

Protocol (spec ``papers/mesa.md``): scikit-learn digits 8x8 scaled to [0, 1] (fixed 1437/360 split),
tiny pre-LN ViT (patch 2 -> 16 tokens + cls, dim 64, 4 heads, depth 4, MLP ratio 4) whose attention is
explicit (q k^T, softmax, A v) in both arms; the arms differ only in compression (``MesaViT(enabled=...)``).
1. Memory: exact bytes autograd saves for one training forward at batch 64 (saved-tensor hooks), Mesa 8-bit
   vs fp32 (and, reported only, vs a bf16-autocast baseline with Mesa also under autocast).
2. Gradient fidelity on one fixed batch at init: cosine of Mesa vs exact gradient for every parameter
   tensor, and the relative L2 error of the whole gradient at 4, 6 and 8 bits.
3. Accuracy: AdamW (lr 2e-3 at quick scale), batch 64, 12 epochs, paired (same init and batch order).
"""
from __future__ import annotations

import functools
import time

import torch
from torch import nn
from torch.nn import functional as F

from ..data import Split, TensorBatches
from ..engine import accuracy, cpu_threads, fit, seed_everything
from ..nn.mesa import MesaViT, set_mesa_enabled
from ..testing import SavedBytesMeter
from .base import Claim, Primary, RunContext, RunOutput, register
from .criteria import AllOf, AtLeast, AtMost, Drop, Monotonic

SLUG = "mesa"
OURS, BASELINE = "mesa", "fp32"
FIDELITY_BITS = (4, 6, 8)


@functools.lru_cache(maxsize=1)
def digits01() -> Split:
    """scikit-learn digits as 64 pixels in [0, 1], the fixed 1437/360 split of ``load_digits_split``."""
    from ..data import load_digits_images_split

    s = load_digits_images_split()
    return Split(s.x_train.flatten(1), s.y_train, s.x_test.flatten(1), s.y_test, name="digits")


def _model(cfg: dict, seed: int, device, *, enabled: bool = True, bits: int = 8) -> MesaViT:
    seed_everything(seed)
    return MesaViT(enabled=enabled, bits=bits, **cfg).to(device)


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None = None) -> int:
    """Exact bytes saved for backward by one training forward (+ loss) of ``model``; runs the backward."""
    model.train()
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else _null()
    with ctx, SavedBytesMeter() as meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.bytes


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    params = [(n, p) for n, p in model.named_parameters()]
    gs = torch.autograd.grad(F.cross_entropy(model(x), y), [p for _, p in params])
    return {n: g.detach().flatten() for (n, _), g in zip(params, gs)}


def fidelity(cfg: dict, seed: int, x: torch.Tensor, y: torch.Tensor, device) -> dict[str, float]:
    """Min per-tensor cosine (8 bit) and whole-gradient relative L2 error per bit width vs the exact grad."""
    out: dict[str, float] = {}
    for bits in FIDELITY_BITS:
        model = _model(cfg, seed, device, bits=bits)
        set_mesa_enabled(model, False)
        exact = _grads(model, x, y)
        set_mesa_enabled(model, True)
        torch.manual_seed(seed + 1000 * bits)  # stochastic-rounding draws
        approx = _grads(model, x, y)
        e = torch.cat(list(exact.values()))
        a = torch.cat(list(approx.values()))
        out[f"relerr_b{bits}"] = float((a - e).norm() / e.norm())
        if bits == 8:
            cos = [float(F.cosine_similarity(approx[n], exact[n], dim=0)) for n in exact if exact[n].norm() > 0]
            out["grad_cos_min"] = min(cos)
            out["grad_cos_mean"] = sum(cos) / len(cos)
    return out


def _train_arm(arm: str, cfg: dict, split: Split, epochs: int, lr: float, ctx: RunContext):
    gen = seed_everything(ctx.seed)
    model = MesaViT(enabled=(arm == OURS), **cfg).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = TensorBatches(split.x_train, split.y_train, batch_size=64, shuffle=True, generator=gen)
    t0 = time.perf_counter()
    hist = fit(model, opt, batches, epochs=epochs,
               evaluate=lambda m: {"test_acc": accuracy(m, split.x_test, split.y_test, batch_size=1000)},
               progress=ctx.progress, desc=f"{SLUG}/{arm}")
    secs = time.perf_counter() - t0
    ok = len(hist.records) == epochs
    metrics = {"test_acc": hist.last("test_acc") if ok else float("nan"),
               "train_loss": hist.last("train_loss"),
               "sec_per_epoch": secs / max(len(hist.records), 1)}
    return metrics, {"test_acc": hist.series("test_acc"), "train_loss": hist.series("train_loss")}


def run(ctx: RunContext) -> RunOutput:
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    if ctx.data_root is not None:
        from ..data.real import data_folder, mnist_split

        root = data_folder(ctx.data_root, "mnist/")
        split = mnist_split(root, n_train=ctx.pick(smoke=500, quick=2000, full=60000),
                            n_test=ctx.pick(smoke=1000, quick=2000, full=None), normalise="global")
        split = Split(split.x_train, split.y_train, split.x_test, split.y_test, name="mnist")
        cfg = dict(image_size=28, patch=4, in_chans=1, num_classes=10, dim=64, heads=4, mlp_ratio=4,
                   depth=ctx.pick(smoke=2, quick=4, full=4))
        epochs, lr = ctx.pick(smoke=1, quick=3, full=20), 1e-3
    else:
        split = digits01()
        cfg = dict(image_size=8, patch=2, in_chans=1, num_classes=10, dim=64, heads=4, mlp_ratio=4,
                   depth=ctx.pick(smoke=2, quick=4, full=4))
        epochs, lr = ctx.pick(smoke=1, quick=12, full=25), ctx.pick(smoke=2e-3, quick=2e-3, full=1e-3)
    split = split.to(ctx.device)
    bs = ctx.pick(smoke=32, quick=64, full=64)
    xb, yb = split.x_train[:bs], split.y_train[:bs]

    # 1. memory: exact saved bytes, one training forward
    base_model = _model(cfg, ctx.seed, ctx.device, enabled=False)
    mesa_model = _model(cfg, ctx.seed, ctx.device, enabled=True)
    b_fp32, b_mesa = saved_bytes(base_model, xb, yb), saved_bytes(mesa_model, xb, yb)
    low = torch.bfloat16
    try:
        b_half, b_mesa_half = saved_bytes(base_model, xb, yb, low), saved_bytes(mesa_model, xb, yb, low)
    except RuntimeError:  # autocast unsupported for this device/dtype
        b_half, b_mesa_half = float("nan"), float("nan")
    # 2. gradient fidelity on one fixed batch
    fid = fidelity(cfg, ctx.seed, xb, yb, ctx.device)
    # 3. accuracy, paired arms
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for arm in (BASELINE, OURS):
        m, c = _train_arm(arm, cfg, split, epochs, lr, ctx)
        metrics[arm] = m
        for name, series in c.items():
            curves.setdefault(name, {})[arm] = series
    metrics[BASELINE]["saved_mb"] = b_fp32 / 2**20
    metrics[OURS]["saved_mb"] = b_mesa / 2**20
    metrics[OURS]["bytes_ratio"] = b_mesa / b_fp32
    metrics[OURS]["bytes_ratio_bf16"] = b_mesa_half / b_half if b_half == b_half else float("nan")
    metrics[OURS]["time_ratio"] = metrics[OURS]["sec_per_epoch"] / metrics[BASELINE]["sec_per_epoch"]
    metrics[OURS].update({k: v for k, v in fid.items() if not k.startswith("relerr")})
    for bits in FIDELITY_BITS:  # one pseudo-arm per bit width so Monotonic can order them
        metrics[f"mesa_b{bits}"] = {"grad_relerr": fid[f"relerr_b{bits}"]}
    info = {"model": cfg, "epochs": epochs, "lr": lr, "optimizer": "AdamW(wd=0.01)", "batch_size": 64,
            "memory_batch": bs, "saved_bytes": {"fp32": b_fp32, "mesa": b_mesa, "bf16_autocast": b_half,
                                                "mesa_bf16_autocast": b_mesa_half},
            "n_train": len(split.y_train), "n_test": len(split.y_test), "bits": 8, "groups": cfg["heads"],
            "ema_decay": 0.9}
    return RunOutput(metrics=metrics, data=split.name, curves=curves, info=info)


def _criterion() -> AllOf:
    return AllOf(
        AtMost(metric="bytes_ratio", arm=OURS, value=0.30),
        AtLeast(metric="grad_cos_min", arm=OURS, value=0.99),
        Monotonic(metric="grad_relerr", arms=tuple(f"mesa_b{b}" for b in FIDELITY_BITS), increasing=False),
        Drop(metric="test_acc", ours=OURS, baseline=BASELINE, at_most=1.0),
        AtLeast(metric="test_acc", arm=OURS, value=88.0),
        AtLeast(metric="test_acc", arm=BASELINE, value=88.0),
    )


def _mnist_criterion() -> AllOf:
    return AllOf(
        AtMost(metric="bytes_ratio", arm=OURS, value=0.30),
        AtLeast(metric="grad_cos_min", arm=OURS, value=0.99),
        Monotonic(metric="grad_relerr", arms=tuple(f"mesa_b{b}" for b in FIDELITY_BITS), increasing=False),
        Drop(metric="test_acc", ours=OURS, baseline=BASELINE, at_most=1.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Mesa: A Memory-saving Training Framework for Transformers",
    arxiv="2111.11124",
    statement="Saving a ViT's activations as head-wise 8-bit codes (EMA ranges, stochastic rounding) cuts the "
              "bytes saved for backward to <= 0.30x of fp32, keeps every parameter's gradient at cosine >= 0.99 "
              "of the exact one (error falling with bits 4 -> 6 -> 8), and trains to within 1 point of the fp32 "
              "baseline's test accuracy (both >= 88%).",
    paper_figure="ImageNet train memory / top-1 (AMP baseline -> Mesa, batch 128): DeiT-Ti 4,171 -> 1,858 MB, "
                 "71.9 -> 72.1%; DeiT-S 8,459 -> 3,840 MB, 79.8 -> 80.0%; DeiT-B 17,691 -> 8,616 MB, 81.8 -> "
                 "81.8%; Swin-Ti 11,812 -> 5,371 MB, 81.3 -> 81.3% (~50% memory saving).",
    criterion=_criterion(),
    data_criteria={"mnist": _mnist_criterion()},
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%"),
    run=run,
    uses=(
        "gradkit.functional.compressed.ActQuantizer",
        "gradkit.functional.compressed.QLinearFn",
        "gradkit.functional.compressed.QGELUFn",
        "gradkit.functional.compressed.QSoftmaxFn",
        "gradkit.functional.compressed.QMatMulFn",
        "gradkit.functional.compressed.QLayerNormFn",
        "gradkit.nn.mesa.MesaLinear",
        "gradkit.nn.mesa.MesaAttention",
        "gradkit.nn.mesa.MesaViT",
        "gradkit.nn.mesa.mesa_convert",
        "gradkit.testing.SavedBytesMeter",
    ),
    real_data="MNIST (mnist/ under --data-root): 28x28 ViT with patch 4 (49 tokens), first 60,000 training "
              "images (2,000 at quick scale), the first 2,000 test images at quick scale (all 10,000 at full), 3 epochs at lr 1e-3 (quick); same memory/fidelity checks, accuracy "
              "checked as parity only (no absolute floor).",
    notes="Paper measures GPU memory under AMP (fp16 -> int8, ~50%); here saved-tensor bytes are counted exactly "
          "in fp32 (4 -> 1 byte, expected ~0.25x) and the bf16-autocast ratio is reported as bytes_ratio_bf16. "
          "Both arms use the same explicit attention, so they differ only in compression. Codes are clamped to "
          "[0, 255] (the official kernel wraps around above the EMA range). time_ratio is the wall time per "
          "epoch of Mesa / fp32 with Python autograd Functions on CPU (report only). The grad_relerr pseudo-arms "
          "mesa_b4/b6/b8 hold the whole-gradient relative error at each bit width. Observed in development "
          "(seed 0, quick protocol): the EMA ranges (decay 0.9, ~10-step memory) lag the fast-changing "
          "activations of early training at lr 2e-3 without warmup, values above the range are clamped, and "
          "the whole-gradient relative error rose from 0.007 at init to 0.07-0.14 around steps 20-60 (with "
          "per-batch ranges, ema_decay=0, it stayed at 0.005-0.011), and Mesa with per-batch ranges reached "
          "89.8% mean test accuracy over seeds 0-2 vs 89.5% for fp32; the paper trains with warmup and much "
          "smaller per-step changes.",
    plots=("test_acc", "train_loss"),
))
