"""Benchmark: M-FAC optimizer step vs an SGD step on a ~10k-parameter MLP (paper slug: mfac).

MLP 64-128-10 (9,610 parameters), batch 64, same initial weights and batch for both. Registered ratios
are of the whole training step (forward + backward + optimizer step), as ``compare_steps`` measures them;
``extra["step_only_ratio"]`` is ``optimizer.step()`` alone (fixed gradients) against ``SGD.step()`` alone.
The window size m sets the cost: O(d m + m^2) per step with the default incremental Woodbury update.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark, train_step
from ...optim.mfac import MFAC

BATCH = 64
TARGETS = {16: 5.0, 64: 15.0, 256: 60.0}


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _step_only(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return opt.step


def _runner(m: int, method: str = "woodbury"):
    def run(repeats: int) -> BenchResult:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        plain = _mlp()
        model = copy.deepcopy(plain)
        x = torch.randn(BATCH, 64, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        sgd = torch.optim.SGD(plain.parameters(), lr=1e-2)
        mfac = MFAC(model.parameters(), lr=1e-4, ngrads=m, method=method)
        res = compare_steps(train_step(plain, sgd, x, y), train_step(model, mfac, x, y), repeats=repeats)
        # optimizer.step() alone, gradients fixed
        plain2, model2 = copy.deepcopy(plain), copy.deepcopy(plain)
        sgd2 = torch.optim.SGD(plain2.parameters(), lr=1e-2)
        mfac2 = MFAC(model2.parameters(), lr=1e-4, ngrads=m, method=method)
        only = compare_steps(_step_only(plain2, sgd2, x, y), _step_only(model2, mfac2, x, y), repeats=repeats, inner=5)
        return BenchResult(res.baseline_s, res.candidate_s, extra={
            "m": m, "method": method, "d": sum(p.numel() for p in plain.parameters()), "batch": BATCH,
            "step_only_ratio": round(only.ratio, 3), "sgd_step_only_s": only.baseline_s,
            "mfac_step_only_s": only.candidate_s})

    return run


for _m, _target in TARGETS.items():
    register_benchmark(Benchmark(
        name=f"mfac-step-m{_m}",
        slug="mfac",
        description=f"MLP 64-128-10 training step, batch {BATCH}: MFAC (m={_m}, incremental Woodbury) vs SGD "
                    "(whole step; extra.step_only_ratio = optimizer.step() alone)",
        target=_target,
        baseline="SGD step",
        run=_runner(_m),
    ))
