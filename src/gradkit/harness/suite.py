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
from typing import Any, Callable, Mapping, Sequence

import torch

from .claims import SCALES, Claim, RunContext, RunOutput
from .claims.criteria import Check
from ..engine import configure_cpu, null_progress
from .protocol import overrides_key
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


def data_mode(claim: Claim, data_root: Path | None, scale: str = "quick") -> str:
    """``"real"`` when a data root is given and the claim has a real-data variant at ``scale``, else ``"bundled"``."""
    return "real" if claim.variant_for(scale, data_root) is not None else "bundled"


def _validate_output(claim: Claim, out: RunOutput) -> None:
    if not isinstance(out, RunOutput):
        raise TypeError(f"claim {claim.slug!r}: run() must return RunOutput, got {type(out).__name__}")
    if not out.metrics:
        raise ValueError(f"claim {claim.slug!r}: run() returned no metrics")
    primary = claim.resolved_for_data(out.data).primary
    for arm in (primary.ours, primary.baseline):
        if arm not in out.metrics or primary.metric not in out.metrics[arm]:
            raise ValueError(f"claim {claim.slug!r}: metrics lack {arm}.{primary.metric}")
    for arm, vals in out.metrics.items():
        for k, v in vals.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"claim {claim.slug!r}: metric {arm}.{k} must be a number, got {type(v).__name__}")


PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


def substitute(per_seed: Sequence[Mapping[str, Mapping[str, float]]], control: Mapping[str, str]) -> list[dict]:
    """Per-seed metrics with each arm ``a`` of ``control`` replaced by the metrics of ``control[a]``."""
    out = []
    for m in per_seed:
        m2 = dict(m)
        for arm, stand_in in control.items():
            if stand_in not in m:
                raise KeyError(f"control arm {stand_in!r} missing from the metrics (arms: {sorted(m)})")
            m2[arm] = m[stand_in]
        out.append(m2)
    return out


@dataclass(frozen=True)
class Verdict:
    """PASS / FAIL / INCONCLUSIVE with the checks that decided it.

    checks: the criterion on the measured arms; control_checks: the same criterion with the control's
    stand-ins; reason: one line on why (the deciding check, a passing control, a ceiling).
    """

    verdict: str
    checks: list[Check]
    control_checks: list[Check]
    control_passed: bool | None
    at_ceiling: bool
    reason: str


def decide(claim: Claim, data: str, per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> Verdict:
    """Apply the criterion, its negative control and the ceiling rule to per-seed metrics."""
    r = claim.resolved_for_data(data)
    crit = r.criterion
    try:
        passed, checks = crit.evaluate(per_seed)
    except KeyError as e:
        passed, checks = False, [Check(crit.describe(), False, f"cannot evaluate: {e}")]
    try:
        ctrl_passed, ctrl_checks = crit.evaluate(substitute(per_seed, r.control))
    except KeyError as e:
        ctrl_passed, ctrl_checks = None, [Check(crit.describe(), False, f"control cannot be evaluated: {e}")]
    ceiling = False
    pr = r.primary
    if pr.ceiling is not None and per_seed:
        try:
            means = [statistics.fmean(float(m[a][pr.metric]) for m in per_seed) for a in (pr.ours, pr.baseline)]
            ceiling = all(math.isfinite(x) and abs(x - pr.ceiling) <= pr.ceiling_tol for x in means)
        except (KeyError, statistics.StatisticsError):
            ceiling = False
    if not passed:
        failed = next((k for k in checks if not k.passed), None)
        reason = f"failed: {failed.description} ({failed.detail})" if failed else "failed"
        return Verdict(FAIL, checks, ctrl_checks, ctrl_passed, ceiling, reason)
    ctrl_text = ", ".join(f"{b} for {a}" for a, b in r.control.items())
    if ctrl_passed is None:
        return Verdict(INCONCLUSIVE, checks, ctrl_checks, None, ceiling,
                       f"the control ({ctrl_text}) cannot be evaluated: {ctrl_checks[0].detail}")
    if ctrl_passed:
        return Verdict(INCONCLUSIVE, checks, ctrl_checks, True, ceiling,
                       f"the control ({ctrl_text}) passes the same criterion")
    if ceiling:
        return Verdict(INCONCLUSIVE, checks, ctrl_checks, False, True,
                       f"{pr.ours} and {pr.baseline} both within {pr.ceiling_tol:g} of the ceiling "
                       f"{pr.ceiling:g} on {pr.metric}")
    failed_ctrl = next((k for k in ctrl_checks if not k.passed), None)
    why = f"; the control ({ctrl_text}) fails {failed_ctrl.description}" if failed_ctrl else ""
    return Verdict(PASS, checks, ctrl_checks, False, False, "all checks hold" + why)


@dataclass
class Summary:
    """Aggregate of a claim's per-seed runs and its verdict."""

    claim: Claim
    scale: str
    data_mode: str
    data: str
    seeds: list[int]
    runs: list[RunRecord]
    verdict: Verdict
    stats: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    duration_s: float = 0.0
    overrides: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict.verdict == PASS

    @property
    def checks(self) -> list[Check]:
        return self.verdict.checks

    @property
    def primary(self):
        return self.claim.resolved_for_data(self.data).primary

    def stat(self, arm: str, metric: str) -> tuple[float, float]:
        return self.stats.get(arm, {}).get(metric, (float("nan"), float("nan")))

    def to_json(self) -> dict:
        c = self.claim
        v = self.verdict
        p = self.primary
        r = c.resolved_for_data(self.data)
        return {
            "slug": c.slug, "scale": self.scale, "data_mode": self.data_mode, "data": self.data,
            "overrides": self.overrides, "seeds": self.seeds, "verdict": v.verdict, "passed": self.passed,
            "reason": v.reason, "duration_s": round(self.duration_s, 3),
            "criterion": r.criterion.describe(),
            "checks": [{"description": k.description, "passed": k.passed, "detail": k.detail} for k in v.checks],
            "control": {"substitutes": dict(r.control), "passed": v.control_passed,
                        "checks": [{"description": k.description, "passed": k.passed, "detail": k.detail}
                                   for k in v.control_checks]},
            "at_ceiling": v.at_ceiling,
            "primary": {"metric": p.metric, "ours": p.ours, "baseline": p.baseline},
            "protocol": self.runs[0].info.get("protocol", {}) if self.runs else {},
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
    """Aggregate per-seed runs (mean ± sample std per arm and metric) and decide the verdict."""
    runs = sorted(runs, key=lambda r: r.seed)
    datas = sorted({r.data for r in runs})
    data = datas[0] if len(datas) == 1 else "+".join(datas)
    per_seed = [r.metrics for r in runs]
    verdict = decide(claim, data, per_seed)
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    arms = sorted({a for m in per_seed for a in m})
    for arm in arms:
        names = sorted({k for m in per_seed for k in m.get(arm, {})})
        stats[arm] = {k: mean_std([m[arm][k] for m in per_seed if k in m.get(arm, {})]) for k in names}
    overrides = runs[0].overrides if runs else ""
    return Summary(claim, scale, mode, data, [r.seed for r in runs], list(runs), verdict, stats,
                   sum(r.duration_s for r in runs), overrides)


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
    overrides: Mapping[str, Any] | None = None,
) -> Summary:
    """Run one claim over seeds, storing each finished seed at once; return the summary.

    resume: reuse seeds already stored for this claim version/scale/data mode/overrides instead of
    rerunning. overrides: protocol field -> value (checked); such runs are stored with them and
    never resumed into, or averaged with, runs of the default protocol.
    on_seed(record, reused): called after every seed (for progress output).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    seeds = list(seeds) if seeds is not None else list(range(claim.default_seeds))
    dev = torch.device(device)
    if dev.type == "cpu":
        configure_cpu()
    mode = data_mode(claim, data_root, scale)
    overrides = dict(overrides or {})
    proto = claim.protocol_for(scale, data_root if mode == "real" else None, overrides)  # checks overrides
    okey = overrides_key({k: getattr(proto, k) for k in overrides})
    done = (store.latest_per_seed(claim.slug, claim.version, scale, mode, overrides=okey)
            if (store is not None and resume) else {})
    records: list[RunRecord] = []
    versions = environment_versions()
    for seed in seeds:
        if seed in done:
            records.append(done[seed])
            if on_seed:
                on_seed(done[seed], True)
            continue
        ctx = RunContext(scale=scale, seed=seed, device=dev, data_root=data_root if mode == "real" else None,
                         progress=progress, overrides=overrides)
        t0 = time.perf_counter()
        out = claim.run(ctx)
        duration = time.perf_counter() - t0
        _validate_output(claim, out)
        seed_verdict = decide(claim, out.data, [out.metrics]).verdict
        rec = RunRecord(slug=claim.slug, claim_version=claim.version, scale=scale, seed=seed, data_mode=mode,
                        data=out.data, metrics=out.metrics, curves=out.curves, info=out.info,
                        seed_passed=seed_verdict == PASS, duration_s=duration, device=str(dev), versions=versions,
                        git_rev=git_revision(), overrides=okey, verdict=seed_verdict)
        if store is not None:
            store.add_run(rec)
        records.append(rec)
        if on_seed:
            on_seed(rec, False)
    return summarize(claim, records, scale, mode)
