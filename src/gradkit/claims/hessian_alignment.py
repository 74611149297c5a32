"""Claim of hessian-alignment: aligning head gradients and Hessians across domains (HGP) beats ERM out of domain.

Protocol (papers/hessian-alignment.md, the official Colored-MNIST script's recipe, no tuning): MLP
``2*H*W -> hidden -> hidden -> 1`` (ReLU, Xavier-uniform weights, zero biases; head = the last
Linear), full-batch Adam lr 4.9e-4, L2 1.1e-3 on all parameters, binary cross-entropy per
environment. The penalty weight is 1 before step 190 and 91257.19 afterwards, the total loss then
divided by it (:func:`~gradkit.nn.hessian_alignment.penalty_anneal`); inside the penalty
``alpha = beta = 1``, the pooled terms are not detached and the domain terms are summed, as in the
script. Arms (each from the same seed and data): ``erm`` (no penalty), ``hgp`` (Hessian-gradient
products); at full scale also ``hutchinson`` (Hessian diagonals, K = 300 probes) and ``vrex``
(``(R_1 - R_2)^2``, the script's V-REx penalty). Metrics: train accuracy (mean over the two training
environments), test accuracy (colour flipped in 90% of the test images), and, reported but not
judged, the spectral norm of the difference of head Hessians between the pooled training loss and
the test loss (the paper's bound on the transfer measure).

- Bundled: coloured scikit-learn digits (``gradkit.data.domains.colored_digits``): random halves of
  the 1,437 training images (e = 0.1, 0.2), the 360 held-out images at e = 0.9; hidden 128, 400 steps
  (full: 501 steps and the four arms).
- ``--data-root`` (MNIST): Colored MNIST 14x14 (2x max-pooled), 1,000 images per training
  environment and 5,000 test images at quick scale, hidden 128, 400 steps; full: 25,000 per
  environment, the 10,000 held-out images, hidden 390, 501 steps.
- Smoke: 60 steps with the anneal at step 30 (digits 8x8 or MNIST 300 per environment).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.domains import DGSplit, colored_digits
from ..engine import accuracy, cpu_threads, fit, seed_everything
from ..nn.hessian_alignment import HessianAlignment, head_hessian, penalty_anneal, risk_variance
from .base import Claim, Primary, RunContext, RunOutput, register
from .criteria import AllOf, Gain

SLUG = "hessian-alignment"
LR, L2 = 4.898536566546834e-4, 1.10794568e-3
PENALTY_WEIGHT = 91257.18613115903
STEPS_PER_EPOCH = 10  # full-batch steps per logged "epoch" of the engine
PROBE_SEED_OFFSET = 7919  # Hutchinson probes: generator seed = seed + offset


class ColoredMLP(nn.Module):
    """IRM's Colored-MNIST MLP: ``features`` = Linear-ReLU-Linear-ReLU, ``head`` = Linear(hidden, 1)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        lin1, lin2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        for lin in (lin1, lin2, self.head):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.features = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(), lin2, nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(-1)  # one logit per sample


class _TwoLogits(nn.Module):
    """``[0, logit]`` so that ``argmax`` (``engine.accuracy``) predicts ``logit > 0``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x).unsqueeze(-1)
        return torch.cat([torch.zeros_like(z), z], dim=-1)


def _bce(logits: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))


def _penalty_fn(arm: str, model: ColoredMLP, ctx: RunContext, n_samples: int):
    """``f(domain_losses) -> penalty`` for an arm (None for ERM)."""
    if arm == "erm":
        return None
    if arm == "vrex":
        return lambda losses: 4.0 * risk_variance(losses)  # = (R_1 - R_2)^2, the script's form
    gen = torch.Generator().manual_seed(ctx.seed + PROBE_SEED_OFFSET)
    reg = HessianAlignment(model.head.parameters(), alpha=1.0, beta=1.0, method=arm,
                           n_samples=n_samples, detach_mean=False, reduction="sum", generator=gen,
                           check_finite=False)
    return lambda losses: reg(losses)[0]


@torch.no_grad()
def _features(model: ColoredMLP, x: Tensor) -> Tensor:
    return model.features(x)


def _hessian_gaps(model: ColoredMLP, split: DGSplit) -> dict[str, float]:
    """Spectral norms of head-Hessian differences (features fixed): pooled train vs test, env 1 vs env 2."""
    model.eval()
    params = list(model.head.parameters())

    def hess(x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            return head_hessian(_bce(model.head(_features(model, x)).squeeze(-1), y), params)

    h_envs = [hess(x, y) for x, y in split.train]
    h_train = torch.stack(h_envs).mean(0)
    h_test = hess(*split.test)
    model.train()
    return {"hessian_gap": float(torch.linalg.matrix_norm(h_train - h_test, ord=2)),
            "hessian_gap_train": float(torch.linalg.matrix_norm(h_envs[0] - h_envs[1], ord=2))}


def _run_arm(ctx: RunContext, split: DGSplit, arm: str, *, steps: int, anneal: int, hidden: int,
             n_samples: int) -> tuple[dict[str, float], dict[str, list[float]], float]:
    t0 = time.perf_counter()
    seed_everything(ctx.seed)
    model = ColoredMLP(split.num_features, hidden).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    penalty_fn = _penalty_fn(arm, model, ctx, n_samples)
    state = {"step": 0}
    pens: list[Tensor] = []
    epochs = steps // STEPS_PER_EPOCH

    def on_step_start(step: int) -> None:
        state["step"] = step

    def compute_loss(m: ColoredMLP, envs) -> Tensor:
        losses = [_bce(m(x), y) for x, y in envs]  # one forward per environment
        loss = torch.stack(losses).mean() + L2 * sum(p.pow(2).sum() for p in m.parameters())
        if penalty_fn is None:
            return loss
        pen = penalty_fn(losses)
        pens.append(pen.detach())
        w, s = penalty_anneal(state["step"], anneal, PENALTY_WEIGHT)
        return s * (loss + w * pen)

    clf = _TwoLogits(model)
    x_test, y_test = split.test

    def evaluate(m: nn.Module) -> dict[str, float]:
        out = {"train_acc": sum(accuracy(clf, x, y) for x, y in split.train) / len(split.train),
               "test_acc": accuracy(clf, x_test, y_test)}
        if pens:
            out["penalty"] = float(torch.stack(pens).mean())
            pens.clear()
        return out

    hist = fit(model, opt, lambda epoch: [split.train] * STEPS_PER_EPOCH, epochs=epochs,
               compute_loss=compute_loss, on_step_start=on_step_start, evaluate=evaluate,
               progress=ctx.progress, desc=f"{SLUG}/{arm}")
    nan = float("nan")
    diverged = any(v != v for v in hist.series("train_loss"))
    metrics = {"train_acc": nan if diverged else hist.last("train_acc"),
               "test_acc": nan if diverged else hist.last("test_acc"),
               "diverged": float(diverged)}
    if not diverged:
        metrics.update(_hessian_gaps(model, split))
    curves = {"test_acc": hist.series("test_acc"), "train_acc": hist.series("train_acc")}
    if penalty_fn is not None:
        pen_curve = hist.series("penalty")
        curves["penalty"] = pen_curve
        before = anneal // STEPS_PER_EPOCH - 1  # the last logged epoch entirely before the anneal
        metrics["penalty_before_anneal"] = pen_curve[before] if 0 <= before < len(pen_curve) else nan
        metrics["penalty_final"] = pen_curve[-1] if pen_curve and not diverged else nan
    return metrics, curves, time.perf_counter() - t0


def _load(ctx: RunContext) -> DGSplit:
    if ctx.data_root is None:
        return colored_digits(ctx.seed)
    from ..data.domains import colored_mnist  # the real-data branch (MNIST IDX files under the root)

    n_env = ctx.pick(smoke=300, quick=1000, full=None)
    n_test = ctx.pick(smoke=1000, quick=5000, full=None)
    return colored_mnist(ctx.data_root, ctx.seed, n_per_env=n_env, n_test=n_test)


def run(ctx: RunContext) -> RunOutput:
    """Train ERM and HGP (plus Hutchinson and V-REx at full scale) for one seed."""
    # a 128-wide MLP on ~2,000 images gains nothing from intra-op threads on a shared machine
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    split = _load(ctx).to(ctx.device)
    steps = ctx.pick(smoke=60, quick=400, full=501)
    anneal = ctx.pick(smoke=30, quick=190, full=190)
    hidden = 390 if ctx.scale == "full" and ctx.data_root is not None else 128
    n_samples = 300
    arms = ("erm", "hgp") if ctx.scale != "full" else ("erm", "hgp", "hutchinson", "vrex")
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {"test_acc": {}, "train_acc": {}, "penalty": {}}
    seconds: dict[str, float] = {}
    for arm in arms:
        m, c, secs = _run_arm(ctx, split, arm, steps=steps, anneal=anneal, hidden=hidden,
                              n_samples=n_samples)
        metrics[arm] = m
        seconds[arm] = round(secs, 2)
        for k, v in c.items():
            curves[k][arm] = v
    info = {
        "data": split.name, "n_per_env": [len(y) for _, y in split.train], "n_test": len(split.test[1]),
        "env_noise": list(split.env_noise), "test_noise": split.test_noise,
        "label_noise": split.label_noise, "inputs": split.num_features, "hidden": hidden,
        "steps": steps, "anneal_step": anneal, "penalty_weight": PENALTY_WEIGHT, "lr": LR, "l2": L2,
        "steps_per_logged_epoch": STEPS_PER_EPOCH, "arms": list(arms),
        "hutchinson_probes": n_samples if "hutchinson" in arms else None, "seconds": seconds,
        "penalty": "alpha = beta = 1, pooled terms not detached, summed over the 2 environments",
    }
    return RunOutput(metrics=metrics, data=split.name, curves=curves, info=info)


CLAIM = register(Claim(
    slug=SLUG,
    title="Understanding Hessian Alignment for Domain Generalization",
    arxiv="2308.11778",
    statement=("Penalising the differences between training domains' classifier-head gradients and "
               "Hessian-gradient products (HGP) stops an MLP from following a spurious colour feature "
               "on Colored-MNIST-style data: higher out-of-domain test accuracy than ERM with the "
               "same network, data and optimiser."),
    paper_figure=("Colored MNIST (Fishr/IRM protocol, 25,000 images per environment): HGP and "
                  "Hutchinson ~70% test accuracy, on par with or above IRM / V-REx / Fishr, vs ERM "
                  "~28% (exact table values unconfirmed). Spec prototype at 1,000 images per "
                  "environment, hidden 128: ERM train 98.8% / test 27.2%, HGP 64.6% / 44.5% and "
                  "81.2% / 34.3%."),
    criterion=Gain(metric="test_acc", ours="hgp", baseline="erm", at_least=5.0),
    data_criteria={
        "colored-mnist": AllOf(
            Gain(metric="test_acc", ours="hgp", baseline="erm", at_least=7.0),
            Gain(metric="train_acc", ours="erm", baseline="hgp", at_least=10.0),
        ),
    },
    primary=Primary(metric="test_acc", ours="hgp", baseline="erm", unit="%"),
    run=run,
    uses=("gradkit.nn.hessian_alignment.HessianAlignment",
          "gradkit.nn.hessian_alignment.hessian_gradient_product",
          "gradkit.nn.hessian_alignment.hutchinson_diag",
          "gradkit.nn.hessian_alignment.head_hessian",
          "gradkit.nn.hessian_alignment.penalty_anneal",
          "gradkit.nn.hessian_alignment.risk_variance",
          "gradkit.data.domains.colored_digits", "gradkit.data.domains.colored_mnist"),
    real_data=("mnist/: Colored MNIST (14x14, 2x196 inputs), 1,000 images per training environment and "
               "5,000 test images at quick scale; the paper's 25,000 per environment, hidden 390, "
               "501 steps and Hutchinson (K = 300) and V-REx arms at full scale"),
    notes=("The margins are set from the spec's prototype (+7 to +17 test points per seed on MNIST at "
           "1,000 images per environment), not from the paper's ~+40 points at 25,000 per environment: "
           "with ~1,000 images per environment the MLP can memorise, so test accuracies stay far below "
           "~70%. The digits margin (+5) is unconfirmed at that size. Test images come from MNIST's "
           "last 10,000 training images (the IRM/Fishr scripts' split), training environments from the "
           "first 50,000. L2 covers all parameters as in the script. Hutchinson probes are shared by "
           "both environments and the pooled loss (gradkit's default; the script draws fresh ones). "
           "hessian_gap = ||H_train - H_test||_2 of the head Hessians (features fixed) at the end, "
           "reported, not judged. Curves are logged every 10 full-batch steps."),
    plots=("test_acc", "train_acc", "penalty"),
))
