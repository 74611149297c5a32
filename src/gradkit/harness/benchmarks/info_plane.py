"""Per-step cost of the information-plane probes (info-plane) on the claim's 12-10-7-5-4-3-2 tanh network.

Both benchmarks time an Adam step (batch 256 of 12-bit patterns, cross-entropy) with and without the
probes, interleaved in one process:

- ``info-plane-probes-step``: GradientSNR.accumulate every step plus an InformationPlaneRecorder record
  (binned and kernel estimates of 6 layers on all 4096 patterns, kernel on 1024 of them) once every
  ``STEPS_PER_RECORD`` steps: the quick protocol's schedule (41 records over 1000 epochs of 13 steps),
  so the ratio is the overhead a quick training run pays per step.
- ``info-plane-snr-step``: GradientSNR.accumulate alone (Welford moments of every weight matrix).
"""
from __future__ import annotations

import math

import torch

from ...probes.gradient_snr import GradientSNR
from ...probes.information import InformationPlaneRecorder
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.info_plane import InfoPlaneProtocol, all_patterns, build_mlp, recorded_layers, teacher_labels

_P = InfoPlaneProtocol.at("quick")
STEPS_PER_EPOCH = math.ceil(_P.train_fraction * 4096 / _P.batch_size)
STEPS_PER_RECORD = round(_P.epochs * STEPS_PER_EPOCH / (_P.n_records + 1))


def _setup():
    x = all_patterns()
    y = teacher_labels(x, _P.teacher_hidden, _P.data_seed)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=gen)[:_P.batch_size]
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_mlp(_P.widths, "tanh")
        models.append(m)
        opts.append(torch.optim.Adam(m.parameters(), lr=_P.lr, fused=True))
    return x, y, x[idx], y[idx], models, opts


def _step(model, opt, xb, yb, after_backward=None):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        if after_backward is not None:
            after_backward()
        opt.step()
    return step


def run_probes(repeats: int) -> BenchResult:
    x, y, xb, yb, (m0, m1), (o0, o1) = _setup()
    names = recorded_layers(_P.widths)
    rec = InformationPlaneRecorder(m1, names, x, y, n_bins=_P.n_bins,
                                   transforms={names[-1]: lambda h: torch.softmax(h, dim=-1)},
                                   kde_noise_var=_P.kde_noise_var, kde_samples=_P.kde_samples)
    snr = GradientSNR(m1)
    count = [0]

    def probed() -> None:
        snr.accumulate()
        count[0] += 1
        if count[0] % STEPS_PER_EPOCH == 0:
            snr.end_epoch()
        if count[0] % STEPS_PER_RECORD == 0:
            rec.record(count[0])

    r = compare_steps(_step(m0, o0, xb, yb), _step(m1, o1, xb, yb, probed), repeats=repeats,
                      warmup=1, inner=STEPS_PER_RECORD)
    n_rec = max(len(rec.history["step"]), 1)
    return BenchResult(r.baseline_s, r.candidate_s, extra={
        "steps_per_record": STEPS_PER_RECORD, "records": len(rec.history["step"]),
        "seconds_per_record": round(rec.seconds / n_rec, 5), "threads": torch.get_num_threads()})


def run_snr(repeats: int) -> BenchResult:
    _, _, xb, yb, (m0, m1), (o0, o1) = _setup()
    snr = GradientSNR(m1)
    r = compare_steps(_step(m0, o0, xb, yb), _step(m1, o1, xb, yb, snr.accumulate), repeats=repeats,
                      inner=STEPS_PER_EPOCH)
    return BenchResult(r.baseline_s, r.candidate_s, extra={"matrices": len(snr.params),
                                                           "threads": torch.get_num_threads()})


register_benchmark(Benchmark(
    name="info-plane-probes-step",
    slug="info-plane",
    description=(f"Adam step of the 12-10-7-5-4-3-2 tanh net (batch {_P.batch_size}) with GradientSNR every step "
                 f"and an information-plane record (binned + kernel, 6 layers, 4096 patterns) every "
                 f"{STEPS_PER_RECORD} steps (the quick schedule) vs the plain step"),
    target=2.0,
    run=run_probes,
))

register_benchmark(Benchmark(
    name="info-plane-snr-step",
    slug="info-plane",
    description=f"Adam step of the 12-10-7-5-4-3-2 tanh net (batch {_P.batch_size}) with GradientSNR.accumulate "
                "vs the plain step",
    target=1.3,
    run=run_snr,
))
