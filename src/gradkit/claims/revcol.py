"""Claim ``revcol``: reversible columns keep saved activations flat in the number of columns.

Cai et al., "Reversible Column Networks", ICLR 2023 (arXiv 2212.11696). Arms: ``revcol`` (the
reversible column stack, one autograd Function over all columns: ``strict=True``) and ``twin``
(the same network, same weights, plain autograd). One run measures, per seed:

- memory: exact saved-tensor bytes (:class:`gradkit.testing.SavedBytesMeter`) of one forward of a
  tiny RevCol (channels 8-16-32-64, one ConvNeXt block per level, batch 64) with N columns, for
  N = 2..16 (smoke: 2, 4); ``bytes_growth`` = bytes(N_max) / bytes(N_min). The official per-column
  Function (``strict=False``) is measured too: its growth per column over the bytes of one column's
  4 output maps is ``nonstrict_growth_ratio`` (must be <= 1);
- exactness (batch 4, layer scale 0.1 and drop-path 0.1 so blocks and RNG replay matter): max
  relative parameter-gradient error of both reversible modes vs the twin at N = 4 (float64 and
  float32; float32 also at N_max, reported only), and the relative error of rebuilding column 1's
  outputs from column N_max's (alpha 0.5) in float64 and float32;
- accuracy: sklearn digits upsampled to 16x16, N = 4, AdamW lr 2e-3, 15 epochs, batch 64.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..data import TensorBatches, load_digits_split
from ..engine import accuracy, cpu_threads, fit, seed_everything
from ..nn.revcol import RevColNet
from ..nn.reversible import run_steps
from ..testing import SavedBytesMeter, param_grads
from .base import Claim, Primary, RunContext, RunOutput, register
from .criteria import AllOf, AtLeast, AtMost, Below, Drop

SLUG = "revcol"
OURS, BASELINE = "revcol", "twin"
CHANNELS, BLOCKS = (8, 16, 32, 64), (1, 1, 1, 1)


def _net(num_columns: int, *, reversible: bool, strict: bool = True, stem: int = 2, **kw) -> RevColNet:
    return RevColNet(1, 10, channels=CHANNELS, blocks=BLOCKS, num_columns=num_columns, stem=stem,
                     reversible=reversible, strict=strict, **kw)


def _digits(side: int, device: torch.device):
    d = load_digits_split()

    def img(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        if side != 8:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return x.to(device)

    return img(d.x_train), d.y_train.to(device), img(d.x_test), d.y_test.to(device)


def saved_bytes(num_columns: int, mode: str, x: torch.Tensor, stem: int) -> int:
    """Saved-tensor bytes of one forward (mode: 'twin', 'strict' or 'per_column')."""
    torch.manual_seed(0)
    net = _net(num_columns, reversible=mode != "twin", strict=mode == "strict", stem=stem).to(x.device)
    with SavedBytesMeter() as meter:
        out = net(x)
    del out
    return meter.bytes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def grad_error(num_columns: int, x: torch.Tensor, y: torch.Tensor, stem: int,
               dtype: torch.dtype = torch.float64, seed: int = 0) -> float:
    """Max over parameters of max|g_rev - g_twin| / max|g_twin| (both reversible modes)."""
    torch.manual_seed(seed)
    net = _net(num_columns, reversible=False, stem=stem, layer_scale=0.1, drop_path=0.1).to(x.device, dtype)

    def loss(m):
        torch.manual_seed(seed + 1)
        return F.cross_entropy(m(x.to(dtype)), y)

    ref = param_grads(net, loss)
    err = 0.0
    for strict in (True, False):
        net.columns.reversible, net.columns.strict = True, strict
        got = param_grads(net, loss)
        err = max(err, max(_rel(got[k], ref[k]) for k in ref if ref[k].abs().max() > 0))
    return err


@torch.no_grad()
def reconstruction_error(num_columns: int, x: torch.Tensor, stem: int, dtype: torch.dtype,
                         seed: int = 0) -> float:
    """Relative error of rebuilding column 1's outputs from column N's outputs."""
    torch.manual_seed(seed)
    net = _net(num_columns, reversible=False, stem=stem).to(x.device, dtype)
    h = net.stem(x.to(dtype))
    stack = net.columns
    stack.clamp_alphas_()
    first = run_steps(stack.steps()[:1], h, [None] * len(stack.channels))
    rec = stack.reconstruct(h, stack(h))
    return max(_rel(r, f) for r, f in zip(rec, first))


def run(ctx: RunContext) -> RunOutput:
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    dev = ctx.device
    side, stem = ctx.pick(smoke=(8, 1), quick=(16, 2), full=(16, 2))
    cols_sweep = ctx.pick(smoke=(2, 4), quick=(2, 4, 8, 16), full=(2, 4, 8, 16))
    epochs = ctx.pick(smoke=1, quick=15, full=60)
    n_train = ctx.pick(smoke=256, quick=None, full=None)
    xtr, ytr, xte, yte = _digits(side, dev)
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]

    # ---- memory sweep (one forward per configuration)
    seed_everything(ctx.seed)
    xb = xtr[torch.randperm(len(xtr))[:64]]
    mem = {m: [saved_bytes(n, m, xb, stem) for n in cols_sweep] for m in ("twin", "strict", "per_column")}
    lo, hi = cols_sweep[0], cols_sweep[-1]
    out_bytes = len(xb) * sum(c * (side // stem // 2 ** k) ** 2 for k, c in enumerate(CHANNELS)) * xb.element_size()
    per_col = (mem["per_column"][-1] - mem["per_column"][0]) / (hi - lo)

    # ---- exactness
    seed_everything(ctx.seed)
    idx = torch.randperm(len(xtr))[:4]
    xe, ye, sd = xtr[idx], ytr[idx], ctx.seed
    n_exact = ctx.pick(smoke=2, quick=4, full=4)
    g_err = grad_error(n_exact, xe, ye, stem, seed=sd)
    g_err32 = grad_error(n_exact, xe, ye, stem, torch.float32, seed=sd)
    g_err32_hi = grad_error(hi, xe, ye, stem, torch.float32, seed=sd)
    r_err = reconstruction_error(hi, xe, stem, torch.float64, seed=sd)
    r_err32 = reconstruction_error(hi, xe, stem, torch.float32, seed=sd)
    r_err_lo = reconstruction_error(n_exact, xe, stem, torch.float64, seed=sd)
    r_err32_lo = reconstruction_error(n_exact, xe, stem, torch.float32, seed=sd)

    # ---- accuracy: same seed, same initial weights, reversible vs plain autograd
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {"test_acc": {}, "train_loss": {}, "saved_mib": {}}
    times = {}
    for arm in (OURS, BASELINE):
        gen = seed_everything(ctx.seed)
        net = _net(ctx.pick(smoke=2, quick=4, full=4), reversible=arm == OURS, stem=stem).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
        t0 = time.perf_counter()
        hist = fit(net, opt, TensorBatches(xtr, ytr, batch_size=64, generator=gen), epochs=epochs,
                   evaluate=lambda m: {"test_acc": accuracy(m, xte, yte)},
                   progress=ctx.progress, desc=f"{SLUG}/{arm}")
        times[arm] = time.perf_counter() - t0
        key = "strict" if arm == OURS else "twin"
        metrics[arm] = {"test_acc": hist.last("test_acc"), "bytes_growth": mem[key][-1] / mem[key][0],
                        f"saved_mib_n{hi}": mem[key][-1] / 2**20, f"saved_mib_n{lo}": mem[key][0] / 2**20}
        curves["test_acc"][arm] = hist.series("test_acc")
        curves["train_loss"][arm] = hist.series("train_loss")
        curves["saved_mib"][arm] = [b / 2**20 for b in mem[key]]
    curves["saved_mib"]["revcol_per_column"] = [b / 2**20 for b in mem["per_column"]]
    metrics[OURS].update({
        "grad_rel_err": g_err, "grad_rel_err_f32": g_err32, f"grad_rel_err_f32_n{hi}": g_err32_hi,
        "recon_err": r_err, "recon_err_f32": r_err32,
        f"recon_err_n{n_exact}": r_err_lo, f"recon_err_f32_n{n_exact}": r_err32_lo,
        "nonstrict_growth_ratio": per_col / out_bytes,
        "bytes_growth_per_column": mem["per_column"][-1] / mem["per_column"][0],
        "train_time_ratio": times[OURS] / times[BASELINE],
    })
    return RunOutput(metrics=metrics, data="digits", curves=curves,
                     info={"columns_sweep": list(cols_sweep), "image_side": side, "stem": stem,
                           "saved_bytes": mem, "column_output_bytes": out_bytes,
                           "exactness_columns": n_exact, "reconstruction_columns": hi, "epochs": epochs,
                           "train_seconds": times,
                           "curve_axes": {"saved_mib": {"xlabel": "columns", "x": list(cols_sweep)}}})


def _criterion():
    return AllOf(
        AtMost("bytes_growth", OURS, 1.15),
        AtLeast("bytes_growth", BASELINE, 5.0),
        AtMost("nonstrict_growth_ratio", OURS, 1.0),
        Below("grad_rel_err", OURS, 1e-8),
        Below("grad_rel_err_f32", OURS, 1e-4),
        Below("recon_err", OURS, 1e-10),
        Below("recon_err_f32", OURS, 1e-3),
        Drop("test_acc", OURS, BASELINE, 1.5),
        Drop("test_acc", BASELINE, OURS, 1.5),
        AtLeast("test_acc", OURS, 85.0),
        AtLeast("test_acc", BASELINE, 85.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Reversible Column Networks",
    arxiv="2212.11696",
    statement="RevCol's reversible connections keep saved activations flat in the number of columns "
              "(<= 1.15x from 2 to 16 columns while the non-reversible twin grows >= 5x), with gradients "
              "equal to the twin's (float64 rel. error < 1e-8) and the same accuracy (within 1.5 points, >= 85%).",
    paper_figure="ImageNet-1K top-1: RevCol-T 82.2% (30M params, 4.5 GFLOPs), RevCol-XL 88.2% (IN-22K); "
                 "training memory grows only marginally with the number of columns thanks to reversible "
                 "connections.",
    criterion=_criterion(),
    primary=Primary(metric="bytes_growth", ours=OURS, baseline=BASELINE, unit="x (N=16 / N=2)"),
    run=run,
    uses=(
        "gradkit.nn.reversible.MultiLevelReversibleFunction",
        "gradkit.nn.reversible.ReversibleStep",
        "gradkit.nn.revcol.ReversibleColumnStack",
        "gradkit.nn.revcol.RevColLevel",
        "gradkit.nn.revcol.RevColNet",
        "gradkit.testing.SavedBytesMeter",
    ),
    notes="Laptop-scale check of the mechanism, not of the ImageNet accuracies. The memory sweep excludes "
          "intermediate supervision heads (not reversible; the official loss adds them every N/4 columns) and "
          "counts the stem and head once. 'revcol' uses one Function over all columns (strict=True); the "
          "official per-column saving is reported as nonstrict_growth_ratio. RNG states captured for "
          "drop-path replay (5 KB each on CPU) are not saved tensors and are not counted. train_time_ratio "
          "is wall time under the machine's load (see the revcol-step benchmark for a controlled ratio). "
          "Measured finding: round-off in the inverse grows ~4x per column for this net at initialisation "
          "(alpha 0.5; the Up/Down paths re-feed reconstructed states), not 2x (= 1/alpha) as the spec assumed, "
          "so float64 reconstruction over 16 columns misses 1e-10 and float32 over 16 columns is unusable "
          "(recon_err_f32, grad_rel_err_f32_n16); 4 columns are exact (recon_err_n4, grad_rel_err_f32).",
    plots=("test_acc", "saved_mib"),
))
