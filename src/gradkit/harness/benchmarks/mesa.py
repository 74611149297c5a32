"""Benchmark: training step of a tiny ViT with Mesa 8-bit saved activations vs fp32 (paper slug: mesa).

Both models are ``gradkit.nn.mesa.MesaViT`` (digits-sized: 8x8 input, patch 2, dim 64, 4 heads, depth 4)
with identical weights and inputs and the same explicit attention; the baseline has Mesa disabled
(plain PyTorch ops), so the step-time ratio is the cost of quantising the saved activations (forward +
backward + AdamW step). ``extra["saved_bytes_ratio"]`` is the exact saved-tensor bytes ratio of one
training forward (saved-tensor hooks), measured in the same run; ``extra["ratio_round_to_nearest"]`` the
step-time ratio with deterministic rounding (``stochastic=False``: no random draws, slightly biased codes).
Where the time goes (profiled at 1 thread): the uniform draws of stochastic rounding are about a sixth of the
Mesa step, the remaining elementwise passes (scale, offset, floor, clamp, the uint8 conversion and its
inverse in backward) most of the rest.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.mesa import MesaViT
from ...testing import SavedBytesMeter

NAME = "mesa-vit-step"
BATCH = 64
CFG = dict(image_size=8, patch=2, in_chans=1, num_classes=10, dim=64, depth=4, heads=4, mlp_ratio=4)


def _make_step(model: MesaViT, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _saved(model: MesaViT, x: torch.Tensor, y: torch.Tensor) -> int:
    with SavedBytesMeter() as meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.bytes


def run(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 64, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    torch.manual_seed(0)
    base = MesaViT(enabled=False, **CFG)
    mesa = MesaViT(enabled=True, **CFG)
    mesa.load_state_dict(base.state_dict())
    b_base, b_mesa = _saved(base, x, y), _saved(mesa, x, y)
    nearest = MesaViT(enabled=True, stochastic=False, **CFG)
    nearest.load_state_dict(base.state_dict())
    base_step = _make_step(base, x, y)
    res = compare_steps(base_step, _make_step(mesa, x, y), repeats=repeats)
    res_nearest = compare_steps(base_step, _make_step(nearest, x, y), repeats=max(3, repeats // 2))
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "saved_bytes_fp32": b_base, "saved_bytes_mesa": b_mesa,
                              "saved_bytes_ratio": b_mesa / b_base, "bits": 8, "groups": 4,
                              "ratio_round_to_nearest": res_nearest.ratio})


register_benchmark(Benchmark(
    name=NAME,
    slug="mesa",
    description=f"MesaViT (depth 4, dim 64, 4 heads) training step, batch {BATCH}: Mesa 8-bit saved activations "
                "vs the same model in fp32 (explicit attention); extra: saved-bytes ratio",
    target=1.5,
    baseline="same ViT, Mesa disabled (fp32)",
    run=run,
))
