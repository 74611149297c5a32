"""Benchmark (paper slug ``rev-mbconv``): training step of a reversible-MBConv 3D U-Net vs its twin.

A 3-level U-Net (width 16, 2 RevMBConv3d blocks per level, expansion 4, GroupNorm, SiLU) on a batch of
2 x 4 x 16^3 volumes, cross-entropy over 3 classes, Adam. The candidate runs every stage as one
reversible Function (backward recomputes each MBConv once); the baseline is the same network with
plain autograd (same initial weights, same batch). ``extra`` holds the exact saved-activation bytes of
one forward of both (saved-tensor hooks) and their ratio.
"""
from __future__ import annotations

import copy

import torch

from ..bench import Benchmark, BenchResult, compare_steps, forward_saved_bytes, register_benchmark, train_step
from ...nn.rev_mbconv import RevMBConvUNet3d

BATCH, SIDE, BLOCKS = 2, 16, 2


def run(repeats: int = 20) -> BenchResult:
    torch.manual_seed(0)
    twin = RevMBConvUNet3d(4, 3, width=16, levels=3, blocks=BLOCKS, reversible=False)
    rev = copy.deepcopy(twin)
    rev.reversible = True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, SIDE, SIDE, SIDE, generator=gen)
    y = torch.randint(3, (BATCH, SIDE, SIDE, SIDE), generator=gen)
    opt_t = torch.optim.Adam(twin.parameters(), lr=1e-3)
    opt_r = torch.optim.Adam(rev.parameters(), lr=1e-3)
    bytes_t, bytes_r = forward_saved_bytes(twin, x), forward_saved_bytes(rev, x)
    res = compare_steps(train_step(twin, opt_t, x, y), train_step(rev, opt_r, x, y),
                        repeats=repeats, warmup=2)
    return BenchResult(res.baseline_s, res.candidate_s, extra={
        "model": f"3D U-Net 3 levels, width 16, {BLOCKS} RevMBConv3d blocks/level, {SIDE}^3, batch {BATCH}",
        "saved_bytes_twin": bytes_t, "saved_bytes_rev_mbconv": bytes_r,
        "saved_bytes_ratio": bytes_r / bytes_t})


register_benchmark(Benchmark(
    name="rev-mbconv-step",
    slug="rev-mbconv",
    description="Training step (forward + backward + Adam) of a 3D U-Net with reversible MBConv stages vs the "
                "same network with plain autograd (its non-reversible twin); extra: saved-activation bytes of both",
    target=1.5,
    run=run,
    baseline="non-reversible twin",
))
