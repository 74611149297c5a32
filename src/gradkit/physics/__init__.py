"""Differentiable physics: a 2-D soft-body tactile simulator (paper slug: difftactile).

``SoftBody2D`` (linear-triangle neo-Hookean FEM pad), analytic SDF objects (``Circle``, ``Box``,
``Polyline``), ``PenaltyContact`` (damped penalty + Coulomb-capped friction) and ``DiffSim2D`` (symplectic
Euler rollouts with optional per-control-step checkpointing and gradient clamping).
"""
from .contact import PenaltyContact, penalty_contact_force
from .fem import SoftBody2D
from .mesh import TriMesh, rectangle_mesh
from .sdf import Box, Circle, Polyline, evaluate_sdf
from .sim import DiffSim2D, clamp_grad_hook, energy_drift

__all__ = ["Box", "Circle", "DiffSim2D", "PenaltyContact", "Polyline", "SoftBody2D", "TriMesh", "clamp_grad_hook", "energy_drift",
           "evaluate_sdf", "penalty_contact_force", "rectangle_mesh"]
