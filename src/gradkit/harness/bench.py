"""Benchmarks: per-step cost of a component as a ratio to plain PyTorch, measured in one process.

Baseline and candidate steps are interleaved (A, B, A, B, ...) so that drifts in machine load hit
both alike; the ratio is of the medians. A benchmark module registers a :class:`Benchmark` whose
``run(repeats)`` returns a :class:`BenchResult`.

Clocks: ``"wall"`` (default, ``time.perf_counter``) or ``"cpu"`` (``time.process_time``: CPU seconds of
this process, all its threads). On a machine shared with other jobs, wall time counts the time a step
waits for a core; CPU time does not, so ``gradkit bench --clock cpu`` gives steadier ratios there (it
also ignores time a step spends idle, e.g. waiting on I/O or other processes).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..registry import Registry

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = ["wall"]
_peers = [False]


def set_peers(enabled: bool) -> bool:
    """Turn timing of public peer implementations on or off (``gradkit bench --peers``); returns the old value."""
    old, _peers[0] = _peers[0], bool(enabled)
    return old


def peers_enabled() -> bool:
    return _peers[0]


def import_peer(module: str):
    """The peer's module, or None when it is not installed (the benchmark then records it as missing)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def peer_result(name: str, baseline: Callable[[], object], peer: Callable[[], object] | None, ours_ratio: float,
                repeats: int, ours: Callable[[], object] | None = None) -> dict:
    """Time a peer's step against the same baseline, interleaved; the entry of ``extra["peers"]``.

    ``ratio`` is peer / baseline (medians), ``ours_vs_peer`` our ratio over the peer's (< 1: we are faster).
    With ``ours`` (our step function) our step is also timed against the peer's directly, interleaved in one
    loop: ``direct`` is ours / peer (medians) with ``direct_min``/``direct_max`` over the pairs. It does not
    carry the drift between two separate loops that the quotient of two ratios does.
    ``peer=None`` records the peer as not installed.
    """
    if peer is None:
        return {"name": name, "status": "not installed"}
    r = compare_aside(baseline, peer, repeats=repeats)
    out = {"name": name, "status": "ok", "ratio": r.ratio, "ms": r.candidate_s * 1e3,
           "ours_vs_peer": ours_ratio / r.ratio if r.ratio > 0 else float("inf"),
           "ratio_min": r.extra["ratio_min"], "ratio_max": r.extra["ratio_max"]}
    if ours is not None:
        d = compare_aside(peer, ours, repeats=repeats)
        out.update({"direct": d.ratio, "direct_min": d.extra["ratio_min"], "direct_max": d.extra["ratio_max"]})
    return out


def compare_aside(baseline: Callable[[], object], candidate: Callable[[], object], *, repeats: int) -> BenchResult:
    """:func:`compare_steps` for a side measurement (a peer, a variant): its pairs do not count in the
    benchmark's own spread."""
    r = compare_steps(baseline, candidate, repeats=repeats)
    _measured.pop()
    return r


def set_clock(name: str) -> str:
    """Select the clock :func:`compare_steps` uses by default (``"wall"`` or ``"cpu"``); returns the old one."""
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {name!r}")
    old, _clock[0] = _clock[0], name
    return old


@dataclass(frozen=True)
class BenchResult:
    """Measured medians (seconds per step) and their ratio candidate / baseline."""

    baseline_s: float
    candidate_s: float
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.candidate_s / self.baseline_s if self.baseline_s > 0 else float("inf")


@dataclass(frozen=True)
class Benchmark:
    """name: unique id; slug: the paper; target: the ratio to stay at or under (None: report only)."""

    name: str
    slug: str
    description: str
    run: Callable[[int], BenchResult]
    target: float | None = None
    baseline: str = "plain PyTorch"


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> Callable[[], None]:
    """A step function for :func:`compare_steps`: cross-entropy forward, backward, optimizer step."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def forward_saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward during one forward of ``model`` on ``x``."""
    from ..testing import SavedBytesMeter

    with SavedBytesMeter() as meter:
        out = model(x)
    del out
    return meter.bytes


def register_benchmark(b: Benchmark) -> Benchmark:
    return BENCHMARKS.add(b.name, b)


def compare_steps(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    repeats: int = 30,
    warmup: int = 5,
    inner: int = 1,
    clock: str | None = None,
) -> BenchResult:
    """Time two step functions interleaved; return the medians of ``repeats`` timings.

    Each timing covers ``inner`` consecutive calls (use it for very short steps). ``clock``: ``"wall"`` or
    ``"cpu"`` (default: the one chosen with :func:`set_clock`, initially wall).
    """
    if repeats < 1 or warmup < 0 or inner < 1:
        raise ValueError(f"repeats and inner must be >= 1 and warmup >= 0, got {repeats}, {inner}, {warmup}")
    name = _clock[0] if clock is None else clock
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {name!r}")
    now = CLOCKS[name]
    for _ in range(warmup):
        baseline()
        candidate()
    tb: list[float] = []
    tc: list[float] = []
    for i in range(repeats):
        pair = ((baseline, tb), (candidate, tc)) if i % 2 == 0 else ((candidate, tc), (baseline, tb))
        for fn, sink in pair:
            t0 = now()
            for _ in range(inner):
                fn()
            sink.append((now() - t0) / inner)
    res = BenchResult(statistics.median(tb), statistics.median(tc),
                      _spread([c / b if b > 0 else float("inf") for b, c in zip(tb, tc)]))
    _measured.append(res)
    return res


def _spread(ratios: list[float]) -> dict:
    """The range of the per-repetition ratios (each candidate timing over the baseline timing beside it)."""
    return {"ratio_min": min(ratios), "ratio_max": max(ratios), "pairs": len(ratios)}


_measured: list[BenchResult] = []  # every compare_steps result of the benchmark being run


def _with_spread(r: BenchResult) -> dict:
    """``r.extra`` plus the per-repetition ratio range of the :func:`compare_steps` call it came from."""
    if "ratio_min" in r.extra:
        return dict(r.extra)
    for m in _measured:
        if m.baseline_s == r.baseline_s and m.candidate_s == r.candidate_s:
            return {**r.extra, **m.extra}
    return dict(r.extra)


_loaded = False


def load_benchmarks() -> None:
    """Import every module of ``gradkit.harness.benchmarks`` (each registers its benchmarks)."""
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil

    from . import benchmarks

    for m in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        importlib.import_module(f"gradkit.harness.benchmarks.{m.name}")
    _loaded = True


def run_benchmarks(names: list[str] | None = None, repeats: int = 30, threads: int | None = 1,
                   clock: str = "wall", peers: bool = False):
    """Run the named (default: all) benchmarks; yield ``(Benchmark, BenchResult)`` pairs.

    ``threads``: intra-op threads for the run (default 1: OpenMP spin-waiting makes CPU-clock figures
    at several threads incomparable). ``clock`` (``"wall"`` or ``"cpu"``) is the default clock of
    :func:`compare_steps` meanwhile. Each result's ``extra`` records the clock, the thread count and,
    where the benchmark timed through :func:`compare_steps`, the range of the per-repetition ratios
    (``ratio_min``, ``ratio_max``, ``pairs``). ``peers``: benchmarks that have a public peer implementation
    also time it against the same baseline, in the same process, and list it in ``extra["peers"]``.
    """
    load_benchmarks()
    chosen = names or BENCHMARKS.names()
    benches = [BENCHMARKS.get(n) for n in chosen]
    old = torch.get_num_threads()
    old_clock = set_clock(clock)
    old_peers = set_peers(peers)
    if threads:
        torch.set_num_threads(threads)
    try:
        for b in benches:
            _measured.clear()
            r = b.run(repeats)
            yield b, BenchResult(r.baseline_s, r.candidate_s,
                                 {**_with_spread(r), "clock": clock, "threads": torch.get_num_threads()})
    finally:
        torch.set_num_threads(old)
        set_clock(old_clock)
        set_peers(old_peers)
