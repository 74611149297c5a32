"""Pass criteria of claims: comparisons of measured numbers, aggregated over seeds.

A criterion is data: the report prints its description next to the numbers it
compared. Metrics arrive per seed as ``{arm: {metric: value}}``; each criterion
reduces them to seed means (or checks every seed) and returns :class:`Check`
records. A non-finite value in a metric a criterion reads fails that check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

SeedMetrics = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class Check:
    """One evaluated condition: what was compared, the numbers, and the outcome."""

    description: str
    passed: bool
    detail: str


def seed_values(per_seed: Sequence[SeedMetrics], arm: str, metric: str) -> list[float]:
    """``metric`` of ``arm`` in every seed's metrics (KeyError naming what is missing)."""
    out = []
    for i, m in enumerate(per_seed):
        if arm not in m:
            raise KeyError(f"arm {arm!r} missing from seed #{i} metrics (arms: {sorted(m)})")
        if metric not in m[arm]:
            raise KeyError(f"metric {metric!r} missing from arm {arm!r} (metrics: {sorted(m[arm])})")
        out.append(float(m[arm][metric]))
    return out


def mean(xs: Sequence[float]) -> float:
    """Plain mean (NaN for no values; NaN inputs propagate, so a failed seed cannot be averaged away)."""
    return sum(xs) / len(xs) if xs else float("nan")


def _finite(xs: Sequence[float]) -> bool:
    return all(math.isfinite(x) for x in xs)


def fmt(x: float) -> str:
    """A number as criteria print it (4 significant digits)."""
    return f"{x:.4g}" if math.isfinite(x) else str(x)


class Criterion:
    """Base class; subclasses implement :meth:`checks` and :meth:`describe`."""

    def checks(self, per_seed: Sequence[SeedMetrics]) -> list[Check]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def evaluate(self, per_seed: Sequence[SeedMetrics]) -> tuple[bool, list[Check]]:
        if not per_seed:
            return False, [Check(self.describe(), False, "no runs")]
        cs = self.checks(per_seed)
        return all(c.passed for c in cs), cs


_OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


@dataclass(frozen=True)
class Ratio(Criterion):
    """A relative improvement: ``mean(metric[arm]) <= at_most x mean(metric[ref])`` over seeds.

    The reference's mean must be positive and both means finite (e.g. NFE, an error, a dead zone).
    """

    metric: str
    arm: str
    ref: str
    at_most: float

    def describe(self) -> str:
        return f"{self.metric}: {self.arm} <= {self.at_most:g} x {self.ref} (seed means)"

    def checks(self, per_seed):
        a = mean(seed_values(per_seed, self.arm, self.metric))
        b = mean(seed_values(per_seed, self.ref, self.metric))
        ok = math.isfinite(a) and math.isfinite(b) and b > 0 and a <= self.at_most * b
        r = a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else float("nan")
        return [Check(self.describe(), ok, f"{fmt(a)} vs {fmt(b)} (ratio {fmt(r)})")]


@dataclass(frozen=True)
class Compare(Criterion):
    """The one comparison: ``metric[arm] OP ref + margin``, with ``ref`` another arm's mean or a number.

    ``every_seed=False`` compares seed means; ``True`` requires the comparison in every seed (only
    with a numeric ``ref``). ``Gain``, ``Drop``, ``AtLeast``, ``AtMost`` and ``Below`` are named forms
    of it. ``text`` replaces the generated description where a claim wants its own words.
    """

    metric: str
    arm: str
    op: str
    ref: str | float
    margin: float = 0.0
    every_seed: bool = False
    text: str = ""

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"op must be one of {', '.join(_OPS)}, got {self.op!r}")
        if self.every_seed and isinstance(self.ref, str):
            raise ValueError("every_seed compares against a number, not an arm")

    def describe(self) -> str:
        if self.text:
            return self.text
        if isinstance(self.ref, str):
            m = "" if self.margin == 0 else f" {'+' if self.margin > 0 else '-'} {abs(self.margin):g}"
            return f"{self.metric}: {self.arm} {self.op} {self.ref}{m}"
        scope = "every seed" if self.every_seed else "mean"
        return f"{self.metric}[{self.arm}] {self.op} {self.ref + self.margin:g} ({scope})"

    def checks(self, per_seed):
        xs = seed_values(per_seed, self.arm, self.metric)
        cmp = _OPS[self.op]
        if isinstance(self.ref, str):
            ys = seed_values(per_seed, self.ref, self.metric)
            a, b = mean(xs), mean(ys)
            ok = _finite(xs) and _finite(ys) and cmp(a - b, self.margin)
            return [Check(self.describe(), ok, f"{fmt(a)} vs {fmt(b)} (diff {a - b:+.4g})")]
        bound = float(self.ref) + self.margin
        if self.every_seed:
            ok = _finite(xs) and all(cmp(x, bound) for x in xs)
            return [Check(self.describe(), ok, "seeds: " + ", ".join(fmt(x) for x in xs))]
        ok = _finite(xs) and cmp(mean(xs), bound)
        return [Check(self.describe(), ok, f"mean {fmt(mean(xs))}")]


def Gain(metric: str, ours: str, baseline: str, at_least: float) -> Compare:
    """mean(ours) - mean(baseline) >= at_least (metric units)."""
    return Compare(metric, ours, ">=", baseline, margin=at_least, text=f"{metric}: {ours} >= {baseline} + {at_least:g}")


def Drop(metric: str, ours: str, baseline: str, at_most: float) -> Compare:
    """mean(baseline) - mean(ours) <= at_most: ours may lose at most this much."""
    return Compare(metric, ours, ">=", baseline, margin=-at_most, text=f"{metric}: {ours} >= {baseline} - {at_most:g}")


def Below(metric: str, arm: str, value: float, every_seed: bool = True) -> Compare:
    """A metric of one arm stays below a value: in every seed (default) or in the mean."""
    return Compare(metric, arm, "<", value, every_seed=every_seed)


def AtLeast(metric: str, arm: str, value: float) -> Compare:
    """mean of a metric of one arm >= value."""
    return Compare(metric, arm, ">=", value)


def AtMost(metric: str, arm: str, value: float) -> Compare:
    """mean of a metric of one arm <= value."""
    return Compare(metric, arm, "<=", value)


@dataclass(frozen=True)
class Within(Criterion):
    """|mean(a) - mean(b)| <= tol: two arms agree on a metric (e.g. a method matches its reference)."""

    metric: str
    a: str
    b: str
    tol: float

    def __post_init__(self) -> None:
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")

    def describe(self) -> str:
        return f"{self.metric}: |{self.a} - {self.b}| <= {self.tol:g}"

    def checks(self, per_seed):
        xs, ys = seed_values(per_seed, self.a, self.metric), seed_values(per_seed, self.b, self.metric)
        d = mean(xs) - mean(ys)
        ok = _finite(xs) and _finite(ys) and abs(d) <= self.tol
        return [Check(self.describe(), ok, f"{fmt(mean(xs))} vs {fmt(mean(ys))} (diff {d:+.4g})")]


@dataclass(frozen=True)
class Monotonic(Criterion):
    """Seed means of a metric are strictly monotonic across an ordered list of arms."""

    metric: str
    arms: tuple[str, ...]
    increasing: bool = True

    def describe(self) -> str:
        rel = " < " if self.increasing else " > "
        return f"{self.metric}: " + rel.join(self.arms) + " (seed means)"

    def checks(self, per_seed):
        means = [mean(seed_values(per_seed, a, self.metric)) for a in self.arms]
        pairs = zip(means, means[1:])
        ok = all(math.isfinite(m) for m in means) and all(
            (b > a) if self.increasing else (b < a) for a, b in pairs
        )
        return [Check(self.describe(), ok, ", ".join(fmt(m) for m in means))]


@dataclass(frozen=True)
class AllFinite(Criterion):
    """Every metric of every arm is finite in every seed (a NaN is a failed run)."""

    def describe(self) -> str:
        return "all metrics finite in every seed"

    def checks(self, per_seed):
        bad = [
            f"seed#{i} {arm}.{k}"
            for i, m in enumerate(per_seed)
            for arm, vals in m.items()
            for k, v in vals.items()
            if not math.isfinite(float(v))
        ]
        return [Check(self.describe(), not bad, "ok" if not bad else "non-finite: " + ", ".join(bad[:5]))]


@dataclass(frozen=True)
class AtLeastKOf(Criterion):
    """At least ``k`` of the sub-criteria hold (every sub-check is reported)."""

    k: int
    criteria: tuple[Criterion, ...]

    def describe(self) -> str:
        return f"at least {self.k} of: " + "; ".join(c.describe() for c in self.criteria)

    def checks(self, per_seed):
        subs = [c.checks(per_seed) for c in self.criteria]
        ok = [all(ch.passed for ch in s) for s in subs]
        detail = "; ".join(f"[{'pass' if o else 'fail'}] {ch.description}: {ch.detail}"
                           for s, o in zip(subs, ok) for ch in s)
        return [Check(self.describe(), sum(ok) >= self.k, f"{sum(ok)}/{len(ok)} hold: {detail}")]


class AllOf(Criterion):
    """Every sub-criterion must hold."""

    def __init__(self, *criteria: Criterion) -> None:
        if not criteria:
            raise ValueError("AllOf needs at least one criterion")
        self.criteria = tuple(criteria)

    def describe(self) -> str:
        return " AND ".join(c.describe() for c in self.criteria)

    def checks(self, per_seed):
        out: list[Check] = []
        for c in self.criteria:
            out.extend(c.checks(per_seed))
        return out

    def __repr__(self) -> str:
        return f"AllOf{self.criteria!r}"
