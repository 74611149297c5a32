"""Run a function on N fresh torch.distributed processes on this machine and collect what each returns.

Used by tests and claims that need a real multi-process run (gloo on CPU) without ``torchrun``:

>>> def work(rank, world_size, x):
...     t = torch.tensor([x * (rank + 1)]); dist.all_reduce(t); return t
>>> run_workers(work, 2, 1.0)          # [tensor([3.]), tensor([3.])]

``fn`` must be defined at module level (processes are spawned, ``fn`` is pickled by reference). Every worker
gets a process group initialised through a FileStore in a private temporary folder (no ports to pick), one
intra-op thread by default, and passive OpenMP waits. A worker that raises, dies or outlives ``timeout``
makes ``run_workers`` raise :class:`WorkerError` naming the rank, after the other workers are stopped.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

from .._validate import positive_int

__all__ = ["run_workers", "WorkerError"]


class WorkerError(RuntimeError):
    """A worker of :func:`run_workers` failed; ``rank`` names it (None when no single rank is to blame)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _entry(rank: int, world_size: int, fn: Callable, args: tuple, backend: str, store_path: str,
           threads: int, timeout: float, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        out = fn(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 — everything goes back to the caller, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                timeout: float = 120.0, threads: int = 1) -> list[Any]:
    """Start ``world_size`` processes running ``fn(rank, world_size, *args)`` in one process group.

    Returns the workers' return values ordered by rank. Raises :class:`WorkerError` when a worker raises
    (its traceback is in the message), exits without a result, or the whole run exceeds ``timeout`` seconds.
    """
    world_size = positive_int("world_size", world_size)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    threads = positive_int("threads", threads)
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="gradkit-dist-")
    results = ctx.Queue()
    env_before = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_entry, name=f"gradkit-worker-{rank}",
                            args=(rank, world_size, fn, args, backend, os.path.join(tmp, "store"), threads,
                                  float(timeout), results), daemon=True)
            p.start()
            procs.append(p)
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in out and not p.is_alive() and results.empty():
                        # give the queue's feeder a moment: a result may still be in flight
                        time.sleep(0.2)
                        if results.empty():
                            raise WorkerError(f"worker {r} exited with code {p.exitcode} without a result", r)
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in out]
                    raise WorkerError(f"workers {missing} gave no result within {timeout:g} s",
                                      missing[0] if len(missing) == 1 else None)
                continue
            if not ok:
                # a peer that died is the likelier cause of this worker's failure: name it first
                time.sleep(0.5)
                dead = [r for r, p in enumerate(procs)
                        if r != rank and r not in out and not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise WorkerError(f"worker {dead[0]} exited with code {procs[dead[0]].exitcode} without a "
                                      f"result; worker {rank} then failed:\n{payload}", dead[0])
                raise WorkerError(f"worker {rank} failed:\n{payload}", rank)
            out[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        if env_before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        shutil.rmtree(tmp, ignore_errors=True)
