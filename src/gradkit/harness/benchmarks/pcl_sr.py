"""Benchmark: an SR training step with the PCL-SR loss vs the plain L1 step (paper slug: pcl-sr).

Both steps train the same small residual SR net (width 16, 3 blocks, x2) on one batch of 16 HR 32x32
images; the PCL step adds ``PCLLoss`` (2 sharpened positives + HR, 2 blurred negatives + bicubic(LR),
the 16-16-32-32 Haar patch embedder updated once per step, features of all four blocks). The ratio is the
cost of the contrastive term per step: building the samples, the embedder update and the extra forward /
backward through the frozen embedder. The paper states no speed figure; the number is reported only.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ...sr.embedder import WaveletPatchEmbedder
from ...sr.net import ResidualSR
from ...sr.pcl_loss import PCLLoss
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark

BATCH, SIZE = 16, 32


def _make_step(net: torch.nn.Module, hr: torch.Tensor, lr: torch.Tensor, pcl: PCLLoss | None):
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)

    def step() -> None:
        sr = net(lr)
        loss = 255.0 * F.l1_loss(sr, hr)
        if pcl is not None:
            loss = loss + pcl(sr, hr, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plain = ResidualSR(1, 16, 3, scale=2)
    net = copy.deepcopy(plain)
    emb = WaveletPatchEmbedder(1, widths=(16, 16, 32, 32), strides=(1, 2, 1, 2))
    pcl = PCLLoss(emb, torch.optim.Adam(emb.parameters(), lr=1e-4), layers=(0, 1, 2, 3), weight=0.5,
                  generator=torch.Generator().manual_seed(1))
    hr = torch.rand(BATCH, 1, SIZE, SIZE, generator=gen)
    lr = F.interpolate(hr, scale_factor=0.5, mode="bicubic", antialias=True)
    res = compare_steps(_make_step(plain, hr, lr, None), _make_step(net, hr, lr, pcl), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "hr": [1, SIZE, SIZE], "n_pos": 2, "n_neg": 2, "d_steps": 1})


register_benchmark(Benchmark(
    name="pcl-sr-loss-step",
    slug="pcl-sr",
    description=f"SR training step, batch {BATCH} of 1x{SIZE}x{SIZE} HR (x2, width-16 net): L1 + PCL loss "
                "(embedder update included) vs L1 alone",
    target=None,
    baseline="L1 step",
    run=run,
))
