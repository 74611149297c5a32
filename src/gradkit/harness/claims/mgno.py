"""MgNO claim: a multigrid V-cycle parameterisation learns the Darcy solution operator better than a plain CNN
of the same depth (paper slug: mgno).

Data (generated in code; these reference solutions are the data of the claim): ``-div(a grad u) = 1`` on the
unit square, zero Dirichlet data, ``a`` a thresholded Gaussian random field (12 / 3), solved with the
conservative 5-point finite-difference stencil (:mod:`gradkit.data.darcy`), one fixed data set per scale
(seed-independent). Inputs and outputs are normalised with one training mean/std each and the models are
trained on the decoded output with the relative L2 loss.

Arms, each trained for the same number of Adam steps (OneCycle schedule, weight decay 1e-4, batch 8), each
with its learning rate chosen from the same grid on a held-out fifth of the training set:
- ``mgno``: MgNO, ``n_layers`` layers of GELU(V-cycle + 1x1 conv), ``levels`` per V-cycle;
- ``cnn``: the same network with a one-level V-cycle, i.e. one 3x3 convolution per layer (receptive field
  2 * n_layers + 1 px), widened to MgNO's parameter count;
- ``fno``: a Fourier neural operator (lifting, ``n_layers`` spectral layers with ``fno_modes`` modes, projection),
  widened to MgNO's parameter count;
- ``mgno_no_coarse`` (the negative control): MgNO whose V-cycles silently drop every coarse level.
Metrics: relative L2 / H1 test error, the training error and the train/test gap, per arm.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...data import Split, TensorBatches
from ...data.darcy import darcy_split
from ...engine import fit
from ...nn.fno import FNO2d
from ...solvers.mgno import MgNO
from ...solvers.operator_losses import relative_h1_loss, relative_lp_loss
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, Ratio
from .tuning import holdout, tune

SLUG = "mgno"
ARMS = ("mgno", "cnn", "fno", "mgno_no_coarse")
N_SHOW = 4  # test problems drawn in the report


@dataclass(frozen=True)
class MgNOProtocol(Protocol):
    size: int = scaled(smoke=16, quick=32, full=64)  # interior grid points per axis
    n_train: int = scaled(smoke=64, quick=1000, full=1000)
    n_test: int = scaled(smoke=32, quick=200, full=200)
    steps: int = scaled(smoke=30, quick=160, full=20_000)  # Adam steps of the final run of every arm
    tune_steps: int = scaled(smoke=10, quick=40, full=2_000)  # Adam steps of every tuning trial
    lr_grid: tuple[float, ...] = scaled(smoke=(2e-3,), quick=(1e-3, 3e-3), full=(5e-4, 1e-3, 3e-3))
    batch_size: int = 8
    weight_decay: float = 1e-4
    width: int = scaled(smoke=8, quick=12, full=16)  # MgNO channels; the baselines are widened to its size
    n_layers: int = 3
    levels: tuple[tuple[int, int], ...] = ((1, 0), (1, 0), (1, 0), (2, 0))
    fno_modes: int = scaled(smoke=4, quick=8, full=12)
    fno_padding: int = scaled(smoke=4, quick=8, full=9)  # zero cells appended (non-periodic problem)
    val_fraction: float = 0.2
    evals: int = scaled(smoke=2, quick=4, full=20)  # test-error points on the curve
    data_seed: int = 0


# ------------------------------------------------------------------------------------------ baselines
class GridFNO2d(nn.Module):
    """The FNO-2D baseline on Darcy: the coefficient field with its (x, y) coordinates appended as input
    channels (:class:`gradkit.nn.fno.FNO2d`, zero-padded by ``padding`` cells)."""

    def __init__(self, width: int, modes: int, n_layers: int = 3, padding: int = 8) -> None:
        super().__init__()
        self.fno = FNO2d(3, 1, width, modes, n_layers, padding)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        b, _, h, w = a.shape
        gx = torch.linspace(0, 1, h, device=a.device, dtype=a.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        gy = torch.linspace(0, 1, w, device=a.device, dtype=a.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.fno(torch.cat([a, gx, gy], 1))


class Normalised(nn.Module):
    """``model`` on the normalised input ``(a - a_mean) / a_std``, its output decoded as ``out * u_std + u_mean``."""

    def __init__(self, model: nn.Module, stats: tuple[float, float, float, float]) -> None:
        super().__init__()
        self.model = model
        self.a_mean, self.a_std, self.u_mean, self.u_std = stats

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.model((a - self.a_mean) / self.a_std) * self.u_std + self.u_mean


def n_params(model: nn.Module) -> int:
    """Real parameters (a complex weight counts twice)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters())


def matched_width(build, target: int, lo: int = 2, hi: int = 256) -> int:
    """The width whose ``build(width)`` has the parameter count closest to ``target`` (counts grow with width)."""
    a, b = lo, hi
    while a < b:  # the smallest width with at least ``target`` parameters
        mid = (a + b) // 2
        if n_params(build(mid)) >= target:
            b = mid
        else:
            a = mid + 1
    return min({max(lo, a - 1), a}, key=lambda w: abs(math.log(n_params(build(w)) / target)))


def build_model(arm: str, p: MgNOProtocol) -> nn.Module:
    """The arm's network (not yet normalised)."""
    def mgno(width: int, levels) -> MgNO:
        return MgNO(in_channels=1, out_channels=1, width=width, n_layers=p.n_layers, levels=levels)

    target = n_params(mgno(p.width, p.levels))
    if arm == "mgno":
        return mgno(p.width, p.levels)
    if arm == "mgno_no_coarse":
        return mgno(p.width, p.levels[:1])
    if arm == "cnn":  # a one-level V-cycle is one 3x3 convolution: the plain CNN of the same depth
        return mgno(matched_width(lambda w: mgno(w, ((1, 0),)), target), ((1, 0),))
    if arm == "fno":
        def fno(w: int) -> GridFNO2d:
            return GridFNO2d(w, p.fno_modes, p.n_layers, p.fno_padding)
        return fno(matched_width(fno, target, hi=64))
    raise ValueError(f"unknown arm {arm!r}")


# ------------------------------------------------------------------------------------------ training
@torch.no_grad()
def rel_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> tuple[float, float]:
    """Mean relative L2 and H1 errors of ``model`` over a data set (eval mode)."""
    model.eval()
    l2 = h1 = 0.0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        l2 += float(relative_lp_loss(out, y[i:i + batch], reduction="sum"))
        h1 += float(relative_h1_loss(out, y[i:i + batch], reduction="sum"))
    model.train()
    return l2 / len(x), h1 / len(x)


def _stats(split: Split) -> tuple[float, float, float, float]:
    x, y = split.x_train, split.y_train
    return float(x.mean()), float(x.std()), float(y.mean()), float(y.std())


def _train(ctx: ArmContext, split: Split, lr: float, steps: int, evals: int, seed_offset: int = 0):
    """Train the arm's model for ``steps`` Adam steps on ``split``'s training set; evaluate ``evals`` times
    on its test set. Returns (model, history)."""
    p = ctx.p
    torch.manual_seed(ctx.seed * 1000 + seed_offset)
    model = Normalised(build_model(ctx.arm, p), _stats(split)).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, div_factor=2.0,
                                                final_div_factor=100.0)
    gen = torch.Generator().manual_seed(ctx.seed * 1000 + seed_offset)
    stream = itertools.chain.from_iterable(
        TensorBatches(split.x_train, split.y_train, batch_size=p.batch_size, generator=gen, drop_last=True)
        for _ in itertools.count())
    chunks = max(1, evals)
    per = [steps // chunks + (1 if i < steps % chunks else 0) for i in range(chunks)]

    def evaluate(m: nn.Module) -> dict[str, float]:
        l2, h1 = rel_errors(m, split.x_test, split.y_test)
        return {"test_rel_l2": l2, "test_rel_h1": h1}

    hist = fit(model, opt, lambda e: itertools.islice(stream, per[e]), epochs=chunks,
               compute_loss=lambda m, b: relative_lp_loss(m(b[0]), b[1]), evaluate=evaluate,
               scheduler=sched, scheduler_every="step", progress=ctx.progress, desc=f"{SLUG}/{ctx.arm}")
    return model, hist


def _arm(ctx: ArmContext) -> ArmResult:
    p, split = ctx.p, ctx.data
    fit_split, val_split = holdout(split, fraction=p.val_fraction, seed=ctx.seed)

    def trial(lr: float) -> float:
        return _train(ctx, val_split, lr, p.tune_steps, 1, seed_offset=1)[1].last("test_rel_l2")

    tuned = tune(p.lr_grid, trial, mode="min")
    model, hist = _train(ctx, split, tuned.value, p.steps, p.evals)
    n_fit = min(len(split.x_train), len(split.x_test))
    train_l2, _ = rel_errors(model, split.x_train[:n_fit], split.y_train[:n_fit])
    test_l2, test_h1 = hist.last("test_rel_l2"), hist.last("test_rel_h1")
    with torch.no_grad():
        model.eval()
        ctx.shared.setdefault("pred", {})[ctx.arm] = model(split.x_test[:N_SHOW]).cpu().numpy()
    metrics = {"test_rel_l2": test_l2, "test_rel_h1": test_h1, "train_rel_l2": train_l2,
               "gap": test_l2 - train_l2, "params": float(n_params(model)), "lr": float(tuned.value)}
    return ArmResult(metrics, curves={"test_rel_l2": hist.series("test_rel_l2"),
                                      "train_loss": hist.series("train_loss")},
                     info={"tuned": tuned.as_info(), "val_fit_examples": len(fit_split.x_train)})


def _setup(ctx: ArmContext) -> Split:
    p = ctx.p
    return darcy_split(p.n_train, p.n_test, p.size, seed=p.data_seed).to(ctx.device)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p, split = ctx.p, ctx.data
    a = split.x_test[:N_SHOW, 0].cpu().numpy()
    u = split.y_test[:N_SHOW, 0].cpu().numpy()
    scale = u.max(axis=(1, 2), keepdims=True)
    rows = {"coefficient a": (a - 3.0) / 9.0, "exact u": u / scale}
    preds = ctx.shared.get("pred", {})
    for arm in ARMS:
        if arm in preds:
            rows[arm] = preds[arm][:, 0] / scale
    if "mgno" in preds:
        rows["|mgno - exact| x10"] = 10 * np.abs(preds["mgno"][:, 0] - u) / scale
    per = [p.steps // p.evals + (1 if i < p.steps % p.evals else 0) for i in range(p.evals)]
    out.info.update({
        "images": {"darcy-test-problems": {k: v.tolist() for k, v in rows.items()}},
        "curve_axes": {"test_rel_l2": {"xlabel": "Adam step", "x": list(itertools.accumulate(per)),
                                       "ylabel": "relative L2 test error", "log": True},
                       "train_loss": {"xlabel": "Adam step", "x": list(itertools.accumulate(per)),
                                      "ylabel": "relative L2 training loss", "log": True}},
        "n_train": len(split.x_train), "n_test": len(split.x_test), "grid": p.size,
        "mgno_vs_fno_ratio": out.metrics["mgno"]["test_rel_l2"] / out.metrics["fno"]["test_rel_l2"],
    })


CLAIM = register(Claim(
    slug=SLUG,
    title="MgNO: Efficient Parameterization of Linear Operators via Multigrid",
    arxiv="2310.19809",
    statement=(
        "On Darcy flow (-div(a grad u) = 1, thresholded Gaussian-random-field a, 32x32 grid), MgNO's relative L2 "
        "test error is at most 0.8x that of a plain CNN of the same depth and parameter count, with equal "
        "learning-rate tuning and step budgets; the FNO comparison and train/test gaps are reported beside it"
    ),
    paper_figure=(
        "Darcy (smooth, rough, multiscale), Helmholtz, pipe and Navier-Stokes benchmarks: MgNO has the lowest "
        "relative L2/H1 errors among FNO, UNO, MWT, U-Net, dilated ResNet and LSM with ~0.5-0.6M parameters, "
        "trains more easily than CNN baselines and overfits less than spectral operators (Tables 1-3)"
    ),
    protocol=MgNOProtocol,
    data="darcy2d",
    setup=_setup,
    arms={arm: _arm for arm in ARMS},
    finish=_finish,
    criterion=AllOf(Ratio("test_rel_l2", "mgno", "cnn", at_most=0.8), AllFinite()),
    primary=Primary("test_rel_l2", "mgno", "cnn", ceiling=0.0, ceiling_tol=1e-3),
    control={"mgno": "mgno_no_coarse"},
    control_note="MgNO whose V-cycles silently drop their coarse levels stands in for MgNO",
    uses=("gradkit.nn.multigrid.MultigridConv2d", "gradkit.solvers.mgno.MgNO",
          "gradkit.solvers.operator_losses.relative_lp_loss", "gradkit.solvers.operator_losses.relative_h1_loss",
          "gradkit.data.darcy.darcy_split"),
    notes=(
        "Why the task can discriminate: the Darcy solution at a point depends on the coefficient everywhere, "
        "while the plain CNN sees 2*n_layers+1 pixels (7 px for 3 layers on 32x32), so the CNN stays well above "
        "the metric's floor of 0; the control (the V-cycle without its coarse levels, a local 3x3 net at MgNO's "
        "width) has the same receptive field and must fail the 0.8x criterion. The paper trains 500 epochs with "
        "the H1 loss; here every arm gets the same few hundred Adam steps with the relative L2 loss (the paper "
        "reports L2), so the absolute errors are far above the paper's and the FNO comparison (the paper's MgNO "
        "<= FNO) is reported (info['mgno_vs_fno_ratio'], the gap metric), not gated. Learning rates: every arm "
        "picks from the same grid by a short trial scored on a held-out fifth of the training set; the final "
        "run trains on the whole training set. Baselines are widened to MgNO's parameter count (metric 'params')."
    ),
    plots=("test_rel_l2", "train_loss"),
    bounds={"test_rel_l2": (0.0, float("inf")), "test_rel_h1": (0.0, float("inf")),
            "train_rel_l2": (0.0, float("inf")), "gap": (-float("inf"), float("inf")),
            "params": (1.0, float("inf")), "lr": (0.0, 1.0)},
))
