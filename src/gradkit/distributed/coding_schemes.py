"""Gradient coding against stragglers: the schemes GC and the sequential SR-SGC and M-SGC (paper slug: sgc).

A master needs a sequence of J gradients ``g(0..J-1)`` (one per *job*: e.g. J models trained concurrently)
computed on ``n`` workers, some of which straggle. Each job's data is split into *chunks*; a worker's *task*
is a linear combination ``sum_k coeffs[k] * grad(chunk_k)`` of chunk gradients (each the SUM of per-sample
gradients of the chunk). The master decodes the exact sum over all chunks from the tasks that arrived.

- :class:`~gradkit.distributed.gradient_codes.GradientCode` (Tandon et al.): any ``n - s`` of the ``n`` coded tasks give ``sum_j g_j`` exactly.
  Fractional repetition when ``(s+1) | n``, else the cyclic-repetition construction.
- :class:`GCScheme`: one GC task per worker per round, job ``t`` decoded in round ``t`` (T = 0),
  load ``(s+1)/n``.
- :class:`SRSGCScheme` (selective-repeat SGC): GC with ``s = ceil(B lam / (W-1+B))``; in round ``t+B`` the
  workers missing for job ``t`` beyond ``s`` redo their job-``t`` task. T = B.
- :class:`MSGCScheme` (multiplexed SGC): ``W-1+B`` equal mini-tasks per worker per round, slot ``m`` of
  round ``r`` for job ``r-m``; uncoded part D1 (each worker owns ``W-1`` pieces, redone when missed) and a
  GC-coded part D2 (``B`` groups, tolerance ``lam``). T = W-2+B,
  load ``(lam+1)(W-1+B) / (n (B + (W-1)(lam+1)))`` (``(W-1+B)/(n(W-1))`` when ``lam = n``).

Every scheme is a deterministic state machine shared by the event simulator
(:func:`gradkit.distributed.stragglers.simulate_runtime`) and the real torch.distributed run
(:mod:`gradkit.distributed.coded_run`): ``assign(r)`` -> tasks per worker, ``complete_round(r, returned,
results)`` -> bookkeeping (and payloads on the master), ``decodable(job)`` / ``decode(job)``.

Example::

    scheme = MSGCScheme(n=4, B=1, W=2, lam=1, jobs=3)
    for r in range(scheme.rounds):
        tasks = scheme.assign(r)                          # list over workers of lists of Task
        scheme.complete_round(r, returned=[True] * 4)     # simulation: no payloads
    assert all(scheme.decodable(j) for j in range(3))
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from .._validate import choice, integer
from .gradient_codes import CodingError, DecodeError, GradientCode, Task, check_payloads
from .straggler_models import BurstyStragglerModel, PerRoundStragglerModel

__all__ = ["CodingScheme", "GCScheme", "SRSGCScheme", "MSGCScheme", "SCHEMES", "make_scheme"]


class CodingScheme:
    """Base of the gradient-coding schemes: a deterministic state machine over rounds (paper slug: sgc).

    Attributes: ``n`` workers, ``jobs`` (J), ``T`` (decoding delay: job t is decoded after round t+T),
    ``rounds = J + T``, ``load`` (work per worker per round, in units of one job's full gradient),
    ``chunk_fractions`` (share of a job's data in each chunk), ``straggler_model`` (the patterns it
    tolerates; see :mod:`gradkit.distributed.straggler_models`).
    Protocol, for ``r = 0 .. rounds-1`` in order: ``assign(r)`` -> per-worker task lists;
    ``complete_round(r, returned, results=None)``; then ``decodable(r - T)`` holds under any pattern the
    straggler model admits, and ``decode(job)`` returns the exact sum of the job's chunk gradients.
    ``reset(batch=K)`` runs K independent copies at once (the simulator's vectorised traces): then
    ``returned`` is (K, n) and ``decodable`` means decodable in every copy; tasks and payloads need K = 1.
    """

    name = "scheme"

    def __init__(self, n: int, jobs: int) -> None:
        self.n = integer("n", n, low=1)
        self.jobs = integer("jobs", jobs, low=1)

    # subclasses set T, load, chunk_fractions, straggler_model, and implement the hooks below
    @property
    def rounds(self) -> int:
        return self.jobs + self.T

    @property
    def params(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{type(self).__name__}(n={self.n}, {p}, jobs={self.jobs})"

    def reset(self, batch: int = 1) -> None:
        """Forget every round: the scheme starts again at round 0 (``batch`` independent copies)."""
        self.batch = integer("batch", batch, low=1)
        self._next = 0
        self._plan_cache: tuple[int, object] | None = None
        self._store: dict[int, dict[tuple, torch.Tensor]] = {}
        self._shape: tuple | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _plan(self, r: int):
        raise NotImplementedError

    def _tasks(self, r: int, plan) -> list[list[Task]]:
        raise NotImplementedError

    def _work(self, plan) -> np.ndarray:
        """(batch, n) work per worker."""
        raise NotImplementedError

    def _apply(self, r: int, plan, returned: np.ndarray) -> None:
        raise NotImplementedError

    def _decodable(self, job: int) -> np.ndarray:
        """(batch,) decodability of ``job`` in every copy."""
        raise NotImplementedError

    def _task_key(self, task: Task) -> tuple:
        return (task.kind, task.index)

    def _check_round(self, r) -> int:
        r = integer("r", r, low=0, high=self.rounds - 1)
        if r != self._next:
            raise CodingError(f"round {r} out of order: the scheme expects round {self._next} next")
        return r

    def _single(self, what: str) -> None:
        if self.batch != 1:
            raise CodingError(f"{what} needs a single copy of the scheme; call reset() (batch=1) first")

    def plan(self, r: int):
        r = self._check_round(r)
        if self._plan_cache is None or self._plan_cache[0] != r:
            self._plan_cache = (r, self._plan(r))
        return self._plan_cache[1]

    def assign(self, r: int) -> list[list[Task]]:
        """Tasks of round ``r`` for every worker (depends on what arrived in earlier rounds)."""
        self._single("assign")
        return self._tasks(r, self.plan(r))

    def work(self, r: int) -> np.ndarray:
        """Per-worker work in round ``r`` (share of one job's data processed; (n,), or (batch, n))."""
        w = self._work(self.plan(r))
        return w[0] if self.batch == 1 else w

    def idle(self, r: int) -> np.ndarray:
        """(batch,) True where no worker has a task in round ``r`` (such a round is skipped: no time)."""
        return ~self._work(self.plan(r)).any(-1)

    def is_idle(self, r: int) -> bool:
        """True when no worker has a task in round ``r`` (in every copy)."""
        return bool(self.idle(r).all())

    def complete_round(self, r: int, returned, results: Mapping[int, Sequence[torch.Tensor]] | None = None) -> None:
        """Record which workers' round-``r`` results arrived before the deadline (``returned``, n bools).

        ``results`` (master only): ``{worker: [tensor per task of assign(r)[worker]]}`` for the returned
        workers; stragglers' entries are ignored (late). Malformed results raise :class:`CodingError`
        and leave the scheme unchanged.
        """
        plan = self.plan(r)
        mask = np.asarray(returned)
        want = (self.n,) if self.batch == 1 else (self.batch, self.n)
        if mask.dtype != np.bool_ or mask.shape not in (want, (self.batch, self.n)):
            raise CodingError(f"returned must be {self.n} booleans (one per worker)"
                              f"{'' if self.batch == 1 else f' for each of {self.batch} copies'}, got "
                              f"{mask.dtype} array of shape {mask.shape}")
        mask = mask.reshape(self.batch, self.n)
        if results is not None:
            self._single("results")
            tasks = self._tasks(r, plan)
            staged = []
            for i in np.flatnonzero(mask[0]):
                i = int(i)
                if not tasks[i]:
                    continue
                if i not in results or results[i] is None:
                    raise CodingError(f"round {r}: worker {i} is marked returned but sent no results "
                                      f"for its {len(tasks[i])} task(s)")
                got = list(results[i])
                if len(got) != len(tasks[i]):
                    raise CodingError(f"round {r}: worker {i} sent {len(got)} result(s) for "
                                      f"{len(tasks[i])} task(s)")
                for task, t in zip(tasks[i], got):
                    staged.append(((task.job, self._task_key(task), i), t))
            self._shape = check_payloads(
                [(f"of worker {k[2]} for job {k[0]} {k[1]} (round {r})", t) for k, t in staged], "result",
                self._shape)
            for (job, key, i), t in staged:
                self._store.setdefault(job, {})[key + (i,)] = t.detach()
        self._apply(r, plan, mask)
        self._next = r + 1
        self._plan_cache = None

    def decodable(self, job: int) -> bool:
        """Whether job ``job`` can be decoded from what arrived so far (in every copy)."""
        job = integer("job", job, low=0, high=self.jobs - 1)
        return bool(self._decodable(job).all())

    def missing(self, job: int) -> str:
        """What job ``job`` still lacks in the first copy that cannot decode it (empty when decodable)."""
        raise NotImplementedError

    def _payloads(self, job: int) -> dict[tuple, torch.Tensor]:
        self._single("decode")
        job = integer("job", job, low=0, high=self.jobs - 1)
        if not self.decodable(job):
            raise DecodeError(f"job {job} is not decodable: {self.missing(job)}")
        store = self._store.get(job)
        if not store:
            raise DecodeError(f"job {job}: no payloads were received (complete_round was called without results)")
        return store

    def decode(self, job: int, free: bool = True) -> torch.Tensor:
        """The exact sum of job ``job``'s chunk gradients; ``free`` drops its stored payloads afterwards."""
        raise NotImplementedError


class GCScheme(CodingScheme):
    """Gradient coding baseline: job t coded over n workers, decoded at round t (paper slug: sgc).

    Each worker returns one (n, s)-coded task per round; any ``n - s`` returns decode (T = 0);
    load = (s+1)/n. Tolerates at most s stragglers per round.

    >>> sch = GCScheme(n=4, s=1, jobs=2); sch.load
    0.5
    >>> sch.complete_round(0, np.array([True, False, True, True])); sch.decodable(0)
    True
    """

    name = "gc"

    def __init__(self, n: int, s: int, jobs: int) -> None:
        super().__init__(n, jobs)
        self.s = integer("s", s, low=0, high=self.n - 1)
        self.T = 0
        self.load = (self.s + 1) / self.n
        self.chunk_fractions = np.full(self.n, 1.0 / self.n)
        self.straggler_model = PerRoundStragglerModel(self.s)
        self._code: GradientCode | None = None
        self.reset()

    @property
    def params(self) -> dict:
        return {"s": self.s}

    @classmethod
    def param_grid(cls, n: int, max_T: int, lambdas=None, max_W=None) -> list[dict]:
        """Every s in 0..n-1 (T = 0 fits any delay budget)."""
        return [{"s": s} for s in range(n)]

    @property
    def code(self) -> GradientCode:
        if self._code is None:
            self._code = GradientCode(self.n, self.s)
        return self._code

    def _reset_state(self) -> None:
        self._recv = np.zeros((self.batch, self.jobs, self.n), dtype=bool)

    def _plan(self, r: int) -> np.ndarray:
        """(batch, n): the job of each worker's task, -1 for none."""
        return np.full((self.batch, self.n), r if r < self.jobs else -1)

    def _tasks(self, r, plan) -> list[list[Task]]:
        return [[Task(int(j), "coded", 0, self.code.support(i), self.code.coefficients(i))] if j >= 0 else []
                for i, j in enumerate(plan[0])]

    def _work(self, plan) -> np.ndarray:
        return np.where(plan >= 0, self.load, 0.0)

    def _apply(self, r, plan, returned) -> None:
        k, i = np.nonzero(returned & (plan >= 0))
        self._recv[k, plan[k, i], i] = True

    def _decodable(self, job: int) -> np.ndarray:
        return self._recv[:, job].sum(-1) >= self.n - self.s

    def missing(self, job: int) -> str:
        got = self._recv[:, job].sum(-1)
        need = self.n - self.s
        k = int(np.argmin(got))
        return "" if got[k] >= need else f"{got[k]} of the {need} coded results needed arrived"

    def decode(self, job: int, free: bool = True) -> torch.Tensor:
        store = self._payloads(job)
        out = self.code.decode({k[-1]: t for k, t in store.items()})
        if free:
            self._store.pop(job, None)
        return out


def _lambda_grid(n: int, lambdas) -> list[int]:
    """Straggler tolerances to search: ``lambdas`` capped at ``n`` (default 1..n), sorted, unique."""
    return sorted({min(int(x), n) for x in (lambdas or range(1, n + 1))})


class SRSGCScheme(GCScheme):
    """Selective-repeat SGC: GC with s = ceil(B lam/(W-1+B)) plus repeats in round t+B (paper slug: sgc).

    Round r: every worker does its GC task for job r, except that if v > s workers' job-(r-B) tasks are
    missing, the first v - s of them redo their job-(r-B) task instead. Job t decodes at round t+B
    (T = B) from >= n - s of its tasks. Tolerates (B, W, lam)-bursty stragglers; requires B | W-1.
    After the last job, rounds with nothing to redo are skipped.

    >>> SRSGCScheme(n=8, B=1, W=3, lam=2, jobs=5).s
    1
    """

    name = "sr_sgc"

    def __init__(self, n: int, B: int, W: int, lam: int, jobs: int) -> None:
        n = integer("n", n, low=1)
        self.B = integer("B", B, low=1)
        self.W = integer("W", W, low=self.B + 1)
        self.lam = integer("lam", lam, low=1, high=n)
        if (self.W - 1) % self.B:
            raise ValueError(f"SR-SGC needs B to divide W-1, got B={self.B}, W={self.W}")
        s = math.ceil(self.B * self.lam / (self.W - 1 + self.B))
        super().__init__(n, s, jobs)
        self.T = self.B
        self.straggler_model = BurstyStragglerModel(self.B, self.W, self.lam)
        self.reset()

    @property
    def params(self) -> dict:
        return {"B": self.B, "W": self.W, "lam": self.lam}

    @classmethod
    def param_grid(cls, n: int, max_T: int, lambdas=None, max_W=None) -> list[dict]:
        """B in 1..max_T (T = B), W in {B+1, 2B+1, ...} <= max_W (default: max(B+1, max_T+2-B), the
        windows M-SGC uses), lam in ``lambdas`` (default 1..n)."""
        lams = _lambda_grid(n, lambdas)
        out = []
        for B in range(1, max_T + 1):
            w_hi = max_W if max_W is not None else max(B + 1, max_T + 2 - B)
            for W in range(B + 1, w_hi + 1, B):
                out += [{"B": B, "W": W, "lam": lam} for lam in lams]
        return out

    def _plan(self, r: int) -> np.ndarray:
        plan = super()._plan(r)
        t = r - self.B
        if 0 <= t < self.jobs:
            miss = ~self._recv[:, t]                                   # (batch, n)
            excess = miss.sum(-1) - self.s                              # redo the first v - s missing
            redo = miss & (np.cumsum(miss, -1) <= excess[:, None])
            plan[redo] = t
        return plan


class MSGCScheme(CodingScheme):
    """Multiplexed SGC: uncoded D1 pieces + GC-coded D2 groups multiplexed over rounds (paper slug: sgc).

    Every round each worker runs W-1+B equal mini-tasks; slot m of round r belongs to job r-m. D1 (share
    (lam+1)(W-1)/(B+(W-1)(lam+1))) is cut into n(W-1) pieces, W-1 per worker; D2 (share B/(...)) into B
    groups, each (n, lam)-GC-coded. Slots 0..W-2 process the worker's next unfinished D1 piece; slot
    W-1+j processes D2 group j if the worker has all its D1 pieces, else a missing D1 piece. Job t is
    decodable at round t+W-2+B when every D1 piece arrived and every group has >= n-lam results.
    With lam = n there is no D2 (its slots only redo missed D1 pieces).

    >>> MSGCScheme(n=8, B=2, W=3, lam=2, jobs=5).load   # 3*4/(8*(2+2*3))
    0.1875
    """

    name = "m_sgc"

    def __init__(self, n: int, B: int, W: int, lam: int, jobs: int) -> None:
        super().__init__(n, jobs)
        self.B = integer("B", B, low=1)
        self.W = integer("W", W, low=self.B + 1)
        self.lam = integer("lam", lam, low=1, high=self.n)
        B, W, lam, n = self.B, self.W, self.lam, self.n
        self.T = W - 2 + B
        self.slots = W - 1 + B
        if lam == n:
            self.d1_share, self.d2_share = 1.0, 0.0
            self.load = (W - 1 + B) / (n * (W - 1))
        else:
            denom = B + (W - 1) * (lam + 1)
            self.d1_share, self.d2_share = (lam + 1) * (W - 1) / denom, B / denom
            self.load = (lam + 1) * (W - 1 + B) / (n * denom)
        self.minitask = self.d1_share / (n * (W - 1))
        fr = [np.full(n * (W - 1), self.d1_share / (n * (W - 1)))]
        if lam < n:
            fr.append(np.full(B * n, self.d2_share / (B * n)))
        self.chunk_fractions = np.concatenate(fr)
        self.straggler_model = BurstyStragglerModel(B, W, lam)
        self._code: GradientCode | None = None
        self._slot = np.arange(self.slots)
        self.reset()

    @property
    def params(self) -> dict:
        return {"B": self.B, "W": self.W, "lam": self.lam}

    @classmethod
    def param_grid(cls, n: int, max_T: int, lambdas=None, max_W=None) -> list[dict]:
        """Every B < W with T = W-2+B <= max_T, and lam in ``lambdas`` (default 1..n)."""
        lams = _lambda_grid(n, lambdas)
        out = []
        for W in range(2, max_T + 2):
            for B in range(1, W):
                if W - 2 + B <= max_T:
                    out += [{"B": B, "W": W, "lam": lam} for lam in lams]
        return out

    @property
    def code(self) -> GradientCode:
        if self._code is None:
            self._code = GradientCode(self.n, self.lam)
        return self._code

    def _reset_state(self) -> None:
        self._d1 = np.zeros((self.batch, self.jobs, self.n), dtype=np.int64)      # D1 pieces done
        self._d2 = np.zeros((self.batch, self.jobs, self.B, self.n), dtype=bool)  # D2 group results

    def _plan(self, r: int):
        """(job per slot (S,), kind (batch, n, S): 0 idle / 1 D1 / 2 D2, index (batch, n, S): piece or group)."""
        jobs = r - self._slot
        valid = (jobs >= 0) & (jobs < self.jobs)
        done = self._d1[:, np.clip(jobs, 0, self.jobs - 1)].transpose(0, 2, 1)     # (batch, n, S)
        d1_slot = self._slot < self.W - 1
        d2_kind = 2 if self.lam < self.n else 0
        kind = np.where(d1_slot | (done < self.W - 1), 1, d2_kind)
        kind = np.where(valid, kind, 0)
        index = np.where(kind == 2, self._slot - (self.W - 1), done)
        return jobs, kind, index

    def _tasks(self, r, plan) -> list[list[Task]]:
        jobs, kind, index = plan
        out: list[list[Task]] = []
        base = self.n * (self.W - 1)
        for i in range(self.n):
            ts = []
            for m in range(self.slots):
                k, idx, job = int(kind[0, i, m]), int(index[0, i, m]), int(jobs[m])
                if k == 1:
                    ts.append(Task(job, "d1", idx, (i * (self.W - 1) + idx,), (1.0,)))
                elif k == 2:
                    sup = tuple(base + idx * self.n + j for j in self.code.support(i))
                    ts.append(Task(job, "d2", idx, sup, self.code.coefficients(i)))
            out.append(ts)
        return out

    def _work(self, plan) -> np.ndarray:
        return (plan[1] > 0).sum(-1) * self.minitask

    def _apply(self, r, plan, returned) -> None:
        jobs, kind, index = plan
        got = returned[:, :, None]
        k, w, m = np.nonzero((kind == 1) & got)
        self._d1[k, jobs[m], w] += 1        # one slot per job per round: (copy, job, worker) triples are unique
        k, w, m = np.nonzero((kind == 2) & got)
        self._d2[k, jobs[m], index[k, w, m], w] = True

    def _decodable(self, job: int) -> np.ndarray:
        ok = (self._d1[:, job] >= self.W - 1).all(-1)
        if self.lam < self.n:
            ok &= (self._d2[:, job].sum(-1) >= self.n - self.lam).all(-1)
        return ok

    def missing(self, job: int) -> str:
        bad = np.flatnonzero(~self._decodable(job))
        if not bad.size:
            return ""
        k = int(bad[0])
        parts = []
        short = np.flatnonzero(self._d1[k, job] < self.W - 1)
        if short.size:
            parts.append(f"D1 pieces missing from workers {short.tolist()}")
        if self.lam < self.n:
            cnt = self._d2[k, job].sum(-1)
            low = np.flatnonzero(cnt < self.n - self.lam)
            if low.size:
                parts.append(f"D2 groups {low.tolist()} have {cnt[low].tolist()} of the {self.n - self.lam} "
                             "results needed")
        return "; ".join(parts)

    def decode(self, job: int, free: bool = True) -> torch.Tensor:
        store = self._payloads(job)
        out = None
        for i in range(self.n):
            for k in range(self.W - 1):
                t = store[("d1", k, i)]
                out = t.clone() if out is None else out + t
        for g in range(self.B if self.lam < self.n else 0):
            res = {key[-1]: t for key, t in store.items() if key[0] == "d2" and key[1] == g}
            out = out + self.code.decode(res)
        if free:
            self._store.pop(job, None)
        return out


SCHEMES: dict[str, type[CodingScheme]] = {"gc": GCScheme, "sr_sgc": SRSGCScheme, "m_sgc": MSGCScheme}


def make_scheme(name: str, n: int, jobs: int, **params) -> CodingScheme:
    """A scheme by name (``"gc"``, ``"sr_sgc"``, ``"m_sgc"``) with its parameters (paper slug: sgc)."""
    return SCHEMES[choice("scheme", name, sorted(SCHEMES))](n=n, jobs=jobs, **params)
