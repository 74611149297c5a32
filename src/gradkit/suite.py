"""Running claims: seeds -> runs stored one by one -> aggregate -> verdict.

Used by ``gradkit run`` and ``gradkit reproduce``; the report re-aggregates from the store with
the same :func:`summarize`.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .claims import SCALES, Claim, RunContext, RunOutput
from .claims.criteria import Check
from .engine import configure_cpu, null_progress
from .results import ResultStore, RunRecord, environment_versions, git_revision


def parse_seeds(spec: str | int | Sequence[int] | None, default_count: int) -> list[int]:
    """``None`` -> ``range(default_count)``; ``"3"``/``3`` -> ``[0, 1, 2]``; ``"11,12,13"`` -> that list.

    A single explicit seed is written with a trailing comma: ``"7,"``.
    """
    if spec is None:
        return list(range(default_count))
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"seeds must be a count >= 1 or a comma-separated list, got {spec}")
        return list(range(spec))
    if isinstance(spec, str):
        s = spec.strip()
        if "," not in s:
            try:
                n = int(s)
            except ValueError:
                raise ValueError(f"seeds must be a count (e.g. 3) or a list (e.g. 11,12,13), got {spec!r}") from None
            return parse_seeds(n, default_count)
        try:
            seeds = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"seeds must be a count (e.g. 3) or a list (e.g. 11,12,13), got {spec!r}") from None
    else:
        seeds = [int(x) for x in spec]
    if not seeds:
        raise ValueError(f"seeds list is empty: {spec!r}")
    if any(x < 0 for x in seeds):
        raise ValueError(f"seeds must be non-negative, got {spec!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {spec!r}")
    return seeds


def data_mode(claim: Claim, data_root: Path | None) -> str:
    """``"real"`` when a data root is given and the claim has a real-data variant, else ``"bundled"``."""
    return "real" if (data_root is not None and claim.real_data) else "bundled"


def _validate_output(claim: Claim, out: RunOutput) -> None:
    if not isinstance(out, RunOutput):
        raise TypeError(f"claim {claim.slug!r}: run() must return RunOutput, got {type(out).__name__}")
    if not out.metrics:
        raise ValueError(f"claim {claim.slug!r}: run() returned no metrics")
    for arm in (claim.primary.ours, claim.primary.baseline):
        if arm not in out.metrics or claim.primary.metric not in out.metrics[arm]:
            raise ValueError(f"claim {claim.slug!r}: metrics lack {arm}.{claim.primary.metric}")
    for arm, vals in out.metrics.items():
        for k, v in vals.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"claim {claim.slug!r}: metric {arm}.{k} must be a number, got {type(v).__name__}")


@dataclass
class Summary:
    """Aggregate of a claim's per-seed runs and its verdict."""

    claim: Claim
    scale: str
    data_mode: str
    data: str
    seeds: list[int]
    runs: list[RunRecord]
    passed: bool
    checks: list[Check]
    stats: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    duration_s: float = 0.0

    def stat(self, arm: str, metric: str) -> tuple[float, float]:
        return self.stats.get(arm, {}).get(metric, (float("nan"), float("nan")))

    def to_json(self) -> dict:
        c = self.claim
        return {
            "slug": c.slug, "scale": self.scale, "data_mode": self.data_mode, "data": self.data,
            "seeds": self.seeds, "passed": self.passed, "duration_s": round(self.duration_s, 3),
            "criterion": c.criterion_for(self.data).describe(),
            "checks": [{"description": k.description, "passed": k.passed, "detail": k.detail} for k in self.checks],
            "primary": {"metric": c.primary.metric, "ours": c.primary.ours, "baseline": c.primary.baseline},
            "stats": {arm: {m: {"mean": _j(mu), "std": _j(sd)} for m, (mu, sd) in ms.items()}
                      for arm, ms in self.stats.items()},
            "per_seed": [{"seed": r.seed, "metrics": r.metrics, "duration_s": r.duration_s} for r in self.runs],
        }


def _j(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    if any(not math.isfinite(x) for x in xs):
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(claim: Claim, runs: Sequence[RunRecord], scale: str, mode: str) -> Summary:
    """Aggregate per-seed runs (mean ± sample std per arm and metric) and apply the criterion."""
    runs = sorted(runs, key=lambda r: r.seed)
    datas = sorted({r.data for r in runs})
    data = datas[0] if len(datas) == 1 else "+".join(datas)
    per_seed = [r.metrics for r in runs]
    crit = claim.criterion_for(data)
    try:
        passed, checks = crit.evaluate(per_seed)
    except KeyError as e:
        passed, checks = False, [Check(crit.describe(), False, f"cannot evaluate: {e}")]
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    arms = sorted({a for m in per_seed for a in m})
    for arm in arms:
        names = sorted({k for m in per_seed for k in m.get(arm, {})})
        stats[arm] = {k: mean_std([m[arm][k] for m in per_seed if k in m.get(arm, {})]) for k in names}
    return Summary(claim, scale, mode, data, [r.seed for r in runs], list(runs), passed, checks, stats,
                   sum(r.duration_s for r in runs))


def run_claim(
    claim: Claim,
    *,
    scale: str = "quick",
    seeds: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    data_root: Path | None = None,
    store: ResultStore | None = None,
    resume: bool = False,
    progress: Callable[..., object] = null_progress,
    on_seed: Callable[[RunRecord, bool], None] | None = None,
) -> Summary:
    """Run one claim over seeds, storing each finished seed at once; return the summary.

    resume: reuse seeds already stored for this claim version/scale/data mode instead of rerunning.
    on_seed(record, reused): called after every seed (for progress output).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    seeds = list(seeds) if seeds is not None else list(range(claim.default_seeds))
    dev = torch.device(device)
    if dev.type == "cpu":
        configure_cpu()
    mode = data_mode(claim, data_root)
    done = store.latest_per_seed(claim.slug, claim.version, scale, mode) if (store is not None and resume) else {}
    records: list[RunRecord] = []
    versions = environment_versions()
    for seed in seeds:
        if seed in done:
            records.append(done[seed])
            if on_seed:
                on_seed(done[seed], True)
            continue
        ctx = RunContext(scale=scale, seed=seed, device=dev, data_root=data_root if mode == "real" else None,
                         progress=progress)
        t0 = time.perf_counter()
        out = claim.run(ctx)
        duration = time.perf_counter() - t0
        _validate_output(claim, out)
        seed_ok, _ = claim.criterion_for(out.data).evaluate([out.metrics])
        rec = RunRecord(slug=claim.slug, claim_version=claim.version, scale=scale, seed=seed, data_mode=mode,
                        data=out.data, metrics=out.metrics, curves=out.curves, info=out.info,
                        seed_passed=seed_ok, duration_s=duration, device=str(dev), versions=versions,
                        git_rev=git_revision())
        if store is not None:
            store.add_run(rec)
        records.append(rec)
        if on_seed:
            on_seed(rec, False)
    return summarize(claim, records, scale, mode)
