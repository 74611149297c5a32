"""Coded gradient descent on real torch.distributed processes with simulated stragglers (paper slug: sgc).

``n`` gloo processes are the ``n`` workers of a gradient-coding scheme (GC, SR-SGC or M-SGC); rank 0 is also
the master. J jobs are gradients of ``M = T + 1`` multinomial logistic-regression models trained round-robin
(job t belongs to model ``t mod M``; its previous job was decoded at round ``t - M + T < t``, so its
parameters are current). Every rank runs the same deterministic scheme state machine. Round r:

1. rank 0 broadcasts the parameters of job r (if r < J);
2. each worker computes its tasks of ``scheme.assign(r)`` -- ``sum_k coeff_k * grad(chunk_k)``, chunk gradients
   being sums of per-sample cross-entropy gradients -- and sends ``[finish time, #results, results]`` to
   rank 0 (``dist.gather``). Straggling is *simulated*: a worker's finish time is its delay-trace entry plus
   ``load * load_cost``; no one sleeps;
3. rank 0 applies the deadline rule of :func:`gradkit.distributed.stragglers.round_outcome` (late results are
   discarded unless the pattern is inadmissible, then it waits for all), feeds the accepted results to the
   scheme (malformed ones raise :class:`~gradkit.distributed.gradient_codes.CodingError`) and broadcasts
   the accepted mask; every rank calls ``complete_round``;
4. rank 0 decodes job r - T, compares it with the directly computed full-batch gradient and takes a
   gradient step on that job's model.

Example::

    scheme = MSGCScheme(n=4, B=1, W=2, lam=1, jobs=6)
    delays = gilbert_elliott_delays(4, scheme.rounds, p_gb=0.1, rng=0)
    [res] = coded_gradient_descent([scheme], x, y, delays=[delays], num_classes=10)
    assert res.max_abs_err < 1e-10
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from .._validate import integer, real_scalar
from .coding_schemes import CodingScheme
from .gradient_codes import CodingError, partition
from .stragglers import round_outcome

__all__ = ["CodedRunResult", "coded_gradient_descent", "coded_worker", "logistic_chunk_grad"]


@dataclass
class CodedRunResult:
    """One scheme's coded run: decoding error against the full-batch gradient, simulated runtime, wall time."""

    scheme: str
    jobs: int
    decoded: int
    max_abs_err: float
    max_rel_err: float
    sim_runtime: float
    full_waits: int
    stragglers: np.ndarray
    wall_s: float
    final_loss: float
    initial_loss: float
    errors: list[float] = field(default_factory=list)


def logistic_chunk_grad(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        reduction: str = "sum") -> torch.Tensor:
    """Flat gradient of the cross-entropy of a linear classifier ``x @ W.T + b`` (theta = [W.flatten(), b])."""
    d = x.shape[1]
    th = theta.detach().clone().requires_grad_(True)
    Wm = th[: num_classes * d].view(num_classes, d)
    b = th[num_classes * d:]
    if len(y) == 0:
        return torch.zeros_like(theta)
    loss = F.cross_entropy(x @ Wm.T + b, y, reduction=reduction)
    (g,) = torch.autograd.grad(loss, th)
    return g


def _full_loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    d = x.shape[1]
    with torch.no_grad():
        return float(F.cross_entropy(x @ theta[: num_classes * d].view(num_classes, d).T + theta[num_classes * d:], y))


def _run_scheme(rank: int, scheme: CodingScheme, x, y, num_classes: int, delays: np.ndarray, mu: float,
                load_cost: float, lr: float, fault: Mapping | None):
    n, N = scheme.n, len(y)
    P = num_classes * x.shape[1] + num_classes
    slices = partition(N, scheme.chunk_fractions)
    M = scheme.T + 1
    thetas = [torch.zeros(P, dtype=x.dtype) for _ in range(M)]
    init_loss = _full_loss(thetas[0], x, y, num_classes)
    job_params: dict[int, torch.Tensor] = {}
    slots = max(getattr(scheme, "slots", 1), 1)
    msg_len = 2 + slots * P
    scheme.reset()
    hist = np.zeros((n, scheme.rounds), dtype=bool)
    sim_time, waits, errs, rel = 0.0, 0, [], []
    everyone = np.ones(n, dtype=bool)
    t0 = time.perf_counter()
    for r in range(scheme.rounds):
        if r < scheme.jobs:
            th = thetas[r % M].clone() if rank == 0 else torch.empty(P, dtype=x.dtype)
            dist.broadcast(th, src=0)
            job_params[r] = th
        if scheme.is_idle(r):
            scheme.complete_round(r, everyone)
        else:
            tasks = scheme.assign(r)[rank]
            msg = torch.zeros(msg_len, dtype=x.dtype)
            msg[0] = float(delays[rank, r]) + scheme.load * load_cost     # simulated finish time
            msg[1] = len(tasks)
            for k, task in enumerate(tasks):
                theta = job_params[task.job]
                g = None
                for c, coef in zip(task.chunks, task.coeffs):
                    sl = slices[c]
                    gc = logistic_chunk_grad(theta, x[sl], y[sl], num_classes)
                    g = gc * coef if g is None else g + gc * coef
                msg[2 + k * P: 2 + (k + 1) * P] = g
            if fault and fault.get("rank") == rank and fault.get("round") == r:
                kind = fault.get("kind")
                if kind == "die":
                    os._exit(3)
                elif kind == "nan":
                    msg[2] = float("nan")
                elif kind == "count":
                    msg[1] = len(tasks) - 1
            if rank == 0:
                box = [torch.empty(msg_len, dtype=x.dtype) for _ in range(n)]
                dist.gather(msg, box, dst=0)
                finish = np.array([float(m[0]) for m in box])
                out = round_outcome(scheme.straggler_model, hist[:, :r], finish, mu)
                hist[:, r] = out.stragglers
                sim_time += out.duration
                waits += int(out.waited_for_all)
                returned = ~out.stragglers
                results = {}
                for i in np.flatnonzero(returned):
                    cnt = float(box[i][1])
                    if not (cnt.is_integer() and 0 <= cnt <= slots):
                        raise CodingError(f"round {r}: worker {i} sent a malformed header (result count {cnt})")
                    results[int(i)] = [box[i][2 + k * P: 2 + (k + 1) * P] for k in range(int(cnt))]
                scheme.complete_round(r, returned, results)      # validates: count, shape, finiteness
                mask = torch.from_numpy(returned.astype(np.uint8))
            else:
                dist.gather(msg, None, dst=0)
                mask = torch.empty(n, dtype=torch.uint8)
            dist.broadcast(mask, src=0)
            if rank != 0:
                scheme.complete_round(r, mask.numpy().astype(bool))
        job = r - scheme.T
        if 0 <= job < scheme.jobs:
            if rank == 0:
                g = scheme.decode(job) / N
                ref = logistic_chunk_grad(job_params[job], x, y, num_classes, reduction="mean")
                err = float((g - ref).abs().max())
                errs.append(err)
                rel.append(err / max(float(ref.abs().max()), 1e-300))
                m = job % M
                thetas[m] = job_params[job] - lr * g
            job_params.pop(job, None)
    wall = time.perf_counter() - t0
    if rank != 0:
        return None
    final = float(np.mean([_full_loss(t, x, y, num_classes) for t in thetas]))
    return CodedRunResult(repr(scheme), scheme.jobs, len(errs), max(errs), max(rel), sim_time, waits, hist, wall,
                          final, init_loss, errs)


def coded_worker(rank: int, world_size: int, config: dict):
    """The per-process entry point of :func:`coded_gradient_descent` (runs every scheme in turn)."""
    schemes = config["schemes"]
    for s in schemes:
        if s.n != world_size:
            raise ValueError(f"{s!r} has n={s.n} workers but the process group has world_size={world_size}")
    x, y = config["x"], config["y"]
    out = []
    for k, s in enumerate(schemes):
        fault = config["fault"] if config["fault"] and config["fault"].get("scheme", 0) == k else None
        out.append(_run_scheme(rank, s, x, y, config["num_classes"], config["delays"][k], config["mu"],
                               config["load_cost"], config["lr"], fault))
        dist.barrier()
    return out


def coded_gradient_descent(schemes: Sequence[CodingScheme], x: torch.Tensor, y: torch.Tensor, *,
                           delays: Sequence[np.ndarray], num_classes: int, lr: float = 0.5, mu: float = 1.0,
                           load_cost: float = 2.0, timeout: float = 60.0, fault: Mapping | None = None
                           ) -> list[CodedRunResult]:
    """Run coded full-batch gradient descent for each scheme on ``n`` gloo processes (paper slug: sgc).

    Every decoded gradient is compared with the full-batch gradient mean_i grad CE(x_i, y_i) at the same
    parameters (``max_abs_err``). ``delays[k]`` (n, >= rounds) is scheme k's simulated delay trace. ``fault``
    (tests): ``{"scheme": k, "rank": i, "round": r, "kind": "die" | "nan" | "count"}`` makes worker i die,
    send a NaN, or miscount its results in round r; the run then raises
    :class:`gradkit.distributed.launch.WorkerError` naming the failure.
    Deterministic in its inputs; returns one :class:`CodedRunResult` per scheme.
    """
    from .launch import run_workers

    schemes = list(schemes)
    if not schemes or not all(isinstance(s, CodingScheme) for s in schemes):
        raise TypeError("schemes must be a non-empty sequence of CodingScheme")
    n = schemes[0].n
    for s in schemes:
        if s.n != n:
            raise ValueError(f"all schemes must have the same number of workers (world size): {schemes[0]!r} has "
                             f"n={n}, {s!r} has n={s.n}")
    if len(delays) != len(schemes):
        raise ValueError(f"delays must hold one trace per scheme ({len(schemes)}), got {len(delays)}")
    traces = []
    for s, d in zip(schemes, delays):
        d = np.asarray(d, dtype=np.float64)
        if d.ndim != 2 or d.shape[0] != n or d.shape[1] < s.rounds or not np.isfinite(d).all():
            raise ValueError(f"delays for {s!r} must be finite with shape ({n}, >= {s.rounds}), got {d.shape}")
        traces.append(d)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-d floating tensor (N, features), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.dtype != torch.int64:
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', type(y))}")
    num_classes = integer("num_classes", num_classes, low=2)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    config = {"schemes": schemes, "x": x.detach().cpu(), "y": y.detach().cpu(), "num_classes": num_classes,
              "delays": traces, "mu": real_scalar("mu", mu, nonneg=True),
              "load_cost": real_scalar("load_cost", load_cost, nonneg=True), "lr": real_scalar("lr", lr),
              "fault": dict(fault) if fault else None}
    outs = run_workers(coded_worker, n, config, timeout=timeout)
    return outs[0]
