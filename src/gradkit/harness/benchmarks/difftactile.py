"""Benchmarks of the 2-D differentiable tactile simulator (paper slug: difftactile).

The scene is the system-identification claim's: a 20x5-node pad (152 triangles) pressed onto a circle
and slid, 10 substeps per control step, float64.

- ``difftactile-rollout-fwd-bwd``: a forward+backward rollout (loss on forces and markers) vs the same
  rollout forward only under ``torch.no_grad`` -- the cost of differentiating through the simulator.
- ``difftactile-checkpoint``: forward+backward with per-control-step checkpointing vs without (the
  recomputation's time cost); extra: the bytes a forward with grad retains per control step, with and
  without checkpointing, at two rollout lengths (flat per control step means memory linear in length
  with a per-step constant; checkpointing keeps only the boundary state, not every substep's tensors).
"""
from __future__ import annotations

import torch

from ...physics import Circle, DiffSim2D, PenaltyContact, SoftBody2D, rectangle_mesh
from ...testing import RetainedBytesMeter
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark

NX, NY, SUBSTEPS, DT = 20, 5, 10, 2e-4
LENGTHS = (10, 20)


def _sim(checkpoint: bool) -> DiffSim2D:
    body = SoftBody2D(rectangle_mesh(NX, NY, dtype=torch.float64), damping=50.0).double()
    return DiffSim2D(body, PenaltyContact().double(), Circle(0.5, center=(0.0, -0.505)), dt=DT, substeps=SUBSTEPS,
                     checkpoint=checkpoint)


def _traj(steps: int) -> torch.Tensor:
    press = steps // 2
    rows = [[0.0, -0.04 * (k + 1) / press] for k in range(press)]
    rows += [[0.15 * (k + 1) / (steps - press), -0.04] for k in range(steps - press)]
    return torch.tensor(rows, dtype=torch.float64)


def _loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return out["contact_force"].pow(2).mean() + out["markers"].pow(2).mean()


def _fwd_bwd(sim: DiffSim2D, traj: torch.Tensor):
    params = list(sim.body.parameters()) + list(sim.contact.parameters())

    def step() -> None:
        torch.autograd.grad(_loss(sim.rollout(traj)), params)

    return step


def _fwd(sim: DiffSim2D, traj: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            sim.rollout(traj)

    return step


def _run_fwd_bwd(repeats: int) -> BenchResult:
    steps = LENGTHS[0]
    sim, traj = _sim(False), _traj(steps)
    res = compare_steps(_fwd(sim, traj), _fwd_bwd(sim, traj), repeats=repeats, warmup=2)
    n = steps * SUBSTEPS
    return BenchResult(res.baseline_s, res.candidate_s, extra={
        **res.extra, "substeps": n, "forward_s_per_substep": res.baseline_s / n,
        "forward_backward_s_per_substep": res.candidate_s / n, "nodes": NX * NY})


def retained_bytes_per_step(checkpoint: bool, steps: int) -> float:
    """Bytes a forward rollout with grad retains (outputs, saved tensors), divided by the control steps."""
    sim, traj = _sim(checkpoint), _traj(steps)
    with torch.no_grad():
        sim.rollout(traj[:1])  # builds the body's cached force operators outside the measurement
    with RetainedBytesMeter() as m:
        loss = _loss(sim.rollout(traj))
    del loss
    return m.bytes / steps


def _run_checkpoint(repeats: int) -> BenchResult:
    steps = LENGTHS[0]
    traj = _traj(steps)
    res = compare_steps(_fwd_bwd(_sim(False), traj), _fwd_bwd(_sim(True), traj), repeats=repeats, warmup=2)
    mem = {f"{'checkpoint' if ck else 'plain'}_bytes_per_step_T{t}": retained_bytes_per_step(ck, t)
           for ck in (False, True) for t in LENGTHS}
    lo, hi = LENGTHS
    mem["checkpoint_per_step_ratio_T{}_vs_T{}".format(hi, lo)] = (
        mem[f"checkpoint_bytes_per_step_T{hi}"] / max(mem[f"checkpoint_bytes_per_step_T{lo}"], 1.0))
    mem["checkpoint_vs_plain_bytes_T{}".format(hi)] = (
        mem[f"checkpoint_bytes_per_step_T{hi}"] / max(mem[f"plain_bytes_per_step_T{hi}"], 1.0))
    return BenchResult(res.baseline_s, res.candidate_s, extra={**res.extra, **mem, "control_steps": steps})


register_benchmark(Benchmark(
    name="difftactile-rollout-fwd-bwd",
    slug="difftactile",
    description=f"{NX}x{NY}-node pad, {LENGTHS[0]} control steps x {SUBSTEPS} substeps: forward+backward rollout "
                "vs forward only (no_grad)",
    target=None,
    baseline="forward-only rollout",
    run=_run_fwd_bwd,
))

register_benchmark(Benchmark(
    name="difftactile-checkpoint",
    slug="difftactile",
    description=f"{NX}x{NY}-node pad, {LENGTHS[0]} control steps x {SUBSTEPS} substeps: forward+backward with "
                "per-control-step checkpointing vs without; retained bytes per control step at "
                f"{LENGTHS[0]} and {LENGTHS[1]} steps in extra",
    target=None,
    baseline="forward+backward without checkpointing",
    run=_run_checkpoint,
))
