"""Benchmark: one GIFD attack iteration vs one plain training step of the victim (paper slug: gifd).

Report only (no target): the cost per iteration of the feature-domain search (generator from stage 2 to the
image, victim forward, parameter gradients with ``create_graph``, cosine matching loss, TV and norm priors,
double backward to the feature, Adam step, l1-ball projection) relative to one forward+backward+SGD step of
the same victim (the claim's small CNN on one 8x8 digit). The candidate runs a 20-iteration attack per call
(its set-up included) and is divided by 20. Both run on one CPU thread (as the claim does): these ops are
tiny, and a second intra-op thread only adds synchronisation (on a loaded 2-core machine it made the
attack ~10x slower).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.gifd import VictimCNN
from ...engine import cpu_threads
from ...generative.layered import small_generator
from ...privacy import PRESETS, GradientInversion, model_gradients
from ...privacy.gifd import FeatureSpace

ITERS, STAGE = 20, 2


def run(repeats: int) -> BenchResult:
    with cpu_threads(1):
        return _run(repeats)


def _run(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    gen = small_generator(16, 8).eval()
    model = VictimCNN(8).eval()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3])
    grads = model_gradients(model, x, y)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    attack = GradientInversion(model, dataclasses.replace(PRESETS.get("gifd"), iters=ITERS))
    with torch.no_grad():
        h0 = gen.forward_to(STAGE, torch.randn(1, 16, generator=torch.Generator().manual_seed(1)))

    def baseline() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def candidate() -> None:
        attack.run(grads, y, FeatureSpace(gen, STAGE, h0, rho=0.25))

    res = compare_steps(baseline, candidate, repeats=repeats)
    model.load_state_dict(snapshot)
    return BenchResult(res.baseline_s, res.candidate_s / ITERS,
                       extra={"iters_per_call": ITERS, "stage": STAGE, "image": "1x8x8", "batch": 1})


register_benchmark(Benchmark(
    name="gifd-feature-iteration",
    slug="gifd",
    description="one GIFD iteration (stage-2 feature search, 8x8 image, batch 1) vs one training step of the victim CNN",
    target=None,
    baseline="victim forward+backward+SGD step",
    run=run,
))
