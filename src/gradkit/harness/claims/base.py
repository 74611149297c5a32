"""The claim: one paper's headline experiment, our method and its baseline(s) in one run.

A claim is data: a protocol class (its hyperparameters, a value per scale), named arm functions, a
criterion, the primary metric and a negative control. The runner (:func:`execute`) owns what every
claim used to repeat: the thread count, seeding before every arm, timing, the arm loop, progress,
and storing the protocol with the run. A claim file holds the experiment and nothing else::

    @dataclass(frozen=True)
    class P(Protocol):
        epochs: int = scaled(smoke=2, quick=30)
        lr: float = 0.1

    def train(ctx: ArmContext) -> ArmResult:
        model = ...; hist = fit(model, ..., epochs=ctx.p.epochs)
        return ArmResult({"test_acc": hist.last("test_acc")}, curves={"test_acc": hist.series("test_acc")})

    register(Claim(slug=..., protocol=P, arms={"baseline": train, "ours": train}, data="digits",
                   criterion=Gain("test_acc", "ours", "baseline", 1.0),
                   primary=Primary("test_acc", "ours", "baseline", unit="%", ceiling=100.0), ...))

A real-data variant (``Variant``) is selected by ``--data-root`` at the scales it lists; it brings its
own data name, arms (or the claim's), protocol overrides and criterion.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ...engine import cpu_threads, seed_everything
from ...registry import Registry
from ..protocol import SCALES, Protocol
from .criteria import Criterion


def _no_progress(total: int | None = None, desc: str = ""):
    from ...engine import NullProgress

    return NullProgress()


@dataclass(frozen=True)
class RunContext:
    """What the runner gets for one seed: the scale, the seed, the device, optional real data,
    protocol overrides (field -> value) and a progress-bar factory ``progress(total, desc)``."""

    scale: str
    seed: int
    device: torch.device = torch.device("cpu")
    data_root: Path | None = None
    progress: Callable[..., Any] = _no_progress
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ArmContext:
    """What an arm function gets.

    p: the protocol instance; data: what the variant's ``setup`` returned (None without one);
    shared: a dict the arms of one run may use to share work (e.g. one learning-rate sweep that two
    arms pick from); generator: a CPU ``torch.Generator`` seeded with the run's seed, fresh for
    this arm (the runner also re-seeds Python, NumPy and torch before every arm).
    """

    scale: str
    seed: int
    device: torch.device
    p: Any
    arm: str = ""
    data: Any = None
    data_root: Path | None = None
    shared: dict = field(default_factory=dict)
    generator: torch.Generator | None = None
    progress: Callable[..., Any] = _no_progress

    @property
    def desc(self) -> str:
        """A progress-bar label for this arm."""
        return self.arm


@dataclass
class ArmResult:
    """One arm's outcome: metrics, curves (name -> series) and info worth storing."""

    metrics: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOutput:
    """One seed's outcome, every arm of the same run.

    metrics: ``{arm: {metric: float}}``; data: the data set used (selects nothing by itself: the
    variant brings its criterion); curves: ``{curve_name: {arm: [values]}}``; info: free-form facts
    (the runner adds ``protocol``, ``overrides`` and ``seconds_per_arm``).
    ``info["curve_axes"][curve] = {"xlabel": ..., "x": [...]}`` gives a plot its x values and label.
    """

    metrics: dict[str, dict[str, float]]
    data: str
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Primary:
    """The metric the report's 'ours' and 'baseline' columns show.

    ceiling: the best value the metric can take (100 for an accuracy in %); when ours and the
    baseline both sit within ``ceiling_tol`` of it, the verdict is INCONCLUSIVE: the task left no
    room for a difference.
    """

    metric: str
    ours: str
    baseline: str
    unit: str = ""
    ceiling: float | None = None
    ceiling_tol: float = 0.5


ArmFn = Callable[[ArmContext], "ArmResult | tuple[dict, dict]"]
SetupFn = Callable[[ArmContext], Any]
FinishFn = Callable[[ArmContext, RunOutput], None]


@dataclass(frozen=True)
class Variant:
    """A way to run a claim on other data, chosen by ``--data-root`` at the listed scales.

    name: the data set's name, stored with each run; description: what it needs under the data root
    and what it runs. Arms, setup, finish and protocol default to the claim's; ``overrides`` sets
    protocol fields; ``criterion`` and ``control`` default to the claim's too.
    """

    name: str
    description: str
    scales: tuple[str, ...] = SCALES
    arms: Mapping[str, ArmFn] | None = None
    setup: SetupFn | None = None
    finish: FinishFn | None = None
    protocol: type | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    criterion: Criterion | None = None
    control: Mapping[str, str] | None = None
    primary: Primary | None = None


@dataclass(frozen=True)
class Resolved:
    """The variant a run actually uses, every field filled in."""

    name: str
    real: bool
    protocol: type
    overrides: Mapping[str, Any]
    arms: Mapping[str, ArmFn]
    setup: SetupFn | None
    finish: FinishFn | None
    criterion: Criterion
    control: Mapping[str, str]
    primary: Primary


@dataclass(frozen=True)
class Claim:
    """A paper's headline claim and how gradkit checks it (see the module docstring).

    control: arm substitutions for the negative control (``{"dann": "source_only"}``: the criterion
    is evaluated again with the source-only arm standing in for DANN); default: the baseline stands
    in for ours. When the control passes too, the verdict is INCONCLUSIVE.
    version: bumped whenever the protocol's meaning changes, so older stored runs are not mixed in.
    threads: intra-op threads the runner sets on CPU for the whole run (None: leave as is).
    bounds: metric name -> (low, high), the range a metric lies in by definition (an accuracy in
    [0, 100], an SSIM in [-1, 1]); the suite's smoke test checks every arm's value against it.
    findings: one or two sentences where a FAIL is the paper's, shown first in the report.
    scale_note: one sentence for a FAIL or INCONCLUSIVE that comes from our scale or task, not the
    paper: what the gap is and what would settle it. The report shows it under any verdict but PASS.
    """

    slug: str
    title: str
    arxiv: str
    statement: str
    paper_figure: str
    criterion: Criterion
    primary: Primary
    protocol: type
    arms: Mapping[str, ArmFn]
    data: str
    setup: SetupFn | None = None
    finish: FinishFn | None = None
    control: Mapping[str, str] | None = None
    control_note: str = ""
    variants: tuple[Variant, ...] = ()
    uses: tuple[str, ...] = ()
    default_seeds: int = 3
    version: int = 1
    threads: int | None = 1
    notes: str = ""
    findings: str = ""
    scale_note: str = ""
    plots: tuple[str, ...] = ()
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.protocol, type) and issubclass(self.protocol, Protocol)
                and dataclasses.is_dataclass(self.protocol)):
            raise TypeError(f"claim {self.slug!r}: protocol must be a Protocol dataclass, got {self.protocol!r}")
        if not self.arms:
            raise ValueError(f"claim {self.slug!r}: needs at least one arm")
        for v in self.variants:
            bad = [s for s in v.scales if s not in SCALES]
            if bad:
                raise ValueError(f"claim {self.slug!r}: variant {v.name!r} lists unknown scales {bad}")

    # ---- variants ------------------------------------------------------------------------------
    @property
    def real_data(self) -> str:
        """What ``--data-root`` gives this claim, in words ('' when nothing)."""
        return "; ".join(f"{v.description} ({', '.join(v.scales)})" for v in self.variants)

    def variant_for(self, scale: str, data_root: Path | None) -> Variant | None:
        """The real-data variant used at ``scale`` with ``data_root`` (None: the bundled default)."""
        if data_root is None:
            return None
        for v in self.variants:
            if scale in v.scales:
                return v
        return None

    def resolve(self, variant: Variant | None) -> Resolved:
        v = variant
        primary = (v.primary if v is not None and v.primary is not None else self.primary)
        control = (v.control if v is not None and v.control is not None else self.control)
        if control is None:
            control = {primary.ours: primary.baseline}
        return Resolved(
            name=v.name if v is not None else self.data,
            real=v is not None,
            protocol=(v.protocol if v is not None and v.protocol is not None else self.protocol),
            overrides=dict(v.overrides) if v is not None else {},
            arms=(v.arms if v is not None and v.arms is not None else self.arms),
            setup=(v.setup if v is not None and v.setup is not None else self.setup),
            finish=(v.finish if v is not None and v.finish is not None else self.finish),
            criterion=(v.criterion if v is not None and v.criterion is not None else self.criterion),
            control=control,
            primary=primary,
        )

    def resolved_for_data(self, data: str) -> Resolved:
        """The resolved variant whose data name is ``data`` (the bundled one when none matches)."""
        for v in self.variants:
            if v.name == data:
                return self.resolve(v)
        return self.resolve(None)

    def criterion_for(self, data: str) -> Criterion:
        return self.resolved_for_data(data).criterion

    def protocol_for(self, scale: str, data_root: Path | None = None, overrides: Mapping[str, Any] | None = None):
        r = self.resolve(self.variant_for(scale, data_root))
        return r.protocol.at(scale, **{**r.overrides, **(overrides or {})})

    # ---- running -------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> RunOutput:
        """Run every arm for one seed (see :func:`execute`)."""
        return execute(self, ctx)


def _as_result(arm: str, res: Any) -> ArmResult:
    if isinstance(res, ArmResult):
        return res
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], dict):
        return ArmResult(dict(res[0]), dict(res[1]))
    if isinstance(res, dict):
        return ArmResult(dict(res))
    raise TypeError(f"arm {arm!r} must return ArmResult, (metrics, curves) or metrics, got {type(res).__name__}")


def execute(claim: Claim, ctx: RunContext) -> RunOutput:
    """One seed of a claim: resolve the variant and protocol, then setup, every arm, finish.

    Before setup and before every arm, Python, NumPy and torch are seeded with ``ctx.seed`` (so
    every arm starts from the same initialisation and data order); each arm's wall time is stored
    in ``info["seconds_per_arm"]``, the protocol in ``info["protocol"]``.
    """
    variant = claim.variant_for(ctx.scale, ctx.data_root)
    r = claim.resolve(variant)
    p = r.protocol.at(ctx.scale, **{**r.overrides, **dict(ctx.overrides)})
    base = dict(scale=ctx.scale, seed=ctx.seed, device=torch.device(ctx.device), p=p,
                data_root=ctx.data_root if r.real else None, progress=ctx.progress)
    shared: dict = {}
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    info: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with cpu_threads(claim.threads, ctx.device):
        data = None
        if r.setup is not None:
            gen = seed_everything(ctx.seed)
            data = r.setup(ArmContext(**base, arm="setup", shared=shared, generator=gen))
        bar = ctx.progress(total=len(r.arms), desc=f"{claim.slug} arms") if len(r.arms) > 1 else None
        try:
            for name, fn in r.arms.items():
                gen = seed_everything(ctx.seed)
                actx = ArmContext(**base, arm=name, data=data, shared=shared, generator=gen)
                t0 = time.perf_counter()
                res = _as_result(name, fn(actx))
                seconds[name] = round(time.perf_counter() - t0, 3)
                metrics[name] = res.metrics
                for cname, series in res.curves.items():
                    curves.setdefault(cname, {})[name] = series
                if res.info:
                    info.setdefault("arms", {})[name] = res.info
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        out = RunOutput(metrics=metrics, data=r.name, curves=curves, info=info)
        if r.finish is not None:
            r.finish(ArmContext(**base, arm="finish", data=data, shared=shared), out)
    out.info["protocol"] = p.asdict()
    out.info["overrides"] = {k: v for k, v in p.asdict().items() if k in ctx.overrides}
    out.info["seconds_per_arm"] = seconds
    return out


CLAIMS: Registry[Claim] = Registry("claim")


def register(claim: Claim) -> Claim:
    """Add a claim to the registry (duplicate slugs raise)."""
    if claim.default_seeds < 1:
        raise ValueError(f"default_seeds must be >= 1, got {claim.default_seeds}")
    return CLAIMS.add(claim.slug, claim)
