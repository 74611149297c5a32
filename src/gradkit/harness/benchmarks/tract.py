"""Benchmark: training step of a small CNN with a TrAct first conv vs the plain CNN (paper slug: tract).

Both models share the initial weights and see the same batch; the step is forward + backward + SGD
(momentum) step. The only difference is the first layer's weight gradient: TrAct unfolds the input
patches, forms the (C*k*k)^2 second-moment matrix and solves one small SPD system per step.
Two shapes: CIFAR-10-like 3x32x32 images (the paper's setting) and the claim's 1x8x8 digits.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, import_peer, peer_result, peers_enabled, register_benchmark
from ...nn.tract import tract

BATCH = 64
SHAPES = {"cifar": (3, 32), "digits": (1, 8)}


def _cnn(channels: int, size: int) -> nn.Sequential:
    s = (size - 2) // 2
    return nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * s * s, 10))


def _make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _runner(shape: str):
    channels, size = SHAPES[shape]

    def run(repeats: int) -> BenchResult:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        plain = _cnn(channels, size)
        model = copy.deepcopy(plain)
        model[0] = tract(model[0], lambda_=0.1)
        x = torch.randn(BATCH, channels, size, size, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        base = _make_step(plain, x, y)
        ours_step = _make_step(model, x, y)
        res = compare_steps(base, ours_step, repeats=repeats)
        extra = {"batch": BATCH, "input": [channels, size, size], "lambda": 0.1}
        if peers_enabled():
            tt = import_peer("torch_tract")
            peer = None
            if tt is not None:
                theirs = copy.deepcopy(plain)
                first = tt.TrActConv2d(channels, 32, 3, padding=1, lambda_=0.1)
                first.load_state_dict(plain[0].state_dict())
                theirs[0] = first
                peer = _make_step(theirs, x, y)
            extra["peers"] = [peer_result("torch_tract", base, peer, res.ratio, repeats, ours=ours_step)]
        return BenchResult(res.baseline_s, res.candidate_s, extra=extra)

    return run


for _shape, (_c, _s) in SHAPES.items():
    register_benchmark(Benchmark(
        name=f"tract-first-conv-step-{_shape}",
        slug="tract",
        description=f"small CNN training step, batch {BATCH} of {_c}x{_s}x{_s}: TrAct first conv (lambda 0.1) vs "
                    "plain first conv",
        target=1.10,
        baseline="plain CNN",
        run=_runner(_shape),
    ))
