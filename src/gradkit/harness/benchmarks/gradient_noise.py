"""Step-time cost of GradientNoise (gradient-noise): a 4-layer MLP SGD step with vs without noise.

Model: 784 -> 256 -> 256 -> 256 -> 10 ReLU MLP (335k parameters), batch 128, plain SGD (lr 0.01);
the candidate adds ``GradientNoise(eta=0.01)`` (one N(0, sigma_t^2) draw per parameter entry)
between ``backward`` and ``step``. Both models start from the same weights and see the same batch.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...optim.gradient_noise import GradientNoise

IN, WIDTH, OUT, BATCH = 784, 256, 10, 128


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, OUT))


def run(repeats: int, batch: int = BATCH):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, IN, generator=gen)
    y = torch.randint(0, OUT, (batch,), generator=gen)
    torch.manual_seed(0)
    base = _mlp()
    cand = copy.deepcopy(base)
    opt_b = torch.optim.SGD(base.parameters(), lr=0.01)
    opt_c = torch.optim.SGD(cand.parameters(), lr=0.01)
    gn = GradientNoise(cand.parameters(), eta=0.01, generator=torch.Generator().manual_seed(1))

    def baseline_step() -> None:
        opt_b.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(base(x), y).backward()
        opt_b.step()

    def candidate_step() -> None:
        opt_c.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(cand(x), y).backward()
        gn.apply()
        opt_c.step()

    r = compare_steps(baseline_step, candidate_step, repeats=repeats)
    n_params = sum(p.numel() for p in base.parameters())
    return BenchResult(r.baseline_s, r.candidate_s,
                       extra={"params": n_params, "batch": batch, "threads": torch.get_num_threads()})


register_benchmark(Benchmark(
    name="gradient-noise-step",
    slug="gradient-noise",
    description=("SGD step of a 784-256-256-256-10 ReLU MLP (335k params), batch 128, "
                 "with GradientNoise(eta=0.01) vs without"),
    target=1.05,
    run=run,
))


# The noise costs one Gaussian draw per parameter per step, whatever the batch: the same model at
# batch 1024 shows how the ratio falls as the step's compute grows (reported, no target).
register_benchmark(Benchmark(
    name="gradient-noise-step-b1024",
    slug="gradient-noise",
    description="the same MLP step at batch 1024, with GradientNoise(eta=0.01) vs without",
    target=None,
    run=lambda repeats: run(repeats, batch=1024),
))
