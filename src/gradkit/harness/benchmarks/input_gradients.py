"""Benchmarks of input-gradients: a PGD adversarial training step and an input-gradient attribution, each
against one plain forward+backward+SGD step of the same MLP on the same inputs.

- ``input-gradients-pgd-train-step``: ``adversarial_loss(PGD(eps=0.1, steps=7))`` + backward + step. The
  attack costs ``steps`` extra forward+backward passes (input gradient only), so the expected ratio is
  about steps + 1 = 8; target 10.
- ``input-gradients-attribution``: ``InputGradient(model).attribute`` of 256 inputs (loss gradient,
  ``internal_batch_size=64``); no parameter gradients or optimizer step, so about 1 (chunking adds a little); target 2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...probes.input_gradients import InputGradient
from ...robustness.pgd import PGD, adversarial_loss

BATCH, D_IN, HIDDEN, CLASSES, STEPS = 256, 784, 256, 10, 7


def _setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, CLASSES))
    x = torch.rand(BATCH, D_IN, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def baseline() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return model, x, y, opt, baseline


def run_pgd(repeats: int) -> BenchResult:
    model, x, y, opt, baseline = _setup()
    loss_fn = adversarial_loss(PGD(eps=0.1, norm="linf", steps=STEPS, clamp=(0.0, 1.0)),
                               generator=torch.Generator().manual_seed(1))

    def candidate() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, (x, y)).backward()
        opt.step()

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "pgd_steps": STEPS})


def run_attribution(repeats: int) -> BenchResult:
    model, x, y, opt, baseline = _setup()
    ig = InputGradient(model, output="loss")

    def candidate() -> None:
        ig.attribute(x, target=y, internal_batch_size=64)

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "internal_batch_size": 64})


register_benchmark(Benchmark(
    name="input-gradients-pgd-train-step",
    slug="input-gradients",
    description=f"linf PGD ({STEPS} steps) adversarial training step vs plain step, MLP {D_IN}-{HIDDEN}-{HIDDEN}-"
                f"{CLASSES}, batch {BATCH}",
    target=10.0,
    baseline="plain forward+backward+SGD step",
    run=run_pgd,
))

register_benchmark(Benchmark(
    name="input-gradients-attribution",
    slug="input-gradients",
    description=f"InputGradient (loss) attribution of {BATCH} inputs (internal_batch_size 64) vs plain training "
                "step of the same MLP",
    target=2.0,
    baseline="plain forward+backward+SGD step",
    run=run_attribution,
))
