"""Benchmark: a full-batch training step whose gradient comes from M-SGC coded tasks vs plain (paper slug: sgc).

Baseline: a linear classifier (64 -> 10) on scikit-learn digits (1,437 samples), full-batch cross-entropy,
backward, SGD step. Candidate: the same step, but the gradient is computed the way the n = 8 workers of
M-SGC (B = 2, W = 3, lam = 2) compute it -- every task of one job (uncoded D1 pieces and (8, 2)-coded D2
group tasks, each a sum of chunk gradients, with the 3x redundancy of the coded part), driven through the
scheme's rounds with no straggler -- then decoded and applied. The ratio is the single-process compute
and bookkeeping overhead of coding (report only: in a real cluster the tasks run in parallel).
"""
from __future__ import annotations

import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...data import load_digits_split
from ...distributed.gradient_coding import MSGCScheme, compute_task, partition

N, B, W, LAM = 8, 2, 3, 2


def run(repeats: int) -> BenchResult:
    sp = load_digits_split()
    x, y = sp.x_train, sp.y_train
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 10)
    coded = torch.nn.Linear(64, 10)
    coded.load_state_dict(base.state_dict())
    opt_b = torch.optim.SGD(base.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(coded.parameters(), lr=0.1)
    scheme = MSGCScheme(N, B, W, LAM, jobs=1)
    slices = partition(len(y), scheme.chunk_fractions)
    params = list(coded.parameters())
    everyone = torch.ones(N, dtype=torch.bool).numpy()

    def chunk_grad(c: int) -> torch.Tensor:
        sl = slices[c]
        loss = torch.nn.functional.cross_entropy(coded(x[sl]), y[sl], reduction="sum")
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    def baseline() -> None:
        opt_b.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(base(x), y).backward()
        opt_b.step()

    def candidate() -> None:
        scheme.reset()
        for r in range(scheme.rounds):
            tasks = scheme.assign(r)
            scheme.complete_round(r, everyone, {i: [compute_task(t, chunk_grad) for t in ts]
                                                for i, ts in enumerate(tasks)})
        g = scheme.decode(0) / len(y)
        opt_c.zero_grad(set_to_none=True)
        k = 0
        for p in params:
            p.grad = g[k: k + p.numel()].view_as(p).clone()
            k += p.numel()
        opt_c.step()

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"n": N, "B": B, "W": W, "lam": LAM, "load": scheme.load,
                              "chunks": len(scheme.chunk_fractions)})


register_benchmark(Benchmark(
    name="sgc-msgc-coded-step",
    slug="sgc",
    description=f"digits linear classifier, full-batch step: gradient from all M-SGC tasks of one job "
                f"(n={N}, B={B}, W={W}, lam={LAM}) + decode, vs plain backward",
    target=None,
    run=run,
))
