"""Analytic signed-distance objects for the 2-D contact model (paper slug: difftactile).

A rigid object is a signed distance ``phi(p)`` (< 0 inside) with outward normal ``n(p) = grad phi``.
The shapes here return both in closed form: ``Circle``, ``Box`` (axis-aligned) and ``Polyline`` (a
height-field surface y = h(x) given by vertices, solid below). Any callable ``points (N, 2) -> phi (N,)``
works too; :func:`evaluate_sdf` then takes the normal from autograd and checks the shapes.

>>> phi, n = evaluate_sdf(Circle(radius=0.5), torch.tensor([[0.0, 0.4], [0.0, 0.6]]))
>>> phi            # 0.1 inside, 0.1 outside
tensor([-0.1000,  0.1000])
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .._validate import ArgumentError, positive

EPS = 1e-12


class Circle(nn.Module):
    """phi(p) = |p - center| - radius."""

    def __init__(self, radius: float = 0.5, center: Sequence[float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.radius = positive("radius", radius)
        self.register_buffer("center", torch.as_tensor(center, dtype=torch.get_default_dtype()).reshape(2))

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = p - self.center.to(p)
        r = (d * d).sum(-1).clamp_min(EPS).sqrt()
        return r - self.radius, d / r[:, None]


class Box(nn.Module):
    """An axis-aligned box ``|p - center| <= half`` (per axis); exact signed distance and its gradient."""

    def __init__(self, half: Sequence[float] = (0.5, 0.5), center: Sequence[float] = (0.0, 0.0)) -> None:
        super().__init__()
        half_t = torch.as_tensor(half, dtype=torch.get_default_dtype()).reshape(2)
        if bool((half_t <= 0).any()):
            raise ArgumentError(f"half must be two positive half-widths, got {tuple(half_t.tolist())}")
        self.register_buffer("half", half_t)
        self.register_buffer("center", torch.as_tensor(center, dtype=half_t.dtype).reshape(2))

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = p - self.center.to(p)
        q = d.abs() - self.half.to(p)
        outside = q.clamp_min(0)
        out_len = (outside * outside).sum(-1).clamp_min(EPS).sqrt()
        inside = q.max(-1).values.clamp_max(0)
        phi = torch.where(q.max(-1).values > 0, out_len, inside)
        n_out = outside / out_len[:, None]
        axis = q.argmax(-1)
        n_in = torch.nn.functional.one_hot(axis, 2).to(p)
        n = torch.where((q.max(-1).values > 0)[:, None], n_out, n_in) * torch.where(d >= 0, 1.0, -1.0).to(p)
        return phi, n


class Polyline(nn.Module):
    """A surface through ``vertices`` (K, 2) ordered by increasing x, solid below it (a bumpy floor).

    phi is the distance to the nearest segment, negative below the surface (x outside the vertex range
    extends the end heights).
    """

    def __init__(self, vertices: torch.Tensor | Sequence[Sequence[float]]) -> None:
        super().__init__()
        v = torch.as_tensor(vertices, dtype=torch.get_default_dtype())
        if v.dim() != 2 or v.shape[1] != 2 or v.shape[0] < 2:
            raise ArgumentError(f"vertices must have shape (K, 2) with K >= 2, got {tuple(v.shape)}")
        if bool((v[1:, 0] <= v[:-1, 0]).any()):
            raise ArgumentError("vertices must have strictly increasing x")
        self.register_buffer("vertices", v)

    def height(self, x: torch.Tensor) -> torch.Tensor:
        """The surface height h(x) (piecewise linear, constant beyond the ends)."""
        v = self.vertices.to(x)
        xs, ys = v[:, 0], v[:, 1]
        i = torch.searchsorted(xs.contiguous(), x.detach().contiguous()).clamp(1, len(xs) - 1)
        t = ((x - xs[i - 1]) / (xs[i] - xs[i - 1])).clamp(0, 1)
        return ys[i - 1] + t * (ys[i] - ys[i - 1])

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vertices.to(p)
        a, b = v[:-1], v[1:]                                               # (S, 2) segments
        ab = b - a
        t = (((p[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0, 1)   # (N, S)
        closest = a + t[..., None] * ab
        d2 = ((p[:, None] - closest) ** 2).sum(-1)
        k = d2.argmin(-1)
        c = closest[torch.arange(p.shape[0]), k]
        diff = p - c
        dist = (diff * diff).sum(-1).clamp_min(EPS).sqrt()
        sign = torch.where(p[:, 1] >= self.height(p[:, 0]), 1.0, -1.0).to(p)
        return sign * dist, sign[:, None] * diff / dist[:, None]


SDF = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


def evaluate_sdf(sdf: SDF, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi (N,), normal (N, 2))`` of ``sdf`` at ``points`` (N, 2).

    ``sdf`` returns either ``phi`` alone (the normal is then its autograd gradient, kept differentiable) or
    ``(phi, normal)``. A wrong shape raises an error naming the expected one.
    """
    if not callable(sdf):
        raise ArgumentError(f"sdf must be callable points (N, 2) -> phi (N,), got {type(sdf).__name__}")
    n_pts = points.shape[0]
    if isinstance(sdf, (Circle, Box, Polyline)):
        return sdf(points)
    need_grad = not points.requires_grad
    p = points.detach().requires_grad_(True) if need_grad else points
    with torch.enable_grad():
        out = sdf(p)
        phi, normal = out if isinstance(out, tuple) else (out, None)
        if not isinstance(phi, torch.Tensor) or tuple(phi.shape) != (n_pts,):
            got = tuple(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
            raise ArgumentError(f"sdf must return phi of shape ({n_pts},) for points of shape "
                                f"{tuple(points.shape)}, got {got}")
        if normal is None:
            normal = torch.autograd.grad(phi.sum(), p, create_graph=not need_grad)[0]
            normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(EPS)
    if not isinstance(normal, torch.Tensor) or tuple(normal.shape) != (n_pts, 2):
        got = tuple(normal.shape) if isinstance(normal, torch.Tensor) else type(normal).__name__
        raise ArgumentError(f"sdf must return normals of shape ({n_pts}, 2), got {got}")
    return phi, normal
