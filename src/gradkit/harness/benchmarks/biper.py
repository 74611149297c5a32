"""Benchmark: training step of a BiPer binary layer vs the same layer with STE weights (paper slug: biper).

Both candidates are ``gradkit.nn.periodic.BiPerLinear`` (binary weights and activations, per-output alpha,
training-mode variance normalisation + ApproxSign on activations) with identical initial weights and
inputs; only the weight binariser differs: BiPer's square wave sign(sin(20 W)) with the cosine backward
(stage 2) vs sign(W) with the clipped STE. The ratio is the cost of the periodic estimator (forward +
backward + SGD step). ``extra`` also reports the ratio against gradkit's plain STE ``BinaryLinear``
(no alpha, no activation normalisation), i.e. the cost of BiPer's whole layer.
"""
from __future__ import annotations

import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.binary import BinaryLinear
from ...nn.periodic import BiPerLinear

BATCH, FEATURES, FREQ = 256, 512, 20.0


def _make_step(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
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
    w = torch.randn(FEATURES, FEATURES, generator=gen) * 0.05
    alpha = torch.rand(FEATURES, generator=gen)
    # the input requires grad, as in a middle layer: both the weight and the activation estimators run
    x = torch.randn(BATCH, FEATURES, generator=gen).requires_grad_()
    y = torch.randn(BATCH, FEATURES, generator=gen)

    def layer(estimator: str) -> BiPerLinear:
        m = BiPerLinear(FEATURES, FEATURES, freq=FREQ, hard=True, weight_estimator=estimator)
        with torch.no_grad():
            m.weight.copy_(w)
            m.alpha.copy_(alpha)
        return m

    ste, biper = layer("ste"), layer("biper")
    res = compare_steps(_make_step(ste, x, y), _make_step(biper, x, y), repeats=repeats)
    plain = BinaryLinear(FEATURES, FEATURES, bias=False, estimator="ste", scale=None)
    with torch.no_grad():
        plain.weight.copy_(w)
    res_plain = compare_steps(_make_step(plain, x, y), _make_step(biper, x, y), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "features": FEATURES, "freq": FREQ,
                              "ratio_vs_plain_ste_binary_linear": res_plain.ratio,
                              "plain_ste_binary_linear_s": res_plain.baseline_s})


register_benchmark(Benchmark(
    name="biper-binary-linear-step",
    slug="biper",
    description=f"BiPerLinear({FEATURES}->{FEATURES}) training step, batch {BATCH}: square-wave weights "
                f"(freq {FREQ:g}) vs clipped-STE weights, same alpha and activation path",
    target=1.10,
    baseline="STE binary layer",
    run=run,
))
