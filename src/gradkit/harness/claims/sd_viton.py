"""Claim ``sd-viton``: routing the adversarial loss to a final TACO stage keeps a cascaded warp from squeezing.

Task (laptop scale; the paper trains on VITON-HD at up to 1024x768):
- Procedural garments (:func:`gradkit.data.garments.garment_pairs`): a striped "T" (torso and two sleeves, each
  separated from the torso by a 2 px gap, stripe period 4 px) and its target under a random smooth body
  deformation with the sleeves turned down against the torso (no gap). Ground-truth masks, textures, the
  analytic flow and det J of the torso map come from the warp. The warp is conditioned on a blurred target
  silhouette.
- Arms (about 25k parameters each, same encoders and widths, :class:`gradkit.nn.sequential_deformation.CascadedFlow`):
  ``baseline``: a 3-level cascade of 2-D flows, every loss on the final flow (L1 mask x10, L1 texture, TV x
  tv_weight, LSGAN from a small conditional mask discriminator).
  ``sd``: 2 TVOB levels (mask, texture and TV losses only) + 1 TACO level with a 3-D erase flow (all losses,
  the adversarial one included, plus the erase-coordinate loss), routed by
  :class:`~gradkit.nn.sequential_deformation.LossRouting`.
  ``sd_unrouted`` (negative control): the same network with routing switched off, every loss at the TACO stage
  only, as the baseline does.
  Equal tuning budgets: each arm picks its Adam learning rate from the same grid, by the validation
  reconstruction loss (mask and texture L1) after a shortened run, then trains from scratch with it.
- Metrics on n_test test pairs: ``squeeze`` = mean |det J - det J_gt| over the (eroded) torso, J of the composite
  backward flow; ``stripe_err`` = relative error of the dominant stripe period along x in the torso; ``iou`` of
  the output mask; ``tex_l1`` inside the target mask; ``conflict`` = mean cosine between the gradients of the TV
  loss and the adversarial loss w.r.t. the final 2-D flow, logged during training by
  :class:`gradkit.probes.gradient_conflict.GradientConflictProbe` (for ``sd`` also ``conflict_tvob`` w.r.t.
  the last TVOB flow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.garments import GarmentPairs, garment_pairs
from ...functional.flow_warp import erase_z_loss, jacobian_det
from ...nn.sequential_deformation import CascadedFlow, LossRouting
from ...privacy.matching import total_variation
from ...probes.gradient_conflict import GradientConflictProbe
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllOf, Check, Compare, Criterion, Ratio, fmt, mean, seed_values
from .tuning import tune

SLUG = "sd-viton"
PAIR = ("tv", "adv")


@dataclass(frozen=True)
class SDVitonProtocol(Protocol):
    """Garment warping at 32x32 (16x16 at smoke), three-level cascades, LSGAN mask discriminator."""

    size: int = scaled(smoke=16, quick=32, full=32)
    n_train: int = scaled(smoke=128, quick=1600, full=1600)
    n_val: int = scaled(smoke=32, quick=200, full=200)
    n_test: int = scaled(smoke=32, quick=200, full=200)
    steps: int = scaled(smoke=30, quick=170, full=3000)
    trial_fraction: float = 0.2  # tuning trials run this fraction of the steps
    batch_size: int = 16
    width: int = 16
    lr_grid: tuple[float, ...] = scaled(smoke=(2e-3,), quick=(1e-3, 3e-3), full=(3e-4, 1e-3, 3e-3))
    d_lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    mask_weight: float = 10.0
    tv_weight: float = 2.0
    adv_weight: float = 1.0
    erase_weight: float = 1.0
    probe_every: int = scaled(smoke=5, quick=10, full=20)
    n_images: int = 6


# ------------------------------------------------------------------------------------------ data
def _setup(ctx: ArmContext) -> dict:
    p = ctx.p
    train = garment_pairs(p.n_train + p.n_val, size=p.size, seed=ctx.seed)
    test = garment_pairs(p.n_test, size=p.size, seed=100_000 + ctx.seed)
    n = p.n_train
    return {"fit": train.subset(slice(0, n)).to(ctx.device), "val": train.subset(slice(n, None)).to(ctx.device),
            "test": test.to(ctx.device)}


class MaskDiscriminator(nn.Module):
    """LSGAN PatchGAN on (mask, condition): two stride-2 convs and a 1-channel patch map."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, mask: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat((mask, cond), 1))


# ------------------------------------------------------------------------------------------ training
def _routing(arm: str, p: SDVitonProtocol) -> tuple[LossRouting, list[str]]:
    w = {"l1": 1.0, "tv": p.tv_weight, "adv": p.adv_weight}
    if arm == "baseline":
        return LossRouting({"l1": ["final"], "tv": ["final"], "adv": ["final"]}, w), ["final"]
    stages = ["tvob0", "tvob1", "taco"]
    w["erase"] = p.erase_weight
    if arm == "sd":
        return LossRouting({"l1": stages, "tv": stages, "adv": ["taco"], "erase": ["taco"]}, w), stages
    return LossRouting({"l1": ["taco"], "tv": ["taco"], "adv": ["taco"], "erase": ["taco"]}, w), stages


def _l1(out: Tensor, tgt: Tensor, mask_weight: float) -> Tensor:
    return mask_weight * (out[:, 1] - tgt[:, 1]).abs().mean() + (out[:, 0] - tgt[:, 0]).abs().mean()


def _stage_losses(arm: str, o: dict, b: GarmentPairs, disc: MaskDiscriminator, p: SDVitonProtocol) -> dict:
    def adv(out: Tensor):
        return lambda: (disc(out[:, 1:2], b.cond) - 1).pow(2).mean()

    if arm == "baseline":
        f = o["flows_tvob"][-1]
        return {"final": {"l1": _l1(o["warped"], b.target, p.mask_weight), "tv": total_variation(f),
                          "adv": adv(o["warped"])}}
    out = {f"tvob{i}": {"l1": _l1(w, b.target, p.mask_weight), "tv": total_variation(f)}
           for i, (w, f) in enumerate(zip(o["warped_tvob"], o["flows_tvob"]))}
    g = o["flow_taco"]
    out["taco"] = {"l1": _l1(o["warped"], b.target, p.mask_weight), "tv": total_variation(g[:, :2]),
                   "adv": adv(o["warped"]), "erase": erase_z_loss(g[:, 2], b.target[:, 1])}
    return out


def _final_flow(o: dict) -> Tensor:
    return o["flows_tvob"][-1] if o["flow_taco"] is None else o["flow_taco"]


def _train(ctx: ArmContext, data: GarmentPairs, lr: float, steps: int, probe: GradientConflictProbe | None = None,
           probe_tvob: GradientConflictProbe | None = None):
    p, arm, dev = ctx.p, ctx.arm, ctx.device
    gen = torch.Generator().manual_seed(ctx.seed * 7919 + 17)
    torch.manual_seed(ctx.seed)
    net = CascadedFlow(2, 1, levels=3, taco=arm != "baseline", width=p.width).to(dev)
    disc = MaskDiscriminator().to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=p.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=p.d_lr, betas=p.betas)
    routing, stages = _routing(arm, p)
    curve = []
    for step in range(steps):
        idx = torch.randint(0, len(data), (p.batch_size,), generator=gen).to(dev)
        b = data.subset(idx)
        o = net(b.source, b.cond)
        losses = _stage_losses(arm, o, b, disc, p)
        terms = routing.terms(losses)
        loss = sum(terms.values())
        last = stages[-1]
        if probe is not None and step % p.probe_every == 0:
            adv = terms.get(("adv", last))
            probe.record({"tv": terms[("tv", last)], "adv": adv}, _final_flow(o), step=step)
            if probe_tvob is not None and ("tv", "tvob1") in terms:
                probe_tvob.record({"tv": terms[("tv", "tvob1")], "adv": adv}, o["flows_tvob"][-1], step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fake = o["warped"][:, 1:2].detach()
        d_loss = (disc(b.target[:, 1:2], b.cond) - 1).pow(2).mean() + disc(fake, b.cond).pow(2).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        curve.append(float(loss.detach()))
    net.eval()
    return net, curve


def _stripe_period(tex: Tensor, region: Tensor, pad: int = 128) -> Tensor:
    """Dominant stripe period along x (pixels) of each image's texture inside ``region``."""
    x = (tex - (tex * region).sum((1, 2), keepdim=True) / region.sum((1, 2), keepdim=True).clamp_min(1)) * region
    power = torch.fft.rfft(x, n=pad, dim=-1).abs().pow(2).sum(1)  # (N, pad//2+1), rows summed
    power[:, :2] = 0  # ignore the mean and the window's lowest frequencies
    k = power.argmax(-1).clamp_min(1)
    return pad / k.to(tex.dtype)


@torch.no_grad()
def _evaluate(net: CascadedFlow, d: GarmentPairs) -> tuple[dict[str, float], dict]:
    o = net(d.source, d.cond)
    torso = (-F.max_pool2d(-d.torso.unsqueeze(1), 3, 1, 1)).squeeze(1)  # eroded: central differences inside
    det = jacobian_det(o["flow"])
    squeeze = ((det - d.det_gt).abs() * torso).sum() / torso.sum().clamp_min(1)
    pred_mask, gt_mask = o["warped"][:, 1] > 0.5, d.target[:, 1] > 0.5
    iou = ((pred_mask & gt_mask).sum((1, 2)).float() / (pred_mask | gt_mask).sum((1, 2)).clamp_min(1).float()).mean()
    per_gt = _stripe_period(d.target[:, 0], torso)
    per = _stripe_period(o["warped"][:, 0], torso)
    m = d.target[:, 1]
    tex = ((o["warped"][:, 0] - d.target[:, 0]).abs() * m).sum() / m.sum().clamp_min(1)
    return ({"squeeze": float(squeeze), "iou": float(iou), "stripe_err": float(((per - per_gt).abs() / per_gt).mean()),
             "tex_l1": float(tex), "det_mean": float((det * torso).sum() / torso.sum().clamp_min(1))}, o)


def _val_loss(net: CascadedFlow, d: GarmentPairs, p: SDVitonProtocol) -> float:
    with torch.no_grad():
        return float(_l1(net(d.source, d.cond)["warped"], d.target, p.mask_weight))


def _arm(ctx: ArmContext) -> ArmResult:
    p, d = ctx.p, ctx.data
    trial_steps = max(1, int(round(p.steps * p.trial_fraction)))
    tuned = tune(p.lr_grid, lambda lr: _val_loss(_train(ctx, d["fit"], lr, trial_steps)[0], d["val"], p), mode="min")
    probe = GradientConflictProbe(pairs=[PAIR])
    probe_tvob = GradientConflictProbe(pairs=[PAIR]) if ctx.arm == "sd" else None
    net, curve = _train(ctx, d["fit"], tuned.value, p.steps, probe, probe_tvob)
    metrics, o = _evaluate(net, d["test"])
    metrics["conflict"] = probe.mean(PAIR)
    metrics["val_l1"] = _val_loss(net, d["val"], p)
    curves = {"conflict": probe.series(PAIR), "train_loss": curve}
    if probe_tvob is not None:
        metrics["conflict_tvob"] = probe_tvob.mean(PAIR)
        curves["conflict_tvob"] = probe_tvob.series(PAIR)
    ctx.shared[f"warped_{ctx.arm}"] = o["warped"][:p.n_images, 0].cpu()
    return ArmResult(metrics, curves=curves,
                     info={"tuned": tuned.as_info(), "params": sum(q.numel() for q in net.parameters()),
                           "probe_steps": probe.steps})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    d, n = ctx.data["test"], ctx.p.n_images

    def rows(t: Tensor) -> list:
        return [t[i].clamp(0, 1).cpu().numpy().round(3).tolist() for i in range(min(n, len(t)))]

    grid = {"source": rows(d.source[:, 0]), "target": rows(d.target[:, 0])}
    for arm in ("baseline", "sd", "sd_unrouted"):
        if f"warped_{arm}" in ctx.shared:
            grid[f"warped: {arm}"] = rows(ctx.shared[f"warped_{arm}"])
    out.info["images"] = {"warps": grid}
    out.info["curve_axes"] = {"conflict": {"xlabel": "probe record"}, "conflict_tvob": {"xlabel": "probe record"},
                              "train_loss": {"xlabel": "step", "logy": True}}


# ------------------------------------------------------------------------------------------ criterion
@dataclass(frozen=True)
class GivenConflict(Criterion):
    """``then`` is judged only where the baseline shows the conflict (mean cosine of ``metric`` < 0).

    Where it does not, every check is reported as holding with the reason, so ours and the control both pass
    and the verdict is INCONCLUSIVE: the task did not reproduce the premise and cannot decide the claim.
    """

    metric: str
    baseline: str
    then: Criterion

    def describe(self) -> str:
        return f"if {self.metric}[{self.baseline}] < 0 (the premise): {self.then.describe()}"

    def checks(self, per_seed):
        c = mean(seed_values(per_seed, self.baseline, self.metric))
        premise = math.isfinite(c) and c < 0
        if not premise:
            return [Check(self.describe(), True, f"premise not reproduced: {self.metric}[{self.baseline}] = {fmt(c)} "
                                                 f">= 0, the task cannot decide the claim")]
        head = Check(f"{self.metric}: {self.baseline} < 0", True, f"{fmt(c)} < 0")
        return [head, *self.then.checks(per_seed)]


CRITERION = GivenConflict("conflict", "baseline", AllOf(
    Ratio("squeeze", "sd", "baseline", at_most=0.7),
    Compare("iou", "sd", ">=", "baseline", margin=-0.02, text="iou: sd >= baseline - 0.02"),
))

CLAIM = register(Claim(
    slug=SLUG,
    title="Towards Squeezing-Averse Virtual Try-On via Sequential Deformation",
    arxiv="2312.15861",
    statement=(
        "Where the TV and adversarial gradients on a cascade's final flow conflict (mean cosine < 0 on the "
        "baseline), routing the adversarial loss to a final TACO stage with a 3-D erase flow, with TV-dominant "
        "stages before it, cuts the squeezing error |det J - det J_gt| in the torso to <= 0.7x the plain "
        "cascade's, with target-mask IoU no more than 0.02 below it"
    ),
    paper_figure=(
        "VITON-HD (1024x768 and lower): removes HR-VITON's sleeve and waist squeezing and improves FID/KID and "
        "paired SSIM/LPIPS over HR-VITON and other baselines (qualitative squeezing figures; no squeezing metric)"
    ),
    protocol=SDVitonProtocol,
    data="garments",
    setup=_setup,
    arms={"baseline": _arm, "sd": _arm, "sd_unrouted": _arm},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary("squeeze", "sd", "baseline", unit="|det J - det J_gt|"),
    control={"sd": "sd_unrouted"},
    control_note="the SD network with routing switched off (every loss at the last stage) stands in for sd",
    uses=("gradkit.nn.sequential_deformation.CascadedFlow", "gradkit.nn.sequential_deformation.LossRouting",
          "gradkit.nn.sequential_deformation.compose_flows", "gradkit.functional.flow_warp.warp2d",
          "gradkit.functional.flow_warp.warp_with_erase", "gradkit.functional.flow_warp.erase_z_loss",
          "gradkit.functional.flow_warp.jacobian_det", "gradkit.privacy.matching.total_variation",
          "gradkit.probes.gradient_conflict.GradientConflictProbe", "gradkit.data.garments.garment_pairs"),
    notes=(
        "Why the task can discriminate: the source garment has a gap between sleeve and torso and the target has "
        "none, so a smooth (TV-preferred) warp leaves a hole that the mask losses and the discriminator push the "
        "flow to close; a single cascade closes it by stretching or squeezing the torso, which det J against the "
        "analytic det J_gt measures (the identity warp is ~0.09 off). The control keeps the SD network but routes "
        "every loss to its last stage like the baseline: it must miss the 0.7x bar if routing, not the 3-D "
        "stage alone, is what helps. The premise is checked on the data: if the baseline's TV and adversarial "
        "gradients do not conflict (mean cosine >= 0), the verdict is INCONCLUSIVE, not FAIL. "
        "Choices: L1 on the texture stands in for the VGG loss, the mask discriminator sees (mask, blurred "
        "target silhouette); no segmentation generator or CE loss; no tucked-in region, so the TVOB supervision "
        "is not masked. Out of reach here: VITON-HD, DensePose/OpenPose inputs, the segmentation and image "
        "generators, FID/KID, high resolution, and the paper's lambda_tv sweep (run it with --set tv_weight=0.5 "
        "or 8)."
    ),
    scale_note=(
        "32x32 procedural garments and under two hundred steps per arm stand in for VITON-HD: the TV-adversarial "
        "conflict on the plain cascade's final flow is weak here (cosine near 0) and the extra TACO stage is "
        "barely trained; a clear test needs the paper's try-on data, a segmentation generator and full-length "
        "training, out of reach on a laptop."
    ),
    plots=("conflict", "conflict_tvob", "train_loss"),
    bounds={"squeeze": (0.0, 100.0), "iou": (0.0, 1.0), "stripe_err": (0.0, 100.0), "tex_l1": (0.0, 1.0),
            "conflict": (-1.0, 1.0), "conflict_tvob": (-1.0, 1.0), "val_l1": (0.0, 100.0), "det_mean": (-100.0, 100.0)},
))
