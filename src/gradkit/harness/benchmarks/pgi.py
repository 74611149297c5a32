"""Benchmark: training-step cost of PGI's auxiliary branch (paper slug: pgi), report only.

Baseline: the pgi claim's deep-and-thin main network alone (8 Conv1d(k=3, 16 ch)-BN-ReLU stages, stride 2 at
stages 3, 5, 7, pooled linear head), Adam step on a batch of 128 MNIST-1D-shaped signals (1 x 40).
Candidate: the same main network (same initial weights) inside a ``PGIWrapper`` with the claim's aux branch and
multi-level CBLinear routes, loss ``CE_main + 0.25 CE_aux``. The ratio is what training with PGI costs per step;
inference cost is unchanged (the deployed model is the main network; checked in the claim and the tests).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.pgi import CLASSES, PgiProtocol, build_main, routes  # the claim's network
from ...nn.pgi import PGIWrapper, make_aux_copy, pool_head

LENGTH, BATCH = 40, 128
P = PgiProtocol.at("quick")


def run(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, LENGTH, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    torch.manual_seed(0)
    stages, head = build_main(P)
    plain = nn.Sequential(*copy.deepcopy(list(stages)), copy.deepcopy(head))
    pgi = PGIWrapper(stages, make_aux_copy(stages), head, pool_head(P.width, CLASSES, dims=1), routes(P),
                     aux_weight=P.aux_weight)
    opt_b = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(pgi.parameters(), lr=1e-3)
    plain.train()
    pgi.train()

    def baseline_step() -> None:
        opt_b.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt_b.step()

    def candidate_step() -> None:
        opt_c.zero_grad(set_to_none=True)
        pgi.loss(pgi(x), y).backward()
        opt_c.step()

    r = compare_steps(baseline_step, candidate_step, repeats=repeats)
    n_main = sum(p.numel() for p in plain.parameters())
    n_train = sum(p.numel() for p in pgi.parameters())
    return BenchResult(r.baseline_s, r.candidate_s,
                       extra={"batch": BATCH, "main_params": n_main, "train_params": n_train,
                              "threads": torch.get_num_threads()})


register_benchmark(Benchmark(
    name="pgi-train-step",
    slug="pgi",
    description=f"Adam training step, batch {BATCH}: {P.depth}-stage Conv1d({P.width} ch) classifier with PGI's aux "
                f"branch + CBLinear/CBFuse routes vs the main network alone (inference cost unchanged)",
    target=None,
    baseline="main network alone",
    run=run,
))
