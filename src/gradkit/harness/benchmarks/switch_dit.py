"""Benchmarks: the Switch-DiT block (a timestep-gated MoE mask in front of attention and MLP, E = 3 experts,
top-2) against the dense DiT block of the same width, forward + backward + SGD step (paper slug: switch-dit).

``switch-dit-block``: one block, dim 128, 4 heads, batch 64 of 16 tokens; both get the same adaLN
conditioning and the timestep embeddings of all T = 1000 timesteps as inputs, so the ratio is the cost of the
mask (routing over all T timesteps, one mixed expert matrix per sample, the masked residual). Target <= 1.3.
``switch-dit-model``: the whole 4-block TinyDiT of the claim on 8x8 images with the diffusion prior loss, against
the DiT without routing (reported only: it includes running the timestep embedder on all T timesteps every
step, which the paper's routers also need).
"""
from __future__ import annotations

import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...generative import GaussianDiffusion, MaskedDiTBlock, TinyDiT, VPSchedule, switch_dit_loss
from ...nn import DiffusionPriorLoss, TimestepGatedMoEMask

DIM, HEADS, BATCH, TOKENS, T = 128, 4, 64, 16, 1000


def _block_step(block: MaskedDiTBlock, opt: torch.optim.Optimizer, x, c, t, t_all):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out, _ = block(x, c, t, t_all)
        out.square().mean().backward()
        opt.step()
    return step


def run_block(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    dense = MaskedDiTBlock(DIM, HEADS)
    moe = MaskedDiTBlock(DIM, HEADS, moe=TimestepGatedMoEMask(DIM, num_experts=3, k=2))
    moe.load_state_dict(dense.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():    # non-zero experts and adaLN so that every path carries signal
        for blk in (dense, moe):
            blk.ada[1].weight.normal_(0, 0.02, generator=gen)
        moe.moe.expert_weight.normal_(0, 0.02, generator=gen)
    x = torch.randn(BATCH, TOKENS, DIM, generator=gen)
    c = torch.randn(BATCH, DIM, generator=gen)
    t = torch.randint(0, T, (BATCH,), generator=gen)
    t_all = torch.randn(T, DIM, generator=gen)
    steps = [_block_step(b, torch.optim.SGD(b.parameters(), lr=1e-3), x, c, t, t_all) for b in (dense, moe)]
    res = compare_steps(*steps, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"dim": DIM, "batch": BATCH, "tokens": TOKENS, "experts": 3, "k": 2})


def run_model(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    kw = dict(img_size=8, patch=2, dim=64, depth=4, heads=4, num_classes=10, num_timesteps=T)
    models = {"dense": TinyDiT(**kw), "switch": TinyDiT(**kw, routing="switch")}
    models["switch"].load_state_dict(models["dense"].state_dict(), strict=False)
    diffusion = GaussianDiffusion(VPSchedule("cosine", num_timesteps=T))
    prior = DiffusionPriorLoss(num_timesteps=T, depth=4, num_experts=3, k=2)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(BATCH, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)

    def step_of(name: str):
        model = models[name]
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(1)   # the same timesteps and noise for both arms
            if name == "dense":
                diffusion.loss(model, x0, y=y, generator=g).backward()
            else:
                switch_dit_loss(model, diffusion, x0, y=y, prior=prior, generator=g)[0].backward()
            opt.step()
        return step

    res = compare_steps(step_of("dense"), step_of("switch"), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"depth": 4, "dim": 64, "batch": BATCH})


register_benchmark(Benchmark(
    name="switch-dit-block", slug="switch-dit",
    description=f"DiT block dim {DIM}, batch {BATCH}x{TOKENS} tokens, fwd+bwd+SGD: timestep-gated MoE mask "
                f"(3 experts, top-2) vs the dense block",
    target=1.3, baseline="the same block without the mask (plain PyTorch DiT block)", run=run_block))
register_benchmark(Benchmark(
    name="switch-dit-model", slug="switch-dit",
    description="4-block TinyDiT on 8x8, fwd+bwd+SGD: Switch-DiT with the prior loss vs the DiT without routing",
    baseline="the same DiT without routing", run=run_model))
