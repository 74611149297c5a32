"""Benchmarks: the learned prox f = grad psi of an ICNN vs the ICNN's plain forward + backward (paper slug: lpn).

``lpn-prox-forward-*``: one LPN forward with ``create_graph=True`` (psi, then its input gradient with the graph
kept, as in training) against one plain forward + backward of the same ICNN (psi, then the parameter
gradients). Both cost a forward and a backward pass; the LPN's backward also records its own graph, so the
ratio is expected to stay <= 3. ``lpn-train-step-1d`` (reported only) is the whole LPN training step (prox
forward, L1 loss, double backward, Adam, clamp) against the plain step of the same ICNN used as a regressor.
Shapes: the claim's 1-D model (batch 500, width 50, 4 layers) and a dense MNIST-sized one (784 inputs,
width 256, 4 layers, batch 64).
"""
from __future__ import annotations

import torch

from ...nn.icnn import ICNN, clamp_after_step
from ...solvers.proximal import LearnedProx
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark

SHAPES = {"1d": (1, 50, 500), "mnist": (784, 256, 64)}  # in_features, hidden, batch
LAYERS = 4


def _setup(shape: str) -> tuple[ICNN, torch.Tensor]:
    d, hidden, batch = SHAPES[shape]
    torch.manual_seed(0)
    psi = ICNN(d, hidden, LAYERS, beta=10.0, init_log_mean=-3.0, init_log_std=0.5)
    y = torch.randn(batch, d, generator=torch.Generator().manual_seed(0))
    return psi, y


def _forward_runner(shape: str):
    def run(repeats: int) -> BenchResult:
        psi, y = _setup(shape)
        prox = LearnedProx(psi).train()

        def plain() -> None:
            psi.zero_grad(set_to_none=True)
            psi(y).sum().backward()

        def lpn() -> None:
            prox(y, create_graph=True)

        res = compare_steps(plain, lpn, repeats=repeats)
        d, hidden, batch = SHAPES[shape]
        return BenchResult(res.baseline_s, res.candidate_s,
                           extra={"in_features": d, "hidden": hidden, "layers": LAYERS, "batch": batch})

    return run


def _train_step_1d(repeats: int) -> BenchResult:
    psi, y = _setup("1d")
    plain_psi, _ = _setup("1d")
    x = y.sign() * (y.abs() - 1).clamp_min(0)
    prox = LearnedProx(psi).train()
    opt = torch.optim.Adam(psi.parameters(), lr=1e-4)
    clamp_after_step(opt, psi)
    plain_opt = torch.optim.Adam(plain_psi.parameters(), lr=1e-4)
    clamp_after_step(plain_opt, plain_psi)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        (plain_psi(y) - x[:, 0]).abs().mean().backward()
        plain_opt.step()

    def lpn() -> None:
        opt.zero_grad(set_to_none=True)
        (prox(y) - x).abs().mean().backward()
        opt.step()

    res = compare_steps(plain, lpn, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": SHAPES["1d"][2], "loss": "l1"})


for _shape, (_d, _h, _b) in SHAPES.items():
    register_benchmark(Benchmark(
        name=f"lpn-prox-forward-{_shape}",
        slug="lpn",
        description=f"LPN forward f = grad psi with create_graph (ICNN {_d}-{_h}x{LAYERS}, batch {_b}) vs the "
                    "ICNN's plain forward + backward",
        target=3.0,
        baseline="ICNN forward + backward",
        run=_forward_runner(_shape),
    ))

register_benchmark(Benchmark(
    name="lpn-train-step-1d",
    slug="lpn",
    description=f"LPN training step (double backward, Adam, clamp; ICNN 1-50x{LAYERS}, batch 500) vs the same "
                "ICNN trained as a plain regressor",
    target=None,
    baseline="ICNN regressor step",
    run=_train_step_1d,
))
