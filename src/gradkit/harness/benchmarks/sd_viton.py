"""Benchmark: overhead of the gradient-conflict probe on a cascaded-flow training step (paper slug: sd-viton).

The step is the claim's baseline cascade (3 levels of 2-D flows, 32x32 garments, batch 32): forward, L1 mask
and texture losses, TV of the final flow and a stand-in adversarial term (squared error of the output mask
against a fixed patch map through a small conv), backward and an Adam step. The candidate does the same step
and records the cosine between the TV and adversarial gradients w.r.t. the final flow
(:class:`gradkit.probes.gradient_conflict.GradientConflictProbe`): two extra partial backward passes
through the graph, every step (``every1``) or every 10th step as the claim logs it (``every10``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...data.garments import garment_pairs
from ...nn.sequential_deformation import CascadedFlow
from ...privacy.matching import total_variation
from ...probes.gradient_conflict import GradientConflictProbe

BATCH = 32


def _make_step(net: CascadedFlow, critic: nn.Module, data, probe: GradientConflictProbe | None):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> None:
        o = net(data.source, data.cond)
        out = o["warped"]
        l1 = 10 * (out[:, 1] - data.target[:, 1]).abs().mean() + (out[:, 0] - data.target[:, 0]).abs().mean()
        tv = 2.0 * total_variation(o["flow"])
        adv = (critic(out[:, 1:2]) - 1).pow(2).mean()
        if probe is not None:
            probe.record({"tv": tv, "adv": adv}, o["flow"])
        opt.zero_grad(set_to_none=True)
        (l1 + tv + adv).backward()
        opt.step()

    return step


def _runner(every: int):
    def run(repeats: int) -> BenchResult:
        torch.manual_seed(0)
        data = garment_pairs(BATCH, size=32, seed=0)
        net = CascadedFlow(2, 1, levels=3, taco=False, width=24)
        critic = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 1, 3, 1, 1))
        for q in critic.parameters():
            q.requires_grad_(False)
        probe = GradientConflictProbe(pairs=[("tv", "adv")], every=every)
        base = _make_step(net, critic, data, None)
        cand = _make_step(copy.deepcopy(net), critic, data, probe)
        res = compare_steps(base, cand, repeats=repeats, inner=every)
        return BenchResult(res.baseline_s, res.candidate_s,
                           extra={"batch": BATCH, "size": 32, "probe_every": every, "records": len(probe.steps)})

    return run


for _every in (1, 10):
    register_benchmark(Benchmark(
        name=f"sd-viton-conflict-probe-every{_every}",
        slug="sd-viton",
        description=f"cascaded-flow training step (3 levels, 32x32, batch {BATCH}) with the TV-vs-adversarial "
                    f"gradient-conflict probe recorded every {_every} step(s) vs the same step without it",
        target=None,
        baseline="training step without the probe",
        run=_runner(_every),
    ))
