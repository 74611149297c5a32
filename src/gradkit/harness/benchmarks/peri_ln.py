"""Step-time cost of Peri-LN (peri-ln): a TinyTransformerLM AdamW step with Peri-LN vs Pre-LN blocks.

Model: decoder-only LM, vocab 64, dim 128, depth 4, 4 heads, MLP ratio 4, RMSNorm; batch 16 x 64
tokens. Peri-LN adds one output RMSNorm per sublayer (dim parameters each) to the same Pre-LN
model; both start from the same weights (norms draw no random numbers) and see the same batch.
"""
from __future__ import annotations

import torch
from torch import nn

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...nn.peri_ln import weight_decay_groups
from ..claims.peri_ln import TinyTransformerLM  # the claim's model

VOCAB, DIM, DEPTH, HEADS, BATCH, SEQ = 64, 128, 4, 4, 16, 64


def _model(placement: str) -> TinyTransformerLM:
    torch.manual_seed(0)
    return TinyTransformerLM(VOCAB, DIM, DEPTH, HEADS, placement=placement, norm="rmsnorm", max_len=SEQ)


def run(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    models = {p: _model(p) for p in ("pre", "peri")}
    opts = {p: torch.optim.AdamW(weight_decay_groups(m, 0.1), lr=1e-3, betas=(0.9, 0.95))
            for p, m in models.items()}

    def step(p: str) -> None:
        opts[p].zero_grad(set_to_none=True)
        nn.functional.cross_entropy(models[p](x).reshape(-1, VOCAB), y).backward()
        opts[p].step()

    r = compare_steps(lambda: step("pre"), lambda: step("peri"), repeats=repeats)
    n = {p: sum(q.numel() for q in m.parameters()) for p, m in models.items()}
    return BenchResult(r.baseline_s, r.candidate_s,
                       extra={"params_pre": n["pre"], "params_peri": n["peri"], "batch": BATCH, "seq": SEQ,
                              "threads": torch.get_num_threads()})


register_benchmark(Benchmark(
    name="peri-ln-step",
    slug="peri-ln",
    description=("AdamW step of a 4-block, dim-128 decoder LM (RMSNorm), batch 16 x 64 tokens: "
                 "Peri-LN blocks vs Pre-LN blocks"),
    target=None,
    baseline="Pre-LN",
    run=run,
))
