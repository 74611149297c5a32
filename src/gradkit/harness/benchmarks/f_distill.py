"""Benchmarks (paper slug ``f-distill``): the cost of the f-divergence weighting, and one-step sampling.

1. ``f-distill-generator-step``: one generator update (batch 512, 2-D, MLP generator, time-conditioned
   MLP fake score and discriminator, exact mixture teacher) with :class:`FDistillLoss` (Jensen-Shannon
   weights from the discriminator, DMD normalisation) vs the reverse-KL DMD update written in plain
   PyTorch (``0.5 * mse(x, stopgrad(x - grad))``) on the same networks and noise. The extra work is one
   discriminator forward and the weights: the ratio should stay near 1.
2. ``f-distill-one-step-sampling``: drawing 4096 samples with a distilled one-step generator vs 50 DDIM
   steps of a denoiser MLP of the same width (the paper's point: one network call instead of many). The
   ratio is one-step / multi-step, far below 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...generative.diffusion import GaussianDiffusion, VPSchedule, timestep_embedding
from ...generative.f_distill import FDistillLoss
from ...generative.mixture import GaussianMixture, ring_means

BATCH, HIDDEN, EMB, SAMPLES, DDIM_STEPS = 512, 128, 16, 4096, 50


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN), nn.SiLU(),
                         nn.Linear(HIDDEN, d_out))


class _TimeNet(nn.Module):
    def __init__(self, d_out: int) -> None:
        super().__init__()
        self.net = _mlp(2 + EMB, d_out)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, timestep_embedding(t, EMB).to(x_t)], 1))


def _generator_step(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sched = VPSchedule("cosine", 1000)
    mix = GaussianMixture(ring_means(8, 4.0), torch.full((8,), 1 / 8), std=0.15)
    G, eps_net, disc = _mlp(2, 2), _TimeNet(2), _TimeNet(1)
    opt = torch.optim.Adam(G.parameters(), lr=1e-4)
    z = torch.randn(BATCH, 2, generator=g)
    t = torch.randint(20, 980, (BATCH,), generator=g)
    noise = torch.randn(BATCH, 2, generator=g)
    alpha, sigma = sched.alpha_sigma(t, like=z)
    alpha, sigma = alpha[:, None], sigma[:, None]

    def teacher(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return mix.score(x_t, tt, sched)

    def fake(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return -eps_net(x_t, tt) / sigma

    loss_fn = FDistillLoss(teacher, fake, lambda x_t, tt: disc(x_t, tt).squeeze(1), kind="js", schedule=sched)

    def plain_dmd() -> None:  # reverse-KL DMD update in plain PyTorch
        opt.zero_grad(set_to_none=True)
        x = G(z)
        with torch.no_grad():
            x_t = alpha * x + sigma * noise
            pred_real = (x_t + sigma ** 2 * teacher(x_t, t)) / alpha
            pred_fake = (x_t - sigma * eps_net(x_t, t)) / alpha
            grad = (pred_fake - pred_real) / (x - pred_real).abs().mean(1, keepdim=True)
        (0.5 * F.mse_loss(x, (x - grad).detach())).backward()
        opt.step()

    def f_distill() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(G(z), t=t, noise=noise).backward()
        opt.step()

    res = compare_steps(plain_dmd, f_distill, repeats=repeats, warmup=5, inner=5)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "hidden": HIDDEN, "kind": "js", "baseline": "DMD reverse KL"})


def _one_step_sampling(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    G, eps_net = _mlp(2, 2), _TimeNet(2)
    diff = GaussianDiffusion(VPSchedule("cosine", 1000))
    z = torch.randn(SAMPLES, 2, generator=g)

    def teacher_ddim() -> None:
        diff.ddim_sample(eps_net, (SAMPLES, 2), steps=DDIM_STEPS, x_T=z)

    def one_step() -> None:
        with torch.no_grad():
            G(z)

    res = compare_steps(teacher_ddim, one_step, repeats=repeats, warmup=2)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"samples": SAMPLES, "ddim_steps": DDIM_STEPS, "hidden": HIDDEN})


register_benchmark(Benchmark(
    name="f-distill-generator-step",
    slug="f-distill",
    description=f"one generator update, batch {BATCH} 2-D, MLPs width {HIDDEN}: FDistillLoss (JS weights from the "
                "discriminator, DMD normalisation) vs the DMD reverse-KL update in plain PyTorch",
    target=1.5,
    baseline="DMD update in plain PyTorch",
    run=_generator_step,
))

register_benchmark(Benchmark(
    name="f-distill-one-step-sampling",
    slug="f-distill",
    description=f"{SAMPLES} samples: one-step generator vs {DDIM_STEPS}-step DDIM of a denoiser MLP of the same width",
    target=0.1,
    baseline=f"{DDIM_STEPS}-step DDIM sampling",
    run=_one_step_sampling,
))
