"""convex-relu claim: ADMM on the convex reformulation reaches the global optimum of a two-layer ReLU network.

Bai, Gautam, Sojoudi, "Efficient Global Optimization of Two-layer ReLU Networks: Quadratic-time Algorithms and
Adversarial Training", SIAM J. Math. Data Science 2023 (arXiv 2201.01965). Two experiments in one run, both
with the squared loss and weight decay ``beta`` (the non-convex objective of :func:`nonconvex_objective`):

1. The exact instance: ``n`` points ``X ~ N(0, I_2)`` (no bias, so the patterns are exact), ``y = sign(x_1 x_2)``,
   every activation pattern enumerated (:func:`enumerate_patterns_2d`). ADMM to ``tol``; the reference is a
   20x longer ADMM run whose residuals are reported (``exact_ref_kkt``). The recovered network's non-convex
   objective must equal ADMM's, and no full-batch Adam restart of the network with ``m*`` neurons (``m*`` the
   nonzero blocks at the optimum) may beat it.
2. Breast cancer (scikit-learn, standardised, bias column, fixed stratified 70/30 split; with ``--data-root``:
   MNIST 3 vs 5, PCA to 30 dims): the sampled program with ``P_s`` patterns (``h ~ N(0, I)``, drawn by the seed)
   solved by ADMM against the same architecture trained by full-batch Adam from several inits, at the width of
   the ADMM solution (``adam``, the baseline) and at ``2 P_s`` (``adam_wide``, reported only).

Arms: ``admm`` (ours), ``adam`` (the baseline: same width; it also runs the exact instance's restarts),
``adam_wide``. Every arm tunes its one hyperparameter (ADMM: rho; Adam: the learning rate) on a grid of the
same size, each trial a shortened run (``trial_fraction``) on the fit part of a validation holdout, scored by
the validation mean squared error; ``adam_wide`` reuses the ``adam`` arm's learning rate.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...data import Split, standardise
from ...solvers.convex_relu import ConvexReLUProblem, admm_convex_relu, nonconvex_objective, sign_accuracy
from ...solvers.relu_patterns import enumerate_patterns_2d, sample_patterns
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, Compare, Drop
from .tuning import holdout, tune

SLUG = "convex-relu"
OURS, BASELINE, WIDE = "admm", "adam", "adam_wide"
EXACT_SEED_OFFSET = 7_919  # the exact instance's data generator: seed + offset
ACC_CURVE = 100  # test accuracy is recorded at every iteration / step up to this one


@dataclass(frozen=True)
class ConvexReluProtocol(Protocol):
    """Both experiments; sizes per scale, the same grid size and trial budget for every arm."""

    # the exact instance
    exact_n: int = 10
    exact_beta: float = 1e-2
    exact_rho: float = 0.01
    exact_alpha: float = 1.8  # over-relaxation of the exact instance's ADMM (the classification task: plain, 1)
    exact_iters: int = scaled(smoke=200, quick=20000)  # ADMM budget (stops at exact_tol)
    exact_tol: float = 1e-9
    exact_ref_factor: int = 20  # the reference run: this many times exact_iters, to exact_ref_tol
    exact_ref_tol: float = 1e-10
    exact_restarts: int = scaled(smoke=3, quick=20)  # Adam inits of the m*-neuron network
    exact_adam_steps: int = scaled(smoke=500, quick=5000)
    exact_adam_lr: float = 1e-2
    # the classification task
    test_fraction: float = 0.3
    beta_per_example: float = 1e-3  # beta = beta_per_example * n_train (sum-of-squares loss)
    patterns: int = scaled(smoke=4, quick=50, full=200)  # P_s sampled directions
    admm_iters: int = scaled(smoke=20, quick=300, full=1000)
    rho_grid: tuple[float, ...] = (0.1, 1.0, 10.0)
    adam_steps: int = scaled(smoke=60, quick=3000)
    adam_inits: int = scaled(smoke=2, quick=5)
    lr_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    trial_fraction: float = 1 / 3  # a tuning trial runs this fraction of the iterations / steps, one Adam init
    val_fraction: float = 0.2
    acc_fraction: float = 0.99  # iters_to_99: first iteration at this fraction of the final test accuracy
    # MNIST 3 vs 5 (--data-root)
    mnist_classes: tuple[int, int] = (3, 5)
    mnist_train: int = 2000
    mnist_test: int = 1000
    pca_dims: int = 30


# ------------------------------------------------------------------------------------------ data
def _with_bias(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.hstack([x, np.ones((len(x), 1))]), dtype=torch.float64)


def breast_cancer_split(test_fraction: float = 0.3) -> Split:
    """scikit-learn breast cancer: standardised, a ones column (d = 31), labels in {-1, +1}, fixed stratified split."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(data.data, data.target, test_size=test_fraction, stratify=data.target,
                                          random_state=0)
    xtr, xte = standardise(xtr, xte)
    pm = lambda t: torch.tensor(2.0 * t - 1.0, dtype=torch.float64)  # noqa: E731
    return Split(_with_bias(xtr), pm(ytr), _with_bias(xte), pm(yte), "breast_cancer")


def mnist_pair_split(root, classes=(3, 5), n_train=2000, n_test=1000, dims=30) -> Split:
    """MNIST two-class subset (first images of each split), PCA on the training subset, standardised, bias column."""
    from ...data.readers import load_mnist

    def pick(split: str, n: int):
        x, y = load_mnist(root, split)
        keep = np.flatnonzero((y == classes[0]) | (y == classes[1]))[:n]
        return x[keep].reshape(len(keep), -1).astype(np.float64) / 255.0, np.where(y[keep] == classes[0], 1.0, -1.0)

    xtr, ytr = pick("train", n_train)
    xte, yte = pick("test", n_test)
    mu = xtr.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(xtr - mu, full_matrices=False)
    comp = vt[:dims].T
    xtr, xte = standardise((xtr - mu) @ comp, (xte - mu) @ comp)
    return Split(_with_bias(xtr), torch.tensor(ytr), _with_bias(xte), torch.tensor(yte), "mnist-3v5")


def exact_instance(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``X ~ N(0, I_2)`` (n x 2), ``y = sign(x_1 x_2)``: an XOR-like target no linear model fits."""
    gen = torch.Generator().manual_seed(seed + EXACT_SEED_OFFSET)
    X = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return X, torch.where(X[:, 0] * X[:, 1] >= 0, 1.0, -1.0).to(torch.float64)


# ------------------------------------------------------------------------------------------ the Adam baseline
def init_nets(K: int, width: int, d: int, gen: torch.Generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K independent two-layer nets (nn.Linear's default uniform init), stacked: W (K, d, m), a (K, m, 1)."""
    W = (torch.rand(K, d, width, generator=gen, dtype=dtype) * 2 - 1) / math.sqrt(d)
    a = (torch.rand(K, width, 1, generator=gen, dtype=dtype) * 2 - 1) / math.sqrt(width)
    return W.requires_grad_(), a.requires_grad_()


def _forward(X: torch.Tensor, W: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.bmm(torch.relu(torch.matmul(X, W)), a)[..., 0]  # (K, n)


def _as_network(W: torch.Tensor, a: torch.Tensor) -> nn.Sequential:
    """One of the stacked nets as ``Linear(d, m, bias=False) -> ReLU -> Linear(m, 1, bias=False)`` in float64."""
    d, m = W.shape
    net = nn.Sequential(nn.Linear(d, m, bias=False), nn.ReLU(), nn.Linear(m, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(W.T)
        net[2].weight.copy_(a.T)
    return net


def train_adam(X, y, width: int, inits: int, lr: float, steps: int, beta: float, gen: torch.Generator, *,
               dtype=torch.float64, X_test=None, y_test=None, progress=None) -> dict:
    """``inits`` independent nets trained at once by full-batch Adam on the weight-decayed squared loss.

    Adam acts elementwise and the summed objectives share no parameter, so this is ``inits`` separate runs.
    Returns the float64 objectives, the nets, and (with test data) test accuracies at every step up to
    ``ACC_CURVE`` and every 50 steps after, and at the end.
    """
    Xd, yd = X.to(dtype), y.to(dtype)
    W, a = init_nets(inits, width, X.shape[1], gen, dtype)
    opt = torch.optim.Adam([W, a], lr=lr)
    track = X_test is not None
    steps_seen, accs = [], []

    def record(step: int) -> None:
        with torch.no_grad():
            out = _forward(X_test.to(dtype), W, a)
        steps_seen.append(step)
        accs.append([sign_accuracy(o, y_test) for o in out])

    for step in range(1, steps + 1):
        obj = 0.5 * (_forward(Xd, W, a) - yd).pow(2).sum(1) + 0.5 * beta * (W.pow(2).sum((1, 2)) + a.pow(2).sum((1, 2)))
        opt.zero_grad(set_to_none=True)
        obj.sum().backward()
        opt.step()
        if track and (step <= ACC_CURVE or step % 50 == 0 or step == steps):
            record(step)
        if progress is not None:
            progress.update(1)
    nets = [_as_network(W[k].detach().double(), a[k].detach().double()) for k in range(inits)]
    with torch.no_grad():
        objs = [float(nonconvex_objective(net, X, y, beta)) for net in nets]
    return {"objectives": objs, "nets": nets, "steps": steps_seen, "accs": accs}


def first_reaching(values: list[float], at: list[int], fraction: float) -> float:
    """The first ``at[i]`` with ``values[i] >= fraction * values[-1]`` (the final value)."""
    target = fraction * values[-1]
    return float(next(s for v, s in zip(values, at) if v >= target - 1e-12))


def _val_mse(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.reshape(-1).double() - y.double()).pow(2).mean())


# ------------------------------------------------------------------------------------------ setup
def _exact_reference(p: ConvexReluProtocol, seed: int) -> dict:
    X, y = exact_instance(p.exact_n, seed)
    prob = ConvexReLUProblem(X, y, enumerate_patterns_2d(X), p.exact_beta)
    v, w, hist = admm_convex_relu(prob, rho=p.exact_rho, max_iter=p.exact_ref_factor * p.exact_iters,
                                  tol=p.exact_ref_tol, record_objective=False, alpha=p.exact_alpha)
    norms = torch.cat([v, w]).norm(dim=1)
    m_star = int((norms > 1e-6 * float(norms.max())).sum())
    kkt = max(hist.primal_u[-1], hist.primal_s[-1], hist.dual[-1])
    return {"X": X, "y": y, "problem": prob, "f_ref": prob.objective(v, w), "m_star": m_star, "ref_kkt": kkt,
            "ref_iters": hist.iterations}


def _setup_with(split_fn):
    def setup(ctx: ArmContext) -> dict:
        return {"exact": _exact_reference(ctx.p, ctx.seed), "split": split_fn(ctx)}

    return setup


def _bundled_split(ctx: ArmContext) -> Split:
    return breast_cancer_split(ctx.p.test_fraction)


def _mnist(ctx: ArmContext) -> Split:
    p = ctx.p
    return mnist_pair_split(ctx.data_root, p.mnist_classes, p.mnist_train, p.mnist_test, p.pca_dims)


# ------------------------------------------------------------------------------------------ arms
def _patterns(X: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The seed's sampled directions applied to X (the same directions for a trial's fit split and the final run)."""
    return sample_patterns(X, count, generator=torch.Generator().manual_seed(seed))


def _scaled(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def _admm_arm(ctx: ArmContext) -> ArmResult:
    p, ex, split = ctx.p, ctx.data["exact"], ctx.data["split"]
    metrics, curves = {}, {}
    # 1. the exact instance
    prob = ex["problem"]
    v, w, hist = admm_convex_relu(prob, rho=p.exact_rho, max_iter=p.exact_iters, tol=p.exact_tol,
                                  alpha=p.exact_alpha)
    f = prob.objective(v, w)
    with torch.no_grad():
        f_net = float(nonconvex_objective(prob.to_network(v, w), ex["X"], ex["y"], p.exact_beta))
    metrics.update(exact_objective=f, exact_gap=abs(f - ex["f_ref"]) / ex["f_ref"],
                   exact_recovery=abs(f_net - f) / f, exact_iters=float(hist.iterations),
                   exact_kkt=max(hist.primal_u[-1], hist.primal_s[-1], hist.dual[-1]),
                   exact_ref_kkt=ex["ref_kkt"], exact_patterns=float(prob.num_patterns),
                   exact_width=float(ex["m_star"]))
    stride = max(1, len(hist.objective) // 200)
    curves["exact_gap"] = [max(abs(o - ex["f_ref"]) / ex["f_ref"], 1e-16) for o in hist.objective[::stride]]
    ctx.shared["exact_f_admm"] = f
    # 2. the classification task
    beta = p.beta_per_example * split.x_train.shape[0]
    fit, val = holdout(split, p.val_fraction, seed=ctx.seed)

    def trial(rho: float) -> float:
        tp = ConvexReLUProblem(fit.x_train, fit.y_train, _patterns(fit.x_train, p.patterns, ctx.seed), beta)
        tv, tw, _ = admm_convex_relu(tp, rho=rho, max_iter=_scaled(p.admm_iters, p.trial_fraction), tol=1e-12,
                                     record_objective=False)
        return _val_mse(tp.predict(tv, tw, val.x_test), val.y_test)

    tuned = tune(p.rho_grid, trial, mode="min")
    t0 = time.perf_counter()
    prob = ConvexReLUProblem(split.x_train, split.y_train, _patterns(split.x_train, p.patterns, ctx.seed), beta)
    accs: list[float] = []
    bar = ctx.progress(total=p.admm_iters, desc=f"{SLUG}/admm rho={tuned.value:g}")

    def track(k: int, vk: torch.Tensor, wk: torch.Tensor) -> None:
        accs.append(sign_accuracy(prob.predict(vk, wk, split.x_test), split.y_test))
        bar.update(1)

    try:
        v, w, hist = admm_convex_relu(prob, rho=tuned.value, max_iter=p.admm_iters, tol=1e-12, callback=track)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    net = prob.to_network(v, w)
    with torch.no_grad():
        f_net = float(nonconvex_objective(net, split.x_train, split.y_train, beta))
        test_acc = sign_accuracy(net(split.x_test), split.y_test)
    width = prob.nonzero_blocks(v, w)
    ctx.shared["width"] = max(1, width)
    metrics.update(objective=f_net, objective_best=f_net, objective_convex=hist.objective[-1],
                   test_acc=test_acc, test_acc_best=test_acc,
                   iters_to_99=first_reaching(accs, list(range(1, len(accs) + 1)), p.acc_fraction),
                   acc_at_20=accs[min(19, len(accs) - 1)], width=float(width), patterns=float(prob.num_patterns),
                   cone_violation=prob.cone_violation(v, w), seconds=seconds, rho=float(tuned.value),
                   kkt=max(hist.primal_u[-1], hist.primal_s[-1], hist.dual[-1]))
    curves["test_acc"] = accs[:ACC_CURVE]
    curves["objective"] = hist.objective
    return ArmResult(metrics, curves, info={"tuned": tuned.as_info()})


def _adam_task(ctx: ArmContext, width: int, lr: float, inits: int) -> tuple[dict, dict]:
    p, split = ctx.p, ctx.data["split"]
    beta = p.beta_per_example * split.x_train.shape[0]
    bar = ctx.progress(total=p.adam_steps, desc=f"{SLUG}/{ctx.arm} lr={lr:g}")
    t0 = time.perf_counter()
    try:
        res = train_adam(split.x_train, split.y_train, width, inits, lr, p.adam_steps, beta, ctx.generator,
                         dtype=torch.float32, X_test=split.x_test, y_test=split.y_test, progress=bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        final = [sign_accuracy(net(split.x_test), split.y_test) for net in res["nets"]]
    per_init = list(zip(*res["accs"]))  # inits x evaluations
    reach = [first_reaching(list(acc), res["steps"], p.acc_fraction) for acc in per_init]
    objs = res["objectives"]
    metrics = dict(objective=statistics.median(objs), objective_best=min(objs), objective_worst=max(objs),
                   test_acc=statistics.median(final), test_acc_best=max(final),
                   iters_to_99=statistics.median(reach),
                   acc_at_20=statistics.median(acc[min(19, len(acc) - 1)] for acc in per_init),
                   width=float(width), seconds=seconds, lr=float(lr))
    curve = [statistics.median(acc[i] for acc in per_init) for i in range(min(ACC_CURVE, len(res["steps"])))]
    return metrics, {"test_acc": curve}


def _adam_trial(ctx: ArmContext, width: int):
    p = ctx.p
    split = ctx.data["split"]
    beta = p.beta_per_example * split.x_train.shape[0]
    fit, val = holdout(split, p.val_fraction, seed=ctx.seed)

    def trial(lr: float) -> float:
        gen = torch.Generator().manual_seed(ctx.seed)
        res = train_adam(fit.x_train, fit.y_train, width, 1, lr, _scaled(p.adam_steps, p.trial_fraction), beta, gen,
                         dtype=torch.float32)
        with torch.no_grad():
            return _val_mse(res["nets"][0](val.x_test), val.y_test)

    return trial


def _adam_arm(ctx: ArmContext) -> ArmResult:
    p, ex = ctx.p, ctx.data["exact"]
    # 1. the exact instance: restarts of the m*-neuron network
    gen = torch.Generator().manual_seed(ctx.seed)
    res = train_adam(ex["X"], ex["y"], ex["m_star"], p.exact_restarts, p.exact_adam_lr, p.exact_adam_steps,
                     p.exact_beta, gen)
    objs, f_ref = res["objectives"], ex["f_ref"]
    med = statistics.median(objs)
    ctx.shared["exact_adam"] = objs
    metrics = dict(exact_objective=med, exact_gap=abs(med - f_ref) / f_ref, exact_recovery=0.0,
                   exact_best_gap=(min(objs) - f_ref) / f_ref,
                   exact_within_frac=sum((o - f_ref) / f_ref <= 1e-3 for o in objs) / len(objs),
                   exact_width=float(ex["m_star"]))
    # 2. the classification task at the ADMM solution's width
    width = ctx.shared.get("width", 2 * p.patterns)
    tuned = tune(p.lr_grid, _adam_trial(ctx, width), mode="min")
    ctx.shared["adam_lr"] = tuned.value
    m, curves = _adam_task(ctx, width, tuned.value, p.adam_inits)
    metrics.update(m)
    return ArmResult(metrics, curves, info={"tuned": tuned.as_info(), "exact_objectives": objs})


def _wide_arm(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    lr = ctx.shared.get("adam_lr", p.lr_grid[len(p.lr_grid) // 2])
    m, curves = _adam_task(ctx, 2 * p.patterns, lr, p.adam_inits)
    return ArmResult(m, curves, info={"lr_from": BASELINE})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    adam = ctx.shared.get("exact_adam")
    for arm in (OURS, BASELINE):
        m = out.metrics.get(arm)
        if m is None or adam is None or "exact_objective" not in m:
            continue
        f = m["exact_objective"]
        m["exact_beaten"] = max(0.0, max((f - o) / f for o in adam))  # how far the best Adam restart is below
    if OURS in out.metrics and BASELINE in out.metrics:
        a, b = out.metrics[OURS], out.metrics[BASELINE]
        a["objective_ratio"] = a["objective"] / b["objective_best"]
        a["time_ratio"] = a["seconds"] / b["seconds"] if b["seconds"] > 0 else float("nan")
    out.info["curve_axes"] = {
        "test_acc": {"xlabel": "ADMM iteration / Adam step", "ylabel": "test accuracy (%)"},
        "exact_gap": {"xlabel": "ADMM iteration (strided)", "ylabel": "|f - f_ref| / f_ref", "log": True},
        "objective": {"xlabel": "ADMM iteration", "ylabel": "convex objective", "log": True},
    }


# ------------------------------------------------------------------------------------------ criterion
CRITERION = AllOf(
    Compare("exact_gap", OURS, "<=", 1e-4, every_seed=True,
            text="exact instance: |f_ADMM - f_ref| / f_ref <= 1e-4 (every seed)"),
    Compare("exact_recovery", OURS, "<=", 1e-6, every_seed=True,
            text="exact instance: recovered network's objective = f_ADMM to 1e-6 relative (every seed)"),
    Compare("exact_beaten", OURS, "<=", 1e-5, every_seed=True,
            text="exact instance: no Adam restart (m* neurons) beats f_ADMM by > 1e-5 relative (every seed)"),
    Compare("objective", OURS, "<=", BASELINE,
            text="objective: ADMM <= median same-width Adam (seed means)"),
    Drop("test_acc_best", OURS, BASELINE, 2.0),
    Compare("iters_to_99", OURS, "<=", 20.0,
            text="iters_to_99[admm] <= 20 (mean): 99% of the final test accuracy within 20 iterations"),
)

_BOUNDS = {k: (0.0, float("inf")) for k in (
    "exact_objective", "exact_gap", "exact_recovery", "exact_iters", "exact_kkt", "exact_ref_kkt", "exact_patterns",
    "exact_width", "exact_beaten", "objective", "objective_best", "objective_worst", "objective_convex",
    "iters_to_99", "width", "patterns", "cone_violation", "seconds", "rho", "lr", "kkt", "objective_ratio",
    "time_ratio")}
_BOUNDS.update({k: (0.0, 100.0) for k in ("test_acc", "test_acc_best", "acc_at_20")})
_BOUNDS.update({"exact_within_frac": (0.0, 1.0), "exact_best_gap": (-1.0, float("inf"))})

CLAIM = register(Claim(
    slug=SLUG,
    title="Efficient Global Optimization of Two-layer ReLU Networks: Quadratic-time Algorithms and "
          "Adversarial Training",
    arxiv="2201.01965",
    statement=(
        "ADMM on the convex reformulation finds the global optimum of a weight-decayed two-layer ReLU network: on "
        "an exact 10-point XOR-like instance (all patterns) it matches the reference optimum to 1e-4, the recovered "
        "network has the same objective, and no Adam restart with m* neurons beats it; on breast cancer with 50 "
        "sampled patterns and 300 iterations its objective is <= the median same-width Adam objective, its test "
        "accuracy within 2 points of the best Adam init, and it reaches 99% of its final accuracy within 20 "
        "iterations"
    ),
    paper_figure=(
        "ADMM converges linearly to the global optimum of the convex program at a per-iteration cost quadratic in "
        "dP (cubic for prior methods); a few iterations already give high test accuracy; a moderate number of "
        "sampled patterns gives a training objective close to the global optimum (qualitative; no single number)"
    ),
    protocol=ConvexReluProtocol,
    data="breast_cancer",
    setup=_setup_with(_bundled_split),
    arms={OURS: _admm_arm, BASELINE: _adam_arm, WIDE: _wide_arm},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="objective", ours=OURS, baseline=BASELINE),
    control={OURS: BASELINE},
    control_note="Adam (median of its restarts) stands in for ADMM",
    variants=(Variant(name="mnist-3v5", description="MNIST under --data-root: 3 vs 5, 2000/1000 images, PCA 30",
                      scales=("quick", "full"), setup=_setup_with(_mnist)),),
    uses=("gradkit.solvers.relu_patterns.sample_patterns", "gradkit.solvers.relu_patterns.enumerate_patterns_2d",
          "gradkit.solvers.convex_relu.ConvexReLUProblem", "gradkit.solvers.convex_relu.admm_convex_relu",
          "gradkit.solvers.convex_relu.nonconvex_objective"),
    notes=(
        "Why the task can discriminate: on the exact instance the non-convex network with m* neurons has spurious "
        "minima (in the quick runs 1 of 60 restarts came within 1e-3 of the optimum; the median restart ends "
        "4-140% above it), so Adam standing in for ADMM (the negative control) "
        "fails the exact-instance checks, while a global solver must pass them; on breast cancer the same-width "
        "Adam baseline is below the accuracy ceiling (about 95-96%) and its objective is a number ADMM can lose "
        "to. The exact instance's reference is a 20x longer ADMM run to 1e-10 (no cvxpy here); the check that "
        "does not depend on the solver is the non-convex one (no Adam restart below f_ADMM). The compared "
        "objective is the recovered network's non-convex objective (what a user gets; it differs from the "
        "convex one by the residual cone violation after 300 iterations, objective_convex). The exact instance's "
        "ADMM uses rho 0.01 and over-relaxation 1.8 (a standard ADMM option, same cost per iteration) with up to "
        "20,000 iterations: the plain iteration's linear rate is slow on some draws (residuals above 1e-9 after "
        "20,000 iterations, and an iterate that is not yet feasible can be 0.5% off the optimum). The "
        "sampled-program arm and the Adam arms get equal tuning (3 values, a third of the budget each, scored on "
        "a validation split); the learning rate of the 2 P_s-wide Adam arm is the same-width arm's. rho, P_s "
        "and the step size gamma (1) are not confirmed from the paper."
    ),
    findings=(
        "Global optimality holds where every pattern is present (exact instance: ADMM within 3e-5 of the reference, "
        "no Adam restart below it, most restarts stuck 1-140% above), but 50 sampled patterns do not give a "
        "near-optimal network on breast cancer: the sampled program's optimum (ADMM: about 15, 3.9x the best Adam "
        "init) is far above same-width Adam (median about 5.5). The patterns, not the solver, are the limit: run "
        "to convergence, ADMM stays near 13 on seed 0's 50 patterns, while on the 94 patterns of a trained Adam "
        "network the same ADMM reaches 3.89, below that network's 4.16. Test accuracy is within 1.2 points of the "
        "best Adam init and 99% of it is reached in about 3 iterations. On MNIST 3 vs 5 (--data-root) the gap is "
        "wider (ADMM 218 vs Adam 31) and accuracy also falls short (96.6% vs 98.7%, 29 iterations to 99%)."
    ),
    plots=("test_acc", "exact_gap", "objective"),
    bounds=_BOUNDS,
))
