"""Claim ``rev-mbconv``: reversible MBConv stages keep a 3D U-Net's saved activations flat in depth.

Pendse et al., "Memory Efficient 3D U-Net with Reversible Mobile Inverted Bottlenecks for Brain
Tumor Segmentation", BrainLes 2020 (arXiv 2104.09648). Arms: ``rev_mbconv`` (every encoder/decoder
stage is one reversible Function over its RevMBConv3d blocks) and ``twin`` (the same network, same
weights, plain autograd). Each arm measures, per seed (numbers: :class:`RevMBConvProtocol`,
``gradkit show rev-mbconv``):

- memory: exact saved-tensor bytes (:class:`gradkit.testing.SavedBytesMeter`) of one forward of a
  3D U-Net over the sweep of blocks per level; ``bytes_growth`` = bytes(deepest) / bytes(shallowest).
  Fixed budget (computed once both arms ran) = the twin's bytes at ``budget_blocks``: the largest volume
  side the reversible net with ``budget_blocks`` fits in it (``volume_ratio``, in voxels) and the deepest
  n of the sweep that fits (``depth_ratio`` vs ``budget_blocks``, a lower bound: capped by the sweep);
- exactness (``rev_mbconv``): float64 relative parameter-gradient error reversible vs twin, and the
  inverse of a stage of ``inverse_blocks`` blocks (float64 and float32); the twin keeps its exact
  activations and is its own gradient reference, so its errors are 0;
- training sanity: procedural ellipsoid volumes, Adam, soft Dice + cross-entropy, mean held-out Dice
  over the regions whole / core / shell.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...data import TensorBatches
from ...data.volumes import make_ellipsoid_volumes
from ...engine import fit
from ...nn.rev_mbconv import RevMBConvUNet3d, rev_mbconv_stage
from ...testing import SavedBytesMeter, param_grads
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllOf, AtLeast, AtMost, Below, Drop

SLUG = "rev-mbconv"
OURS, BASELINE = "rev_mbconv", "twin"
IN_CH, CLASSES = 4, 3  # the ellipsoid volumes: 4 channels, labels background / shell / core


@dataclass(frozen=True)
class RevMBConvProtocol(Protocol):
    """Memory sweep, fixed-budget search, exactness checks and a short training run on ellipsoid volumes."""

    width: int = 16
    levels: int = 3
    mem_side: int = scaled(smoke=16, quick=24)
    mem_batch: int = 2
    sweep: tuple[int, ...] = scaled(smoke=(1, 2, 4), quick=(1, 2, 4, 8))
    budget_blocks: int = 2  # the fixed budget: the twin's bytes at this many blocks per level
    inverse_blocks: int = 16
    train_blocks: int = scaled(smoke=1, quick=2)
    train_side: int = 16
    n_train: int = scaled(smoke=8, quick=64)
    n_test: int = scaled(smoke=4, quick=16)
    epochs: int = scaled(smoke=1, quick=2, full=10)
    lr: float = 2e-3
    batch_size: int = 2


def _net(blocks: int, reversible: bool, width: int = 16, levels: int = 3) -> RevMBConvUNet3d:
    return RevMBConvUNet3d(IN_CH, CLASSES, width=width, levels=levels, blocks=blocks, reversible=reversible)


def saved_bytes(blocks: int, reversible: bool, side: int, batch: int = 2, device="cpu", width: int = 16,
                levels: int = 3) -> int:
    """Saved-tensor bytes of one forward of the U-Net on a ``batch x 4 x side^3`` input."""
    torch.manual_seed(0)
    net = _net(blocks, reversible, width, levels).to(device)
    x = torch.randn(batch, IN_CH, side, side, side, device=device)
    with SavedBytesMeter() as meter:
        out = net(x)
    del out
    return meter.bytes


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def grad_error(seed: int, side: int = 8, device="cpu", dtype: torch.dtype = torch.float64, blocks: int = 2) -> float:
    """Max over parameters of max|g_rev - g_twin| / max|g_twin| (U-Net width 8, ``blocks`` per level).

    Both arms in ``dtype``; the reversible net runs with its default drift check.
    """
    torch.manual_seed(seed)
    net = _net(blocks, False, width=8, levels=2).to(device, dtype)
    x = torch.randn(1, IN_CH, side, side, side, device=device, dtype=dtype)
    y = torch.randint(CLASSES, (1, side, side, side), device=device)

    def loss(m):
        return F.cross_entropy(m(x), y)

    ref = param_grads(net, loss)
    net.reversible = True
    got = param_grads(net, loss)
    return max(_rel(got[k], ref[k]) for k in ref if ref[k].abs().max() > 0)


@torch.no_grad()
def inverse_error(seed: int, dtype: torch.dtype, blocks: int = 16, device="cpu") -> float:
    """Relative error of ``stage.inverse(stage(x))`` vs ``x`` for a stage of ``blocks`` blocks."""
    torch.manual_seed(seed)
    st = rev_mbconv_stage(8, blocks).to(device, dtype)
    x = torch.randn(1, 8, 6, 6, 6, device=device, dtype=dtype)
    return _rel(st.inverse(st(x)), x)


def dice_loss(logits: torch.Tensor, y: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over the foreground classes (1..K-1), averaged; batch pooled."""
    p = logits.softmax(1)
    oh = F.one_hot(y, logits.shape[1]).movedim(-1, 1).to(p.dtype)
    dims = (0, *range(2, p.dim()))
    inter, tot = (p * oh).sum(dims), (p + oh).sum(dims)
    return 1 - ((2 * inter + eps) / (tot + eps))[1:].mean()


def region_dice(pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Hard Dice (%) of regions whole (label > 0), core (2), shell (1), pooled over the set."""
    out = {}
    for name, fn in (("whole", lambda t: t > 0), ("core", lambda t: t == 2), ("shell", lambda t: t == 1)):
        a, b = fn(pred), fn(y)
        tot = int(a.sum() + b.sum())
        out[name] = 100.0 * (2 * int((a & b).sum()) / tot if tot else 1.0)
    out["dice"] = (out["whole"] + out["core"] + out["shell"]) / 3
    return out


@torch.no_grad()
def evaluate_dice(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    was = model.training
    model.eval()
    pred = torch.cat([model(x[i:i + 4]).argmax(1) for i in range(0, len(x), 4)])
    model.train(was)
    return region_dice(pred, y)


def _loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y) + dice_loss(logits, y)


def _setup(ctx: ArmContext) -> dict:
    p, dev = ctx.p, ctx.device
    xtr, ytr = make_ellipsoid_volumes(p.n_train, p.train_side, IN_CH, seed=1000 + ctx.seed)
    xte, yte = make_ellipsoid_volumes(p.n_test, p.train_side, IN_CH, seed=2000 + ctx.seed)
    xtr, ytr, xte, yte = xtr.to(dev), ytr.to(dev), xte.to(dev), yte.to(dev)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte,
            "background": region_dice(torch.zeros_like(yte), yte)["dice"]}


def _arm(ctx: ArmContext) -> ArmResult:
    """Train (same seed, same initial weights in both arms), then the memory sweep and, for ours, exactness."""
    p, d, dev, arm = ctx.p, ctx.data, ctx.device, ctx.arm
    rev = arm == OURS
    net = _net(p.train_blocks, rev, p.width, p.levels).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    t0 = time.perf_counter()
    hist = fit(net, opt, TensorBatches(d["xtr"], d["ytr"], batch_size=p.batch_size, generator=ctx.generator),
               epochs=p.epochs, compute_loss=_loss, evaluate=lambda m: evaluate_dice(m, d["xte"], d["yte"]),
               progress=ctx.progress, desc=f"{SLUG}/{arm}")
    ctx.shared.setdefault("train_seconds", {})[arm] = time.perf_counter() - t0

    mem = [saved_bytes(n, rev, p.mem_side, p.mem_batch, dev, p.width, p.levels) for n in p.sweep]
    ctx.shared.setdefault("saved_bytes", {})[arm] = mem
    lo, hi = p.sweep[0], p.sweep[-1]
    m = {"dice": hist.last("dice"), "dice_whole": hist.last("whole"),
         "dice_core": hist.last("core"), "dice_shell": hist.last("shell"),
         "dice_margin": hist.last("dice") - d["background"],
         "bytes_growth": mem[-1] / mem[0],
         f"saved_mib_n{lo}": mem[0] / 2**20, f"saved_mib_n{hi}": mem[-1] / 2**20}
    if rev:
        m.update({"grad_rel_err": grad_error(ctx.seed, device=dev),
                  "grad_rel_err_f32": grad_error(ctx.seed, device=dev, dtype=torch.float32, blocks=p.sweep[-1]),
                  "inverse_err": inverse_error(ctx.seed, torch.float64, p.inverse_blocks, dev),
                  "inverse_err_f32": inverse_error(ctx.seed, torch.float32, p.inverse_blocks, dev)})
    else:  # plain autograd keeps the exact activations: it is its own gradient reference, nothing is inverted
        m.update({"grad_rel_err": 0.0, "grad_rel_err_f32": 0.0, "inverse_err": 0.0, "inverse_err_f32": 0.0})
    curves = {"dice": hist.series("dice"), "train_loss": hist.series("train_loss"),
              "saved_mib": [b / 2**20 for b in mem]}
    return ArmResult(m, curves)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    """The fixed-budget search (needs both arms' bytes) and the training time ratio."""
    p, dev = ctx.p, ctx.device
    mem, times = ctx.shared["saved_bytes"], ctx.shared["train_seconds"]
    sweep, nb = p.sweep, p.budget_blocks
    budget = mem[BASELINE][sweep.index(nb)] if nb in sweep else None
    fit_side, fit_bytes = p.mem_side, None
    out.metrics[OURS]["train_time_ratio"] = times[OURS] / times[BASELINE]
    if budget is not None:
        fits = [n for n, b in zip(sweep, mem[OURS]) if b <= budget]
        depth_ratio = max(fits) / nb if fits else 0.0
        # bytes are linear in voxels: predict from the measured side, then verify by measuring
        step = 2 ** (p.levels - 1)  # the U-Net needs a side divisible by this
        per_voxel = mem[OURS][sweep.index(nb)] / p.mem_side ** 3
        side = p.mem_side
        while per_voxel * (side + step) ** 3 <= budget:
            side += step
        while side > step:
            b = saved_bytes(nb, True, side, p.mem_batch, dev, p.width, p.levels)
            if b <= budget:
                fit_side, fit_bytes = side, b
                break
            side -= step
        out.metrics[OURS].update({"volume_ratio": (fit_side / p.mem_side) ** 3, "depth_ratio": depth_ratio,
                                  "fit_side": float(fit_side)})
        # the twin at its own budget: the volume it was measured on, by definition
        out.metrics[BASELINE]["volume_ratio"] = 1.0
    out.info.update({"saved_bytes": mem, "budget_bytes": budget, "fit_side": fit_side, "fit_bytes": fit_bytes,
                     "background_dice": ctx.data["background"],
                     "train_steps": p.epochs * ((p.n_train + p.batch_size - 1) // p.batch_size),
                     "train_seconds": times,
                     "curve_axes": {"saved_mib": {"xlabel": "blocks per level", "x": list(sweep)}}})


def _criterion():
    return AllOf(
        AtMost("bytes_growth", OURS, 1.2),
        AtLeast("bytes_growth", BASELINE, 3.0),
        AtLeast("volume_ratio", OURS, 1.5),
        Below("grad_rel_err", OURS, 1e-8),
        Below("inverse_err", OURS, 1e-10),
        AtMost("grad_rel_err_f32", OURS, 1e-3),
        Drop("dice", OURS, BASELINE, 3.0),
        Drop("dice", BASELINE, OURS, 3.0),
        AtLeast("dice_margin", OURS, 20.0),
        AtLeast("dice_margin", BASELINE, 20.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Rev-MBConv: Memory Efficient 3D U-Net with Reversible Mobile Inverted Bottlenecks",
    version=2,
    arxiv="2104.09648",
    statement="Reversible MBConv stages keep a 3D U-Net's saved activations flat in depth (<= 1.2x from the "
              "shallowest to the deepest stage of the blocks-per-level sweep while the non-reversible twin grows "
              ">= 3x), so a fixed memory budget fits a >= 1.5x larger volume; gradients equal the twin's "
              "(float64 rel. error < 1e-8; float32 at the deepest sweep <= 1e-3) and held-out Dice matches it "
              "(within 3 points, both >= all-background + 20).",
    paper_figure="At a fixed memory budget, vs the corresponding non-reversible network: up to 3x larger input "
                 "volumes, 25% more depth, or up to 2x the channels (BraTS 2020, 240x240x155x4 volumes).",
    protocol=RevMBConvProtocol,
    data="ellipsoids3d",
    setup=_setup,
    arms={OURS: _arm, BASELINE: _arm},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="bytes_growth", ours=OURS, baseline=BASELINE,
                    unit="x (deepest / shallowest blocks per level)"),
    control_note="the same network and weights with plain autograd, reversibility off",
    uses=(
        "gradkit.nn.rev_mbconv.MBConv3d",
        "gradkit.nn.rev_mbconv.RevMBConv3d",
        "gradkit.nn.rev_mbconv.rev_mbconv_stage",
        "gradkit.nn.rev_mbconv.RevMBConvUNet3d",
        "gradkit.nn.reversible.ReversibleSequential",
        "gradkit.data.volumes.make_ellipsoid_volumes",
        "gradkit.testing.SavedBytesMeter",
    ),
    notes="Laptop-scale check of the mechanism on procedural ellipsoid volumes, not of the BraTS Dice scores. "
          "The twin is the same network (same MBConv couplings and weights) run with plain autograd, so "
          "parameter counts match exactly; a twin with x + F(x) on full channels (another reading of the "
          "paper's baseline) is not run. "
          "Stem, strided down-convs, transposed up-convs, skip concatenations and the head are not reversible "
          "and form the memory floor (the rev arm's bytes). volume_ratio is in voxels (side ratio cubed); "
          "depth_ratio is capped by the sweep (its deepest n over budget_blocks). The twin's exactness "
          "errors are 0 and its volume_ratio 1 by definition (it keeps its activations; the budget is its "
          "own bytes). Float32 fidelity is gated on what a user trains on: the float32 parameter gradients at the "
          "deepest blocks-per-level of the sweep against the float32 twin (grad_rel_err_f32 <= 1e-3); the "
          "float32 inverse error of a 16-block stage (inverse_err_f32, ~1e-5 of round-off) is reported only, "
          "its former 1e-5 bound was set by hand. train_time_ratio is wall time under the machine's load; see the rev-mbconv-step "
          "benchmark.",
    plots=("dice", "saved_mib"),
    bounds={"dice": (0.0, 100.0), "dice_whole": (0.0, 100.0), "dice_core": (0.0, 100.0),
            "dice_shell": (0.0, 100.0), "dice_margin": (-100.0, 100.0), "bytes_growth": (0.0, float("inf")),
            "grad_rel_err": (0.0, float("inf")), "grad_rel_err_f32": (0.0, float("inf")),
            "inverse_err": (0.0, float("inf")),
            "inverse_err_f32": (0.0, float("inf")), "train_time_ratio": (0.0, float("inf"))},
))
