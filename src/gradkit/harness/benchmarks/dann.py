"""Benchmark (paper slug ``dann``): training-step time with a GradientReversal layer vs without.

The same 4-layer MLP (784-512-512-512-10, ReLU, batch 128, cross-entropy, SGD) is trained with and
without a :class:`gradkit.nn.GradientReversal` between its second and third layer; both copies
start from the same weights and see the same inputs. The reversal layer is a view forward and one
scalar multiply backward, so the ratio should stay within a few percent of 1.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.gradient_reversal import GradientReversal

IN, HIDDEN, OUT, BATCH = 784, 512, 10, 128


def _mlp(grl: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()]
    if grl:
        layers.append(GradientReversal(0.5))
    layers += [nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT)]
    return nn.Sequential(*layers)


def run(repeats: int = 30) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plain = _mlp(grl=False)
    reversed_ = _mlp(grl=True)
    # identical weights: copy the plain model's linear layers into the GRL model
    src = [m for m in plain if isinstance(m, nn.Linear)]
    dst = [m for m in reversed_ if isinstance(m, nn.Linear)]
    for a, b in zip(src, dst):
        b.load_state_dict(copy.deepcopy(a.state_dict()))
    x = torch.randn(BATCH, IN, generator=gen)
    y = torch.randint(OUT, (BATCH,), generator=gen)
    opt_a = torch.optim.SGD(plain.parameters(), lr=1e-3)
    opt_b = torch.optim.SGD(reversed_.parameters(), lr=1e-3)

    def step(model: nn.Module, opt: torch.optim.Optimizer):
        def f() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return f

    res = compare_steps(step(plain, opt_a), step(reversed_, opt_b), repeats=repeats, warmup=5, inner=5)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"model": f"MLP {IN}-{HIDDEN}-{HIDDEN}-{HIDDEN}-{OUT}, batch {BATCH}",
                              "grl": "between layers 2 and 3"})


register_benchmark(Benchmark(
    name="dann-grl-step",
    slug="dann",
    description="Training step of a 4-layer MLP with a GradientReversal layer between layers 2 and 3 "
                "vs the same MLP without it (forward + backward + SGD step)",
    target=1.05,
    run=run,
))
