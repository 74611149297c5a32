"""Benchmark: per-example gradients of an MLP vs one backward per example (paper slug: generalization-mystery).

``per_example_grads(model, cross_entropy, x, y)`` (vmap, and the outer-product rule for Linear layers) of a
batch of 64 through a 784-256-256-10 MLP; the baseline is the plain PyTorch loop, one forward and backward
per example (what a user writes without a library). With ``--peers`` opacus's ``GradSampleModule``
(per-sample gradients from its layer hooks, one batched forward and backward) is timed against the same
baseline.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ...probes.per_example import per_example_grads
from ..bench import (Benchmark, BenchResult, compare_steps, import_peer, peer_result, peers_enabled,
                     register_benchmark)

BATCH = 64


def _runner(method: str):
    def run(repeats: int) -> BenchResult:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(BATCH, 784, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        params = list(model.parameters())

        def baseline() -> list[torch.Tensor]:
            rows = [torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
                    for i in range(BATCH)]
            return [torch.stack(g) for g in zip(*rows)]

        def ours_step() -> list[torch.Tensor]:
            return per_example_grads(model, F.cross_entropy, x, y, method=method)

        res = compare_steps(baseline, ours_step, repeats=repeats)
        extra = {"batch": BATCH, "method": method}
        if peers_enabled():
            opacus = import_peer("opacus")
            peer = None
            if opacus is not None:
                import copy

                gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

                def opacus_step() -> list[torch.Tensor]:
                    gsm.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():  # torch notes that no input requires grad
                        warnings.simplefilter("ignore")
                        F.cross_entropy(gsm(x), y, reduction="sum").backward()
                    return [p.grad_sample for p in gsm.parameters()]
                peer = opacus_step
            extra["peers"] = [peer_result("opacus", baseline, peer, res.ratio, repeats, ours=ours_step)]
        return BenchResult(res.baseline_s, res.candidate_s, extra=extra)

    return run


for _method in ("vmap", "linear"):
    register_benchmark(Benchmark(
        name=f"per-example-grads-{_method}",
        slug="generalization-mystery",
        description=f"per-example gradients ({_method}) of a batch of {BATCH} through a 784-256-256-10 MLP vs one "
                    "backward per example",
        target=None,
        baseline="loop of single-example backward passes",
        run=_runner(_method),
    ))
