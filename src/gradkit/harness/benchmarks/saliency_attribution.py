"""Benchmark: gradient saliency of a batch of images vs the same input gradient in plain PyTorch
(paper slug: backprop-saliency).

``Saliency(model).attribute(x, target=y)`` (|d y_c / d x|) of 64 3x32x32 images through a small CNN; the
baseline computes the same map by hand (inputs requiring grad, the target logits summed, ``autograd.grad``,
``abs``). With ``--peers`` captum's ``Saliency`` (same output; tested equal in the suite) is timed against
the same baseline.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ...probes.saliency import Saliency
from ..bench import (Benchmark, BenchResult, compare_steps, import_peer, peer_result, peers_enabled,
                     register_benchmark)

BATCH = 64


def run(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)

    def baseline() -> torch.Tensor:
        xi = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi).gather(1, y[:, None]).sum(), xi)
        return g.abs()

    ours = Saliency(model)
    def ours_step() -> torch.Tensor:
        return ours.attribute(x, target=y)

    res = compare_steps(baseline, ours_step, repeats=repeats)
    extra = {"batch": BATCH, "input": [3, 32, 32]}
    if peers_enabled():
        captum_attr = import_peer("captum.attr")
        peer = None
        if captum_attr is not None:
            theirs = captum_attr.Saliency(model)

            def captum_step() -> torch.Tensor:
                with warnings.catch_warnings():  # captum notes that it sets requires_grad itself
                    warnings.simplefilter("ignore")
                    return theirs.attribute(x, target=y)
            peer = captum_step
        extra["peers"] = [peer_result("captum", baseline, peer, res.ratio, repeats, ours=ours_step)]
    return BenchResult(res.baseline_s, res.candidate_s, extra=extra)


register_benchmark(Benchmark(
    name="saliency-attribution",
    slug="backprop-saliency",
    description=f"gradient saliency |dy_c/dx| of {BATCH} 3x32x32 images through a small CNN vs the same input "
                "gradient written by hand",
    target=1.2,
    baseline="hand-written input gradient",
    run=run,
))
