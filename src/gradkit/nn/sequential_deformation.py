"""Cascaded appearance flows with sequential deformation and per-stage loss routing (sd-viton).

A coarse-to-fine cascade of residual 2-D flows (the TV-objective-dominant, "TVOB", stages) optionally followed by
one task-coexistence ("TACO") stage that predicts a 3-D flow (dx, dy, dz) and re-samples the TVOB-warped input
over the volume [x, 0], so dz can erase texture while the 2-D flow stays smooth::

    F_0 = head_0([S_0, T_0]);   F_i = up2(F_{i-1}) + head_i([warp(S_i, up2(F_{i-1})), T_i])     (pixel units)
    x_tvob = warp(x, F_last)                  (F_last: the last TVOB flow at full resolution)
    G = conv3d([warp(S, F_last), T ; 0])[slice 0] = (dx, dy, dz);   output = warp_with_erase(x_tvob, G)

Without the TACO stage (``taco=False``) every stage is a 2-D flow and the output is warp(x, F_last): the plain
cascade. :class:`LossRouting` applies each named loss only at the stages it is routed to, e.g. TV and the
reconstruction losses at every stage and the adversarial loss at the TACO stage only.

Example::

    net = CascadedFlow(src_channels=2, tgt_channels=1, levels=3, taco=True)
    out = net(source, cond)                           # dict: flows_tvob, flow_taco, warped_tvob, warped, flow
    routing = LossRouting({"l1": ["tvob0", "tvob1", "taco"], "adv": ["taco"]})
    loss = routing({"tvob0": {"l1": l1_0}, "tvob1": {"l1": l1_1}, "taco": {"l1": l1_t, "adv": lambda: adv}})
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, integer, positive_int, real_scalar, tensor
from ..functional.flow_warp import upsample_flow, warp2d, warp_with_erase

__all__ = ["CascadedFlow", "LossRouting", "compose_flows"]


def compose_flows(first_px: Tensor, then_px: Tensor) -> Tensor:
    """The single backward flow of warping by ``first_px`` and then by ``then_px`` (both (N, 2, H, W), pixels).

    warp(warp(x, first), then)(p) = x(p + then(p) + first(p + then(p))), so the composite is
    then + warp(first, then).
    """
    return then_px + warp2d(first_px, then_px, padding_mode="border")


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


def _encoder(cin: int, width: int, levels: int) -> nn.ModuleList:
    # finest level first: full resolution, then one stride-2 block per coarser level
    return nn.ModuleList([_block(cin, width)] + [_block(width, width, 2) for _ in range(levels - 1)])


def _head(cin: int, width: int, cout: int) -> nn.Sequential:
    last = nn.Conv2d(width, cout, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.LeakyReLU(0.2), last)


class _TacoHead(nn.Module):
    """conv2d features -> 3-D conv (kernel 3) over the depth-2 volume [features, 0] -> (dx, dy, dz), slice 0."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.conv3d = nn.Conv3d(width, 3, 3, padding=1)
        nn.init.zeros_(self.conv3d.weight)
        nn.init.zeros_(self.conv3d.bias)

    def forward(self, h: Tensor) -> Tensor:
        f = self.pre(h)
        return self.conv3d(torch.stack((f, torch.zeros_like(f)), 2))[:, :, 0]


class CascadedFlow(nn.Module):
    """Coarse-to-fine residual 2-D flows (TVOB) with an optional final 3-D erase-flow stage (TACO).

    src_channels / tgt_channels: channels of the image to warp and of the conditioning image (same H, W,
    divisible by 2^(levels-1)). levels: number of stages in all (with ``taco=True`` the last one is the TACO
    stage at full resolution). width: feature channels. The flow heads start at zero (identity warp).

    ``forward(source, cond)`` returns a dict: ``flows_tvob`` (list of (N, 2, h_i, w_i) pixel flows, coarse to
    fine), ``warped_tvob`` (the source warped by each TVOB flow upsampled to full size), ``flow_taco``
    ((N, 3, H, W) or None), ``warped`` (the final output) and ``flow`` (the composite 2-D backward flow from
    output to source at full size, for :func:`~gradkit.functional.flow_warp.jacobian_det`).
    """

    def __init__(self, src_channels: int, tgt_channels: int, *, levels: int = 3, taco: bool = True,
                 width: int = 16) -> None:
        super().__init__()
        self.src_channels = positive_int("src_channels", src_channels)
        self.tgt_channels = positive_int("tgt_channels", tgt_channels)
        self.taco = boolean("taco", taco)
        self.levels = integer("levels", levels, low=2 if self.taco else 1)
        self.width = positive_int("width", width)
        n_tvob = self.levels - 1 if self.taco else self.levels
        self.src_enc = _encoder(self.src_channels, width, self.levels)
        self.tgt_enc = _encoder(self.tgt_channels, width, self.levels)
        self.heads = nn.ModuleList([_head(2 * width, width, 2) for _ in range(n_tvob)])
        self.taco_head = _TacoHead(2 * width, width) if self.taco else None

    def extra_repr(self) -> str:
        return f"levels={self.levels}, taco={self.taco}, width={self.width}"

    @staticmethod
    def _pyramid(enc: nn.ModuleList, x: Tensor) -> list[Tensor]:
        feats = []
        for block in enc:
            x = block(x)
            feats.append(x)
        return feats[::-1]  # coarse to fine

    def forward(self, source: Tensor, cond: Tensor) -> dict:
        tensor("source", source, floating=True)
        tensor("cond", cond, floating=True)
        if source.dim() != 4 or source.shape[1] != self.src_channels:
            raise ArgumentError(f"source must have shape (N, {self.src_channels}, H, W), got {tuple(source.shape)}")
        if cond.dim() != 4 or cond.shape[1] != self.tgt_channels or cond.shape[0] != source.shape[0] \
                or cond.shape[-2:] != source.shape[-2:]:
            raise ArgumentError(f"cond must have shape ({source.shape[0]}, {self.tgt_channels}, "
                                f"{source.shape[-2]}, {source.shape[-1]}), got {tuple(cond.shape)}")
        k = 2 ** (self.levels - 1)
        h, w = source.shape[-2:]
        if h % k or w % k:
            raise ArgumentError(f"source height and width must be divisible by 2^(levels-1) = {k}, got {h}x{w}")
        s_feats, t_feats = self._pyramid(self.src_enc, source), self._pyramid(self.tgt_enc, cond)
        flows: list[Tensor] = []
        for i, head in enumerate(self.heads):
            s, t = s_feats[i], t_feats[i]
            if flows:
                up = upsample_flow(flows[-1], 2)
                flows.append(up + head(torch.cat((warp2d(s, up), t), 1)))
            else:
                flows.append(head(torch.cat((s, t), 1)))
        scale = lambda i: 2 ** (self.levels - 1 - i)  # noqa: E731
        full = [upsample_flow(f, scale(i)) for i, f in enumerate(flows)]
        warped_tvob = [warp2d(source, f) for f in full]
        out = {"flows_tvob": flows, "warped_tvob": warped_tvob, "flow_taco": None}
        if self.taco_head is None:
            out.update(warped=warped_tvob[-1], flow=full[-1])
            return out
        h_in = torch.cat((warp2d(s_feats[-1], full[-1]), t_feats[-1]), 1)
        flow3d = self.taco_head(h_in)
        out.update(flow_taco=flow3d, warped=warp_with_erase(warped_tvob[-1], flow3d),
                   flow=compose_flows(full[-1], flow3d[:, :2]))
        return out


class LossRouting:
    """Apply each named loss only at the stages it is routed to; ``routing(stage_losses)`` is the weighted sum.

    routes: ``{loss name: [stage names]}``; weights: ``{loss name: weight}`` (default 1). ``stage_losses`` maps
    each stage to ``{loss name: tensor or zero-argument callable}``; a callable is evaluated only where routed,
    so a loss never routed to a stage costs nothing there. A routed loss missing from a stage is an error.
    """

    def __init__(self, routes: Mapping[str, Sequence[str]], weights: Mapping[str, float] | None = None) -> None:
        if not isinstance(routes, Mapping) or not routes:
            raise ArgumentError(f"routes must be a non-empty dict {{loss name: [stage names]}}, got {routes!r}")
        self.routes: dict[str, tuple[str, ...]] = {}
        for name, stages in routes.items():
            if isinstance(stages, str) or not isinstance(stages, Sequence) or not stages:
                raise ArgumentError(f"routes[{name!r}] must be a non-empty list of stage names, got {stages!r}")
            self.routes[name] = tuple(stages)
        weights = dict(weights or {})
        for name in weights:
            if name not in self.routes:
                raise ArgumentError(f"weights names loss {name!r}, which is not routed; routed: {list(self.routes)}")
        self.weights = {n: real_scalar(f"weights[{n!r}]", weights.get(n, 1.0)) for n in self.routes}

    def __repr__(self) -> str:
        return f"LossRouting({self.routes}, weights={self.weights})"

    def terms(self, stage_losses: Mapping[str, Mapping[str, Tensor | Callable[[], Tensor]]]) -> dict:
        """``{(loss, stage): weighted value}`` for every routed pair."""
        out = {}
        for name, stages in self.routes.items():
            for stage in stages:
                if stage not in stage_losses:
                    raise ArgumentError(f"loss {name!r} is routed to stage {stage!r}, which stage_losses lacks; "
                                        f"stages given: {list(stage_losses)}")
                if name not in stage_losses[stage]:
                    raise ArgumentError(f"loss {name!r} is routed to stage {stage!r}, but that stage has no "
                                        f"{name!r}; its losses: {list(stage_losses[stage])}")
                v = stage_losses[stage][name]
                out[(name, stage)] = self.weights[name] * (v() if callable(v) else v)
        return out

    def __call__(self, stage_losses: Mapping[str, Mapping[str, Tensor | Callable[[], Tensor]]]) -> Tensor:
        return sum(self.terms(stage_losses).values())
