"""SGC claim: M-SGC finishes a sequence of coded gradient jobs faster than the best GC (paper slug: sgc).

An event simulation of the authors' runtime model: n workers, J jobs, per-worker delay traces from a
two-state Markov chain (good: fast + noise|N(0,1)|, bad: + slow; bursts last ~1/p_bg rounds); a worker's
delay in a round is its trace value + load * load_cost; the master waits until min delay * (1 + mu), and
waits for everybody when the straggler pattern is not admissible for the scheme. Arms, all on the same
traces of a seed: GC (``gc``, s in 0..n-1, T = 0), SR-SGC (``sr_sgc``) and M-SGC (``m_sgc``, ours), each
with the parameters that minimise its mean runtime over the traces, under one delay budget T <= max_T
(M-SGC: B < W, W-2+B <= max_T; SR-SGC: T = B <= max_T, B | W-1, W <= max(B+1, max_T+2-B)). A second set of
traces with i.i.d. slow rounds (non-bursty) is reported as well (``*_iid`` metrics, no pass criterion), and
so is the same bursty search when computation dominates a round (``load_cost_alt``; ``*_c_alt`` metrics).
Without the grid search (smoke scale) each scheme runs with the protocol's fixed parameters. Every scale
also checks that each scheme decodes every job by round t + T under a rejection-sampled admissible
straggler pattern (``decoded_frac``). The numbers are the protocol's (:class:`SGCProtocol`,
``gradkit show sgc``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ...distributed import (SCHEMES, gilbert_elliott_delays, grid_search, iid_delays, sample_admissible_pattern,
                            simulate_runtime)
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllOf, AtMost

SLUG = "sgc"
ARMS = ("gc", "sr_sgc", "m_sgc")
OURS, BASELINE = "m_sgc", "gc"


@dataclass(frozen=True)
class SGCProtocol(Protocol):
    """Runtime simulation of GC, SR-SGC and M-SGC on bursty (and i.i.d.) synthetic delay traces."""

    n: int = scaled(smoke=8, quick=32, full=64)
    jobs: int = scaled(smoke=30, quick=200, full=500)
    traces: int = scaled(smoke=5, quick=5, full=10)
    max_T: int = 9  # the delay budget every scheme shares (the authors': 20 profiled rounds - 10 jobs, W-1+B <= 10)
    lambdas: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # candidates; those above n are dropped
    grid: bool = scaled(smoke=False, quick=True)  # False: the fixed parameters below
    gc_s: int = 2  # fixed GC parameter
    sr_sgc_bwl: tuple[int, int, int] = (2, 3, 2)  # fixed SR-SGC (B, W, lam)
    m_sgc_bwl: tuple[int, int, int] = (2, 3, 2)  # fixed M-SGC (B, W, lam)
    p_gb: float = 0.02  # P(good -> bad) of the bursty chain
    p_bg: float = 0.5  # P(bad -> good)
    fast: float = 1.0
    slow: float = 3.0
    noise: float = 0.05
    iid_p: float = 0.1  # per worker and round, the i.i.d. traces
    mu: float = 1.0
    load_cost: float = 2.0
    load_cost_alt: float = 8.0  # reported: rounds dominated by computation (runtime_c_alt, rel_runtime_c_alt)
    decode_check_p: float = 0.1  # straggler rate of the admissible pattern of the decoding check


def _fixed_params(p: SGCProtocol, arm: str) -> dict:
    if arm == "gc":
        return {"s": p.gc_s}
    B, W, lam = p.sr_sgc_bwl if arm == "sr_sgc" else p.m_sgc_bwl
    return {"B": B, "W": W, "lam": lam}


def _lambdas(p: SGCProtocol) -> list[int]:
    return [lam for lam in p.lambdas if lam <= p.n]


def _best(p: SGCProtocol, arm: str, traces: np.ndarray):
    grid = None if p.grid else [_fixed_params(p, arm)]
    return grid_search(SCHEMES[arm], p.n, p.jobs, traces, p.max_T, mu=p.mu, load_cost=p.load_cost,
                       lambdas=_lambdas(p), grid=grid)


def _decoded_frac(scheme, p_straggle: float, rng: np.random.Generator) -> float:
    """Share of jobs decodable by t + T under a rejection-sampled admissible pattern (must be 1)."""
    pat = sample_admissible_pattern(scheme.straggler_model, scheme.n, scheme.rounds, p=p_straggle, rng=rng)
    scheme.reset()
    ok = 0
    for r in range(scheme.rounds):
        scheme.complete_round(r, ~pat[:, r])
        job = r - scheme.T
        if 0 <= job < scheme.jobs:
            ok += scheme.decodable(job)
    return ok / scheme.jobs


def _setup(ctx: ArmContext) -> dict:
    """The seed's bursty and i.i.d. delay traces, (traces, n, jobs + max_T) each."""
    p = ctx.p
    rng = np.random.default_rng([ctx.seed, 2211])
    R = p.jobs + p.max_T
    bursty = gilbert_elliott_delays(p.n, R, p.p_gb, p.p_bg, p.fast, p.slow, p.noise, rng=rng, traces=p.traces)
    iid = iid_delays(p.n, R, p.iid_p, p.fast, p.slow, p.noise, rng=rng, traces=p.traces)
    return {"bursty": bursty, "iid": iid}


def _arm(ctx: ArmContext) -> ArmResult:
    p, arm = ctx.p, ctx.arm
    bar = ctx.progress(total=3, desc=f"{SLUG}/{arm}")
    try:
        best = _best(p, arm, ctx.data["bursty"])
        bar.update(1)
        best_iid = _best(p, arm, ctx.data["iid"])
        bar.update(1)
        best_alt = _best(replace(p, load_cost=p.load_cost_alt), arm, ctx.data["bursty"])
        bar.update(1)
    finally:
        bar.close()
    scheme = SCHEMES[arm](n=p.n, jobs=p.jobs, **best.params)
    runs = simulate_runtime(scheme, ctx.data["bursty"], mu=p.mu, load_cost=p.load_cost)
    cum = np.mean([np.cumsum(r.durations) for r in runs], 0)
    metrics = {
        "runtime": best.runtime, "load": best.load, "T": float(best.T), "full_waits": best.full_waits,
        "runtime_per_job": best.runtime / p.jobs,
        "runtime_iid": best_iid.runtime, "load_iid": best_iid.load, "full_waits_iid": best_iid.full_waits,
        "runtime_c_alt": best_alt.runtime, "load_c_alt": best_alt.load,
        "decoded_frac": _decoded_frac(scheme, p.decode_check_p, np.random.default_rng([ctx.seed, 7, len(arm)])),
    }
    info = {"best_params": best.params, "best_params_iid": best_iid.params, "best_params_c_alt": best_alt.params,
            "grid_size": len(best.table)}
    return ArmResult(metrics, {"cumulative_time": [float(v) for v in cum]}, info)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    m = out.metrics
    for arm in ARMS:
        m[arm]["rel_runtime"] = m[arm]["runtime"] / m[BASELINE]["runtime"]
        m[arm]["rel_runtime_iid"] = m[arm]["runtime_iid"] / m[BASELINE]["runtime_iid"]
        m[arm]["rel_runtime_c_alt"] = m[arm]["runtime_c_alt"] / m[BASELINE]["runtime_c_alt"]
    R_max = max(len(v) for v in out.curves["cumulative_time"].values())
    out.info.update({"lambdas": _lambdas(ctx.p),
                     "curve_axes": {"cumulative_time": {"xlabel": "round", "x": list(range(1, R_max + 1))}}})


def _criterion() -> AllOf:
    return AllOf(
        AtMost(metric="rel_runtime", arm=OURS, value=0.95),
        AtMost(metric="rel_runtime", arm="sr_sgc", value=1.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    version=2,
    title="Sequential Gradient Coding For Straggler Mitigation",
    arxiv="2211.13802",
    statement="Under bursty stragglers (per-worker Markov chain, bursts of a few rounds) and one delay budget, "
              "M-SGC with grid-searched (B, W, lam) finishes J coded gradient jobs in <= 0.95x the runtime of "
              "the best gradient code (GC, any s), and SR-SGC in <= the GC runtime (means over seeds of the "
              "per-seed runtime ratio to GC).",
    paper_figure="AWS Lambda, 256 workers training several models concurrently: M-SGC runtime ~16% below the "
                 "best GC (abstract); M-SGC's normalized load is far below GC's for the same straggler "
                 "tolerance, SR-SGC in between.",
    protocol=SGCProtocol,
    data="simulation",
    setup=_setup,
    arms={arm: _arm for arm in ARMS},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="runtime", ours=OURS, baseline=BASELINE, unit="time units"),
    control_note="GC, which codes every job on its own, stands in for M-SGC",
    threads=None,
    uses=(
        "gradkit.distributed.gradient_codes.GradientCode",
        "gradkit.distributed.coding_schemes.GCScheme",
        "gradkit.distributed.coding_schemes.SRSGCScheme",
        "gradkit.distributed.coding_schemes.MSGCScheme",
        "gradkit.distributed.straggler_models.BurstyStragglerModel",
        "gradkit.distributed.straggler_models.gilbert_elliott_delays",
        "gradkit.distributed.straggler_models.iid_delays",
        "gradkit.distributed.stragglers.simulate_runtime",
        "gradkit.distributed.stragglers.grid_search",
        "gradkit.distributed.coded_run.coded_gradient_descent",
    ),
    notes="Event simulation of the authors' runtime model (their 2_find_runtimes simulators), not AWS Lambda: "
          "the delay traces are synthetic (a two-state Markov chain per worker), so the paper's 16% is not "
          "expected to transfer as a number. Admissibility uses the exact (B, W, lam) definition (one burst "
          "per window), slightly stricter than the authors' operational check (with theirs, M-SGC's runtime "
          "drops by ~1% on these traces and every job still decodes). GC decodes with <= s "
          "stragglers (the authors' code uses < s). Runtime is in units of a fast worker's base round time. "
          "The i.i.d. traces slow a worker in a round with probability iid_p, well above the bursty chain's "
          "stationary rate p_gb / (p_gb + p_bg), without bursts. "
          "The real torch.distributed run (gradkit.distributed.coded_run, 4 gloo processes, logistic "
          "regression on digits, simulated stragglers) is exercised by the tests: every decoded gradient "
          "equals the full-batch gradient to ~1e-15 in float64. No model is trained here, so the engine's "
          "fit loop is not used. The negative control (GC for M-SGC) cannot pass: GC's rel_runtime is 1 "
          "by definition.",
    scale_note=(
        "At the authors' delay budget (T <= 9) and a load cost of 2, M-SGC runs at 0.99x the best GC: a round "
        "is mostly fixed overhead, so M-SGC's lower load (0.058 vs 0.125) saves little while its burst limit "
        "brings about four times as many wait-for-all rounds. When computation dominates a round (load cost "
        "8, rel_runtime_c_alt) the same search gives 0.88x, near the paper's 16%, and on i.i.d. traces 0.91x. "
        "Which regime the paper's Lambda rounds are in is set by their measured load-time curve, which we do "
        "not have; the authors' equal-load search on measured traces would settle it."
    ),
    plots=("cumulative_time",),
    bounds={"load": (0.0, 1.0), "load_iid": (0.0, 1.0), "decoded_frac": (0.0, 1.0),
            "runtime": (0.0, float("inf")), "runtime_iid": (0.0, float("inf")),
            "rel_runtime": (0.0, float("inf")), "rel_runtime_iid": (0.0, float("inf")),
            "rel_runtime_c_alt": (0.0, float("inf")), "runtime_c_alt": (0.0, float("inf")),
            "load_c_alt": (0.0, 1.0),
            "T": (0.0, float("inf")), "full_waits": (0.0, float("inf")), "full_waits_iid": (0.0, float("inf"))},
))
