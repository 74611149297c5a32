"""Benchmarks of generalization-mystery: per-example gradients, the coherence probe and robust aggregation.

- ``generalization-mystery-per-example-mlp`` / ``-cnn``: per-example gradients of a batch of 128 with
  ``per_example_grads(method="vmap")`` (torch.func) against a plain-PyTorch Python loop (one forward and
  backward per example, gradients copied out), on the claim's MLP 64-256-256-10 and on a small CNN on 1x8x8
  digits. Target: vmap >= 5x faster (ratio <= 0.2). ``extra`` also has the outer-product rule
  (``method="linear"``, MLP only) against the same loop. On CPU the MLP's per-example gradients (128 x 85k
  floats, 44 MB written per call) make both sides memory-bound, which caps the speed-up there.
- ``generalization-mystery-coherence-probe``: one training epoch of the claim's coherence arm (23 SGD steps
  of batch 64 on the MLP 64-256-256-10) with and without ``CoherenceTracker.step`` measuring the m = 256
  probe once per epoch (the claim's cadence); the ratio is the probe's overhead per step, amortised.
- ``generalization-mystery-m3-step`` / ``-winsorize-step``: one ``robust_step`` (per-example gradients by the
  outer-product rule, median of 8 means / winsorised mean c = 2, SGD) against one plain SGD step, batch 64,
  MLP 64-128-128-10 (the claim's memorisation arms). Report only: the price of per-example aggregation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark, train_step
from ...optim.robust_gd import RobustAggregation, robust_step
from ...probes.coherence import CoherenceTracker
from ...probes.per_example import per_example_grads
from ..claims.generalization_mystery import mlp

BATCH = 128
STEPS_PER_EPOCH = 23  # ceil(1437 / 64): one epoch of the claim's coherence arm


def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 3 * 3, 10))


def _loop_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Plain PyTorch: one forward + backward per example, each gradient copied out, stacked per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> list[torch.Tensor]:
        rows: list[list[torch.Tensor]] = [[] for _ in params]
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
            for r, g in zip(rows, grads):
                r.append(g)
        return [torch.stack(r) for r in rows]

    return run


def _per_example_runner(kind: str):
    def run(repeats: int) -> BenchResult:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        if kind == "mlp":
            model, x = mlp((64, 256, 256, 10)), torch.rand(BATCH, 64, generator=gen)
        else:
            model, x = _cnn(), torch.rand(BATCH, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        loop = _loop_reference(model, x, y)
        res = compare_steps(loop, lambda: per_example_grads(model, F.cross_entropy, x, y, method="vmap"),
                            repeats=repeats, warmup=2)
        extra = {"batch": BATCH, "params": sum(p.numel() for p in model.parameters()),
                 "speedup_vmap": res.baseline_s / res.candidate_s}
        if kind == "mlp":
            lin = compare_steps(loop, lambda: per_example_grads(model, F.cross_entropy, x, y, method="linear"),
                                repeats=repeats, warmup=2)
            extra.update({"linear_s": lin.candidate_s, "loop_s_linear_pair": lin.baseline_s,
                          "speedup_linear": lin.baseline_s / lin.candidate_s})
        return BenchResult(res.baseline_s, res.candidate_s, extra=extra)

    return run


def _twins(sizes, gen: torch.Generator):
    """Two MLPs with the same initial weights, a plain training step of the first, and a batch of 64."""
    torch.manual_seed(0)
    plain, other = mlp(sizes), mlp(sizes)
    other.load_state_dict(plain.state_dict())
    x, y = torch.rand(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    return train_step(plain, torch.optim.SGD(plain.parameters(), lr=1e-3), x, y), other, x, y


def _coherence_probe(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    plain_step, probed, x, y = _twins((64, 256, 256, 10), gen)
    px, py = torch.rand(256, 64, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    probed_step = train_step(probed, torch.optim.SGD(probed.parameters(), lr=1e-3), x, y)
    tracker = CoherenceTracker(probed, F.cross_entropy, px, py, every=STEPS_PER_EPOCH, chunk_size=64)
    counter = [0]

    def candidate() -> None:
        tracker.step(counter[0])  # measures on every STEPS_PER_EPOCH-th call
        counter[0] += 1
        probed_step()

    res = compare_steps(plain_step, candidate, repeats=repeats, warmup=0, inner=STEPS_PER_EPOCH)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"probe_m": 256, "every": STEPS_PER_EPOCH, "batch": 64, "measurements": len(tracker.history)})


def _robust_runner(mode: str):
    def run(repeats: int) -> BenchResult:
        plain_step, robust, x, y = _twins((64, 128, 128, 10), torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(robust.parameters(), lr=1e-3)
        agg = RobustAggregation(mode, k=8, c=2)
        res = compare_steps(plain_step, lambda: robust_step(robust, F.cross_entropy, x, y, opt, agg, method="linear"),
                            repeats=repeats)
        return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": 64, "aggregation": repr(agg)})

    return run


for _kind, _what in (("mlp", "the MLP 64-256-256-10"), ("cnn", "a small CNN on 1x8x8")):
    register_benchmark(Benchmark(
        name=f"generalization-mystery-per-example-{_kind}",
        slug="generalization-mystery",
        description=f"per-example gradients of {_what}, batch {BATCH}: torch.func vmap vs a Python loop of "
                    "backward passes",
        target=0.2,
        baseline="Python loop over examples",
        run=_per_example_runner(_kind),
    ))

register_benchmark(Benchmark(
    name="generalization-mystery-coherence-probe",
    slug="generalization-mystery",
    description=f"SGD steps (batch 64, MLP 64-256-256-10) with the coherence probe (m = 256) once every "
                f"{STEPS_PER_EPOCH} steps vs without, per step",
    target=None,
    baseline="plain SGD step",
    run=_coherence_probe,
))

for _mode in ("m3", "winsorize"):
    register_benchmark(Benchmark(
        name=f"generalization-mystery-{_mode}-step",
        slug="generalization-mystery",
        description=f"robust_step ({_mode}, per-example grads by the outer-product rule) vs a plain SGD step, "
                    "batch 64, MLP 64-128-128-10",
        target=None,
        baseline="plain SGD step",
        run=_robust_runner(_mode),
    ))
