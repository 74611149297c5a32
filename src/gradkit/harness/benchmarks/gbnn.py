"""Training cost of GBNN (gbnn) vs Adam: a whole training run of the same one-hidden-layer MLP.

Workload (the gbnn claim's breast_cancer arm): 455 x 30 standardised inputs, binary labels, 50 sigmoid
hidden units, L2 1e-4. Baseline: the MLP trained jointly with Adam (lr 1e-3, 200 epochs, batch 200,
plain PyTorch loop). Candidate: :class:`gradkit.nn.gbnn.GradientBoostedMLP` (50 rounds of one unit,
each fitted with 200 L-BFGS iterations on a 50% subsample, Newton step). One "step" here is a whole
training run, so ``repeats`` is divided by 10 (at least 1). Both run on one intra-op thread whatever
the harness sets (layers this small only wait on a second thread: with 2 threads on a busy 2-core
machine the Adam loop took 7x longer). Report only (no target): boosting costs one small L-BFGS fit
per unit.
"""
from __future__ import annotations

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...engine import cpu_threads
from ...nn.gbnn import GradientBoostedMLP, l2_weight_penalty, one_hidden_mlp

UNITS, EPOCHS, BATCH, LR, ALPHA = 50, 200, 200, 1e-3, 1e-4


def _data():
    from sklearn.datasets import load_breast_cancer

    from ...data import standardise

    d = load_breast_cancer()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(d.target), generator=g)[:455].numpy()
    x = standardise(d.data[idx], d.data[idx])[0]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(d.target[idx], dtype=torch.int64)


def run(repeats: int, units: int = UNITS, epochs: int = EPOCHS) -> BenchResult:
    x, y = _data()
    yf = y.float()

    def baseline_step() -> None:  # plain PyTorch: Adam on the jointly trained MLP
        gen = torch.Generator().manual_seed(0)
        net = one_hidden_mlp(x.shape[1], units, 1, generator=gen)
        opt = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), BATCH):
                j = perm[i:i + BATCH]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.binary_cross_entropy_with_logits(net(x[j]).squeeze(1), yf[j])
                (loss + l2_weight_penalty(net, ALPHA, len(j))).backward()
                opt.step()

    def candidate_step() -> None:
        GradientBoostedMLP(x.shape[1], 2, "binary", total_units=units, weight_decay=ALPHA).fit(
            x, y, generator=torch.Generator().manual_seed(0))

    with cpu_threads(1):  # tiny layers: a second intra-op thread only adds waiting (as in the claim)
        r = compare_steps(baseline_step, candidate_step, repeats=max(1, repeats // 10), warmup=1)
    return BenchResult(r.baseline_s, r.candidate_s,
                       extra={"units": units, "adam_epochs": epochs, "n_train": len(x), "threads": 1})


register_benchmark(Benchmark(
    name="gbnn-training",
    slug="gbnn",
    description=("whole training run, breast_cancer (455x30), 50 sigmoid units: GradientBoostedMLP "
                 "(50 rounds x 200 L-BFGS iterations) vs the same MLP trained with Adam (200 epochs, batch 200)"),
    target=None,
    baseline="Adam (plain PyTorch)",
    run=run,
))
