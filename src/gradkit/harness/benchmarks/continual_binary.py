"""Benchmarks: the training step of a field-binary MLP (paper slug: continual-binary).

The paper's permuted-MNIST network, 784-512-512-10, batch 64, Adam. Two ratios, each measured in one process:

- ``continual-binary-field-step``: the field-binary MLP (Gaussian preactivation: a mean and a variance
  matmul per layer plus the noise) vs the same-shape plain ``nn.Linear`` MLP (no biases), both without KL.
- ``continual-binary-kl-step``: the field-binary step with the variational KL to the previous task's fields
  (``VariationalContinual``, exact binary KL over all 660k weights) vs the same step without it.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark, train_step
from ...nn.field_binary import FieldBinaryLinear
from ...optim.variational_continual import VariationalContinual

SIZES, BATCH = (784, 512, 512, 10), 64


def _mlp(field: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(FieldBinaryLinear(a, b) if field else nn.Linear(a, b, bias=False))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, SIZES[0], generator=gen), torch.randint(0, SIZES[-1], (BATCH,), generator=gen)


def _kl_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    vc = VariationalContinual(model, reference="task", kl_weight=1.0 / 6000)
    vc.end_task()  # a previous task's posterior as the reference

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + vc.penalty()).backward()
        opt.step()

    return step


def run_field(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    x, y = _data()
    plain, field = _mlp(False), _mlp(True)
    res = compare_steps(train_step(plain, torch.optim.Adam(plain.parameters(), lr=1e-3), x, y),
                        train_step(field, torch.optim.Adam(field.parameters(), lr=1e-3), x, y),
                        repeats=repeats, warmup=3)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"sizes": list(SIZES), "batch": BATCH})


def run_kl(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    x, y = _data()
    a, b = _mlp(True), _mlp(True)
    b.load_state_dict(a.state_dict())
    res = compare_steps(train_step(a, torch.optim.Adam(a.parameters(), lr=1e-3, betas=(0.9, 0.99)), x, y),
                        _kl_step(b, x, y), repeats=repeats, warmup=3)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"sizes": list(SIZES), "batch": BATCH, "weights": sum(p.numel() for p in a.parameters())})


register_benchmark(Benchmark(
    name="continual-binary-field-step",
    slug="continual-binary",
    description="784-512-512-10 MLP training step, batch 64, Adam: field-binary (Gaussian preactivation) vs "
                "plain Linear",
    run=run_field,
    baseline="plain nn.Linear MLP",
))

register_benchmark(Benchmark(
    name="continual-binary-kl-step",
    slug="continual-binary",
    description="field-binary 784-512-512-10 training step, batch 64: with the exact binary KL to the previous "
                "task's fields vs without",
    run=run_kl,
    baseline="field-binary step without KL",
))
