"""Dense flow warps for cascaded appearance flows: 2-D warp, 3-D erase-flow warp, Jacobian determinant (sd-viton).

A flow ``F`` of shape (N, 2, H, W) holds, in pixel units at its own resolution, where each output pixel
samples its input (a backward warp, the appearance-flow convention)::

    warp2d(x, F)(p)          = x(p + F(p))                          (bilinear, align_corners=True)
    warp_with_erase(x, G)(p) = V(p + G_xy(p), z = -1 + G_z(p))      V = [x, 0] stacked on a depth axis of 2
    erase_z_loss(dz, roi)    = mean(|dz - 2| * (1 - roi)) + mean(|dz| * roi)
    jacobian_det(F)          = det(I + grad F)                      (central differences)

The 3-D flow ``G`` of shape (N, 3, H, W) is ``(dx, dy, dz)``: dx, dy in pixels as above, dz in the depth
grid's normalised units, so dz = 0 keeps the texture (slice 0) and dz = 2 samples the zero slice (erases).
``jacobian_det`` is the area ratio of the sampling map p -> p + F(p): 1 for a rigid shift, s^2 for a uniform
scaling by s. For a backward warp a value above 1 means the output packs a larger source area into a pixel
(texture compressed: "squeezed"), below 1 stretched; the squeezing error of a predicted flow is
``|det J - det J_gt|``. The flow's L1 total variation (the paper's TV loss,
mean|dF/dy| + mean|dF/dx|) is ``gradkit.privacy.matching.total_variation``.

Example::

    flow = torch.zeros(1, 2, 32, 32, requires_grad=True)
    y = warp2d(x, flow)                           # == x for a zero flow
    loss = (y - target).abs().mean() + 2.0 * total_variation(flow)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import ArgumentError, choice, tensor

__all__ = ["identity_grid", "normalize_flow", "upsample_flow", "warp2d", "warp_with_erase",
           "erase_z_loss", "jacobian_det", "PADDING_MODES"]

PADDING_MODES = ("zeros", "border", "reflection")


def _check_flow(name: str, flow, channels: int, x: Tensor | None = None) -> Tensor:
    tensor(name, flow, floating=True)
    if flow.dim() != 4 or flow.shape[1] != channels:
        raise ArgumentError(f"{name} must have shape (N, {channels}, H, W), got shape {tuple(flow.shape)}")
    if x is not None:
        if flow.shape[0] != x.shape[0] or flow.shape[-2:] != x.shape[-2:]:
            raise ArgumentError(f"{name} must match x's batch and size: expected shape "
                                f"({x.shape[0]}, {channels}, {x.shape[-2]}, {x.shape[-1]}), got {tuple(flow.shape)}")
    return flow


def _check_image(name: str, x) -> Tensor:
    tensor(name, x, floating=True)
    if x.dim() != 4:
        raise ArgumentError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    return x


def identity_grid(n: int, h: int, w: int, *, device=None, dtype=None) -> Tensor:
    """The identity sampling grid (N, H, W, 2) in ``grid_sample``'s normalised (x, y) coordinates."""
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), -1).unsqueeze(0).expand(n, h, w, 2)


def normalize_flow(flow_px: Tensor) -> Tensor:
    """A pixel-unit flow (N, 2, H, W) as a normalised offset grid (N, H, W, 2) for ``align_corners=True``:
    dx * 2 / (W - 1), dy * 2 / (H - 1) (a side of one pixel maps to 0)."""
    _check_flow("flow_px", flow_px, 2)
    h, w = flow_px.shape[-2:]
    sx = 2.0 / (w - 1) if w > 1 else 0.0
    sy = 2.0 / (h - 1) if h > 1 else 0.0
    return torch.stack((flow_px[:, 0] * sx, flow_px[:, 1] * sy), -1)


def upsample_flow(flow_px: Tensor, scale: int = 2) -> Tensor:
    """Bilinear upsampling of a pixel-unit 2-D flow by ``scale``, its values rescaled to the new pixels.

    (Resizing a flow without multiplying its values is a common pitfall: the offsets would shrink by ``scale``.)
    """
    _check_flow("flow_px", flow_px, 2)
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ArgumentError(f"scale must be a positive int, got {scale!r}")
    if scale == 1:
        return flow_px
    return F.interpolate(flow_px, scale_factor=scale, mode="bilinear", align_corners=False) * scale


def warp2d(x: Tensor, flow_px: Tensor, *, padding_mode: str = "zeros") -> Tensor:
    """Backward-warp ``x`` (N, C, H, W) with a pixel-unit flow (N, 2, H, W): out(p) = x(p + flow(p))."""
    _check_image("x", x)
    _check_flow("flow_px", flow_px, 2, x)
    choice("padding_mode", padding_mode, PADDING_MODES)
    n, _, h, w = x.shape
    grid = identity_grid(n, h, w, device=x.device, dtype=x.dtype) + normalize_flow(flow_px.to(x.dtype))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def warp_with_erase(x: Tensor, flow3d: Tensor, *, padding_mode: str = "zeros") -> Tensor:
    """Warp ``x`` with a 3-D flow (dx, dy, dz) over the volume [x, 0]: dz = 0 keeps, dz = 2 erases.

    x: (N, C, H, W); flow3d: (N, 3, H, W), dx, dy in pixels, dz in the depth grid's normalised units
    (depth 2, align_corners=True: z = -1 is x, z = +1 the zero slice). Returns (N, C, H, W).
    """
    _check_image("x", x)
    _check_flow("flow3d", flow3d, 3, x)
    choice("padding_mode", padding_mode, PADDING_MODES)
    n, _, h, w = x.shape
    flow3d = flow3d.to(x.dtype)
    xy = identity_grid(n, h, w, device=x.device, dtype=x.dtype) + normalize_flow(flow3d[:, :2])
    z = (-1.0 + flow3d[:, 2]).unsqueeze(-1)
    grid = torch.cat((xy, z), -1).unsqueeze(1)                   # (N, D_out=1, H, W, 3)
    volume = torch.stack((x, torch.zeros_like(x)), 2)            # (N, C, 2, H, W)
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out[:, :, 0]


def erase_z_loss(dz: Tensor, roi: Tensor) -> Tensor:
    """Supervision of the erase coordinate: dz -> 0 inside ``roi`` (keep), dz -> 2 outside (erase).

    dz: (N, H, W) or (N, 1, H, W); roi: a {0, 1} (or soft) mask of the same shape.
    Returns mean(|dz - 2| * (1 - roi)) + mean(|dz| * roi).
    """
    tensor("dz", dz, floating=True)
    tensor("roi", roi, floating=True)
    if dz.shape != roi.shape:
        raise ArgumentError(f"roi must have dz's shape {tuple(dz.shape)}, got {tuple(roi.shape)}")
    return ((dz - 2.0).abs() * (1.0 - roi)).mean() + (dz.abs() * roi).mean()


def jacobian_det(flow_px: Tensor) -> Tensor:
    """det(I + grad F) of a pixel-unit flow (N, 2, H, W), by central differences: (N, H, W).

    1 for a zero or constant flow, s^2 for F(p) = (s - 1) p (a uniform scaling by s).
    """
    _check_flow("flow_px", flow_px, 2)
    if min(flow_px.shape[-2:]) < 2:
        raise ArgumentError(f"flow_px must be at least 2x2 to take differences, got shape {tuple(flow_px.shape)}")
    du_dy, du_dx = torch.gradient(flow_px[:, 0], dim=(-2, -1))
    dv_dy, dv_dx = torch.gradient(flow_px[:, 1], dim=(-2, -1))
    return (1.0 + du_dx) * (1.0 + dv_dy) - du_dy * dv_dx
