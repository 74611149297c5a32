"""Benchmark: NormGrad attribution of a batch vs one plain forward+backward+step (paper slug: backprop-saliency).

Report only (no target): the cost of ``NormGrad(model, ["conv2", "conv3"]).attribute`` (forward with the
virtual identity layers, backward to both layers, factorised NormGrad, upsampling, min-max normalisation
and the product) relative to a plain training step of the same CNN on the same 256 inputs. The
attribution needs no parameter gradients and no optimizer step, so a ratio near or below 1 is expected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.backprop_saliency import SaliencyCNN
from ...probes.saliency import NormGrad

BATCH, SIZE = 256, 32


def run(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SaliencyCNN().eval()
    x = torch.rand(BATCH, 1, SIZE, SIZE, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    attr = NormGrad(model, ["conv2", "conv3"])

    def baseline() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def candidate() -> None:
        attr.attribute(x, target=y)

    res = compare_steps(baseline, candidate, repeats=repeats)
    model.load_state_dict(snapshot)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "size": SIZE,
                                                               "layers": ["conv2", "conv3"]})


register_benchmark(Benchmark(
    name="backprop-saliency-normgrad-attribution",
    slug="backprop-saliency",
    description=f"NormGrad(conv2*conv3) attribution of {BATCH} 32x32 inputs vs one training step of the same CNN",
    target=None,
    baseline="plain forward+backward+SGD step",
    run=run,
))
