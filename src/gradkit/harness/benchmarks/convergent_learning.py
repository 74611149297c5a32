"""Benchmark: the unit-matching probe's cost (paper slug: convergent-learning).

1. ``convergent-learning-probe-step``: a training step of the claim's MLP 64-128-128-10 (batch 64, Adam) with an
   :class:`ActivationRecorder` on both hidden ReLUs (detached copies of the units, cleared every step) vs the
   plain step.
2. ``convergent-learning-match-layer``: measuring one layer of one pair of nets as the claim does (activations
   of both nets on 360 held-out images, the 128x128 correlation, bipartite and semi matching) vs one plain
   training epoch over the 1437 training images (45 steps of batch 32).
"""
from __future__ import annotations

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark, train_step
from ...probes.unit_matching import ActivationRecorder, collect_activations, match_units, unit_correlation


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _run_step(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plain, probed = _mlp(), _mlp()
    probed.load_state_dict(plain.state_dict())
    x, y = torch.rand(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    base = train_step(plain, torch.optim.Adam(plain.parameters(), lr=1e-3), x, y)
    step = train_step(probed, torch.optim.Adam(probed.parameters(), lr=1e-3), x, y)
    rec = ActivationRecorder(probed, ["1", "3"])

    def candidate() -> None:
        step()
        rec.reset()

    with rec:
        res = compare_steps(base, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": 64, "layers": 2})


def _run_match(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net_a, net_b, net = _mlp(), _mlp(), _mlp()
    x_test = torch.rand(360, 64, generator=gen)
    x_train, y_train = torch.rand(1437, 64, generator=gen), torch.randint(0, 10, (1437,), generator=gen)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = [train_step(net, opt, x_train[i:i + 32], y_train[i:i + 32]) for i in range(0, 1437, 32)]

    def epoch() -> None:
        for s in steps:
            s()

    def measure() -> None:
        c = unit_correlation(collect_activations(net_a, "1", x_test), collect_activations(net_b, "1", x_test))
        match_units(c)
        match_units(c, "semi")

    res = compare_steps(epoch, measure, repeats=repeats, warmup=2)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"units": 128, "samples": 360})


register_benchmark(Benchmark(
    name="convergent-learning-probe-step",
    slug="convergent-learning",
    description="MLP 64-128-128-10 training step (batch 64, Adam) with an ActivationRecorder on both hidden "
                "ReLUs vs the plain step",
    target=1.25,
    baseline="plain training step",
    run=_run_step,
))

register_benchmark(Benchmark(
    name="convergent-learning-match-layer",
    slug="convergent-learning",
    description="one layer of one pair of nets: activations on 360 images, 128x128 correlation, bipartite + "
                "semi matching vs one training epoch (45 steps of batch 32)",
    target=None,
    baseline="one plain training epoch",
    run=_run_match,
))
