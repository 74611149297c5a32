"""Benchmarks of icl-newton: the layer-read-out probe against one plain training step of the claim's transformer.

Model: the claim's 4-layer, width-32 causal transformer on in-context linear regression (d = 4, 16 examples,
paired tokens), batch 64, Adam; the baseline is one plain forward + backward + Adam step.

- ``icl-newton-recording-step``: the same training step with a :class:`LayerReadout` recording every block's
  output (forward hooks, detached references; the records are cleared after each step). Expected about 1;
  target 1.2.
- ``icl-newton-probe-eval``: one whole probe evaluation as the claim runs it at quick scale, on 2048 fit and
  256 evaluation prompts: hidden states, ridge read-outs of the 4 layers, Newton iterates k = 1..12 on every
  prefix and the SimE matrix. Reported as a number of training steps (no target): the probe is run once
  after training, not at every step.
"""
from __future__ import annotations

import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.icl_newton import LAYOUT, ICLTransformer
from ...data.in_context import InContextLinearRegression
from ...probes.icl_algorithms import LayerReadout, error_similarity, icl_predictions
from ...solvers.lstsq_iterates import newton_iterates

D, N, WIDTH, LAYERS, HEADS, BATCH, N_FIT, N_EVAL, NEWTON_STEPS = 4, 16, 32, 4, 4, 64, 2048, 256, 12


def _setup():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    task = InContextLinearRegression(D, N)
    model = ICLTransformer(D, N, WIDTH, LAYERS, HEADS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys, _ = task.sample(BATCH, gen)
    tokens = task.tokens(xs, ys, LAYOUT)

    def baseline() -> None:
        opt.zero_grad(set_to_none=True)
        (model(tokens) - ys).square().mean().backward()
        opt.step()

    return task, gen, model, opt, tokens, ys, baseline


def run_recording(repeats: int) -> BenchResult:
    task, gen, model, opt, tokens, ys, baseline = _setup()
    probe = LayerReadout(model, [f"blocks.{i}" for i in range(LAYERS)])

    def candidate() -> None:
        with probe:
            baseline()
        probe.reset()

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "layers": LAYERS})


def run_probe_eval(repeats: int) -> BenchResult:
    task, gen, model, opt, tokens, ys, baseline = _setup()
    xf, yf, _ = task.sample(N_FIT, gen)
    xe, ye, _ = task.sample(N_EVAL, gen)
    tok_fit, tok_eval = task.tokens(xf, yf, LAYOUT), task.tokens(xe, ye, LAYOUT)
    mask = torch.ones_like(yf, dtype=torch.bool)
    mask[:, 0] = False
    layers = [f"blocks.{i}" for i in range(LAYERS)]

    def candidate() -> None:
        readout = LayerReadout(model, layers).fit(tok_fit, yf, mask=mask)
        preds = readout.predict(tok_eval)
        newton = icl_predictions(lambda X, y: newton_iterates(X, y, NEWTON_STEPS, form="gram"), xe.double(),
                                 ye.double())
        error_similarity(preds, newton, ye)

    res = compare_steps(baseline, candidate, repeats=repeats, warmup=1)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"fit_prompts": N_FIT, "eval_prompts": N_EVAL,
                                                               "newton_steps": NEWTON_STEPS})


register_benchmark(Benchmark(
    name="icl-newton-recording-step",
    slug="icl-newton",
    description=f"training step with LayerReadout recording {LAYERS} blocks vs plain step, ICL transformer "
                f"width {WIDTH}, batch {BATCH} x {N} tokens",
    target=1.2,
    baseline="plain forward+backward+Adam step",
    run=run_recording,
))

register_benchmark(Benchmark(
    name="icl-newton-probe-eval",
    slug="icl-newton",
    description=f"one probe evaluation (read-outs on {N_FIT} prompts, Newton k=1..{NEWTON_STEPS} and SimE on "
                f"{N_EVAL}) in units of one training step",
    target=None,
    baseline="plain forward+backward+Adam step",
    run=run_probe_eval,
))
