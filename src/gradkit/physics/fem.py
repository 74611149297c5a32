"""A linear-triangle FEM soft body in plane strain with learnable Lame parameters (paper slug: difftactile).

DiffTactile's elastomer pad is an FEM body whose material parameters (mu, lambda) are identified from
force and marker data; this is its 2-D counterpart. Each triangle has a constant deformation gradient
``F = Ds Dm^-1`` (Ds, Dm: edge matrices now and at rest) and the compressible neo-Hookean energy density

    psi(F) = mu/2 (tr(F^T F) - 2) - mu log J + lam/2 (log J)^2,     J = det F,

so ``E(x) = sum_e A_e psi(F_e)`` and the nodal forces are ``f = -dE/dx``, computed in closed form from
the first Piola-Kirchhoff stress ``P = mu (F - F^-T) + lam log(J) F^-T``. Masses are lumped (a third of
each triangle's mass to each of its nodes). ``log_mu`` and ``log_lam`` are parameters (positive by
construction).

>>> body = SoftBody2D(rectangle_mesh(6, 3), mu=1294.0, lam=9201.0)
>>> f = body.internal_forces(body.rest * 1.01)       # a uniform stretch pulls the nodes back
>>> float(body.internal_forces(body.rest).abs().max()) < 1e-3
True
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._validate import ArgumentError, positive, real_scalar
from .mesh import TriMesh


DENSE_LIMIT = 4_000_000  # entries of the dense dF/dx operator; larger meshes use gathers


def _edge_matrix(p: torch.Tensor) -> torch.Tensor:
    """(E, 3, 2) triangle corners -> (E, 2, 2) with columns x1 - x0 and x2 - x0."""
    return torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]], dim=-1)


class SoftBody2D(nn.Module):
    """A neo-Hookean plane-strain body on a triangle mesh (see the module docstring for the equations).

    mu, lam: Lame parameters (> 0); density: mass per unit area; damping: mass-proportional velocity
    damping rate (1/time, >= 0); gravity: acceleration along -y (>= 0 pulls down).
    """

    def __init__(self, mesh: TriMesh, mu: float = 1294.0, lam: float = 9201.0, density: float = 1.0,
                 damping: float = 0.0, gravity: float = 0.0) -> None:
        super().__init__()
        if not isinstance(mesh, TriMesh):
            raise ArgumentError(f"mesh must be a TriMesh (see rectangle_mesh), got {type(mesh).__name__}")
        mu, lam = positive("mu", mu), positive("lam", lam)
        self.density = positive("density", density)
        self.damping = real_scalar("damping", damping, nonneg=True)
        self.gravity = real_scalar("gravity", gravity)
        self.log_mu = nn.Parameter(torch.tensor(math.log(mu), dtype=mesh.nodes.dtype))
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam), dtype=mesh.nodes.dtype))
        rest = mesh.nodes.clone()
        dm = _edge_matrix(rest[mesh.triangles])
        area = 0.5 * torch.linalg.det(dm)
        if bool((area <= 0).any()):
            raise ArgumentError("mesh.triangles must be counter-clockwise with positive area, got "
                                f"{int((area <= 0).sum())} degenerate or clockwise triangle(s)")
        mass = torch.zeros(rest.shape[0], dtype=rest.dtype).index_add_(
            0, mesh.triangles.reshape(-1), (density * area / 3).repeat_interleave(3))
        self.register_buffer("rest", rest)
        self.register_buffer("triangles", mesh.triangles.clone())
        self.register_buffer("dm_inv", torch.linalg.inv(dm))
        self.register_buffer("area", area)
        self.register_buffer("mass", mass)
        self.register_buffer("top", mesh.top.clone())
        self.register_buffer("bottom", mesh.bottom.clone())
        self.min_edge = mesh.min_edge()

    @property
    def mu(self) -> torch.Tensor:
        return self.log_mu.exp()

    @property
    def lam(self) -> torch.Tensor:
        return self.log_lam.exp()

    def deformation_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """(E, 2, 2) per-triangle F = Ds(x) Dm^-1 for node positions ``x`` (N, 2)."""
        self.check_nodes(x)
        return _edge_matrix(x[self.triangles]) @ self.dm_inv

    def elastic_energy(self, x: torch.Tensor) -> torch.Tensor:
        """Total stored energy sum_e A_e psi(F_e) (a scalar), the reference for :meth:`internal_forces`."""
        F = self.deformation_gradient(x)
        logj = torch.log(torch.linalg.det(F))
        psi = self.mu / 2 * ((F * F).sum((-1, -2)) - 2) - self.mu * logj + self.lam / 2 * logj ** 2
        return (self.area * psi).sum()

    def internal_forces(self, x: torch.Tensor, mu: torch.Tensor | None = None,
                        lam: torch.Tensor | None = None) -> torch.Tensor:
        """Nodal elastic forces -dE/dx (N, 2) in closed form, f = -sum_e A_e P_e : dF_e/dx.

        ``mu``/``lam`` default to the body's parameters (pass them to reuse one exp over many steps).
        F and the force assembly are products with a precomputed matrix dF/dx (dense for small meshes).
        """
        self.check_nodes(x)
        mu = self.mu if mu is None else mu
        lam = self.lam if lam is None else lam
        dense = self._grad_op() is not None
        F = (self._grad_op() @ x.reshape(-1)).view(-1, 4) if dense else self.deformation_gradient(x).reshape(-1, 4)
        a, b, c, d = F.unbind(-1)
        J = a * d - b * c
        f_inv_t = torch.stack([d, -c, -b, a], -1) / J[:, None]
        P = mu * (F - f_inv_t) + (lam * torch.log(J))[:, None] * f_inv_t
        if dense:
            return (P.reshape(-1) @ self._force_op()).view_as(x)
        H = -self.area[:, None, None] * (P.view(-1, 2, 2) @ self.dm_inv.transpose(1, 2))   # (E, 2, 2)
        f12 = H.transpose(1, 2)                                                     # rows: corners 1, 2
        corner = torch.cat([-(f12[:, 0] + f12[:, 1])[:, None], f12], dim=1)         # (E, 3, 2)
        return torch.zeros_like(x).index_add(0, self.triangles.reshape(-1), corner.reshape(-1, 2))

    def _grad_op(self) -> torch.Tensor | None:
        """dF/dx as a dense (4E, 2N) matrix, vec(F) = G vec(x), built once per device/dtype; None for meshes
        where it would exceed DENSE_LIMIT entries (then F and the forces use gathers and scatters)."""
        if 8 * self.triangles.shape[0] * self.rest.shape[0] > DENSE_LIMIT:
            return None
        key = (self.dm_inv.device, self.dm_inv.dtype, self.dm_inv.data_ptr())
        if getattr(self, "_ops_key", None) != key:
            E, N = self.triangles.shape[0], self.rest.shape[0]
            G = torch.zeros(E, 2, 2, N, 2, dtype=self.dm_inv.dtype, device=self.dm_inv.device)
            e = torch.arange(E, device=G.device)
            for i in range(2):                     # F[i, j] = sum_k (x_{k+1} - x_0)_i Dm^-1[k, j]
                for j in range(2):
                    w1, w2 = self.dm_inv[:, 0, j], self.dm_inv[:, 1, j]
                    G[e, i, j, self.triangles[:, 1], i] += w1
                    G[e, i, j, self.triangles[:, 2], i] += w2
                    G[e, i, j, self.triangles[:, 0], i] -= w1 + w2
            G = G.reshape(4 * E, 2 * N)
            self._ops = (G, -(self.area.repeat_interleave(4)[:, None] * G))
            self._ops_key = key
        return self._ops[0]

    def _force_op(self) -> torch.Tensor:
        self._grad_op()
        return self._ops[1]

    def kinetic_energy(self, v: torch.Tensor) -> torch.Tensor:
        """0.5 sum_i m_i |v_i|^2."""
        self.check_nodes(v, "v")
        return 0.5 * (self.mass[:, None] * v * v).sum()

    def max_stable_dt(self) -> float:
        """The explicit time-step bound 0.5 * h * sqrt(density / (lam + 2 mu)) at the current parameters."""
        with torch.no_grad():
            stiff = float(self.lam + 2 * self.mu)
        return 0.5 * self.min_edge * math.sqrt(self.density / stiff)

    def check_nodes(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.shape != self.rest.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ArgumentError(f"{name} must be a tensor of node positions with shape {tuple(self.rest.shape)}, "
                                f"got {got}")

    def extra_repr(self) -> str:
        return (f"nodes={self.rest.shape[0]}, triangles={self.triangles.shape[0]}, density={self.density:g}, "
                f"damping={self.damping:g}, gravity={self.gravity:g}")
