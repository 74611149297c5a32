"""GBNN claim: a network's hidden layer trained by gradient boosting vs the same MLP trained jointly.

Emami & Martinez-Munoz, "Sequential Training of Neural Networks with Gradient Boosting", IEEE Access
2023 (arXiv 1909.12098). Data: scikit-learn's bundled copies of four UCI sets, breast_cancer (binary),
wine and digits (multi-class), diabetes (regression); one random train/test split per seed (stratified
for classification), features standardised with training statistics (diabetes targets too; RMSE is
reported in the original units). Arms, each seeded alike on every data set:

- ``gbnn``: :class:`gradkit.nn.gbnn.GradientBoostedMLP`, sigmoid units, one unit per round, Newton
  step, each learner fitted by L-BFGS on a random subsample, L2 penalty;
- ``mlp_lbfgs``: the same sigmoid MLP trained jointly with full-batch L-BFGS;
- ``mlp_adam``: the same MLP trained with Adam.

Pass: (a) GBNN's mean accuracy within 1.5 points of the best MLP arm on each classification set
(one set may miss by at most one test sample if the mean over the three sets is within 1.5), RMSE
within 5% of the best MLP arm on diabetes; (b) anytime inference on digits: GBNN with only its first
50% of units (staged prediction) loses <= 3 points, while zeroing the output weights of the last 50%
of a jointly trained MLP's units loses >= max(5, 2x GBNN's loss), for both MLP arms; (c) the merged
network equals the staged ensemble (max abs diff < 1e-5 in float64).

Equal tuning budgets: on every data set each arm picks one value from a grid of the same size (GBNN's
shrinkage eta, the joint L-BFGS iteration count, Adam's learning rate), scored on a validation split cut
from the training rows (accuracy, or RMSE on diabetes); the chosen model is the one tested.

Every number of the protocol is a field of :class:`GbnnProtocol` (``gradkit show gbnn``).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ...data import TensorBatches, standardise
from ...engine import fit, seed_everything
from ...nn.gbnn import GradientBoostedMLP, l2_weight_penalty, make_lbfgs, one_hidden_mlp, switch_off_units
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .tuning import tune
from .criteria import AllOf, AtMost, Below, Check, Criterion, fmt, mean, seed_values

SLUG = "gbnn"
ARMS = ("gbnn", "mlp_lbfgs", "mlp_adam")
MLP_ARMS = ARMS[1:]
CLASSIFICATION = ("breast_cancer", "wine", "digits")
DATASETS = {  # name -> (task, number of classes or targets)
    "breast_cancer": ("binary", 2), "wine": ("multiclass", 3), "digits": ("multiclass", 10),
    "diabetes": ("regression", 1),
}


@dataclass(frozen=True)
class GbnnProtocol(Protocol):
    """Four UCI sets; GBNN vs the same MLP trained jointly by L-BFGS and by Adam."""

    datasets: tuple[str, ...] = scaled(smoke=("breast_cancer", "diabetes"), quick=tuple(DATASETS))
    test_fraction: float = 0.2
    units: int = scaled(smoke=10, quick=50)  # hidden units of every arm (GBNN: one per round)
    # equal tuning budgets: every arm picks one value per data set from a grid of the same size, scored on a
    # validation split cut from the training data (the chosen model is the one tested)
    eta_grid: tuple[float, ...] = scaled(smoke=(1.0,), quick=(0.1, 0.3, 1.0))  # GBNN shrinkage of the Newton step
    lbfgs_iters_grid: tuple[int, ...] = scaled(smoke=(200,), quick=(50, 100, 200))  # joint L-BFGS iterations
    adam_lr_grid: tuple[float, ...] = scaled(smoke=(1e-3,), quick=(3e-4, 1e-3, 3e-3))
    val_fraction: float = 0.2
    subsample: float = 0.5  # GBNN: fraction of the training set each learner is fitted on
    diabetes_subsample: float = scaled(smoke=1.0, quick=0.5)  # the same, on diabetes
    inner_iters: int = 200  # L-BFGS iterations per GBNN learner
    weight_decay: float = 1e-4  # L2 alpha of every arm (0.5 alpha ||W||^2 / n)
    adam_epochs: int = 200
    adam_batch: int = 200


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # bundled with scikit-learn: no download

    loader = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
              "digits": datasets.load_digits, "diabetes": datasets.load_diabetes}[name]
    d = loader()
    return d.data.astype(np.float64), d.target


def n_test(name: str, test_fraction: float = GbnnProtocol.test_fraction) -> int:
    """Test-set size of the split (scikit-learn rounds the test fraction up)."""
    return math.ceil(test_fraction * len(_raw(name)[1]))


def load_split(name: str, seed: int, test_fraction: float = GbnnProtocol.test_fraction) -> dict:
    """One seeded split: standardised float32 features; class labels or standardised targets."""
    from sklearn.model_selection import train_test_split

    x, y = _raw(name)
    task = DATASETS[name][0]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                          stratify=None if task == "regression" else y)
    xtr, xte = standardise(xtr, xte)
    out = {"x_train": torch.tensor(xtr, dtype=torch.float32), "x_test": torch.tensor(xte, dtype=torch.float32),
           "task": task, "classes": DATASETS[name][1]}
    if task == "regression":
        mu, sd = float(ytr.mean()), float(ytr.std())
        out.update(y_train=torch.tensor((ytr - mu) / sd, dtype=torch.float32),
                   y_test=torch.tensor(yte, dtype=torch.float64), y_mean=mu, y_std=sd)
    else:
        out.update(y_train=torch.tensor(ytr, dtype=torch.int64), y_test=torch.tensor(yte, dtype=torch.int64))
    return out


# ----------------------------------------------------------------------------- evaluation
def _score(task: str, out: torch.Tensor, split: dict, y: torch.Tensor | None = None) -> float:
    """Accuracy in percent (classification) or RMSE in the target's original units (regression), against
    ``y`` (default: the test targets)."""
    y = split["y_test"] if y is None else y
    if task == "regression":
        pred = out.double().squeeze(1).cpu() * split["y_std"] + split["y_mean"]
        return float(((pred - y) ** 2).mean().sqrt())
    pred = (out.squeeze(1) > 0).long() if task == "binary" else out.argmax(-1)
    return 100.0 * float((pred.cpu() == y).double().mean())


def _mlp_loss(task: str, wd: float):
    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        out = model(x)
        if task == "regression":
            value = 0.5 * (out.squeeze(1) - y).pow(2).mean()
        elif task == "binary":
            value = nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y.to(out.dtype))
        else:
            value = nn.functional.cross_entropy(out, y)
        return value + l2_weight_penalty(model, wd, len(x))

    return loss


def _keeps(units: int) -> list[int]:
    step = max(1, units // 10)
    return sorted(set(range(0, units + 1, step)) | {units // 2, units})


def _fit_gbnn(ctx: ArmContext, name: str, split: dict, subsample: float, eta: float) -> dict:
    p = ctx.p
    units, task, k = p.units, split["task"], split["classes"]
    dev = ctx.device
    xtr, ytr, xte = split["x_train"].to(dev), split["y_train"].to(dev), split["x_test"].to(dev)
    gen = seed_everything(ctx.seed)  # every data set starts from the run's seed
    gb = GradientBoostedMLP(xtr.shape[1], k, task, total_units=units, units_per_step=1, eta=eta,
                            subsample=subsample, inner_iters=p.inner_iters, weight_decay=p.weight_decay)
    half = units // 2
    try:
        gb.fit(xtr, ytr, generator=gen, progress=ctx.progress, desc=f"{SLUG}/gbnn-{name}")
    except RuntimeError as e:  # the boosting diverged (scores overflowed): a failed run, its metrics NaN
        nan = float("nan")
        return {"score": nan, "half_score": nan, "anytime": [nan] * len(_keeps(units)), "train_loss": [],
                "merge_diff": nan, "merge_rel_diff": nan, "loss_ratio": nan, "decreasing": nan, "rhos": [],
                "error": str(e)}
    staged = list(gb.staged_scores(xte))  # staged[t] = F_t(x_test): anytime prediction
    if "x_val" in split:
        res_val = _score(task, gb.decision_function(split["x_val"].to(dev)), split, split["y_val"])
    res = {"score": _score(task, staged[-1], split), "half_score": _score(task, staged[half], split),
           "anytime": [_score(task, staged[s], split) for s in _keeps(units)], "train_loss": list(gb.train_loss_)}
    # (c) the merged network equals the staged ensemble, in float64; so does its truncation
    g64 = copy.deepcopy(gb).double()
    net = g64.to_module()  # merged in float64 (a float32 merge adds rounding of rho * W2)
    s = gb.loss_fn.output_scale
    diff, scale = 0.0, 1.0
    with torch.no_grad():
        for x in (xtr.double(), xte.double()):
            ref, ref_half = s * g64.decision_function(x), s * g64.decision_function(x, n_steps=half)
            diff = max(diff, float((net(x) - ref).abs().max()), float((net.truncate(half)(x) - ref_half).abs().max()))
            scale = max(scale, float(ref.abs().max()), float(ref_half.abs().max()))
    res["merge_diff"] = diff
    res["merge_rel_diff"] = diff / scale
    losses = gb.train_loss_
    res["loss_ratio"] = losses[-1] / losses[0] if losses[0] > 0 else float("nan")
    res["decreasing"] = sum(b < a for a, b in zip(losses, losses[1:])) / max(len(losses) - 1, 1)
    res["rhos"] = [round(float(r), 6) for r in gb.step_sizes]
    if "x_val" in split:
        res["val_score"] = res_val
    return res


def _fit_mlp(ctx: ArmContext, name: str, split: dict, solver: str, value: float) -> dict:
    """One jointly trained MLP; ``value``: L-BFGS iterations or Adam's learning rate."""
    p = ctx.p
    units, task, k = p.units, split["task"], split["classes"]
    dev = ctx.device
    xtr, ytr, xte = split["x_train"].to(dev), split["y_train"].to(dev), split["x_test"].to(dev)
    gen = seed_everything(ctx.seed)  # every data set starts from the run's seed
    out_dim = 1 if task in ("binary", "regression") else k
    model = one_hidden_mlp(xtr.shape[1], units, out_dim, "sigmoid", generator=gen, device=dev)
    loss = _mlp_loss(task, p.weight_decay)
    desc = f"{SLUG}/mlp_{solver}-{name}"
    if solver == "lbfgs":
        hist = fit(model, make_lbfgs(model.parameters(), int(value)), [(xtr, ytr)], epochs=1,
                   compute_loss=loss, progress=ctx.progress, desc=desc)
    else:
        batches = TensorBatches(xtr, ytr, batch_size=min(p.adam_batch, len(xtr)), generator=gen)
        hist = fit(model, torch.optim.Adam(model.parameters(), lr=value), batches, epochs=p.adam_epochs,
                   compute_loss=loss, progress=ctx.progress, desc=desc)
    model.eval()
    with torch.no_grad():
        res = {"score": _score(task, model(xte), split),
               "half_score": _score(task, switch_off_units(model, units // 2)(xte), split),
               "anytime": [_score(task, switch_off_units(model, s)(xte), split) for s in _keeps(units)]}
        if "x_val" in split:
            res["val_score"] = _score(task, model(split["x_val"].to(dev)), split, split["y_val"])
    res["diverged"] = any(not math.isfinite(v) for v in hist.series("train_loss"))
    return res


def holdout_split(split: dict, fraction: float, seed: int) -> dict:
    """``split`` with a validation set cut from its training rows: ``x_val``/``y_val`` are held out, the model
    trains on the rest, and the test set is unchanged (held-out regression targets back in original units,
    as the test targets are)."""
    n = len(split["y_train"])
    n_val = max(1, int(round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 104729))
    val, fit_rows = perm[:n_val], perm[n_val:]
    out = {**split, "x_train": split["x_train"][fit_rows], "y_train": split["y_train"][fit_rows],
           "x_val": split["x_train"][val]}
    if split["task"] == "regression":
        out["y_val"] = split["y_train"][val].double() * split["y_std"] + split["y_mean"]
    else:
        out["y_val"] = split["y_train"][val]
    return out


def _tuned_fit(ctx: ArmContext, name: str, grid: Sequence[float], fit_one) -> tuple[dict, dict]:
    """``fit_one(split, value) -> result``: every value of ``grid`` trains on the training rows minus a
    validation split and is scored on it; the chosen value's model is the one scored on the test set (no
    refit on all rows, which would add a fourth fit to the quick budget). A one-value grid trains on all
    training rows. Returns the result and the tuning record."""
    split = ctx.data[name]
    if len(grid) == 1:
        return fit_one(split, grid[0]), {"chosen": grid[0], "grid": list(grid)}
    val = holdout_split(split, ctx.p.val_fraction, ctx.seed)
    results = {}

    def trial(v):
        results[v] = fit_one(val, v)
        return results[v]["val_score"]

    lower = DATASETS[name][0] == "regression"
    tuned = tune(grid, trial, mode="min" if lower else "max")
    return results[tuned.value], tuned.as_info()


# ----------------------------------------------------------------------------- arms
def _setup(ctx: ArmContext) -> dict[str, dict]:
    bad = [n for n in ctx.p.datasets if n not in DATASETS]
    if bad:
        raise ValueError(f"unknown data sets {bad}; choose from {', '.join(DATASETS)}")
    return {name: load_split(name, ctx.seed, ctx.p.test_fraction) for name in ctx.p.datasets}


def _scores(metrics: dict[str, float], curves: dict[str, list[float]], name: str, r: dict) -> None:
    """The per-data-set metrics of one arm (only for the sets that ran)."""
    if DATASETS[name][0] == "regression":
        metrics["rmse_diabetes"] = r["score"]
    else:
        metrics[f"acc_{name}"] = r["score"]
    if name == "digits":
        metrics["half_acc_digits"] = r["half_score"]
        metrics["half_drop_digits"] = r["score"] - r["half_score"]
        curves["digits_anytime_acc"] = r["anytime"]


def _acc_mean(metrics: dict[str, float], names: Sequence[str]) -> None:
    run_cls = [n for n in CLASSIFICATION if n in names]
    if run_cls:
        metrics["acc_mean"] = sum(metrics[f"acc_{n}"] for n in run_cls) / len(run_cls)


def _gbnn_arm(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    info: dict = {"rho": {}, "tuned": {}}
    merge, merge_rel = [], []
    for name in p.datasets:
        sub = p.diabetes_subsample if name == "diabetes" else p.subsample
        g, info["tuned"][name] = _tuned_fit(ctx, name, p.eta_grid,
                                            lambda split, eta: _fit_gbnn(ctx, name, split, sub, eta))
        _scores(metrics, curves, name, g)
        merge.append(g["merge_diff"])
        merge_rel.append(g["merge_rel_diff"])
        if "error" in g:
            info.setdefault("errors", {})[name] = g["error"]
        info["rho"][name] = g["rhos"]
        if name == "diabetes":
            metrics["diabetes_train_loss_ratio"] = g["loss_ratio"]
            metrics["diabetes_rounds_decreasing"] = g["decreasing"]
        if name == "digits" or "gbnn_train_loss" not in curves:
            curves["gbnn_train_loss"] = g["train_loss"]
            info["gbnn_train_loss_dataset"] = name
    _acc_mean(metrics, p.datasets)
    if merge:  # max() would skip a NaN in later position: a diverged run makes the metric NaN
        metrics["merge_max_diff"] = float("nan") if any(map(math.isnan, merge)) else max(merge)
        metrics["merge_max_rel_diff"] = float("nan") if any(map(math.isnan, merge_rel)) else max(merge_rel)
    return ArmResult(metrics, curves, info)


def _mlp_arm(ctx: ArmContext) -> ArmResult:
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    diverged, tuned = {}, {}
    solver = ctx.arm.removeprefix("mlp_")
    grid = ctx.p.lbfgs_iters_grid if solver == "lbfgs" else ctx.p.adam_lr_grid
    for name in ctx.p.datasets:
        r, tuned[name] = _tuned_fit(ctx, name, grid, lambda split, v: _fit_mlp(ctx, name, split, solver, v))
        _scores(metrics, curves, name, r)
        diverged[name] = r["diverged"]
    _acc_mean(metrics, ctx.p.datasets)
    metrics["merge_max_diff"] = 0.0  # a jointly trained MLP is already one network: nothing to merge
    return ArmResult(metrics, curves, {"diverged": diverged, "tuned": tuned})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    out.info["n_test"] = {n: len(ctx.data[n]["y_test"]) for n in ctx.p.datasets}
    if "digits_anytime_acc" in out.curves:
        out.info["curve_axes"] = {"digits_anytime_acc": {"xlabel": "hidden units kept", "x": _keeps(ctx.p.units)}}


# ----------------------------------------------------------------------------- criteria
def _best(per_seed, arms: Sequence[str], metric: str, lower: bool) -> tuple[str, float]:
    means = {a: mean(seed_values(per_seed, a, metric)) for a in arms}
    finite = {a: m for a, m in means.items() if math.isfinite(m)}
    if not finite:
        return arms[0], float("nan")
    a = (min if lower else max)(finite, key=finite.get)
    return a, finite[a]


@dataclass(frozen=True)
class CompetitiveAccuracy(Criterion):
    """Seed-mean accuracy of ``ours`` within ``within`` points of the best baseline on every set.

    Leniency for small test sets (wine has 36 test samples at the default split): if exactly one set
    misses, by no more than one test sample of that set (100 / n_test points), the sets are judged on
    ``mean_metric`` instead.
    """

    sets: tuple[tuple[str, int], ...]  # (metric, test-set size)
    mean_metric: str
    ours: str
    baselines: tuple[str, ...]
    within: float

    def describe(self) -> str:
        names = ", ".join(m for m, _ in self.sets)
        return (f"{names}: {self.ours} >= best of ({', '.join(self.baselines)}) - {self.within:g} each "
                f"(one set may miss by <= 1 test sample if {self.mean_metric} holds)")

    def checks(self, per_seed):
        rows = []
        for metric, n in self.sets:
            ours = mean(seed_values(per_seed, self.ours, metric))
            arm, best = _best(per_seed, self.baselines, metric, lower=False)
            drop = best - ours if math.isfinite(ours) and math.isfinite(best) else float("nan")
            rows.append((metric, n, ours, arm, best, drop))
        ours_m = mean(seed_values(per_seed, self.ours, self.mean_metric))
        arm_m, best_m = _best(per_seed, self.baselines, self.mean_metric, lower=False)
        drop_m = best_m - ours_m if math.isfinite(ours_m) and math.isfinite(best_m) else float("nan")
        mean_ok = math.isfinite(drop_m) and drop_m <= self.within
        misses = [r for r in rows if not (math.isfinite(r[5]) and r[5] <= self.within)]
        lenient = (len(misses) == 1 and math.isfinite(misses[0][5])
                   and misses[0][5] <= self.within + 100.0 / misses[0][1] and mean_ok)
        out = []
        for metric, n, ours, arm, best, drop in rows:
            ok = math.isfinite(drop) and drop <= self.within
            note = ""
            if not ok and lenient:
                ok, note = True, f"; misses by <= 1 of {n} test samples, judged on {self.mean_metric}"
            out.append(Check(f"{metric}: {self.ours} >= best baseline - {self.within:g}", ok,
                             f"{fmt(ours)} vs {arm} {fmt(best)} (drop {drop:+.3g}){note}"))
        out.append(Check(f"{self.mean_metric}: {self.ours} >= best baseline - {self.within:g}", mean_ok,
                         f"{fmt(ours_m)} vs {arm_m} {fmt(best_m)} (drop {drop_m:+.3g})"))
        return out


@dataclass(frozen=True)
class RelativeToBest(Criterion):
    """Seed-mean of a lower-is-better metric of ``ours`` <= (1 + rel) x the best baseline's."""

    metric: str
    ours: str
    baselines: tuple[str, ...]
    rel: float

    def describe(self) -> str:
        return f"{self.metric}: {self.ours} <= (1 + {self.rel:g}) x best of ({', '.join(self.baselines)})"

    def checks(self, per_seed):
        ours = mean(seed_values(per_seed, self.ours, self.metric))
        arm, best = _best(per_seed, self.baselines, self.metric, lower=True)
        ratio = ours / best if math.isfinite(ours) and math.isfinite(best) and best > 0 else float("nan")
        ok = math.isfinite(ratio) and ratio <= 1 + self.rel
        return [Check(self.describe(), ok, f"{fmt(ours)} vs {arm} {fmt(best)} (ratio {fmt(ratio)})")]


@dataclass(frozen=True)
class AnytimeContrast(Criterion):
    """Each baseline's seed-mean loss from switching off units >= max(floor, factor x ours')."""

    metric: str
    ours: str
    baselines: tuple[str, ...]
    floor: float
    factor: float

    def describe(self) -> str:
        return (f"{self.metric}: each of ({', '.join(self.baselines)}) >= max({self.floor:g}, "
                f"{self.factor:g} x {self.ours})")

    def checks(self, per_seed):
        ours = mean(seed_values(per_seed, self.ours, self.metric))
        need = max(self.floor, self.factor * ours) if math.isfinite(ours) else float("nan")
        out = []
        for b in self.baselines:
            v = mean(seed_values(per_seed, b, self.metric))
            ok = math.isfinite(v) and math.isfinite(need) and v >= need
            out.append(Check(f"{self.metric}[{b}] >= max({self.floor:g}, {self.factor:g} x {self.ours})", ok,
                             f"{fmt(v)} vs needed {fmt(need)} ({self.ours} {fmt(ours)})"))
        return out


def _criterion() -> AllOf:
    return AllOf(
        CompetitiveAccuracy(sets=tuple((f"acc_{n}", n_test(n)) for n in CLASSIFICATION), mean_metric="acc_mean",
                            ours="gbnn", baselines=MLP_ARMS, within=1.5),
        RelativeToBest(metric="rmse_diabetes", ours="gbnn", baselines=MLP_ARMS, rel=0.05),
        AtMost(metric="half_drop_digits", arm="gbnn", value=3.0),
        AnytimeContrast(metric="half_drop_digits", ours="gbnn", baselines=MLP_ARMS, floor=5.0, factor=2.0),
        Below(metric="merge_max_diff", arm="gbnn", value=1e-5, every_seed=True),
    )


CLAIM = register(Claim(
    slug=SLUG,
    version=2,  # 2: equal tuning budgets (three-value grids chosen on validation) for every arm
    title="Sequential Training of Neural Networks with Gradient Boosting",
    arxiv="1909.12098",
    statement=(
        "Training a sigmoid hidden layer by gradient boosting (one unit per round, Newton step, subsampled "
        "learners) is competitive with the same MLP trained jointly by L-BFGS or Adam (accuracy within "
        "1.5 points on breast_cancer/wine/digits, RMSE within 5% on diabetes), its first 50% of units keep "
        "almost all of its accuracy on digits (<= 3 points lost) unlike a jointly trained MLP's (>= max(5, 2x) "
        "lost), and the merged network equals the boosted ensemble (< 1e-5)"
    ),
    paper_figure=(
        "UCI-style classification and regression sets (IEEE Access 2023, tables): GBNN generalises as well "
        "as or better than same-size MLPs trained with Adam, L-BFGS or SGD; removing the last-trained "
        "hidden units costs little accuracy, unlike a jointly trained MLP"
    ),
    protocol=GbnnProtocol,
    data="uci-sklearn",
    setup=_setup,
    arms={"gbnn": _gbnn_arm, "mlp_lbfgs": _mlp_arm, "mlp_adam": _mlp_arm},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="acc_mean", ours="gbnn", baseline="mlp_lbfgs", unit="%", ceiling=100.0),
    control_note="the same MLP trained jointly by L-BFGS stands in for GBNN",
    uses=("gradkit.nn.gbnn.GradientBoostedMLP", "gradkit.nn.gbnn.BoostedMLP", "gradkit.nn.gbnn.switch_off_units",
          "gradkit.nn.gbnn.BinaryLogisticLoss", "gradkit.nn.gbnn.SoftmaxCrossEntropyLoss",
          "gradkit.nn.gbnn.SquaredLoss", "gradkit.nn.gbnn.one_hidden_mlp", "gradkit.nn.gbnn.make_lbfgs",
          "gradkit.nn.gbnn.l2_weight_penalty"),
    notes=(
        "Data: scikit-learn's bundled copies of the UCI sets (no --data-root variant). Each seed is one "
        "random train/test split (cross-validation does not fit the quick budget). Diabetes targets are "
        "standardised for training (all arms; RMSE in original units). Inner learners: torch.optim.LBFGS "
        "(strong-Wolfe, history 10, no tolerance stop) driven by gradkit.engine.fit, "
        "scikit-learn's Glorot-uniform init and L2 convention (0.5 alpha ||W||^2 / n). Multi-class F_0 = "
        "log class priors (the argmin; the official code starts at 0). half_drop_digits = accuracy lost "
        "when keeping the first half of the units: GBNN by staged prediction (later rounds and their bias "
        "terms removed), MLPs by zeroing the output weights of the second half. The smoke scale runs only "
        "some of the sets (`gradkit show gbnn`); the metrics of the sets not run are absent, so the "
        "criterion cannot be evaluated at smoke scale. (c) compares the float32-trained booster, cast to "
        "float64, with its merge done in float64 (train and test inputs, full and half merges); "
        "merge_max_rel_diff divides by the largest |score|; a jointly trained MLP has nothing to merge "
        "(merge_max_diff 0). A GBNN fit whose scores overflow is a failed run (its metrics NaN, the error "
        "in the arm's info). The gbnn arm's info holds its Newton steps per round and set (rho)."
    ),
    findings=(
        "At the official defaults (eta = 1, one sigmoid unit per round, no control of the Newton step) GBNN "
        "collapses on some splits, and so does the official implementation: run on the same seed-0..2 splits "
        "it gives digits 88.9 / 58.6 / 93.6%, wine 33.3 / 97.2 / 97.2% and diabetes RMSE 350 / 733 / 1286 "
        "(ours: digits 93.1 / 16.1 / 86.9%, wine 100 / 97.2 / 94.4%, RMSE 504 / 84 / 1133), while both jointly "
        "trained MLPs reach ~97% on digits and RMSE 55-79; the collapse is the method's at its defaults, not "
        "our port."
    ),
    scale_note=(
        "With equal three-value budgets chosen on validation GBNN no longer collapses (it picks eta = 0.1 on "
        "most sets): mean accuracy 97.4 vs 96.9-97.0 (seeds 0-2) and 97.3 vs 96.7-98.3 (seeds 3-5), and "
        "keeping half its units costs 0.6 points against 7-15 for the joint MLPs; it still trails by about 2 "
        "points on digits (95.5 vs 97.5) and 8-17% in RMSE on diabetes. The paper tunes every model by 10-fold "
        "cross-validated grids; larger grids here would show whether the digits gap closes."
    ),
    plots=("digits_anytime_acc", "gbnn_train_loss"),
    bounds={**{f"acc_{n}": (0.0, 100.0) for n in CLASSIFICATION}, "acc_mean": (0.0, 100.0),
            "half_acc_digits": (0.0, 100.0), "half_drop_digits": (-100.0, 100.0), "rmse_diabetes": (0.0, math.inf),
            "merge_max_diff": (0.0, math.inf), "merge_max_rel_diff": (0.0, math.inf),
            "diabetes_train_loss_ratio": (0.0, math.inf), "diabetes_rounds_decreasing": (0.0, 1.0)},
))
