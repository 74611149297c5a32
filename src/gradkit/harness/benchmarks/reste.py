"""Benchmark: training step of a ReSTE binary layer vs the same layer with the clipped STE (paper slug: reste).

Both candidates are ``gradkit.nn.binary.BinaryLinear`` (binary weights and activations, mean-|W| scale)
with identical initial weights and inputs; only the estimator differs, so the ratio is the cost of
ReSTE's rectified power derivative over the STE's clipped identity (forward + backward + SGD step).
"""
from __future__ import annotations

import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.binary import BinaryLinear

BATCH, FEATURES = 256, 512


def _make_step(layer: BinaryLinear, x: torch.Tensor, y: torch.Tensor):
    layer.o = 3.0  # ReSTE's default o_end; ignored by the STE
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        loss = torch.nn.functional.mse_loss(layer(x), y)
        loss.backward()
        opt.step()

    return step


def run(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    template = BinaryLinear(FEATURES, FEATURES, estimator="ste")
    with torch.no_grad():
        template.weight.copy_(torch.randn(FEATURES, FEATURES, generator=gen) * 0.05)
        template.bias.zero_()
    # the input requires grad, as in a middle layer: both the weight and the activation estimators run
    x = torch.randn(BATCH, FEATURES, generator=gen).requires_grad_()
    y = torch.randn(BATCH, FEATURES, generator=gen)
    ste = template
    reste = BinaryLinear(FEATURES, FEATURES, estimator="reste")
    reste.load_state_dict(template.state_dict())
    res = compare_steps(_make_step(ste, x, y), _make_step(reste, x, y), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "features": FEATURES, "o": 3.0})


register_benchmark(Benchmark(
    name="reste-binary-linear-step",
    slug="reste",
    description=f"BinaryLinear({FEATURES}->{FEATURES}) training step, batch {BATCH}: ReSTE (o=3) vs clipped STE",
    target=1.10,
    baseline="STE binary layer",
    run=run,
))
