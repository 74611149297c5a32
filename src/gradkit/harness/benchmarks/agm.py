"""Benchmarks (paper slug ``agm``): training-step time of AGM vs joint training.

Model: a two-branch :class:`gradkit.nn.modulation.FusionMLP` (audio-like 256 -> 128, image-like
784 -> 512, concat -> 256 -> 10), batch 128, cross-entropy, SGD with momentum; every copy starts
from the same weights and sees the same inputs.

- ``agm-step``: plain joint training (one forward pass) vs the :class:`~gradkit.nn.modulation.AGM`
  wrapper (Shapley attribution: 2^M - 1 = 3 forward passes and their backward, scores, coefficients).
  The extra passes are the method's own cost, so this ratio is about 2-3, not ~1.
- ``agm-modulation-overhead``: joint training through the same attribution (``AGM(enabled=False)``,
  k = 1: what the official code runs as its early-fusion joint baseline, and what any run that
  reports per-modality accuracies pays) vs AGM with modulation on: the cost of the modulation itself.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.modulation import AGM, FusionMLP

IN_DIMS, ENC_DIMS, HEAD, CLASSES, BATCH = [256, 784], [128, 512], 256, 10, 128


def _setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = FusionMLP(IN_DIMS, ENC_DIMS, CLASSES, fusion="concat", head_hidden=HEAD)
    xs = [torch.randn(BATCH, d, generator=gen) for d in IN_DIMS]
    y = torch.randint(CLASSES, (BATCH,), generator=gen)
    return net, xs, y


def _step(model: torch.nn.Module, xs, y, with_target: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def f() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(*xs, target=y) if with_target else model(*xs)
        F.cross_entropy(out, y).backward()
        opt.step()

    return f


def _extra(name: str) -> dict:
    return {"model": f"FusionMLP a {IN_DIMS[0]}->{ENC_DIMS[0]}, v {IN_DIMS[1]}->{ENC_DIMS[1]}, "
                     f"concat->{HEAD}->{CLASSES}, batch {BATCH}", "compared": name}


def run_vs_plain(repeats: int = 30) -> BenchResult:
    net, xs, y = _setup()
    agm = AGM(copy.deepcopy(net), num_modalities=2, alpha=1.0)
    res = compare_steps(_step(net, xs, y, False), _step(agm, xs, y, True), repeats=repeats, warmup=5, inner=3)
    return BenchResult(res.baseline_s, res.candidate_s, extra=_extra("plain joint step vs AGM step"))


def run_overhead(repeats: int = 30) -> BenchResult:
    net, xs, y = _setup()
    joint = AGM(copy.deepcopy(net), num_modalities=2, alpha=1.0, enabled=False)
    agm = AGM(copy.deepcopy(net), num_modalities=2, alpha=1.0)
    res = compare_steps(_step(joint, xs, y, True), _step(agm, xs, y, True), repeats=repeats, warmup=5, inner=3)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra=_extra("joint step with Shapley attribution (k=1) vs AGM step"))


register_benchmark(Benchmark(
    name="agm-step",
    slug="agm",
    description="Training step of a two-branch fusion MLP with AGM (3 forward passes for the Shapley "
                "attribution, modulated backward) vs plain joint training (one pass)",
    target=1.15,
    run=run_vs_plain,
    baseline="plain joint training",
))

register_benchmark(Benchmark(
    name="agm-modulation-overhead",
    slug="agm",
    description="Training step with AGM's modulation on vs joint training through the same Shapley "
                "attribution (k = 1, the official early-fusion joint baseline)",
    target=1.15,
    run=run_overhead,
    baseline="joint training with Shapley attribution",
))
