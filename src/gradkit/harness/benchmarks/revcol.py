"""Benchmark (paper slug ``revcol``): training step of a reversible column net vs its non-reversible twin.

A tiny RevCol (channels 8-16-32-64, one ConvNeXt block per level, 8 columns, 16x16 inputs, batch 64,
cross-entropy, AdamW) is trained with reversible columns (one Function over all columns,
``strict=True``) and as the plain-autograd twin; both start from the same weights and see the same
batch. Backward recomputes every level function once, so the step-time ratio is expected near
4/3 plus Python overhead; the saved-activation bytes of one forward (exact, via saved-tensor hooks)
of both are reported in ``extra`` together with their ratio.
"""
from __future__ import annotations

import copy

import torch

from ..bench import Benchmark, BenchResult, compare_steps, forward_saved_bytes, register_benchmark, train_step
from ...nn.revcol import RevColNet

COLUMNS, BATCH, SIDE = 8, 64, 16


def run(repeats: int = 30) -> BenchResult:
    torch.manual_seed(0)
    twin = RevColNet(1, 10, channels=(8, 16, 32, 64), blocks=(1, 1, 1, 1), num_columns=COLUMNS, stem=2,
                     reversible=False)
    rev = copy.deepcopy(twin)
    rev.columns.reversible, rev.columns.strict = True, True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, SIDE, SIDE, generator=gen)
    y = torch.randint(10, (BATCH,), generator=gen)
    opt_t = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    opt_r = torch.optim.AdamW(rev.parameters(), lr=1e-3)
    bytes_t, bytes_r = forward_saved_bytes(twin, x), forward_saved_bytes(rev, x)
    res = compare_steps(train_step(twin, opt_t, x, y), train_step(rev, opt_r, x, y),
                        repeats=repeats, warmup=3)
    return BenchResult(res.baseline_s, res.candidate_s, extra={
        "model": f"RevCol 8-16-32-64, blocks 1-1-1-1, {COLUMNS} columns, {SIDE}x{SIDE}, batch {BATCH}",
        "saved_bytes_twin": bytes_t, "saved_bytes_revcol": bytes_r,
        "saved_bytes_ratio": bytes_r / bytes_t})


register_benchmark(Benchmark(
    name="revcol-step",
    slug="revcol",
    description="Training step (forward + backward + AdamW) of an 8-column reversible RevCol vs the same "
                "network with plain autograd (its non-reversible twin); extra: saved-activation bytes of both",
    target=1.5,
    run=run,
    baseline="non-reversible twin",
))
