"""Benchmark: a SimCLR training step through WithProjectionHead vs the plain encoder+head (paper slug:
projection-head).

Both models hold the same weights (an MLP encoder 64-256-128 and a 2-layer head 128-128-64, the claim's
digits model) and see the same two views; the step is forward of both views + InfoNCE + backward + Adam.
The plain model is ``nn.Sequential(encoder, head)`` with ``nn.Linear`` layers; the candidate is
``WithProjectionHead(encoder, ProjectionHead(...))``, whose only extra work is the width check in the head.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.contrastive import info_nce_loss
from ...nn.projection_head import ProjectionHead, WithProjectionHead

BATCH = 256


def _make_step(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        info_nce_loss(model(x1), model(x2), tau=0.5).backward()
        opt.step()

    return step


def run(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
    head = ProjectionHead(128, hidden=128, out_dim=64, depth=2)
    wrapped = WithProjectionHead(copy.deepcopy(encoder), copy.deepcopy(head))
    plain = nn.Sequential(encoder, head.net)  # the same layers without the wrapper and the head's check
    x1, x2 = torch.randn(BATCH, 64, generator=gen), torch.randn(BATCH, 64, generator=gen)
    res = compare_steps(_make_step(plain, x1, x2), _make_step(wrapped, x1, x2), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "encoder": [64, 256, 128],
                                                                  "head": [128, 128, 64], "loss": "info_nce"})


register_benchmark(Benchmark(
    name="projection-head-wrapper-step",
    slug="projection-head",
    description=f"SimCLR step (two views of batch {BATCH}, InfoNCE, Adam) of MLP 64-256-128 + head 128-128-64: "
                "WithProjectionHead vs nn.Sequential(encoder, head)",
    target=1.10,
    baseline="plain encoder+head",
    run=run,
))
