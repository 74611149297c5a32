"""Benchmarks of contextual-fusion, each against plain PyTorch on the same model and inputs, in one process.

- ``contextual-fusion-fgsm-step``: one FGSM step through the fused model (``pgd_attack`` with steps=1, the
  claim's attack) vs a hand-written forward + input-gradient backward + signed step + clamp. FGSM is one
  forward+backward, so the target is 1.1.
- ``contextual-fusion-head-step``: one training step of :class:`LateFusionClassifier` (frozen extractors,
  the fusion layer learns, with the stream penalty) vs the same step written as ``torch.cat`` of the two
  frozen extractors' outputs into an ``nn.Linear``. Target 1.1.

Model: the claim's two extractors (2-conv CNNs, 32 features each), batch 256 of 1x16x16 scenes.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.contextual_fusion import extractor
from ...nn.late_fusion import LateFusionClassifier
from ...robustness.pgd import pgd_attack

BATCH, SIZE, FEAT, CLASSES, EPS, ALPHA = 256, 16, 32, 10, 0.1, 0.01


def _setup():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    streams = {"fg": extractor((16, FEAT)).eval(), "bg": extractor((16, FEAT)).eval()}
    model = LateFusionClassifier(streams, {"fg": FEAT, "bg": FEAT}, CLASSES).eval()
    x = torch.rand(BATCH, 1, SIZE, SIZE, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return model, x, y


def _plain_forward(fg: nn.Module, bg: nn.Module, head: nn.Linear):
    return lambda t: head(torch.cat([fg(t), bg(t)], dim=1))


def run_fgsm(repeats: int) -> BenchResult:
    model, x, y = _setup()
    plain = _plain_forward(model.extractors["fg"], model.extractors["bg"], model.head)

    def baseline() -> None:
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(plain(xr), y), xr)
        (x + EPS * g.sign()).clamp(0.0, 1.0)

    def candidate() -> None:
        pgd_attack(model, x, y, EPS, norm="linf", steps=1, step_size=EPS, random_start=False, clamp=(0.0, 1.0))

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "eps": EPS})


def run_head(repeats: int) -> BenchResult:
    model, x, y = _setup()
    fg, bg = copy.deepcopy(model.extractors["fg"]), copy.deepcopy(model.extractors["bg"])
    head = copy.deepcopy(model.head)
    for p in (*fg.parameters(), *bg.parameters()):
        p.requires_grad_(False)
    plain = _plain_forward(fg, bg, head)
    opt_p = torch.optim.SGD(head.parameters(), lr=1e-3)
    opt_c = torch.optim.SGD(model.head.parameters(), lr=1e-3)
    model.train()

    def baseline() -> None:
        opt_p.zero_grad(set_to_none=True)
        (F.cross_entropy(plain(x), y) + ALPHA * head.weight[:, :FEAT].pow(2).sum()).backward()
        opt_p.step()

    def candidate() -> None:
        opt_c.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + ALPHA * model.stream_weight_penalty("fg")).backward()
        opt_c.step()

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "alpha": ALPHA})


register_benchmark(Benchmark(
    name="contextual-fusion-fgsm-step",
    slug="contextual-fusion",
    description=f"FGSM through the fused 2-stream CNN (pgd_attack, 1 step), batch {BATCH} of 1x{SIZE}x{SIZE}, vs a "
                "hand-written forward + input-gradient backward + signed step",
    target=1.10,
    baseline="plain forward+backward (input gradient) of the same model",
    run=run_fgsm,
))

register_benchmark(Benchmark(
    name="contextual-fusion-head-step",
    slug="contextual-fusion",
    description=f"LateFusionClassifier training step (frozen extractors, fusion layer + stream penalty), batch "
                f"{BATCH}, vs torch.cat of the extractors into nn.Linear",
    target=1.10,
    baseline="plain torch.cat + nn.Linear step",
    run=run_head,
))
