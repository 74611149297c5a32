"""Straggler models, delay traces, the runtime event simulator and the parameter grid search (paper slug: sgc).

- :class:`PerRoundStragglerModel` (GC): at most ``s`` stragglers in each round.
- :class:`BurstyStragglerModel` (SR-SGC, M-SGC): the (B, W, lam)-bursty model: in every window of W
  consecutive rounds at most ``lam`` distinct workers straggle, and each one's straggles inside the window
  form ONE burst of at most B consecutive rounds.
- :func:`gilbert_elliott_delays` / :func:`iid_delays`: per-worker delay traces from a two-state Markov
  chain (bursty) or i.i.d. slow rounds.
- :func:`simulate_runtime`: the authors' runtime model. Worker delay in round r is
  ``delays[i, r] + (load - base_load) * load_cost``; the master waits until ``t_wait = min_i delay * (1+mu)``;
  slower workers are stragglers. If the pattern so far is admissible for the scheme the round lasts
  ``min(t_wait, max delay)``, otherwise the master waits for everybody (``max delay``, nobody straggles).
  Every job must then be decodable by round ``t + T`` (a :class:`DecodeError` otherwise: never silent).
- :func:`grid_search`: the scheme's parameters that minimise the mean runtime over a batch of traces.

Example::

    rng = np.random.default_rng(0)
    d = gilbert_elliott_delays(8, 40, rng=rng)             # (8, 40) bursty delays
    res = simulate_runtime(MSGCScheme(8, B=2, W=3, lam=2, jobs=37), d, mu=1.0, load_cost=2.0)
    print(res.total_time, res.full_waits)
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .._validate import real_scalar
from .gradient_coding import CodingScheme, DecodeError, _int

__all__ = [
    "PerRoundStragglerModel", "BurstyStragglerModel", "markov_straggler_states", "gilbert_elliott_delays",
    "iid_delays", "pattern_delays", "sample_admissible_pattern", "round_outcome", "RoundOutcome",
    "SimulationResult", "simulate_runtime", "GridResult", "grid_search",
]


def _bool_matrix(name: str, a, n: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.bool_ or a.ndim != 2 or (n is not None and a.shape[0] != n):
        want = f"({n}, rounds)" if n is not None else "(n, rounds)"
        raise ValueError(f"{name} must be a boolean array of shape {want}, got {a.dtype} {a.shape}")
    return a


def _bool_vector(name: str, a, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.bool_ or a.shape != (n,):
        raise ValueError(f"{name} must be {n} booleans, got {a.dtype} array of shape {a.shape}")
    return a


class PerRoundStragglerModel:
    """At most ``s`` stragglers per round: what an (n, s) gradient code tolerates (paper slug: sgc).

    >>> PerRoundStragglerModel(1).admissible(np.zeros((3, 0), bool), np.array([True, False, False]))
    True
    """

    def __init__(self, s: int) -> None:
        self.s = _int("s", s, 0)

    def __repr__(self) -> str:
        return f"PerRoundStragglerModel(s={self.s})"

    def admissible(self, history: np.ndarray, is_straggler: np.ndarray):
        """Whether round ``history.shape[-1]`` may have stragglers ``is_straggler`` (history is unused).

        Batched: ``is_straggler`` (K, n) -> (K,) booleans.
        """
        ok = np.count_nonzero(is_straggler, axis=-1) <= self.s
        return bool(ok) if np.ndim(is_straggler) == 1 else ok

    def admissible_pattern(self, pattern: np.ndarray) -> bool:
        """Whether a whole (n, rounds) straggler pattern fits the model."""
        pattern = _bool_matrix("pattern", pattern)
        return bool((pattern.sum(0) <= self.s).all())


class BurstyStragglerModel:
    """The (B, W, lam)-bursty straggler model of SGC (paper slug: sgc).

    In every window of W consecutive rounds: (i) at most ``lam`` distinct workers straggle; (ii) each
    straggler's straggles inside the window form one burst of length <= B. Checked incrementally on the
    window ending at the current round r (earlier windows were checked before): for each worker straggling
    now, its run of consecutive straggles ending at r has length <= B and it has no other straggle in
    rounds [r-W+1, r]. (The authors' simulator only forbids straggles in [r-W+1, r-B]; that also admits a
    gap inside a burst, e.g. straggles at r-2 and r with B = 3, which the model excludes.)

    >>> m = BurstyStragglerModel(B=2, W=3, lam=1)
    >>> m.admissible_pattern(np.array([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], bool))
    True
    """

    def __init__(self, B: int, W: int, lam: int) -> None:
        self.B = _int("B", B, 1)
        self.W = _int("W", W, self.B + 1)
        self.lam = _int("lam", lam, 0)

    def __repr__(self) -> str:
        return f"BurstyStragglerModel(B={self.B}, W={self.W}, lam={self.lam})"

    def admissible(self, history: np.ndarray, is_straggler: np.ndarray):
        """Whether round ``r = history.shape[-1]`` may have stragglers ``is_straggler`` after ``history``.

        ``history``: (n, r) booleans, the stragglers recorded in rounds 0..r-1. Batched: history
        (K, n, r) and is_straggler (K, n) -> (K,) booleans.
        """
        single = np.ndim(is_straggler) == 1
        h = history[None] if single else history
        st = is_straggler[None] if single else is_straggler
        r = h.shape[-1]
        win = h[..., max(0, r - self.W + 1): r]                          # rounds [r-W+1, r-1]
        ok = np.count_nonzero(win.any(-1) | st, axis=-1) <= self.lam
        if win.shape[-1]:
            rev = win[..., ::-1]
            run = np.where(rev.all(-1), rev.shape[-1], np.argmin(rev, axis=-1))   # straggles just before r
            bad = st & ((run + 1 > self.B) | (win.sum(-1) != run))             # too long, or a 2nd burst
            ok &= ~bad.any(-1)
        return bool(ok[0]) if single else ok

    def admissible_pattern(self, pattern: np.ndarray) -> bool:
        """Whether a whole (n, rounds) straggler pattern fits the model (every window checked)."""
        pattern = _bool_matrix("pattern", pattern)
        return all(self.admissible(pattern[:, :r], pattern[:, r]) for r in range(pattern.shape[1]))


# ------------------------------------------------------------------------------------------- traces
def _rng(rng) -> np.random.Generator:
    if rng is None or isinstance(rng, numbers.Integral):
        return np.random.default_rng(rng)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")
    return rng


def _prob(name: str, p) -> float:
    p = real_scalar(name, p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


def markov_straggler_states(n: int, rounds: int, p_gb: float, p_bg: float, rng=None,
                            traces: int | None = None) -> np.ndarray:
    """Bad-state indicators of independent per-worker two-state Markov chains (paper slug: sgc).

    ``P(good -> bad) = p_gb``, ``P(bad -> good) = p_bg``; round 0 is drawn from the stationary law
    ``P(bad) = p_gb / (p_gb + p_bg)``. Bursts last ``1/p_bg`` rounds on average. Shape (n, rounds), or
    (traces, n, rounds) when ``traces`` is given.
    """
    n, rounds = _int("n", n, 1), _int("rounds", rounds, 1)
    p_gb, p_bg = _prob("p_gb", p_gb), _prob("p_bg", p_bg)
    rng = _rng(rng)
    shape = (n,) if traces is None else (_int("traces", traces, 1), n)
    pi = p_gb / (p_gb + p_bg) if p_gb + p_bg > 0 else 0.0
    u = rng.random(shape + (rounds,))
    bad = np.empty(shape + (rounds,), dtype=bool)
    bad[..., 0] = u[..., 0] < pi
    for r in range(1, rounds):
        prev = bad[..., r - 1]
        bad[..., r] = np.where(prev, u[..., r] >= p_bg, u[..., r] < p_gb)
    return bad


def _delays_from_states(bad: np.ndarray, fast: float, slow: float, noise: float, rng) -> np.ndarray:
    fast = real_scalar("fast", fast, nonneg=True)
    slow = real_scalar("slow", slow, nonneg=True)
    noise = real_scalar("noise", noise, nonneg=True)
    return fast + noise * np.abs(rng.standard_normal(bad.shape)) + slow * bad


def gilbert_elliott_delays(n: int, rounds: int, p_gb: float = 0.02, p_bg: float = 0.5, fast: float = 1.0,
                           slow: float = 3.0, noise: float = 0.05, rng=None, traces: int | None = None) -> np.ndarray:
    """Bursty delay traces: ``fast + noise*|N(0,1)|``, plus ``slow`` in the Markov chain's bad state (paper slug: sgc).

    delays[i, r] = fast + noise * |z| + slow * bad[i, r], bad from :func:`markov_straggler_states`.

    >>> gilbert_elliott_delays(4, 10, rng=0).shape
    (4, 10)
    """
    rng = _rng(rng)
    bad = markov_straggler_states(n, rounds, p_gb, p_bg, rng, traces)
    return _delays_from_states(bad, fast, slow, noise, rng)


def iid_delays(n: int, rounds: int, p: float = 0.1, fast: float = 1.0, slow: float = 3.0, noise: float = 0.05,
               rng=None, traces: int | None = None) -> np.ndarray:
    """Non-bursty delay traces: each (worker, round) is slow with probability ``p`` independently (paper slug: sgc)."""
    n, rounds = _int("n", n, 1), _int("rounds", rounds, 1)
    p = _prob("p", p)
    rng = _rng(rng)
    shape = (n, rounds) if traces is None else (_int("traces", traces, 1), n, rounds)
    bad = rng.random(shape) < p
    return _delays_from_states(bad, fast, slow, noise, rng)


def pattern_delays(pattern: np.ndarray, fast: float = 1.0, slow: float = 3.0) -> np.ndarray:
    """Delays that make exactly ``pattern``'s workers stragglers (mu = 1, load * load_cost < slow - fast).

    delays = fast + slow * pattern (a round where everybody is slow has no straggler).
    """
    pattern = _bool_matrix("pattern", pattern)
    return real_scalar("fast", fast, nonneg=True) + real_scalar("slow", slow, nonneg=True) * pattern


def sample_admissible_pattern(model, n: int, rounds: int, p: float = 0.2, rng=None, tries: int = 20) -> np.ndarray:
    """A random straggler pattern admitted by ``model``, rejection-sampled round by round (paper slug: sgc).

    In each round a candidate (each worker straggles w.p. ``p``, a worker straggling in the previous
    round keeps straggling w.p. 0.7) is redrawn until the model admits it (``tries`` times, then no
    straggler). Used to test that schemes decode under every admissible pattern.
    """
    n, rounds = _int("n", n, 1), _int("rounds", rounds, 1)
    p = _prob("p", p)
    rng = _rng(rng)
    pat = np.zeros((n, rounds), dtype=bool)
    for r in range(rounds):
        for _ in range(tries):
            prev = pat[:, r - 1] if r else np.zeros(n, bool)
            cand = np.where(prev, rng.random(n) < 0.7, rng.random(n) < p)
            if model.admissible(pat[:, :r], cand):
                pat[:, r] = cand
                break
    return pat


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

    def __iter__(self):  # ``total, waits = simulate_runtime(...)`` as in the spec's sketch
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
    n, jobs = _int("n", n, 1), _int("jobs", jobs, 1)
    max_T = _int("max_T", max_T, 0)
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
