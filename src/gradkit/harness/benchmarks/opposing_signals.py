"""Benchmarks of opposing-signals: the probes' overhead per full-batch GD step, as in the claim.

The claim's setting: an MLP 21-64-64-64-1 on n = 1000 points, square loss, full-batch GD.

- ``opposing-signals-tracker-step``: a GD step plus ``PerExampleLossTracker.step`` (one no-grad forward of
  the probe set, top-k of |Delta|, a few small bookkeeping ops) vs the plain GD step. The forward is about a
  third of a forward+backward+update and the bookkeeping a few tenths of a millisecond, so the expected
  ratio is about 1.3-1.5; target 2.
- ``opposing-signals-sharpness-every-50``: 50 GD steps plus one ``hessian_top_eigenvalue`` (20 power
  iterations in float64, double backward) vs 50 plain GD steps: the claim's sharpness schedule, per step.
  One Hessian-vector product costs a few training steps, twice that in float64, so 20 of them add about
  1-1.5 steps' worth per step; expected ratio about 2-2.5; target 3.
"""
from __future__ import annotations

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...data.opposing_signals import opposing_signal_data
from ...probes.opposing_signals import PerExampleLossTracker
from ...probes.sharpness import hessian_top_eigenvalue

N, WIDTHS, K, EVERY, ITERS = 1000, (64, 64, 64), 40, 50, 20


def _sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.reshape(-1) - (2 * y - 1)) ** 2


def _setup():
    ds = opposing_signal_data(n=N, seed=0)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = ds.x.shape[1]
    for w in WIDTHS:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    model = nn.Sequential(*layers, nn.Linear(d, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)  # small: the weights barely move while timing

    def gd_step() -> None:
        opt.zero_grad(set_to_none=True)
        _sq(model(ds.x), ds.y).mean().backward()
        opt.step()

    return model, ds, gd_step


def run_tracker(repeats: int) -> BenchResult:
    model, ds, gd_step = _setup()
    tracker = PerExampleLossTracker(model, _sq, ds.x, ds.y, k=K)

    def candidate() -> None:
        tracker.step()
        gd_step()

    res = compare_steps(gd_step, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"n": N, "k": K})


def run_sharpness(repeats: int) -> BenchResult:
    model, ds, gd_step = _setup()
    state = {"v": None}

    def baseline() -> None:
        for _ in range(EVERY):
            gd_step()

    def candidate() -> None:
        _, state["v"] = hessian_top_eigenvalue(model, _sq, ds.x, ds.y, iters=ITERS, v0=state["v"],
                                               dtype=torch.float64)
        baseline()

    res = compare_steps(baseline, candidate, repeats=repeats, warmup=1)
    return BenchResult(res.baseline_s / EVERY, res.candidate_s / EVERY,
                       extra={"n": N, "every": EVERY, "power_iters": ITERS, "dtype": "float64"})


register_benchmark(Benchmark(
    name="opposing-signals-tracker-step",
    slug="opposing-signals",
    description=f"full-batch GD step + PerExampleLossTracker.step (n={N}, k={K}) vs plain GD step, "
                f"MLP 21-{'-'.join(map(str, WIDTHS))}-1",
    target=2.0,
    baseline="plain full-batch GD step",
    run=run_tracker,
))

register_benchmark(Benchmark(
    name="opposing-signals-sharpness-every-50",
    slug="opposing-signals",
    description=f"{EVERY} GD steps + hessian_top_eigenvalue ({ITERS} float64 power iterations, warm-started) "
                f"vs {EVERY} plain GD steps (per step), n={N}",
    target=3.0,
    baseline="plain full-batch GD steps",
    run=run_sharpness,
))
