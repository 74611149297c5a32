"""Benchmark: one DIA attack iteration vs one training step of the victim model (paper slug: dia).

The victim is the claim's MLP (64-128-128-10, GELU, MaskableDropout p=0.5, no biases) at batch 1. Baseline:
a plain forward + backward + SGD step in train mode (what the client does once). Candidate: one iteration of
:class:`gradkit.privacy.dia.DropoutInversionAttack` (forward with the optimised masks, the parameter gradient
with ``create_graph=True``, the cosine matching loss, TV and mask regularizers, the double backward to the
data and the masks, sign, Adam step, clamps, best-iterate bookkeeping). Each candidate call runs a
20-iteration attack and its time is divided by 20, so set-up (mask probe, Adam state) is included, amortised.
Both run on one intra-op thread, as in the claim.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.dia import DropoutMLP
from ...engine import cpu_threads
from ...privacy.dia import DIA_PRESET, DropoutInversionAttack, client_gradients
from ...privacy.inversion import PixelSpace

ITERS = 20


def run(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = DropoutMLP(64, (128, 128), 10, p=0.5, bias=False)
    x = torch.rand(1, 1, 8, 8, generator=gen)
    y = torch.tensor([3])
    grads, _ = client_gradients(model, x, y, generator=gen)
    attack = DropoutInversionAttack(model, preset=replace(DIA_PRESET, iters=ITERS, early_stop=0.0))
    victim = DropoutMLP(64, (128, 128), 10, p=0.5, bias=False).train()
    opt = torch.optim.SGD(victim.parameters(), lr=1e-3)

    def baseline() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(victim(x), y).backward()
        opt.step()

    def candidate() -> None:
        attack.run(grads, y, PixelSpace(x.shape, generator=torch.Generator().manual_seed(1)),
                   generator=torch.Generator().manual_seed(2))

    with cpu_threads(1):  # batch-1 MLP: a second intra-op thread only adds waiting (as in the claim)
        res = compare_steps(baseline, candidate, repeats=max(3, repeats // 3), warmup=2)
    return BenchResult(res.baseline_s, res.candidate_s / ITERS,
                       extra={"attack_iterations_per_call": ITERS, "victim": "MLP 64-128-128-10 GELU p=0.5 batch 1",
                              "seconds_per_attack_iteration": res.candidate_s / ITERS})


register_benchmark(Benchmark(
    name="dia-attack-iteration",
    slug="dia",
    description="one DIA attack iteration (data + dropout masks, double backward) vs one training step of the "
                "victim MLP 64-128-128-10 at batch 1",
    target=40.0,
    baseline="plain forward+backward+SGD step of the victim",
    run=run,
))
