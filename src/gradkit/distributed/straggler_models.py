"""Straggler models and straggler/delay traces (paper slug: sgc).

- :class:`PerRoundStragglerModel` (GC): at most ``s`` stragglers in each round.
- :class:`BurstyStragglerModel` (SR-SGC, M-SGC): the (B, W, lam)-bursty model: in every window of W
  consecutive rounds at most ``lam`` distinct workers straggle, and each one's straggles inside the window
  form ONE burst of at most B consecutive rounds.
- :func:`gilbert_elliott_delays` / :func:`iid_delays`: per-worker delay traces from a two-state Markov
  chain (bursty) or i.i.d. slow rounds; :func:`pattern_delays` turns a straggler pattern into delays;
  :func:`sample_admissible_pattern` draws a pattern a model admits.

The runtime simulator that uses them with a scheme is :mod:`gradkit.distributed.stragglers`.

Example::

    m = BurstyStragglerModel(B=2, W=3, lam=1)
    d = gilbert_elliott_delays(8, 40, rng=0)             # (8, 40) bursty delays
"""
from __future__ import annotations

import numbers

import numpy as np

from .._validate import integer, probability, real_scalar

__all__ = [
    "PerRoundStragglerModel", "BurstyStragglerModel", "markov_straggler_states", "gilbert_elliott_delays",
    "iid_delays", "pattern_delays", "sample_admissible_pattern",
]


def _bool_matrix(name: str, a, n: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.bool_ or a.ndim != 2 or (n is not None and a.shape[0] != n):
        want = f"({n}, rounds)" if n is not None else "(n, rounds)"
        raise ValueError(f"{name} must be a boolean array of shape {want}, got {a.dtype} {a.shape}")
    return a


class PerRoundStragglerModel:
    """At most ``s`` stragglers per round: what an (n, s) gradient code tolerates (paper slug: sgc).

    >>> PerRoundStragglerModel(1).admissible(np.zeros((3, 0), bool), np.array([True, False, False]))
    True
    """

    def __init__(self, s: int) -> None:
        self.s = integer("s", s, low=0)

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
        self.B = integer("B", B, low=1)
        self.W = integer("W", W, low=self.B + 1)
        self.lam = integer("lam", lam, low=0)

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


def markov_straggler_states(n: int, rounds: int, p_gb: float, p_bg: float, rng=None,
                            traces: int | None = None) -> np.ndarray:
    """Bad-state indicators of independent per-worker two-state Markov chains (paper slug: sgc).

    ``P(good -> bad) = p_gb``, ``P(bad -> good) = p_bg``; round 0 is drawn from the stationary law
    ``P(bad) = p_gb / (p_gb + p_bg)``. Bursts last ``1/p_bg`` rounds on average. Shape (n, rounds), or
    (traces, n, rounds) when ``traces`` is given.
    """
    n, rounds = integer("n", n, low=1), integer("rounds", rounds, low=1)
    p_gb, p_bg = probability("p_gb", p_gb), probability("p_bg", p_bg)
    rng = _rng(rng)
    shape = (n,) if traces is None else (integer("traces", traces, low=1), n)
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
    n, rounds = integer("n", n, low=1), integer("rounds", rounds, low=1)
    p = probability("p", p)
    rng = _rng(rng)
    shape = (n, rounds) if traces is None else (integer("traces", traces, low=1), n, rounds)
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
    n, rounds = integer("n", n, low=1), integer("rounds", rounds, low=1)
    p = probability("p", p)
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
