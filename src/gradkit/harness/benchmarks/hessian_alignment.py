"""Step-time cost of the Hessian-alignment penalties (hessian-alignment) as ratios.

Setting: the claim's Colored-MNIST network at quick scale: two environments of 1,000 inputs of
size 2x196, MLP 392-128-128-1 (ReLU), binary cross-entropy per environment, full-batch Adam step.
Baseline: ERM (pooled loss). Candidates add ``HessianAlignment`` on the head's 129 parameters
(pooled terms not detached, as in the claim): HGP (one Hessian-gradient product per domain and
one for the pooled loss), Hutchinson with K = 10 probes (K batched Hessian-vector products per
domain), and the exact Hessian diagonal (P = 129 products per domain). All models start from the
same weights and see the same inputs.

Costs grow with the number of Hessian-vector products: HGP (1) < Hutchinson (K) < exact diagonal
(P). The third benchmark times Hutchinson against the exact diagonal, the estimate it replaces.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.hessian_alignment import HessianAlignment

N_ENV, IN, HIDDEN = 1000, 392, 128
K = 10


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, 1))


def _data():
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(N_ENV, IN, generator=gen), (torch.rand(N_ENV, generator=gen) < 0.5).float())
            for _ in range(2)]


def _stepper(model: nn.Sequential, envs, method: str | None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    reg = None
    if method is not None:
        reg = HessianAlignment(model[-1].parameters(), alpha=1.0, beta=1.0, method=method, n_samples=K,
                               detach_mean=False, generator=torch.Generator().manual_seed(1),
                               check_finite=False)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = [F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y) for x, y in envs]
        loss = torch.stack(losses).mean()
        if reg is not None:
            loss = loss + reg(losses)[0]
        loss.backward()
        opt.step()

    return step


def run(repeats: int, baseline: str | None = None, candidate: str = "hgp") -> BenchResult:
    envs = _data()
    torch.manual_seed(0)
    base = _mlp()
    cand = copy.deepcopy(base)
    r = compare_steps(_stepper(base, envs, baseline), _stepper(cand, envs, candidate), repeats=repeats,
                      warmup=3)
    return BenchResult(r.baseline_s, r.candidate_s, extra={
        "baseline": baseline or "erm", "candidate": candidate, "hutchinson_probes": K,
        "head_params": HIDDEN + 1, "model": f"MLP {IN}-{HIDDEN}-{HIDDEN}-1, 2 x {N_ENV} samples",
        "threads": torch.get_num_threads()})


register_benchmark(Benchmark(
    name="hessian-alignment-hgp-step",
    slug="hessian-alignment",
    description=("full-batch Adam step of the Colored-MNIST MLP (392-128-128-1, 2 x 1,000 samples): "
                 "ERM + HGP penalty vs ERM"),
    target=None,
    run=lambda repeats: run(repeats, None, "hgp"),
))

register_benchmark(Benchmark(
    name="hessian-alignment-hutchinson-step",
    slug="hessian-alignment",
    description=f"the same step with the Hutchinson penalty (K = {K} probes) vs ERM",
    target=None,
    run=lambda repeats: run(repeats, None, "hutchinson"),
))

# Hutchinson replaces the exact Hessian diagonal (one product per head parameter, here 129) by K
# random probes: with K = 10 it must be cheaper.
register_benchmark(Benchmark(
    name="hessian-alignment-hutchinson-vs-exact-diag",
    slug="hessian-alignment",
    description=(f"the same step with the Hutchinson penalty (K = {K}) vs the exact Hessian-diagonal "
                 "penalty (129 Hessian-vector products per domain)"),
    target=1.0,
    baseline="exact Hessian diagonal (HessianAlignment method='exact_diag')",
    run=lambda repeats: run(repeats, "exact_diag", "hutchinson"),
))
