"""Procedural try-on warping pairs: a striped "T" garment and its analytically deformed target (sd-viton).

Source (size S, drawn for S = 32 and scaled): a torso block and two sleeve blocks beside it, each sleeve
separated from the torso by a 2-pixel gap, with vertical stripes of period 4 px (random phase). Target: the
torso under a random smooth body deformation (anisotropic scale, shift and a sinusoidal bend) and the sleeves
rotated down by 90 degrees so that they hang against the torso: the target mask has no gap, so a warp that
fits it must jump across the source gap. Every target pixel has an analytic source point q = phi(p), which
gives the target texture, the ground-truth flow phi(p) - p, and the Jacobian determinant of the torso map.

    pairs = garment_pairs(200, size=32, seed=0)
    pairs.source.shape, pairs.target.shape   # (200, 2, 32, 32): (texture, mask) channels
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import ArgumentError, integer, positive_int

__all__ = ["GarmentPairs", "garment_pairs", "STRIPE_PERIOD"]

STRIPE_PERIOD = 4.0


@dataclass(frozen=True)
class GarmentPairs:
    """source/target: (N, 2, S, S) texture and mask; cond: (N, 1, S, S) a blurred target silhouette (the
    "pose" the warp is conditioned on); torso: (N, S, S) the target torso mask; flow_gt: (N, 2, S, S) the
    analytic backward flow (valid inside the target mask); det_gt: (N, S, S) det of the torso map's Jacobian."""

    source: Tensor
    target: Tensor
    cond: Tensor
    torso: Tensor
    flow_gt: Tensor
    det_gt: Tensor

    def __len__(self) -> int:
        return self.source.shape[0]

    def subset(self, idx) -> "GarmentPairs":
        return GarmentPairs(*(t[idx] for t in (self.source, self.target, self.cond, self.torso, self.flow_gt,
                                               self.det_gt)))

    def to(self, device) -> "GarmentPairs":
        return GarmentPairs(*(t.to(device) for t in (self.source, self.target, self.cond, self.torso, self.flow_gt,
                                                     self.det_gt)))


def _box(px, py, x0, x1, y0, y1):
    return (px >= x0) & (px < x1) & (py >= y0) & (py < y1)


def _stripes(qx, phase):
    return 0.5 + 0.5 * torch.cos(2 * math.pi * (qx + phase) / STRIPE_PERIOD)


def _blur(x: Tensor, sigma: float) -> Tensor:
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))


def garment_pairs(n: int, *, size: int = 32, seed: int = 0, blur: float = 1.0) -> GarmentPairs:
    """``n`` source/target garment pairs of ``size`` x ``size`` pixels (size >= 16), deterministic in ``seed``."""
    n = positive_int("n", n)
    size = integer("size", size, low=16)
    if not (isinstance(blur, (int, float)) and blur > 0):
        raise ArgumentError(f"blur must be a positive number, got {blur!r}")
    g = torch.Generator().manual_seed(int(seed))
    u = size / 32.0  # all lengths below are for 32 px
    rnd = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)  # noqa: E731
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    px, py = xs.expand(n, size, size), ys.expand(n, size, size)
    phase = rnd(0.0, STRIPE_PERIOD)
    # source: torso [tx0, tx1) x [ty0, ty1), sleeves of width sw (along the arm) and height sh, gap 2 px
    half = torch.round(rnd(4.0, 6.0) * u)
    cx = size / 2.0
    tx0, tx1 = cx - half, cx + half
    ty0, ty1 = torch.full_like(half, round(9 * u)), torch.full_like(half, round(27 * u))
    gap = max(1.0, round(2 * u))
    sw, sh = round(6 * u), round(6 * u)
    src_mask = (_box(px, py, tx0, tx1, ty0, ty1) | _box(px, py, tx0 - gap - sw, tx0 - gap, ty0, ty0 + sh)
                | _box(px, py, tx1 + gap, tx1 + gap + sw, ty0, ty0 + sh)).float()
    src_tex = _stripes(px, phase) * src_mask
    # target torso: q = c + (p - c - d) / s  plus a bend of the x coordinate along y
    sx, sy = rnd(0.85, 1.15), rnd(0.9, 1.1)
    dx, dy = rnd(-1.5, 1.5) * u, rnd(-1.0, 1.0) * u
    bend = rnd(-1.0, 1.0) * u
    cy = (ty0 + ty1) / 2
    qy = cy + (py - cy - dy) / sy
    qx = cx + (px - cx - dx) / sx - bend * torch.sin(math.pi * (qy - ty0) / (ty1 - ty0))
    torso = _box(qx, qy, tx0, tx1, ty0, ty1)
    # the sleeves hang from the torso's top corners, against its (bent) side edge: no gap
    top_y = cy + dy + sy * (ty0 - cy)
    bend_y = bend * torch.sin(math.pi * (qy - ty0) / (ty1 - ty0))
    left_x = cx + dx + sx * (tx0 - cx + bend_y)    # the target torso's left edge on each row
    right_x = cx + dx + sx * (tx1 - cx + bend_y)
    # left sleeve: along-arm a = (tx0 - gap) - q_x in [0, sw) goes down (p_y - top_y); across b = q_y - ty0
    # in [0, sh) goes outwards from the edge
    lb, la = torch.ceil(left_x) - 1 - px, py - top_y
    left = (lb >= 0) & (lb < sh) & (la >= 0) & (la < sw) & ~torso
    rb, ra = px - torch.ceil(right_x), py - top_y
    right = (rb >= 0) & (rb < sh) & (ra >= 0) & (ra < sw) & ~torso & ~left
    qx_l, qy_l = (tx0 - gap) - 0.5 - la, ty0 + lb
    qx_r, qy_r = (tx1 + gap) - 0.5 + ra, ty0 + rb
    qx_all = torch.where(left, qx_l, torch.where(right, qx_r, qx))
    qy_all = torch.where(left, qy_l, torch.where(right, qy_r, qy))
    tgt_mask = (torso | left | right).float()
    tgt_tex = _stripes(qx_all, phase) * tgt_mask
    flow_gt = torch.stack((qx_all - px, qy_all - py), 1) * tgt_mask.unsqueeze(1)
    # det of the torso map p -> q (analytic): dqx/dpx = 1/sx, dqy/dpy = 1/sy, dqx/dpy = -bend*cos(.)*pi/(H sy)
    det_gt = (1.0 / (sx * sy)).expand(n, size, size).clone()
    cond = _blur(tgt_mask.unsqueeze(1), float(blur) * u)
    source = torch.stack((src_tex, src_mask), 1)
    target = torch.stack((tgt_tex, tgt_mask), 1)
    return GarmentPairs(source, target, cond, torso.float(), flow_gt, det_gt)
