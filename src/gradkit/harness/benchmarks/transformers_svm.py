"""Benchmarks of transformers-svm: the directional-convergence probe's overhead per training step, and the
attention model's saturation-safe output against the textbook form, each as a ratio to a plain step.

- ``transformers-svm-tracker-step``: one full-batch normalised-GD step of ``SingleLayerAttention`` with an
  ``AttentionSVMTracker`` recording W at every step (``every=1``: a d x d copy per step) vs the same step
  without it. Expected about 1; target 1.5.
- ``transformers-svm-model-step``: the same step of ``SingleLayerAttention`` (output ``u_m + sum_t a_t (u_t -
  u_m)``, one extra gather) vs a plain PyTorch ``v^T X^T softmax(X W z)`` module. Expected about 1; target 1.5.
The SVM solves themselves (``extra``) are one-off costs after training, not per step.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.single_attention import SingleLayerAttention
from ...optim.normalized_gd import NormalizedGD
from ...probes.attention_svm import AttentionSVMTracker
from ...solvers.attention_svm import solve_attention_svm

N, T, D = 128, 32, 64
DTYPE = torch.float64


class _PlainAttention(nn.Module):
    """The textbook ``f(X) = v^T X^T softmax(X W z)`` (the baseline of the model benchmark)."""

    def __init__(self, d: int, v: torch.Tensor) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(d, d, dtype=DTYPE))
        self.register_buffer("v", v)

    def forward(self, X: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(torch.einsum("ntd,de,ne->nt", X, self.W, z), dim=1)
        return torch.einsum("nt,ntd,d->n", a, X, self.v)


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, T, D, generator=g, dtype=DTYPE)
    X = X / X.norm(dim=-1, keepdim=True)
    z = torch.randn(N, D, generator=g, dtype=DTYPE)
    z = z / z.norm(dim=-1, keepdim=True)
    v = torch.randn(D, generator=g, dtype=DTYPE)
    Y = torch.randint(0, 2, (N,), generator=g).to(DTYPE) * 2 - 1
    return X, z, v / v.norm(), Y


def _stepper(model: nn.Module, X, z, Y):
    opt = NormalizedGD(model.parameters(), lr=0.1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.softplus(-Y * model(X, z)).mean().backward()
        opt.step()

    return step


def run_tracker(repeats: int) -> BenchResult:
    X, z, v, Y = _data()
    plain_model, probed_model = SingleLayerAttention(D, head=v, dtype=DTYPE), SingleLayerAttention(D, head=v,
                                                                                                  dtype=DTYPE)
    baseline, candidate = _stepper(plain_model, X, z, Y), _stepper(probed_model, X, z, Y)
    with AttentionSVMTracker(probed_model, X, z, every=1) as tracker:
        res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"n": N, "T": T, "d": D, "recorded": len(tracker.weights)})


def run_model(repeats: int) -> BenchResult:
    X, z, v, Y = _data()
    res = compare_steps(_stepper(_PlainAttention(D, v), X, z, Y), _stepper(SingleLayerAttention(D, head=v,
                                                                                                dtype=DTYPE), X, z, Y),
                        repeats=repeats)
    g = torch.Generator().manual_seed(1)
    small = torch.randn(6, 8, 10, generator=g, dtype=DTYPE)
    small = small / small.norm(dim=-1, keepdim=True)
    zs = torch.randn(6, 10, generator=g, dtype=DTYPE)
    sel = torch.zeros(6, dtype=torch.long)
    t0 = time.perf_counter()
    solve_attention_svm(small, zs, sel, "fro")
    t1 = time.perf_counter()
    solve_attention_svm(small, zs, sel, "nuc")
    t2 = time.perf_counter()
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"n": N, "T": T, "d": D, "fro_svm_s_n6_T8_d10": round(t1 - t0, 4),
                              "nuc_svm_s_n6_T8_d10": round(t2 - t1, 4)})


register_benchmark(Benchmark(
    name="transformers-svm-tracker-step",
    slug="transformers-svm",
    description=f"normalised-GD step of a one-layer attention model (n={N}, T={T}, d={D}, float64) with "
                "AttentionSVMTracker recording W every step vs the same step without it",
    target=1.5,
    baseline="the same training step without the probe",
    run=run_tracker,
))

register_benchmark(Benchmark(
    name="transformers-svm-model-step",
    slug="transformers-svm",
    description=f"normalised-GD step of SingleLayerAttention (saturation-safe output) vs a plain PyTorch "
                f"v^T X^T softmax(X W z) module (n={N}, T={T}, d={D}, float64)",
    target=1.5,
    baseline="plain PyTorch softmax attention module",
    run=run_model,
))
