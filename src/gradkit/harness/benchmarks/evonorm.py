"""Benchmark: training step with EvoNorm-B0 / EvoNorm-S0 vs BN-ReLU (paper slug: evonorm).

The same conv stack (3x3 conv -> norm-act, three times, then global pool and a linear head) on the
same inputs; only the norm-act differs: ``BatchNorm2d + ReLU`` (PyTorch's fused kernels) vs
:class:`gradkit.nn.evonorm.EvoNormB0` or :class:`~gradkit.nn.evonorm.EvoNormS0` (plain autograd ops).
Reported as a ratio to BN-ReLU (no target: EvoNorm is unfused elementwise math, expected slower).
"""
from __future__ import annotations

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.evonorm import replace_bn_relu

BATCH, CH, SIZE, GROUPS = 32, 32, 16, 8


def _net() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for _ in range(3):
        layers += [nn.Conv2d(c_in, CH, 3, padding=1, bias=False), nn.BatchNorm2d(CH), nn.ReLU()]
        c_in = CH
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CH, 10))


def _make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _run(kind: str, repeats: int) -> BenchResult:
    torch.manual_seed(0)
    base = _net()
    cand = _net()
    cand.load_state_dict(base.state_dict())
    replace_bn_relu(cand, kind, **({"groups": GROUPS} if kind == "S0" else {}))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    res = compare_steps(_make_step(base, x, y), _make_step(cand, x, y), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "channels": CH, "size": SIZE, "kind": kind})


for _kind in ("B0", "S0"):
    register_benchmark(Benchmark(
        name=f"evonorm-{_kind.lower()}-step",
        slug="evonorm",
        description=f"3-conv net ({CH} ch, {SIZE}x{SIZE}, batch {BATCH}) training step: EvoNorm-{_kind} vs BN-ReLU",
        target=None,
        baseline="BN-ReLU",
        run=lambda repeats, _k=_kind: _run(_k, repeats),
    ))
