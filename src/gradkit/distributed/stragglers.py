"""The runtime event simulator of gradient-coding schemes and the parameter grid search (paper slug: sgc).

- :func:`simulate_runtime`: the authors' runtime model. Worker delay in round r is
  ``delays[i, r] + (load - base_load) * load_cost``; the master waits until ``t_wait = min_i delay * (1+mu)``;
  slower workers are stragglers. If the pattern so far is admissible for the scheme the round lasts
  ``min(t_wait, max delay)``, otherwise the master waits for everybody (``max delay``, nobody straggles).
  Every job must then be decodable by round ``t + T`` (a :class:`DecodeError` otherwise: never silent).
- :func:`round_outcome`: that deadline rule for one round (shared with the real run).
- :func:`grid_search`: the scheme's parameters that minimise the mean runtime over a batch of traces.

Straggler models and delay traces are defined in :mod:`gradkit.distributed.straggler_models` (re-exported
here, where they were first published).

Example::

    rng = np.random.default_rng(0)
    d = gilbert_elliott_delays(8, 40, rng=rng)             # (8, 40) bursty delays
    res = simulate_runtime(MSGCScheme(8, B=2, W=3, lam=2, jobs=37), d, mu=1.0, load_cost=2.0)
    print(res.total_time, res.full_waits)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .._validate import integer, real_scalar
from .coding_schemes import CodingScheme
from .gradient_codes import DecodeError
from .straggler_models import (BurstyStragglerModel, PerRoundStragglerModel, gilbert_elliott_delays, iid_delays,
                               markov_straggler_states, pattern_delays, sample_admissible_pattern)

__all__ = [
    "round_outcome", "RoundOutcome", "SimulationResult", "simulate_runtime", "GridResult", "grid_search",
    # defined in straggler_models, re-exported for the import paths published before the split
    "PerRoundStragglerModel", "BurstyStragglerModel", "markov_straggler_states", "gilbert_elliott_delays",
    "iid_delays", "pattern_delays", "sample_admissible_pattern",
]


# ---------------------------------------------------------------------------------------- simulator
@dataclass(frozen=True)
class RoundOutcome:
    """What the master decides in one round: who straggled, how long the round took, full wait or not."""

    stragglers: np.ndarray
    duration: float
    waited_for_all: bool
    t_wait: float


def _outcomes(model, history: np.ndarray, d: np.ndarray, mu: float):
    """Batched deadline rule: d (K, n) -> stragglers (K, n), durations (K,), full waits (K,), t_wait (K,)."""
    t_wait = d.min(-1) * (1.0 + mu)
    strag = d > t_wait[:, None]
    dmax = d.max(-1)
    ok = model.admissible(history, strag)
    strag &= ok[:, None]
    return strag, np.where(ok, np.minimum(t_wait, dmax), dmax), ~ok, t_wait


def round_outcome(model, history: np.ndarray, delays: np.ndarray, mu: float) -> RoundOutcome:
    """The master's deadline rule for one round (shared by the simulator and the real run; paper slug: sgc).

    t_wait = min(delays) * (1 + mu); stragglers = delays > t_wait. If ``model`` admits them after
    ``history`` (n, r) the round lasts min(t_wait, max(delays)); otherwise the master waits for all
    (max(delays), no straggler recorded).
    """
    d = np.asarray(delays, dtype=np.float64)
    if d.ndim != 1 or np.asarray(history).shape[:1] != d.shape:
        raise ValueError(f"delays must be (n,) and history (n, r), got {d.shape} and {np.shape(history)}")
    strag, dur, full, t_wait = _outcomes(model, np.asarray(history, bool)[None], d[None], mu)
    return RoundOutcome(strag[0], float(dur[0]), bool(full[0]), float(t_wait[0]))


@dataclass
class SimulationResult:
    """Runtime of one scheme on one trace: total time, rounds with a full wait, per-round durations,
    the recorded straggler pattern (n, rounds) and the round in which each job became decodable."""

    total_time: float
    full_waits: int
    durations: np.ndarray
    stragglers: np.ndarray
    decoded_at: np.ndarray
    load: float
    T: int

    def __iter__(self):  # ``total, waits = simulate_runtime(...)`` unpacks it
        return iter((self.total_time, self.full_waits))


def _simulate(scheme: CodingScheme, d: np.ndarray, mu: float, load_cost: float, base_load: float):
    """All K traces d (K, n, R) at once; returns durations (K, R), full waits (K,), pattern (K, n, R)."""
    K, n, R = d.shape
    d = d + (scheme.load - base_load) * load_cost
    scheme.reset(batch=K)
    hist = np.zeros((K, n, R), dtype=bool)
    durations = np.zeros((K, R))
    waits = np.zeros(K, dtype=np.int64)
    decoded_at = np.full(scheme.jobs, -1, dtype=np.int64)
    model = scheme.straggler_model
    everyone = np.ones((K, n), dtype=bool)
    for r in range(R):
        idle = scheme.idle(r)
        if idle.all():
            scheme.complete_round(r, everyone)
        else:
            strag, dur, full, _ = _outcomes(model, hist[..., :r], d[..., r], mu)
            strag[idle] = False
            hist[..., r] = strag
            durations[:, r] = np.where(idle, 0.0, dur)
            waits += full & ~idle
            scheme.complete_round(r, ~strag)
        job = r - scheme.T
        if 0 <= job < scheme.jobs:
            if not scheme.decodable(job):
                raise DecodeError(f"{scheme!r}: job {job} not decodable after round {r} "
                                  f"({scheme.missing(job)}) under an admitted pattern")
            decoded_at[job] = r
    return durations, waits, hist, decoded_at


def _check_delays(delays, n: int, rounds: int) -> np.ndarray:
    d = np.asarray(delays, dtype=np.float64)
    if d.ndim not in (2, 3) or d.shape[-2] != n or d.shape[-1] < rounds:
        raise ValueError(f"delays must have shape ({n}, >= {rounds}) or (K, {n}, >= {rounds}) for a scheme with "
                         f"n={n} workers and {rounds} rounds, got {d.shape}")
    d = d[..., :rounds]
    if not np.isfinite(d).all() or (d < 0).any():
        raise ValueError("delays must be finite and >= 0")
    return d


def simulate_runtime(scheme: CodingScheme, delays: np.ndarray, mu: float = 1.0, load_cost: float = 2.0,
                     base_load: float = 0.0):
    """Event simulation of ``scheme`` on a delay trace (n, >= rounds) (paper slug: sgc).

    Worker delay in round r: delays[i, r] + (load - base_load) * load_cost. Rounds where no worker has
    work are skipped (duration 0). After round r, job r - T must be decodable: a failure raises
    :class:`DecodeError` (a scheme bug; inadmissible patterns are handled by waiting for all).
    Resets the scheme. Traces stacked as (K, n, R) are simulated together (vectorised) and give a list
    of K results.

    >>> d = pattern_delays(np.zeros((4, 3), bool))
    >>> simulate_runtime(GCScheme(4, 1, jobs=3), d).full_waits
    0
    """
    if not isinstance(scheme, CodingScheme):
        raise TypeError(f"scheme must be a CodingScheme, got {type(scheme).__name__}")
    mu = real_scalar("mu", mu, nonneg=True)
    load_cost = real_scalar("load_cost", load_cost, nonneg=True)
    base_load = real_scalar("base_load", base_load)
    d = _check_delays(delays, scheme.n, scheme.rounds)
    single = d.ndim == 2
    durations, waits, hist, decoded_at = _simulate(scheme, d[None] if single else d, mu, load_cost, base_load)
    scheme.reset()
    res = [SimulationResult(float(durations[k].sum()), int(waits[k]), durations[k], hist[k], decoded_at.copy(),
                            scheme.load, scheme.T) for k in range(len(durations))]
    return res[0] if single else res


@dataclass
class GridResult:
    """Best parameters of a scheme over a grid, its mean runtime over the traces, and the whole table."""

    scheme: str
    params: dict
    runtime: float
    load: float
    T: int
    full_waits: float
    table: list[dict] = field(default_factory=list)


def grid_search(scheme_cls: type[CodingScheme], n: int, jobs: int, traces: np.ndarray, max_T: int,
                mu: float = 1.0, load_cost: float = 2.0, base_load: float = 0.0,
                lambdas: Sequence[int] | None = None, max_W: int | None = None,
                grid: Sequence[dict] | None = None) -> GridResult:
    """Parameters of ``scheme_cls`` minimising the mean runtime over ``traces`` (K, n, R) (paper slug: sgc).

    The grid is ``scheme_cls.param_grid(n, max_T, lambdas, max_W)`` (or ``grid``), keeping only T <= max_T.
    Ties go to the earlier grid entry. All K traces are simulated together.
    """
    mu = real_scalar("mu", mu, nonneg=True)
    load_cost = real_scalar("load_cost", load_cost, nonneg=True)
    base_load = real_scalar("base_load", base_load)
    n, jobs = integer("n", n, low=1), integer("jobs", jobs, low=1)
    max_T = integer("max_T", max_T, low=0)
    tr = np.asarray(traces, dtype=np.float64)
    if tr.ndim == 2:
        tr = tr[None]
    if tr.ndim != 3 or tr.shape[1] != n:
        raise ValueError(f"traces must have shape (K, {n}, rounds), got {np.shape(traces)}")
    grid = list(grid) if grid is not None else scheme_cls.param_grid(n, max_T, lambdas, max_W)
    table = []
    best = None
    for p in grid:
        sch = scheme_cls(n=n, jobs=jobs, **p)
        if sch.T > max_T:
            continue
        durations, waits, _, _ = _simulate(sch, _check_delays(tr, n, sch.rounds), mu, load_cost, base_load)
        row = {"params": dict(p), "runtime": float(durations.sum(-1).mean()), "load": sch.load, "T": sch.T,
               "full_waits": float(waits.mean())}
        table.append(row)
        if best is None or row["runtime"] < best["runtime"]:
            best = row
    if best is None:
        raise ValueError(f"no parameters of {scheme_cls.__name__} have T <= max_T={max_T}")
    return GridResult(scheme_cls.name, best["params"], best["runtime"], best["load"], best["T"],
                      best["full_waits"], table)
