"""The claim: one paper's headline experiment, our method and its baseline(s) in one run."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..registry import Registry
from .criteria import Criterion

SCALES = ("smoke", "quick", "full")


def _no_progress(total: int, desc: str = ""):  # pragma: no cover - trivial
    from ..engine import NullProgress

    return NullProgress()


@dataclass(frozen=True)
class RunContext:
    """What a claim's ``run`` gets: the scale, one seed, the device, optional real data.

    ``progress(total, desc)`` returns a progress bar with ``update(n=1)``,
    ``set_postfix(**kw)`` and ``close()``; the engine uses it for training loops.
    """

    scale: str
    seed: int
    device: torch.device = torch.device("cpu")
    data_root: Path | None = None
    progress: Callable[..., Any] = _no_progress

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        """Choose a value by scale: ``ctx.pick(smoke=3, quick=40, full=1000)``."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.scale]


@dataclass
class RunOutput:
    """What a claim's ``run`` returns for one seed.

    metrics: ``{arm: {metric: float}}`` — every arm (ours and the baselines) of the same run.
    data: name of the data set actually used (e.g. ``"moons"``, ``"mnist->mnist-m"``);
        it selects the criterion (``Claim.data_criteria``) and is stored with the run.
    curves: ``{curve_name: {arm: [values per epoch/step]}}`` for the report's plots.
    info: free-form extra facts worth storing (settings, counts). ``info["curve_axes"][curve_name] =
        {"xlabel": ..., "x": [...]}`` gives a plot its x values and label (default: epochs 1..n).
    """

    metrics: dict[str, dict[str, float]]
    data: str
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Primary:
    """The metric the report's 'ours' and 'baseline' columns show."""

    metric: str
    ours: str
    baseline: str
    unit: str = ""


@dataclass(frozen=True)
class Claim:
    """A paper's headline claim and how gradkit checks it.

    ``run(ctx) -> RunOutput`` trains/evaluates our method AND the baseline(s) for one seed.
    ``criterion`` applies to the bundled-data run; ``data_criteria`` maps a real data set's
    name (``RunOutput.data``) to its own criterion. ``version`` is bumped whenever the protocol
    changes, so stored results of an older protocol are not resumed or mixed in.
    """

    slug: str
    title: str
    arxiv: str
    statement: str
    paper_figure: str
    criterion: Criterion
    primary: Primary
    run: Callable[[RunContext], RunOutput]
    uses: tuple[str, ...] = ()
    data_criteria: Mapping[str, Criterion] = field(default_factory=dict)
    real_data: str = ""
    default_seeds: int = 3
    version: int = 1
    notes: str = ""
    plots: tuple[str, ...] = ()

    def criterion_for(self, data: str) -> Criterion:
        return self.data_criteria.get(data, self.criterion)


def run_arms(arms, train_arm):
    """Train each arm with ``train_arm(arm) -> (metrics, curves)``; collect them and the seconds per arm.

    Returns ``(metrics, curves, seconds)`` shaped as :class:`RunOutput` wants them: ``{arm: metrics}``,
    ``{curve: {arm: series}}`` and ``{arm: wall seconds}``.
    """
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, float] = {}
    for arm in arms:
        t0 = time.perf_counter()
        m, c = train_arm(arm)
        seconds[arm] = round(time.perf_counter() - t0, 3)
        metrics[arm] = m
        for name, series in c.items():
            curves.setdefault(name, {})[arm] = series
    return metrics, curves, seconds


CLAIMS: Registry[Claim] = Registry("claim")


def register(claim: Claim) -> Claim:
    """Add a claim to the registry (duplicate slugs raise)."""
    if claim.default_seeds < 1:
        raise ValueError(f"default_seeds must be >= 1, got {claim.default_seeds}")
    return CLAIMS.add(claim.slug, claim)
