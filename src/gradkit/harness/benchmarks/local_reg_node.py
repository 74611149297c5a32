"""Benchmark: the local regulariser's extra cost per training step of a neural ODE (paper slug: local-reg-node).

The claim's model (Linear(40 -> 32) -> neural ODE with a 32-64-32 tanh field on [0, 1], dopri5 at
rtol = atol = 1e-6, backprop through the solver -> Linear(32 -> 10)), batch 256 of random 40-d inputs.
Baseline: the unregularised training step (forward, cross-entropy, backward, optimizer step). Candidates:
the same step with the unbiased local regulariser (one extra dopri5 step at a random time: 8 evaluations of
the field and their backward) and with the global (ERNODE) regulariser. The optimizer's learning rate is 0,
so every repeat solves the same ODE with the same steps and only the regulariser differs. ``field_gain``
scales the field's output layer: 1 is a fresh initialisation (26 NFE), 5 gives 50 NFE, what the
claim's models need after training.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.local_reg_node import NODEClassifier
from ...solvers.ode import Dopri5

D_IN, WIDTH, HIDDEN, CLASSES, BATCH, TOL = 40, 32, 64, 10, 256, 1e-6


def _model(regularize: str | None, field_gain: float) -> NODEClassifier:
    torch.manual_seed(0)
    m = NODEClassifier(D_IN, WIDTH, HIDDEN, CLASSES, dict(solver=Dopri5(TOL, TOL), regularize=regularize,
                                                          generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        m.node.func.net[2].weight.mul_(field_gain)
    return m


def _step(model: NODEClassifier, x: torch.Tensor, y: torch.Tensor, w_reg: float = 2.5):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # same weights every repeat: the same solve

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if model.reg is not None:
            loss = loss + w_reg * model.reg
        loss.backward()
        opt.step()

    return step


def _runner(regularize: str, field_gain: float):
    def run(repeats: int) -> BenchResult:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, D_IN, generator=gen)
        y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        base = _model(None, field_gain)
        cand = _model(regularize, field_gain)
        cand.load_state_dict(copy.deepcopy(base.state_dict()))
        res = compare_steps(_step(base, x, y), _step(cand, x, y), repeats=repeats, warmup=2)
        base(x)
        cand(x)
        return BenchResult(res.baseline_s, res.candidate_s, extra={
            "batch": BATCH, "tol": TOL, "field_gain": field_gain, "solve_nfe": base.node.last_nfe,
            "candidate_nfe": cand.node.last_nfe, "regularize": regularize})

    return run


for _name, _reg in (("local", "unbiased"), ("global", "global")):
    for _gain, _tag in ((1.0, ""), (5.0, "-nfe50")):
        register_benchmark(Benchmark(
            name=f"local-reg-node-step-{_name}{_tag}",
            slug="local-reg-node",
            description=(f"neural-ODE classifier training step (batch {BATCH}, dopri5 rtol=atol={TOL:g}, field gain "
                         f"{_gain:g}) with the {_name} error regulariser vs unregularised"),
            target=1.5 if _name == "local" else None,
            baseline="unregularised neural-ODE step",
            run=_runner(_reg, _gain),
        ))
