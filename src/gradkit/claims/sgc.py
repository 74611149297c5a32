"""SGC claim: M-SGC finishes a sequence of coded gradient jobs faster than the best GC (paper slug: sgc).

Protocol (spec ``papers/sgc.md``), an event simulation of the authors' runtime model: n workers, J jobs,
per-worker delay traces from a two-state Markov chain (good: 1.0 + 0.05|N(0,1)|, bad: +3.0;
P(good->bad) = 0.02, P(bad->good) = 0.5, so bursts last ~2 rounds); a worker's delay in a round is its
trace value + load * 2 (load cost c = 2); the master waits until min delay * (1 + mu), mu = 1, and waits
for everybody when the straggler pattern is not admissible for the scheme. Arms, all on the same K traces
of a seed: GC (``gc``, s in 0..n-1, T = 0), SR-SGC (``sr_sgc``) and M-SGC (``m_sgc``, ours), each with the
parameters that minimise its mean runtime over the K traces, under one delay budget T <= 6
(M-SGC: B < W, W-2+B <= 6; SR-SGC: T = B <= 6, B | W-1, W <= max(B+1, 8-B); lam in {1, 2, 4, 8, 16, 32}).
A second set of traces with i.i.d. slow rounds (p = 0.1 per worker and round, non-bursty, ~2.6x the
bursty chain's stationary rate) is reported as well (``*_iid`` metrics, no pass criterion).
Smoke scale: n = 8, J = 30, fixed parameters (GC s = 2; SR-SGC B = 2, W = 3, lam = 2; M-SGC B = 2, W = 3,
lam = 2). Every scale also checks that each scheme decodes every job by round t + T under a
rejection-sampled admissible straggler pattern (``decoded_frac``).
"""
from __future__ import annotations

import time

import numpy as np

from ..distributed.gradient_coding import SCHEMES
from ..distributed.stragglers import (
    gilbert_elliott_delays, grid_search, iid_delays, sample_admissible_pattern, simulate_runtime,
)
from ..engine import seed_everything
from .base import Claim, Primary, RunContext, RunOutput, register, run_arms
from .criteria import AllOf, AtMost

SLUG = "sgc"
ARMS = ("gc", "sr_sgc", "m_sgc")
OURS, BASELINE = "m_sgc", "gc"
P_GB, P_BG, SLOW, NOISE, FAST = 0.02, 0.5, 3.0, 0.05, 1.0
IID_P = 0.1
MU, LOAD_COST = 1.0, 2.0
SMOKE_PARAMS = {"gc": {"s": 2}, "sr_sgc": {"B": 2, "W": 3, "lam": 2}, "m_sgc": {"B": 2, "W": 3, "lam": 2}}


def _settings(ctx: RunContext) -> dict:
    n = ctx.pick(smoke=8, quick=32, full=64)
    return {
        "n": n, "jobs": ctx.pick(smoke=30, quick=200, full=500), "traces": ctx.pick(smoke=5, quick=5, full=10),
        "max_T": 6, "lambdas": [lam for lam in (1, 2, 4, 8, 16, 32, 64) if lam <= n],
        "grid": ctx.scale != "smoke",
    }


def _best(arm: str, cfg: dict, traces: np.ndarray):
    cls = SCHEMES[arm]
    grid = None if cfg["grid"] else [SMOKE_PARAMS[arm]]
    return grid_search(cls, cfg["n"], cfg["jobs"], traces, cfg["max_T"], mu=MU, load_cost=LOAD_COST,
                       lambdas=cfg["lambdas"], grid=grid)


def _decoded_frac(scheme, rng: np.random.Generator) -> float:
    """Share of jobs decodable by t + T under a rejection-sampled admissible pattern (must be 1)."""
    pat = sample_admissible_pattern(scheme.straggler_model, scheme.n, scheme.rounds, p=0.1, rng=rng)
    scheme.reset()
    ok = 0
    for r in range(scheme.rounds):
        scheme.complete_round(r, ~pat[:, r])
        job = r - scheme.T
        if 0 <= job < scheme.jobs:
            ok += scheme.decodable(job)
    return ok / scheme.jobs


def run(ctx: RunContext) -> RunOutput:
    cfg = _settings(ctx)
    n, J, K, max_T = cfg["n"], cfg["jobs"], cfg["traces"], cfg["max_T"]
    rng = np.random.default_rng([ctx.seed, 2211])
    R = J + max_T
    bursty = gilbert_elliott_delays(n, R, P_GB, P_BG, FAST, SLOW, NOISE, rng=rng, traces=K)
    iid = iid_delays(n, R, IID_P, FAST, SLOW, NOISE, rng=rng, traces=K)
    chosen: dict[str, dict] = {}

    def train_arm(arm: str):
        seed_everything(ctx.seed)
        bar = ctx.progress(total=2, desc=f"{SLUG}/{arm}")
        try:
            best = _best(arm, cfg, bursty)
            bar.update(1)
            best_iid = _best(arm, cfg, iid)
            bar.update(1)
        finally:
            bar.close()
        scheme = SCHEMES[arm](n=n, jobs=J, **best.params)
        runs = simulate_runtime(scheme, bursty, mu=MU, load_cost=LOAD_COST)
        cum = np.mean([np.cumsum(r.durations) for r in runs], 0)
        chosen[arm] = {"bursty": best.params, "iid": best_iid.params, "grid_size": len(best.table)}
        metrics = {
            "runtime": best.runtime, "load": best.load, "T": float(best.T), "full_waits": best.full_waits,
            "runtime_per_job": best.runtime / J,
            "runtime_iid": best_iid.runtime, "load_iid": best_iid.load, "full_waits_iid": best_iid.full_waits,
            "decoded_frac": _decoded_frac(scheme, np.random.default_rng([ctx.seed, 7, len(arm)])),
        }
        return metrics, {"cumulative_time": [float(v) for v in cum]}

    t0 = time.perf_counter()
    metrics, curves, seconds = run_arms(ARMS, train_arm)
    for arm in ARMS:
        metrics[arm]["rel_runtime"] = metrics[arm]["runtime"] / metrics[BASELINE]["runtime"]
        metrics[arm]["rel_runtime_iid"] = metrics[arm]["runtime_iid"] / metrics[BASELINE]["runtime_iid"]
    R_max = max(len(v) for v in curves["cumulative_time"].values())
    info = {
        "n": n, "jobs": J, "traces": K, "max_T": max_T, "lambdas": cfg["lambdas"], "mu": MU,
        "load_cost": LOAD_COST, "bursty": {"p_gb": P_GB, "p_bg": P_BG, "fast": FAST, "slow": SLOW, "noise": NOISE},
        "iid_p": IID_P, "best_params": chosen, "grid_search": cfg["grid"], "seconds_per_arm": seconds,
        "seconds": round(time.perf_counter() - t0, 3),
        "curve_axes": {"cumulative_time": {"xlabel": "round", "x": list(range(1, R_max + 1))}},
    }
    return RunOutput(metrics=metrics, data="simulation", curves=curves, info=info)


def _criterion() -> AllOf:
    return AllOf(
        AtMost(metric="rel_runtime", arm=OURS, value=0.95),
        AtMost(metric="rel_runtime", arm="sr_sgc", value=1.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Sequential Gradient Coding For Straggler Mitigation",
    arxiv="2211.13802",
    statement="Under bursty stragglers (per-worker Markov chain, bursts ~2 rounds) and one delay budget T <= 6, "
              "M-SGC with grid-searched (B, W, lam) finishes J coded gradient jobs in <= 0.95x the runtime of "
              "the best gradient code (GC, any s), and SR-SGC in <= the GC runtime (means over seeds of the "
              "per-seed runtime ratio to GC).",
    paper_figure="AWS Lambda, 256 workers training several models concurrently: M-SGC runtime ~16% below the "
                 "best GC (abstract); M-SGC's normalized load is far below GC's for the same straggler "
                 "tolerance, SR-SGC in between.",
    criterion=_criterion(),
    primary=Primary(metric="runtime", ours=OURS, baseline=BASELINE, unit="time units"),
    run=run,
    uses=(
        "gradkit.distributed.gradient_coding.GradientCode",
        "gradkit.distributed.gradient_coding.GCScheme",
        "gradkit.distributed.gradient_coding.SRSGCScheme",
        "gradkit.distributed.gradient_coding.MSGCScheme",
        "gradkit.distributed.stragglers.BurstyStragglerModel",
        "gradkit.distributed.stragglers.gilbert_elliott_delays",
        "gradkit.distributed.stragglers.iid_delays",
        "gradkit.distributed.stragglers.simulate_runtime",
        "gradkit.distributed.stragglers.grid_search",
        "gradkit.distributed.coded_run.coded_gradient_descent",
    ),
    notes="Event simulation of the authors' runtime model (their 2_find_runtimes simulators), not AWS Lambda: "
          "the delay traces are synthetic (the spec's two-state Markov chain), so the paper's 16% is not "
          "expected to transfer as a number. Admissibility uses the exact (B, W, lam) definition (one burst "
          "per window), slightly stricter than the authors' operational check (with theirs, M-SGC's runtime "
          "drops by ~1% on these traces and every job still decodes). GC decodes with <= s "
          "stragglers (the authors' code uses < s). Runtime is in units of a fast worker's base round time. "
          "The real torch.distributed run (gradkit.distributed.coded_run, 4 gloo processes, logistic "
          "regression on digits, simulated stragglers) is exercised by the tests: every decoded gradient "
          "equals the full-batch gradient to ~1e-15 in float64. No model is trained here, so the engine's "
          "fit loop is not used.",
    plots=("cumulative_time",),
))
