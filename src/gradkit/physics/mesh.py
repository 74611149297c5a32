"""Triangle meshes for 2-D soft bodies (paper slug: difftactile).

``rectangle_mesh(nx, ny, width, height)`` is a structured grid of ``nx * ny`` nodes split into
``2 * (nx - 1) * (ny - 1)`` counter-clockwise triangles, the "pad" of a 2-D tactile sensor: the top row
is where the sensor base holds it, the bottom row is the contact surface.

>>> mesh = rectangle_mesh(20, 5, width=2.0, height=0.42)
>>> mesh.nodes.shape, mesh.triangles.shape, mesh.bottom.shape
(torch.Size([100, 2]), torch.Size([152, 3]), torch.Size([20]))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import integer, positive


@dataclass(frozen=True)
class TriMesh:
    """Rest positions ``nodes`` (N, 2), counter-clockwise ``triangles`` (E, 3) and the node ids of the
    ``top`` and ``bottom`` rows (left to right)."""

    nodes: torch.Tensor
    triangles: torch.Tensor
    top: torch.Tensor
    bottom: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.nodes.shape[0]

    def min_edge(self) -> float:
        """The shortest triangle edge, the ``h`` of the explicit time-step bound."""
        p = self.nodes[self.triangles]                                   # (E, 3, 2)
        edges = torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 1], p[:, 0] - p[:, 2]], 1)
        return float(edges.norm(dim=-1).min())


def rectangle_mesh(nx: int, ny: int, width: float = 2.0, height: float = 0.42, *,
                   dtype: torch.dtype | None = None) -> TriMesh:
    """An ``nx`` x ``ny`` grid on ``[-width/2, width/2] x [0, height]`` (bottom row at y = 0), each cell cut
    into two counter-clockwise triangles along alternating diagonals (no preferred shear direction)."""
    nx, ny = integer("nx", nx, low=2), integer("ny", ny, low=2)
    width, height = positive("width", width), positive("height", height)
    dtype = dtype or torch.get_default_dtype()
    xs = torch.linspace(-width / 2, width / 2, nx, dtype=dtype)
    ys = torch.linspace(0.0, height, ny, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    nodes = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)      # node id = j * nx + i
    tris = []
    for j in range(ny - 1):
        for i in range(nx - 1):
            a, b, c, d = j * nx + i, j * nx + i + 1, (j + 1) * nx + i + 1, (j + 1) * nx + i
            if (i + j) % 2 == 0:
                tris += [(a, b, c), (a, c, d)]
            else:
                tris += [(a, b, d), (b, c, d)]
    triangles = torch.tensor(tris, dtype=torch.long)
    bottom = torch.arange(nx)
    top = torch.arange((ny - 1) * nx, ny * nx)
    return TriMesh(nodes, triangles, top, bottom)
