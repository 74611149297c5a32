"""Benchmark: S-KAN's selectable layer vs a single-family KAN of the same width (paper slug: s-kan).

Training step (forward + MSE backward + Adam step) of a two-layer KAN [d_in, width, 1] on one full batch:
the candidate is :class:`gradkit.nn.kan.SelectableKANLayer` with the five default families (phase 1: every
family evaluated), the baseline :class:`gradkit.nn.kan.KANLayer` with B-splines (the original KAN). A
third entry times inference after the three phases: the pruned layer (one family per node) vs the
unpruned selectable layer, forward only.
"""
from __future__ import annotations

import torch
from torch import nn

from ...nn.kan import KANLayer, SelectableKANLayer, prune_model
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark

SHAPES = {"claim": (2, 5, 500), "wide": (16, 32, 256)}  # name -> (d_in, width, batch)


def _mse_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    return step


def _data(d_in: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, d_in, generator=gen) * 2 - 1
    return x, torch.sin(3 * x).sum(-1, keepdim=True)


def _train_runner(shape: str):
    d_in, width, batch = SHAPES[shape]

    def run(repeats: int) -> BenchResult:
        torch.manual_seed(0)
        x, y = _data(d_in, batch)
        single = nn.Sequential(KANLayer(d_in, width, "bspline"), KANLayer(width, 1, "bspline"))
        selectable = nn.Sequential(SelectableKANLayer(d_in, width), SelectableKANLayer(width, 1))
        res = compare_steps(_mse_step(single, x, y), _mse_step(selectable, x, y), repeats=repeats)
        return BenchResult(res.baseline_s, res.candidate_s,
                           extra={**res.extra, "shape": [d_in, width, 1], "batch": batch, "families": 5})

    return run


def _inference_runner(repeats: int) -> BenchResult:
    d_in, width, batch = SHAPES["wide"]
    torch.manual_seed(0)
    x, _ = _data(d_in, batch)
    full = nn.Sequential(SelectableKANLayer(d_in, width), SelectableKANLayer(width, 1))  # phase 1: unmasked
    masked = nn.Sequential(SelectableKANLayer(d_in, width), SelectableKANLayer(width, 1))
    with torch.no_grad():
        for layer in masked:
            layer.logits.normal_()
            layer.select_topk(1)
    pruned = prune_model(masked)

    def forward(model: nn.Module):
        def step() -> None:
            with torch.no_grad():
                model(x)
        return step

    res = compare_steps(forward(full), forward(pruned), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={**res.extra, "shape": [d_in, width, 1],
                                                               "batch": batch, "k": 1})


for _shape, (_d, _w, _b) in SHAPES.items():
    register_benchmark(Benchmark(
        name=f"s-kan-selectable-step-{_shape}",
        slug="s-kan",
        description=f"KAN [{_d}, {_w}, 1] training step, batch {_b}: selectable layer over 5 families vs a "
                    "B-spline KAN of the same width",
        target=None,
        baseline="B-spline KAN (KANLayer)",
        run=_train_runner(_shape),
    ))

register_benchmark(Benchmark(
    name="s-kan-pruned-inference",
    slug="s-kan",
    description=f"KAN [{SHAPES['wide'][0]}, {SHAPES['wide'][1]}, 1] forward, batch {SHAPES['wide'][2]}: pruned "
                "S-KAN (top-1 family per node) vs the unpruned selectable layer",
    target=1.0,
    baseline="unpruned SelectableKANLayer",
    run=_inference_runner,
))
