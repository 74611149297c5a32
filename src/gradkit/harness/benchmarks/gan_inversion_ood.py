"""Benchmark: one inversion step with the invertibility decomposition vs one latent-optimisation step
(paper slug: gan-inversion-ood).

Both steps run on the same frozen 16x16 conv decoder and the same batch of images. The baseline is plain
optimisation-based inversion: a free latent z per image, pixel MSE of decoder(z) against the batch, Adam on z.
The candidate is a training step of the decomposition: the frozen encoder, flow-and-mask heads at the
decoder's 8x8 and 16x16 features (two cycles each, warp_scale 0.3), the blend, pixel MSE plus the mask
regulariser, Adam on the heads. The ratio is the cost of the alignment and masking over the decoder alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.gan_inversion_ood import ENC_CHANNELS, STAGES, ConvEncoder
from ...generative.invertibility import InvertibilityDecomposition, mask_regularizer
from ...generative.layered import small_generator

BATCH = 64
LATENT = 16
SIZE = 16


def _run(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    enc, dec = ConvEncoder(LATENT, SIZE), small_generator(LATENT, SIZE, (32, 16))
    for q in (*enc.parameters(), *dec.parameters()):
        q.requires_grad_(False)
    x = torch.rand(BATCH, 1, SIZE, SIZE, generator=gen)
    z = torch.zeros(BATCH, LATENT, requires_grad=True)
    opt_z = torch.optim.Adam([z], lr=1e-2)

    def latent_step() -> None:
        opt_z.zero_grad(set_to_none=True)
        F.mse_loss(dec(z), x).backward()
        opt_z.step()

    model = InvertibilityDecomposition(enc.features, dec, stages=STAGES, enc_channels=ENC_CHANNELS,
                                       warp_scale=0.3, hidden=16, cycles=2)
    opt_h = torch.optim.Adam(model.heads.parameters(), lr=3e-3)

    def decomposition_step() -> None:
        opt_h.zero_grad(set_to_none=True)
        out = model(x)
        (4.0 * F.mse_loss(out.output, x) + 5.0 * mask_regularizer(out.mask, 0.15)).backward()
        opt_h.step()

    res = compare_steps(latent_step, decomposition_step, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "image": [1, SIZE, SIZE], "stages": list(STAGES), "cycles": 2})


register_benchmark(Benchmark(
    name="gan-inversion-ood-step",
    slug="gan-inversion-ood",
    description=f"inversion step, batch {BATCH} of 1x{SIZE}x{SIZE}, frozen conv decoder: decomposition heads "
                "(flow + mask at 8x8 and 16x16, 2 cycles) vs latent optimisation (Adam on z)",
    target=None,
    baseline="latent-optimisation step",
    run=_run,
))
