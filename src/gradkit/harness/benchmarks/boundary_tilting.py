"""Benchmarks of the shared attacks (boundary-tilting): a PGD step is one forward+backward of the model.

- ``boundary-tilting-pgd-step``: the cost of one PGD step: ``pgd_attack(steps=10)`` against 10 plain
  forward + backward passes (parameter gradients) of the same MLP on the same batch. A step is one forward,
  one backward to the input (instead of to the weights: the same matrix products, give or take a layer)
  and three in-place element-wise passes (sign, step, clamp to the ball and data range); target 1.1.
- ``boundary-tilting-pgd-call``: one call of ``pgd_attack(steps=1)``, i.e. one step plus the per-call work
  (argument checks, the data-range check, the per-coordinate bounds); report only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...robustness.pgd import pgd_attack

BATCH, D_IN, HIDDEN, CLASSES = 256, 784, 256, 10


def _setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, CLASSES)).eval()
    x = torch.rand(BATCH, D_IN, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return model, x, y


def _run(steps: int, repeats: int) -> BenchResult:
    model, x, y = _setup()

    def baseline() -> None:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

    def candidate() -> None:
        pgd_attack(model, x, y, eps=0.1, norm="linf", steps=steps, step_size=0.025, random_start=False,
                   clamp=(0.0, 1.0))

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "pgd_steps": steps})


register_benchmark(Benchmark(
    name="boundary-tilting-pgd-step",
    slug="boundary-tilting",
    description=f"linf PGD step (10 steps in one call) vs as many forward+backward passes, MLP {D_IN}-{HIDDEN}-"
                f"{HIDDEN}-{CLASSES}, batch {BATCH}",
    target=1.1,
    baseline="plain forward+backward (parameter gradients), 10 passes",
    run=lambda repeats: _run(10, repeats),
))

register_benchmark(Benchmark(
    name="boundary-tilting-pgd-call",
    slug="boundary-tilting",
    description=f"one pgd_attack call with steps=1 (checks included) vs one forward+backward, MLP {D_IN}-{HIDDEN}-"
                f"{HIDDEN}-{CLASSES}, batch {BATCH}",
    target=None,
    baseline="plain forward+backward (parameter gradients)",
    run=lambda repeats: _run(1, repeats),
))
