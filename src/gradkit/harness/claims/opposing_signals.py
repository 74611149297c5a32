"""Claim ``opposing-signals``: the points whose loss swings most between GD steps are the planted opposing
groups, their losses oscillate in anti-phase, and the opposing feature drives sharpness to the edge of stability.

Rosenfeld & Risteski, "Outliers with Opposing Signals Have an Outsized Effect on Neural Network
Optimization", ICLR 2024 (arXiv 2311.04163). Two arms per seed, same data points, same initialisation:

- ``opposing``: balanced binary data (core signal x[:20] ~ N((2y-1) 0.3, I)) with a large feature x[20] = 15 on
  20 random points of each class (groups A: y = 1, B: y = 0);
- ``no_feature``: the same points with x[20] = 0 everywhere (the control).

An MLP 21-64-64-64-1 (ReLU) is trained by full-batch GD, lr 0.05, on the square loss 0.5 (f(x) - (2y-1))^2.
Every step a :class:`~gradkit.probes.opposing_signals.PerExampleLossTracker` (k = 40 = number of planted
points) records per-example losses and the top-k |Delta loss| set; every 50 steps a
:class:`~gradkit.probes.sharpness.SharpnessTracker` measures the Hessian's top eigenvalue (20 warm-started
power iterations, float64). Per seed the criterion asks, of the ``opposing`` arm: top-k precision against
the planted points (steps >= 200) >= 0.25; anti-phase of L_A and L_B over the last 2000 steps <= -0.5; peak
sharpness >= 0.8 * 2/lr; peak sharpness >= 1.5 x the ``no_feature`` arm's. At least 2/3 of the seeds must
satisfy all four.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...data.opposing_signals import opposing_signal_data
from ...engine import fit
from ...probes.activations import count_spikes
from ...probes.opposing_signals import PerExampleLossTracker, antiphase_score, split_opposing
from ...probes.sharpness import SharpnessTracker, hessian_top_eigenvalue
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import Check, Criterion, fmt

SLUG = "opposing-signals"
OURS, CONTROL = "opposing", "no_feature"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class OpposingSignalsProtocol(Protocol):
    """Data, model, GD and probe settings (the same for both arms)."""

    n: int = scaled(smoke=200, quick=1000, full=1000)
    d: int = 20                       # core-signal dimensions; the opposing feature is one more
    mu: float = 0.3                   # class-mean offset of the core signal
    amplitude: float = 15.0           # the opposing feature's value on the planted points
    n_outliers: int = scaled(smoke=4, quick=20, full=20)  # planted points per class
    widths: tuple[int, ...] = scaled(smoke=(16, 16), quick=(64, 64, 64), full=(64, 64, 64))
    lr: float = 0.05
    steps: int = scaled(smoke=100, quick=3000, full=8000)
    k: int = scaled(smoke=8, quick=40, full=40)            # top-k of |Delta loss| per step
    precision_after: int = scaled(smoke=20, quick=200, full=200)   # precision averaged over steps >= this
    window: int = scaled(smoke=50, quick=2000, full=2000)  # anti-phase over the last `window` steps
    sharpness_every: int = scaled(smoke=25, quick=50, full=50)
    power_iters: int = 20
    sharpness_dtype: str = "float64"
    spike_factor: float = 1.2         # a loss spike: loss > 1.2 x its running minimum (reported only)


def mlp(d_in: int, widths: tuple[int, ...]) -> nn.Sequential:
    """ReLU MLP d_in -> widths -> 1."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(d_in, w), nn.ReLU()]
        d_in = w
    return nn.Sequential(*layers, nn.Linear(d_in, 1))


def square_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example 0.5 (f(x) - (2y - 1))^2 for labels y in {0, 1}."""
    return 0.5 * (out.reshape(-1) - (2 * y - 1)) ** 2


def _setup(ctx: ArmContext):
    p = ctx.p
    return opposing_signal_data(n=p.n, d=p.d, amplitude=p.amplitude, n_outliers=p.n_outliers, mu=p.mu,
                                seed=ctx.seed)


def _purity(ya: torch.Tensor, yb: torch.Tensor) -> float:
    """Fraction of a split consistent with the classes (A all one class, B the other), best orientation."""
    one = float((ya == 1).sum() + (yb == 0).sum())
    other = float((ya == 0).sum() + (yb == 1).sum())
    return max(one, other) / max(len(ya) + len(yb), 1)


def _window_means(values: list[float], size: int) -> list[float]:
    return [sum(values[i:i + size]) / len(values[i:i + size]) for i in range(0, len(values), size)]


def run_arm(ctx: ArmContext) -> ArmResult:
    """Train by full-batch GD with the loss tracker and the sharpness tracker attached."""
    p, dev = ctx.p, ctx.device
    if p.sharpness_dtype not in DTYPES:
        raise ValueError(f"sharpness_dtype must be one of {tuple(DTYPES)}, got {p.sharpness_dtype!r}")
    ds = ctx.data if ctx.arm == OURS else ctx.data.without_feature()
    x, y = ds.x.to(dev), ds.y.to(dev)
    planted = ds.outliers
    model = mlp(x.shape[1], p.widths).to(dev)
    tracker = PerExampleLossTracker(model, square_loss, x, y, k=p.k, warmup=p.precision_after,
                                    groups={"A": ds.idx_a, "B": ds.idx_b}, keep_losses=True)
    sharp = SharpnessTracker(model, square_loss, x, y, every=p.sharpness_every, iters=p.power_iters,
                             dtype=DTYPES[p.sharpness_dtype],
                             generator=torch.Generator().manual_seed(ctx.seed))
    member = torch.zeros(len(x), dtype=torch.bool)
    member[planted] = True
    largest_loss_hits: list[float] = []    # baseline detector: the top-k by current loss, not by its change

    def on_step(step: int) -> None:
        tracker(step)
        sharp(step)
        if step >= p.precision_after:
            largest_loss_hits.append(float(member[torch.topk(tracker.last_losses, p.k).indices.cpu()].float().mean()))

    fit(model, torch.optim.SGD(model.parameters(), lr=p.lr), [(x, y)], epochs=p.steps,
        compute_loss=lambda m, b: square_loss(m(b[0]), b[1]).mean(), on_step_start=on_step,
        stop_on_nonfinite=False, progress=ctx.progress, desc=f"{SLUG}/{ctx.arm}")
    tracker.step(p.steps)  # close the last step's Delta
    hits_per_step = [float(member[idx].float().mean()) for _, idx, _ in tracker.topk_history]

    w = min(p.window, len(tracker.steps) - 1)
    la, lb = tracker.group_losses["A"][-w - 1:], tracker.group_losses["B"][-w - 1:]
    losses = tracker.loss_history[-w - 1:]                    # (w + 1, n)
    swing = (losses[1:] - losses[:-1]).abs().mean(0)                       # mean |Delta_i| over the window
    pool = tracker.frequent_outliers(top=p.k)
    split = split_opposing(model, square_loss, x[pool.to(dev)], y[pool.to(dev)])
    ya, yb = ds.y[pool][split.idx_a], ds.y[pool][split.idx_b]
    la_det = losses[:, pool[split.idx_a]].mean(1).tolist() if len(split.idx_a) else la
    lb_det = losses[:, pool[split.idx_b]].mean(1).tolist() if len(split.idx_b) else lb
    eos = 2.0 / p.lr
    metrics = {
        "precision": tracker.topk_precision(planted, after=p.precision_after),
        "precision_largest_loss": sum(largest_loss_hits) / max(len(largest_loss_hits), 1),
        "base_rate": len(planted) / len(x),
        "antiphase": antiphase_score(la, lb),
        "antiphase_detected": antiphase_score(la_det, lb_det),
        "peak_sharpness": sharp.peak,
        "final_sharpness": sharp.values[-1],
        "peak_over_eos": sharp.peak / eos,
        "swing_ratio": float(swing[member].mean() / swing[~member].mean()),
        "pool_precision": float(member[pool].float().mean()),
        "split_purity": _purity(ya, yb),
        "split_cosine": split.cosine,
        "final_loss": tracker.mean_losses[-1],
        "loss_spikes": float(count_spikes(tracker.mean_losses, p.spike_factor)),
    }
    window_size = max(p.steps // 30, 1)
    curves = {
        "sharpness_over_eos": [v / eos for v in sharp.values],
        "topk_precision": _window_means(hits_per_step, window_size),
        "loss_group_a": tracker.group_losses["A"][-200:],
        "loss_group_b": tracker.group_losses["B"][-200:],
        "train_loss": tracker.mean_losses[:: max(p.steps // 300, 1)],
    }
    info = {"sharpness_steps": sharp.steps, "pool_size": len(pool), "group_sizes": [len(split.idx_a), len(split.idx_b)]}
    return ArmResult(metrics, curves, info)


def smoke_checks(seed: int) -> dict[str, float]:
    """Power iteration on a quadratic 0.5 w^T H w (relative error of lam_max(H), with a dominant negative
    eigenvalue too) and tracker index validity on a tiny run."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    errs = []
    for eigs in ([7.0, 3.0, 2.0, 1.0, 0.5, 0.1], [-20.0, 4.0, 2.0, 1.0, -1.0, 0.3]):
        h = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
        w = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
        quad = _Quadratic(h, w)
        lam, _ = hessian_top_eigenvalue(quad, lambda out, _y: out, torch.zeros(2, 1), torch.zeros(2), iters=300,
                                        generator=g)
        top = max(eigs)
        errs.append(abs(lam - top) / top)
    return {"quadratic_rel_err": max(errs)}


class _Quadratic(nn.Module):
    def __init__(self, h: torch.Tensor, w: nn.Parameter) -> None:
        super().__init__()
        self.register_buffer("h", h)
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.h @ self.w).expand(len(x))


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p = ctx.p
    sh = out.info.get("arms", {}).get(OURS, {}).get("sharpness_steps", [])
    window_size = max(p.steps // 30, 1)
    n_windows = len(out.curves.get("topk_precision", {}).get(OURS, []))
    stride = max(p.steps // 300, 1)
    out.info["checks"] = smoke_checks(ctx.seed)
    out.info["curve_axes"] = {
        "sharpness_over_eos": {"xlabel": "GD step", "x": sh, "unit": "x 2/lr"},
        "topk_precision": {"xlabel": f"GD step (mean over {window_size}-step windows)",
                           "x": [i * window_size for i in range(n_windows)], "unit": "fraction"},
        "loss_group_a": {"xlabel": "GD step (last 200)", "x": list(range(p.steps - 199, p.steps + 1))},
        "loss_group_b": {"xlabel": "GD step (last 200)", "x": list(range(p.steps - 199, p.steps + 1))},
        "train_loss": {"xlabel": "GD step", "x": list(range(0, p.steps + 1, stride))},
    }


@dataclass(frozen=True)
class SeedsWithSignature(Criterion):
    """Per seed, all four conditions on ``ours`` (and its peak sharpness vs ``reference``'s); at least
    ``ceil(fraction * seeds)`` seeds must satisfy them."""

    ours: str = OURS
    reference: str = CONTROL
    fraction: float = 2 / 3
    min_precision: float = 0.25
    max_antiphase: float = -0.5
    min_peak_over_eos: float = 0.8
    min_peak_ratio: float = 1.5

    def describe(self) -> str:
        return (f"in >= {self.fraction:.3g} of the seeds: precision[{self.ours}] >= {self.min_precision:g}, "
                f"antiphase[{self.ours}] <= {self.max_antiphase:g}, peak_over_eos[{self.ours}] >= "
                f"{self.min_peak_over_eos:g}, peak_sharpness[{self.ours}] >= {self.min_peak_ratio:g} x "
                f"peak_sharpness[{self.reference}] (same seed)")

    def checks(self, per_seed):
        need = math.ceil(self.fraction * len(per_seed) - 1e-9)
        good, parts = 0, []
        for i, m in enumerate(per_seed):
            for arm in (self.ours, self.reference):
                if arm not in m:
                    raise KeyError(f"arm {arm!r} missing from seed #{i} metrics (arms: {sorted(m)})")
            o = m[self.ours]
            prec, anti, eos = (float(o[k]) for k in ("precision", "antiphase", "peak_over_eos"))
            ref = float(m[self.reference]["peak_sharpness"])
            ratio = float(o["peak_sharpness"]) / ref if ref > 0 else math.nan
            vals = (prec, anti, eos, ratio)
            ok = (all(math.isfinite(v) for v in vals) and prec >= self.min_precision and anti <= self.max_antiphase
                  and eos >= self.min_peak_over_eos and ratio >= self.min_peak_ratio)
            good += ok
            parts.append(f"seed#{i} {'ok' if ok else 'no'} (prec {fmt(prec)}, anti {fmt(anti)}, "
                         f"peak/eos {fmt(eos)}, ratio {fmt(ratio)})")
        return [Check(self.describe(), good >= need, f"{good}/{len(per_seed)} seeds (need {need}): " + "; ".join(parts))]


CLAIM = register(Claim(
    slug=SLUG,
    title="Outliers with Opposing Signals Have an Outsized Effect on Neural Network Optimization",
    arxiv="2311.04163",
    statement="Under full-batch GD, the training points whose loss changes most between steps are the small "
              "groups that share a large opposing feature (top-k |Delta loss| precision >= 0.25, >= 6x the "
              "base rate 0.04), the two groups' losses oscillate in anti-phase (corr of differences <= -0.5), "
              "and sharpness rises to the edge of stability (>= 0.8 x 2/lr) and >= 1.5x higher than without the "
              "feature, in at least 2/3 of the seeds.",
    paper_figure="CIFAR-10, ResNet/VGG by GD/SGD: the examples with the largest loss changes form visually coherent "
                 "groups (sky, grass, colour patches) with opposing label associations; their losses oscillate "
                 "in anti-phase while the rest barely change; progressive sharpening and loss spikes follow "
                 "these dynamics (figures, no single headline number).",
    protocol=OpposingSignalsProtocol,
    data="opposing-signal-gaussians",
    setup=_setup,
    arms={OURS: run_arm, CONTROL: run_arm},
    finish=_finish,
    criterion=SeedsWithSignature(),
    primary=Primary(metric="precision", ours=OURS, baseline=CONTROL, unit="fraction", ceiling=1.0,
                    ceiling_tol=0.005),
    control={OURS: CONTROL},
    control_note="the same points and GD run without the opposing feature (x[20] = 0)",
    uses=(
        "gradkit.probes.opposing_signals.PerExampleLossTracker",
        "gradkit.probes.opposing_signals.per_example_losses",
        "gradkit.probes.opposing_signals.split_opposing",
        "gradkit.probes.opposing_signals.antiphase_score",
        "gradkit.probes.sharpness.SharpnessTracker",
        "gradkit.probes.sharpness.hessian_top_eigenvalue",
        "gradkit.probes.activations.count_spikes",
        "gradkit.data.opposing_signals.opposing_signal_data",
    ),
    notes="The paper's CIFAR-10 networks are out of reach on CPU and there is no official code; the check is the "
          "paper's toy setting (a small label signal plus a large feature present in a few points of both "
          "classes) on procedural data. Square loss, because progressive sharpening and the edge of stability "
          "are cleanest with it (with the logistic loss every point was fitted and sharpness decayed). The "
          "hyperparameters are fixed by the protocol and identical for both arms (nothing is tuned: the "
          "instrument is a measurement and the edge of stability is defined by the fixed lr). Why it can "
          "discriminate: without the feature the planted points are ordinary, so precision sits at the base "
          "rate (~0.04) and sharpness peaks well below 2/lr, so the control fails conditions 1, 3 and 4; the "
          "primary metric is far below its ceiling of 1. Anti-phase alone does not discriminate: L_A and L_B are "
          "groups of opposite classes and, late in training, GD trades the two classes off even without the "
          "feature (control antiphase is often < -0.5), which is why the criterion requires all four "
          "conditions. Reported, not required: precision of the largest-loss top-k (a baseline detector), the "
          "mean |Delta loss| of planted vs other points (swing_ratio), the frequent-outlier pool "
          "(tracker.frequent_outliers(top=k)) split by split_opposing (precision of the pool, class purity of "
          "the split, cosine of the groups' mean gradients, anti-phase of the detected groups), loss spikes "
          "(loss > 1.2 x running minimum). Smoke scale checks the pipeline and records the power iteration's "
          "relative error on quadratics (one with a dominant negative eigenvalue) in info['checks']. The "
          "full scale runs 8000 steps instead of 3000. Measured caveat, the verdict is seed-sensitive: seeds 0-2 "
          "PASS (2/3), seeds 3-5 FAIL (0/3); over seeds 0-8, 3 of 9 met all four conditions. The seeds that miss "
          "the edge of stability mostly level off below it (followed to 8000 steps, three of five stayed at "
          "19-28 against 2/lr = 40), so more steps alone do not rescue them.",
    findings="",
    scale_note=(
        "The verdict depends on the seed (seeds 0-2 pass, 3-5 fail; 3 of seeds 0-8 meet every condition) because "
        "in this short run the sharpness often stops short of the edge of stability 2/lr, where the paper's "
        "opposing-signal oscillations live; longer training or a larger learning rate would settle it."
    ),
    plots=("sharpness_over_eos", "topk_precision", "loss_group_a", "loss_group_b", "train_loss"),
    bounds={"precision": (0.0, 1.0), "precision_largest_loss": (0.0, 1.0), "base_rate": (0.0, 1.0),
            "antiphase": (-1.0, 1.0), "antiphase_detected": (-1.0, 1.0), "pool_precision": (0.0, 1.0),
            "split_purity": (0.5, 1.0), "split_cosine": (-1.0, 1.0), "final_loss": (0.0, math.inf),
            "loss_spikes": (0.0, math.inf), "swing_ratio": (0.0, math.inf)},
))
