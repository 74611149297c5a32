"""Penalty contact with a damped normal spring and Coulomb-capped viscous friction (paper slug: difftactile).

For a body point at signed distance ``phi`` from a rigid object (outward object normal ``n``), moving at
``v_rel`` relative to the object, the force on the body point is

    pen = max(-phi, 0),   v_n = max(-n . v_rel, 0)                 (approach speed)
    f_n = (k_n + k_d v_n) pen n                                     (pushes the point out of the object)
    v_t = v_rel - (n . v_rel) n
    f_t = -(v_t / |v_t|) min(k_t |v_t|, mu_f |f_n|)   (|v_t| floored at eps in the division)

and the object receives ``-(f_n + f_t)``: its normal force pushes it out of the body, and friction on it
opposes its tangential velocity relative to the body. The force is zero for ``phi >= 0``. ``PenaltyContact``
holds the four coefficients as learnable log-parameters (system-identification targets).

>>> phi, n = torch.tensor([-0.01]), torch.tensor([[0.0, 1.0]])
>>> penalty_contact_force(phi, n, torch.zeros(1, 2), kn=1000.0, kd=0.0, kt=20.0, mu_f=0.5)
tensor([[ 0., 10.]])
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._validate import ArgumentError, positive
from .sdf import SDF, evaluate_sdf


def penalty_contact_force(phi: torch.Tensor, normal: torch.Tensor, v_rel: torch.Tensor, kn, kd, kt, mu_f,
                          eps: float = 1e-4) -> torch.Tensor:
    """The force (N, 2) on body points with signed distances ``phi`` (N,), object normals (N, 2) and
    velocities relative to the object (N, 2); coefficients are floats or 0-dim tensors (see module doc).

    Below the slip speed ``eps`` friction stays viscous (``-k_t v_t``, at most ``k_t eps``) instead of
    being switched off, so the force is continuous there and never divides by zero.
    """
    if phi.dim() != 1 or normal.shape != (phi.shape[0], 2) or v_rel.shape != normal.shape:
        raise ArgumentError(f"phi, normal and v_rel must have shapes (N,), (N, 2), (N, 2), got "
                            f"{tuple(phi.shape)}, {tuple(normal.shape)}, {tuple(v_rel.shape)}")
    pen = (-phi).clamp_min(0)
    vn = (normal * v_rel).sum(-1)
    fn_mag = (kn + kd * (-vn).clamp_min(0)) * pen
    v_t = v_rel - vn[:, None] * normal
    speed = (v_t * v_t).sum(-1).clamp_min(eps * eps).sqrt()       # floored: no 0/0 at rest, finite grads
    # |f_t| = |v_t| min(k_t, mu_f f_n / speed) = min(k_t |v_t|, mu_f f_n) for |v_t| >= eps (and below both)
    gain = torch.minimum(kt * torch.ones_like(speed), mu_f * fn_mag / speed)
    return fn_mag[:, None] * normal - gain[:, None] * v_t


class PenaltyContact(nn.Module):
    """Learnable contact coefficients ``log_kn, log_kd, log_kt, log_muf`` and the force on body points.

    ``forward(x, v, sdf, obj_pos, obj_vel)`` evaluates ``sdf`` at ``x - obj_pos`` (the object translated by
    ``obj_pos``) and returns the force on the points ``x`` (N, 2).
    """

    NAMES = ("kn", "kd", "kt", "mu_f")

    def __init__(self, kn: float = 1500.0, kd: float = 10.0, kt: float = 20.0, mu_f: float = 0.5,
                 eps: float = 1e-4) -> None:
        super().__init__()
        vals = {"kn": kn, "kd": kd, "kt": kt, "mu_f": mu_f}
        for name, val in vals.items():
            setattr(self, f"log_{name.replace('_', '')}",
                    nn.Parameter(torch.tensor(math.log(positive(name, val)), dtype=torch.get_default_dtype())))
        self.eps = positive("eps", eps)

    def coefficients(self) -> dict[str, torch.Tensor]:
        """{kn, kd, kt, mu_f} as positive tensors (exp of the log-parameters)."""
        return {n: getattr(self, f"log_{n.replace('_', '')}").exp() for n in self.NAMES}

    def forward(self, x: torch.Tensor, v: torch.Tensor, sdf: SDF, obj_pos: torch.Tensor | None = None,
                obj_vel: torch.Tensor | None = None) -> torch.Tensor:
        p = x if obj_pos is None else x - obj_pos
        phi, n = evaluate_sdf(sdf, p)
        v_rel = v if obj_vel is None else v - obj_vel
        c = self.coefficients()
        return penalty_contact_force(phi, n, v_rel, c["kn"], c["kd"], c["kt"], c["mu_f"], self.eps)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={float(v):.4g}" for k, v in self.coefficients().items())
