"""Step-time cost of the O-DICE orthogonal-gradient value update vs the true-gradient update (odice).

Value network: the official code's MLP shape, 17 -> 256 -> 256 -> 1 (ReLU; 17 = HalfCheetah's
observation size), batch 256, Adam (lr 2e-4), Pearson chi^2 DICE loss with lambda = 0.6.
Baseline (plain PyTorch): one backward of the true-gradient loss
``(1 - lam) mean V(s) + lam mean f*(r + gamma V(s') - V(s))``. Candidate: the O-DICE update —
target-network forwards, the forward and backward gradients taken separately, the global
projection and the extra (1 - lam) V term (:class:`gradkit.optim.OrthogonalGradient`), then Adam.
The O-DICE step does three backward passes instead of one, so a ratio near 2-3 is expected;
reported, no target (the paper states none).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...data.offline_rl import dice_true_loss, odice_value_losses
from ...optim.orthogonal import OrthogonalGradient

OBS, WIDTH, BATCH, LAM, GAMMA = 17, 256, 256, 0.6, 0.99


def _value_net(obs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(obs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 1))


def run(repeats: int, obs: int = OBS, width: int = WIDTH, batch: int = BATCH) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    s, s2 = torch.randn(batch, obs, generator=gen), torch.randn(batch, obs, generator=gen)
    r = torch.randn(batch, generator=gen)
    done = (torch.rand(batch, generator=gen) < 0.05).float()
    a = torch.zeros(batch, dtype=torch.int64)
    b = (s, a, r, s2, done)
    torch.manual_seed(0)
    base = _value_net(obs, width)
    cand = copy.deepcopy(base)
    target = copy.deepcopy(base).requires_grad_(False)
    opt_b = torch.optim.Adam(base.parameters(), lr=2e-4)
    opt_c = torch.optim.Adam(cand.parameters(), lr=2e-4)
    og = OrthogonalGradient(cand.parameters(), eta=1.0)

    def baseline_step() -> None:
        opt_b.zero_grad(set_to_none=True)
        dice_true_loss(base, b, LAM, GAMMA)[0].backward()
        opt_b.step()

    def candidate_step() -> None:
        opt_c.zero_grad(set_to_none=True)
        L = odice_value_losses(cand, target, b, LAM, GAMMA)
        og.backward(L.forward, L.backward, extra_loss=L.init)
        opt_c.step()

    res = compare_steps(baseline_step, candidate_step, repeats=repeats)
    n_params = sum(p.numel() for p in base.parameters())
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"params": n_params, "batch": batch, "threads": torch.get_num_threads()})


register_benchmark(Benchmark(
    name="odice-value-step",
    slug="odice",
    description=("DICE value step of a 17-256-256-1 MLP (70k params), batch 256, Adam: O-DICE "
                 "orthogonal-gradient update (3 backward passes + projection) vs the true-gradient update"),
    target=None,
    baseline="true-gradient DICE update (plain PyTorch)",
    run=run,
))


# the claim's size: a 2-64-64-1 value MLP at batch 256 (per-step overheads weigh more)
register_benchmark(Benchmark(
    name="odice-value-step-small",
    slug="odice",
    description="the claim's 2-64-64-1 value MLP at batch 256: O-DICE update vs true-gradient update",
    target=None,
    baseline="true-gradient DICE update (plain PyTorch)",
    run=lambda repeats: run(repeats, obs=2, width=64),
))
