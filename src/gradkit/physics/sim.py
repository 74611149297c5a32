"""A differentiable 2-D tactile simulator: FEM pad, rigid SDF object, penalty contact (paper slug: difftactile).

DiffTactile's core, in plain PyTorch: the pad's top nodes follow a controlled base trajectory, the other
nodes move by symplectic Euler,

    v <- v + dt (f_int(x) + f_contact(x, v) - c m v - m g e_y) / m,     x <- x + dt v,

with ``substeps`` substeps per control step. The whole rollout is differentiable (system identification,
trajectory optimisation). Options: ``checkpoint=True`` keeps only the state at control-step boundaries and
recomputes the substeps in backward (``torch.utils.checkpoint``); ``grad_clip`` clamps the gradient of every
substep's state to +-grad_clip (:func:`clamp_grad_hook`), the paper's guard against blow-ups at contact
switches. Explicit integration needs ``dt <= 0.5 h sqrt(density / (lam + 2 mu))``; a rollout whose dt
exceeds this bound at the current parameters raises.

>>> body = SoftBody2D(rectangle_mesh(6, 3), damping=50.0)
>>> sim = DiffSim2D(body, PenaltyContact(), Circle(0.5, center=(0.0, -0.52)), dt=2e-4, substeps=10)
>>> out = sim.rollout(torch.tensor([[0.0, -0.03 * k] for k in range(1, 6)]))
>>> out["contact_force"].shape, out["markers"].shape
(torch.Size([5, 2]), torch.Size([5, 3, 2]))
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from .._validate import ArgumentError, boolean, positive, positive_int
from .contact import PenaltyContact, penalty_contact_force
from .fem import SoftBody2D
from .sdf import SDF, Circle, evaluate_sdf


def clamp_grad_hook(t: torch.Tensor, bound: float) -> torch.Tensor:
    """Register a hook that clamps the gradient flowing into ``t`` to [-bound, bound]; returns ``t``.

    A tensor that does not require grad is returned unchanged.
    """
    bound = positive("bound", bound)
    if t.requires_grad:
        t.register_hook(lambda g: g.clamp(-bound, bound))
    return t


class DiffSim2D:
    """Rollouts of a :class:`SoftBody2D` pad pressed against a rigid SDF object through :class:`PenaltyContact`.

    fixed: node ids driven by the base (default: the body's top row); contact_nodes: nodes tested for
    contact (default: bottom row); markers: nodes whose displacement is reported (default: every other
    bottom node).
    """

    def __init__(self, body: SoftBody2D, contact: PenaltyContact, sdf: SDF, dt: float = 1e-4, substeps: int = 20,
                 grad_clip: float | None = 1e3, checkpoint: bool = False, fixed: torch.Tensor | None = None,
                 contact_nodes: torch.Tensor | None = None, markers: torch.Tensor | None = None) -> None:
        if not isinstance(body, SoftBody2D):
            raise ArgumentError(f"body must be a SoftBody2D, got {type(body).__name__}")
        if not isinstance(contact, PenaltyContact):
            raise ArgumentError(f"contact must be a PenaltyContact, got {type(contact).__name__}")
        if not callable(sdf):
            raise ArgumentError(f"sdf must be callable points (N, 2) -> phi (N,), got {type(sdf).__name__}")
        self.body, self.contact, self.sdf = body, contact, sdf
        self.dt = positive("dt", dt)
        self.substeps = positive_int("substeps", substeps)
        self.grad_clip = None if grad_clip is None else positive("grad_clip", grad_clip)
        self.checkpoint = boolean("checkpoint", checkpoint)
        n = body.rest.shape[0]
        self.fixed = self._nodes("fixed", body.top if fixed is None else fixed, n)
        self.contact_nodes = self._nodes("contact_nodes", body.bottom if contact_nodes is None else contact_nodes, n)
        self.markers = self._nodes("markers", body.bottom[::2] if markers is None else markers, n)
        self.check_dt()

    @staticmethod
    def _nodes(name: str, idx, n: int) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ArgumentError(f"{name} must be node ids in [0, {n}), got {idx.tolist()[:8]}")
        return idx

    def check_dt(self) -> float:
        """Raise unless ``dt`` is within the explicit stability bound at the current parameters; return the bound."""
        bound = self.body.max_stable_dt()
        if self.dt > bound:
            with torch.no_grad():
                mu, lam = float(self.body.mu), float(self.body.lam)
            raise ArgumentError(
                f"dt={self.dt:.4g} exceeds the explicit stability bound 0.5*h*sqrt(density/(lam+2*mu)) = "
                f"{bound:.4g} (h={self.body.min_edge:.4g}, density={self.body.density:g}, mu={mu:.4g}, "
                f"lam={lam:.4g}); lower dt or stiffness")
        return bound

    # ------------------------------------------------------------------------------------------ stepping
    def _control_step(self, x, v, b0, b1, o0, o1):
        """``substeps`` substeps with the base moving linearly b0 -> b1 and the object o0 -> o1.
        Returns the new state and the mean force on the object over the step."""
        body, k, dt, cn, fixed = self.body, self.substeps, self.dt, self.contact_nodes, self.fixed
        mu, lam = body.mu, body.lam                                  # one exp per control step
        c = self.contact.coefficients()
        inv_m = (dt / body.mass)[:, None]
        drag = (body.damping * body.mass)[:, None]
        base_vel = ((b1 - b0) / (k * dt)).expand(len(fixed), 2)
        obj_vel = (o1 - o0) / (k * dt)
        rest_fixed = body.rest[fixed]
        gravity = None
        if body.gravity:
            gravity = torch.zeros_like(x)
            gravity[:, 1] = -body.gravity * body.mass
        f_obj = torch.zeros_like(x[0])
        for s in range(1, k + 1):
            phi, n = evaluate_sdf(self.sdf, x[cn] - (o0 + (o1 - o0) * ((s - 1) / k)))
            f_c = penalty_contact_force(phi, n, v[cn] - obj_vel, c["kn"], c["kd"], c["kt"], c["mu_f"],
                                        self.contact.eps)
            f = body.internal_forces(x, mu, lam).index_add(0, cn, f_c)
            if body.damping:
                f = f - drag * v
            if gravity is not None:
                f = f + gravity
            v = (v + inv_m * f).index_copy(0, fixed, base_vel)
            x = (x + dt * v).index_copy(0, fixed, rest_fixed + (b0 + (b1 - b0) * (s / k)))
            f_obj = f_obj - f_c.sum(0)
            if self.grad_clip is not None:
                clamp_grad_hook(x, self.grad_clip)
                clamp_grad_hook(v, self.grad_clip)
        return x, v, f_obj / k

    def rollout(self, base_traj: torch.Tensor, obj_traj: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                v0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Simulate ``T`` control steps.

        base_traj: (T, 2) offsets of the fixed nodes from rest at the end of each control step (start: 0);
        obj_traj: (T, 2) object offsets likewise (None: the object stays put). Returns ``x`` (T, N, 2) node
        positions at control-step ends, ``v`` (N, 2) the final velocities, ``contact_force`` (T, 2) the mean
        total force on the object over each control step, ``markers`` (T, M, 2) marker displacements in the sensor's frame
        (from rest moved by the base offset), what a camera behind the pad sees.
        """
        body = self.body
        self.check_dt()
        like = body.rest
        base_traj = self._traj("base_traj", base_traj, like)
        T = base_traj.shape[0]
        obj_traj = torch.zeros_like(base_traj) if obj_traj is None else self._traj("obj_traj", obj_traj, like)
        if obj_traj.shape[0] != T:
            raise ArgumentError(f"obj_traj must have the {T} control steps of base_traj, got {obj_traj.shape[0]}")
        x = body.rest.clone() if x0 is None else x0
        v = torch.zeros_like(body.rest) if v0 is None else v0
        body.check_nodes(x, "x0")
        body.check_nodes(v, "v0")
        zero = torch.zeros_like(base_traj[0])
        xs, forces = [], []
        prev_b, prev_o = zero, zero
        for t in range(T):
            args = (x, v, prev_b, base_traj[t], prev_o, obj_traj[t])
            if self.checkpoint and torch.is_grad_enabled():
                x, v, f = _torch_checkpoint(self._control_step, *args, use_reentrant=False)
            else:
                x, v, f = self._control_step(*args)
            xs.append(x)
            forces.append(f)
            prev_b, prev_o = base_traj[t], obj_traj[t]
        xs_t = torch.stack(xs)
        markers = xs_t[:, self.markers] - body.rest[self.markers] - base_traj[:, None]
        return {"x": xs_t, "v": v, "contact_force": torch.stack(forces), "markers": markers}

    @staticmethod
    def _traj(name: str, traj, like: torch.Tensor) -> torch.Tensor:
        traj = torch.as_tensor(traj).to(like)
        if traj.dim() != 2 or traj.shape[1] != 2 or traj.shape[0] < 1:
            raise ArgumentError(f"{name} must have shape (T, 2) with T >= 1, got {tuple(traj.shape)}")
        return traj


def energy_drift(body: SoftBody2D, dt: float, substeps: int, control_steps: int = 1, stretch: float = 0.02) -> float:
    """Relative change of total (elastic + kinetic) energy over a free vibration, an integrator check.

    The pad starts at rest positions stretched vertically by ``stretch`` (top nodes held at rest), with the
    object far away, and runs ``control_steps`` x ``substeps`` substeps of ``dt`` without moving its base.
    Returns ``|E_end / E_start - 1|``. With no damping or gravity in ``body`` the exact answer is 0;
    symplectic Euler's error is first order in ``dt``.

    >>> body = SoftBody2D(rectangle_mesh(6, 3, dtype=torch.float64)).double()
    >>> energy_drift(body, dt=2.5e-5, substeps=200) < 0.01
    True
    """
    stretch = positive("stretch", stretch)
    control_steps = positive_int("control_steps", control_steps)
    like = body.rest
    sim = DiffSim2D(body, PenaltyContact().to(like), Circle(0.3, center=(0.0, -5.0)).to(like), dt=dt, substeps=substeps, grad_clip=None)
    x0 = body.rest.clone()
    x0[:, 1] = x0[:, 1] * (1.0 + stretch)
    x0[body.top] = body.rest[body.top]
    with torch.no_grad():
        e0 = body.elastic_energy(x0)
        out = sim.rollout(torch.zeros(control_steps, 2, dtype=like.dtype, device=like.device), x0=x0)
        e1 = body.elastic_energy(out["x"][-1]) + body.kinetic_energy(out["v"])
    return abs(float(e1 / e0) - 1.0)

