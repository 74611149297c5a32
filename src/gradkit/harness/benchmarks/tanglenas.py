"""Benchmark: forward+backward of the 3-layer entangled conv supernet, weight superposition vs the DARTS
output mixture, batch 128 of 1x8x8 (paper slug: tanglenas). ``extra["saved_bytes_ratio"]``: unique-storage
saved-tensor bytes of one forward, superpose / mixture (target <= 0.35; the time target is 0.5)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.tanglenas import Supernet, TangleProtocol
from ...testing import SavedBytesMeter

BATCH = 128


def _step(net, x, y):
    def run() -> None:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
    return run


def run(repeats: int) -> BenchResult:
    p = TangleProtocol.at("quick")
    torch.manual_seed(0)
    nets = {m: Supernet(p, mode=m) for m in ("mixture", "superpose")}
    nets["superpose"].load_state_dict(nets["mixture"].state_dict())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    saved = {}
    for m, net in nets.items():
        with SavedBytesMeter() as meter:
            out = net(x)
        del out
        saved[m] = meter.bytes
    res = compare_steps(_step(nets["mixture"], x, y), _step(nets["superpose"], x, y), repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "saved_bytes_ratio": saved["superpose"] / saved["mixture"]})


register_benchmark(Benchmark(
    name="tanglenas-superpose-step", slug="tanglenas",
    description=f"3-layer entangled conv supernet fwd+bwd, batch {BATCH}: superposition vs DARTS mixture",
    target=0.5, baseline="DARTS output mixture (same weights)", run=run))
