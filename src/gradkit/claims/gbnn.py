"""GBNN claim: a network's hidden layer trained by gradient boosting vs the same MLP trained jointly.

Protocol (spec ``papers/gbnn.md``): scikit-learn's bundled copies of four UCI sets, breast_cancer
(binary), wine and digits (multi-class), diabetes (regression); one random 80/20 split per seed
(stratified for classification), features standardised with training statistics (diabetes targets
too; RMSE is reported in the original units). Arms, each seeded alike:

- ``gbnn``: :class:`gradkit.nn.gbnn.GradientBoostedMLP`, T*J = 50 sigmoid units, J = 1, eta = 1,
  subsample 0.5, each learner 200 L-BFGS iterations, L2 1e-4;
- ``mlp_lbfgs``: the same 50-sigmoid-unit MLP trained jointly with L-BFGS (200 iterations, full batch);
- ``mlp_adam``: the same MLP trained with Adam (lr 1e-3, 200 epochs, batch 200).

Pass: (a) GBNN's mean accuracy within 1.5 points of the best MLP arm on each classification set
(one set may miss by at most one test sample if the mean over the three sets is within 1.5), RMSE
within 5% of the best MLP arm on diabetes; (b) anytime inference on digits: GBNN with only its first
50% of units (staged prediction) loses <= 3 points, while zeroing the output weights of the last 50%
of a jointly trained MLP's units loses >= max(5, 2x GBNN's loss), for both MLP arms; (c) the merged
network equals the staged ensemble (max abs diff < 1e-5 in float64).
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data import TensorBatches, standardise
from ..engine import cpu_threads, fit, seed_everything
from ..nn.gbnn import GradientBoostedMLP, l2_weight_penalty, make_lbfgs, one_hidden_mlp, switch_off_units
from .base import Claim, Primary, RunContext, RunOutput, register
from .criteria import AllOf, AtMost, Below, Check, Criterion, fmt, mean, seed_values

SLUG = "gbnn"
ARMS = ("gbnn", "mlp_lbfgs", "mlp_adam")
MLP_ARMS = ARMS[1:]
CLASSIFICATION = ("breast_cancer", "wine", "digits")
DATASETS = {  # name -> (task, number of classes or targets)
    "breast_cancer": ("binary", 2), "wine": ("multiclass", 3), "digits": ("multiclass", 10),
    "diabetes": ("regression", 1),
}
TEST_FRACTION = 0.2
ETA, SUBSAMPLE, INNER_ITERS, WEIGHT_DECAY = 1.0, 0.5, 200, 1e-4
LBFGS_ITERS = 200
ADAM_LR, ADAM_EPOCHS, ADAM_BATCH = 1e-3, 200, 200
WITHIN, RMSE_REL = 1.5, 0.05
ANYTIME_GBNN_MAX, ANYTIME_MLP_MIN, ANYTIME_FACTOR = 3.0, 5.0, 2.0
MERGE_TOL = 1e-5


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # bundled with scikit-learn: no download

    loader = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
              "digits": datasets.load_digits, "diabetes": datasets.load_diabetes}[name]
    d = loader()
    return d.data.astype(np.float64), d.target


def n_test(name: str) -> int:
    """Test-set size of the 80/20 split (scikit-learn rounds the test fraction up)."""
    return math.ceil(TEST_FRACTION * len(_raw(name)[1]))


def load_split(name: str, seed: int) -> dict:
    """One seeded 80/20 split: standardised float32 features; class labels or standardised targets."""
    from sklearn.model_selection import train_test_split

    x, y = _raw(name)
    task = DATASETS[name][0]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=TEST_FRACTION, random_state=seed,
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
def _score(task: str, out: torch.Tensor, split: dict) -> float:
    """Accuracy in percent (classification) or RMSE in the target's original units (regression)."""
    y = split["y_test"]
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


def _run_gbnn(ctx: RunContext, name: str, split: dict, units: int, subsample: float) -> dict:
    task, k = split["task"], split["classes"]
    dev = ctx.device
    xtr, ytr, xte = split["x_train"].to(dev), split["y_train"].to(dev), split["x_test"].to(dev)
    gen = seed_everything(ctx.seed)
    gb = GradientBoostedMLP(xtr.shape[1], k, task, total_units=units, units_per_step=1, eta=ETA,
                            subsample=subsample, inner_iters=INNER_ITERS, weight_decay=WEIGHT_DECAY)
    half = units // 2
    try:
        gb.fit(xtr, ytr, generator=gen, progress=ctx.progress, desc=f"{SLUG}/gbnn-{name}")
    except RuntimeError as e:  # the boosting diverged (scores overflowed): a failed run, its metrics NaN
        nan = float("nan")
        return {"score": nan, "half_score": nan, "anytime": [nan] * len(_keeps(units)), "train_loss": [],
                "merge_diff": nan, "merge_rel_diff": nan, "loss_ratio": nan, "decreasing": nan, "rhos": [],
                "error": str(e)}
    staged = list(gb.staged_scores(xte))  # staged[t] = F_t(x_test): anytime prediction
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
    return res


def _run_mlp(ctx: RunContext, name: str, split: dict, units: int, solver: str) -> dict:
    task, k = split["task"], split["classes"]
    dev = ctx.device
    xtr, ytr, xte = split["x_train"].to(dev), split["y_train"].to(dev), split["x_test"].to(dev)
    gen = seed_everything(ctx.seed)
    out_dim = 1 if task in ("binary", "regression") else k
    model = one_hidden_mlp(xtr.shape[1], units, out_dim, "sigmoid", generator=gen, device=dev)
    loss = _mlp_loss(task, WEIGHT_DECAY)
    desc = f"{SLUG}/mlp_{solver}-{name}"
    if solver == "lbfgs":
        hist = fit(model, make_lbfgs(model.parameters(), LBFGS_ITERS), [(xtr, ytr)], epochs=1,
                   compute_loss=loss, progress=ctx.progress, desc=desc)
    else:
        batches = TensorBatches(xtr, ytr, batch_size=min(ADAM_BATCH, len(xtr)), generator=gen)
        hist = fit(model, torch.optim.Adam(model.parameters(), lr=ADAM_LR), batches, epochs=ADAM_EPOCHS,
                   compute_loss=loss, progress=ctx.progress, desc=desc)
    model.eval()
    with torch.no_grad():
        res = {"score": _score(task, model(xte), split),
               "half_score": _score(task, switch_off_units(model, units // 2)(xte), split),
               "anytime": [_score(task, switch_off_units(model, s)(xte), split) for s in _keeps(units)]}
    res["diverged"] = any(not math.isfinite(v) for v in hist.series("train_loss"))
    return res


# ----------------------------------------------------------------------------- run
def run(ctx: RunContext) -> RunOutput:
    # tiny nets (one unit per boosting round): intra-op threads only add overhead
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    units = ctx.pick(smoke=10, quick=50, full=50)
    names = ctx.pick(smoke=("breast_cancer", "diabetes"), quick=tuple(DATASETS), full=tuple(DATASETS))
    # the spec's smoke check on diabetes uses subsample 1.0 (each round then fits the full residuals)
    diabetes_subsample = ctx.pick(smoke=1.0, quick=SUBSAMPLE, full=SUBSAMPLE)
    nan = float("nan")
    metric_names = [f"acc_{n}" for n in CLASSIFICATION] + ["acc_mean", "rmse_diabetes", "half_acc_digits",
                                                           "half_drop_digits"]
    metrics = {arm: {m: nan for m in metric_names} for arm in ARMS}
    metrics["gbnn"].update(merge_max_diff=nan, merge_max_rel_diff=nan, diabetes_train_loss_ratio=nan,
                           diabetes_rounds_decreasing=nan)
    curves: dict[str, dict[str, list[float]]] = {}
    seconds = {arm: {} for arm in ARMS}
    info: dict = {"units": units, "datasets": list(names), "n_test": {n: n_test(n) for n in names},
                  "keeps": _keeps(units), "rho": {}, "diverged": {}}
    merge, merge_rel = [], []
    for name in names:
        split = load_split(name, ctx.seed)
        task = split["task"]
        sub = diabetes_subsample if name == "diabetes" else SUBSAMPLE
        results = {}
        t0 = time.perf_counter()
        results["gbnn"] = _run_gbnn(ctx, name, split, units, sub)
        seconds["gbnn"][name] = round(time.perf_counter() - t0, 3)
        for arm in MLP_ARMS:
            t0 = time.perf_counter()
            results[arm] = _run_mlp(ctx, name, split, units, arm.removeprefix("mlp_"))
            seconds[arm][name] = round(time.perf_counter() - t0, 3)
            info["diverged"][f"{arm}/{name}"] = results[arm]["diverged"]
        g = results["gbnn"]
        merge.append(g["merge_diff"])
        merge_rel.append(g["merge_rel_diff"])
        if "error" in g:
            info.setdefault("gbnn_errors", {})[name] = g["error"]
        info["rho"][name] = g["rhos"]
        for arm, r in results.items():
            if task == "regression":
                metrics[arm]["rmse_diabetes"] = r["score"]
            else:
                metrics[arm][f"acc_{name}"] = r["score"]
            if name == "digits":
                metrics[arm]["half_acc_digits"] = r["half_score"]
                metrics[arm]["half_drop_digits"] = r["score"] - r["half_score"]
                curves.setdefault("digits_anytime_acc", {})[arm] = r["anytime"]
        if name == "diabetes":
            metrics["gbnn"]["diabetes_train_loss_ratio"] = g["loss_ratio"]
            metrics["gbnn"]["diabetes_rounds_decreasing"] = g["decreasing"]
        curves.setdefault("gbnn_train_loss", {})
        if name == "digits" or "gbnn" not in curves["gbnn_train_loss"]:
            curves["gbnn_train_loss"]["gbnn"] = g["train_loss"]
            info["gbnn_train_loss_dataset"] = name
    # max() would skip a NaN in later position: a diverged run makes the metric NaN
    metrics["gbnn"]["merge_max_diff"] = nan if any(map(math.isnan, merge)) or not merge else max(merge)
    metrics["gbnn"]["merge_max_rel_diff"] = nan if any(map(math.isnan, merge_rel)) or not merge_rel else max(merge_rel)
    run_cls = [n for n in CLASSIFICATION if n in names]  # all three at quick/full scale
    for arm in ARMS:
        metrics[arm]["acc_mean"] = sum(metrics[arm][f"acc_{n}"] for n in run_cls) / len(run_cls)
    info.update(seconds=seconds, gbnn={"eta": ETA, "subsample": SUBSAMPLE, "diabetes_subsample": diabetes_subsample,
                                      "units_per_step": 1, "inner": f"L-BFGS {INNER_ITERS} it", "l2": WEIGHT_DECAY},
                mlp_lbfgs={"iters": LBFGS_ITERS, "l2": WEIGHT_DECAY},
                mlp_adam={"lr": ADAM_LR, "epochs": ADAM_EPOCHS, "batch": ADAM_BATCH, "l2": WEIGHT_DECAY})
    return RunOutput(metrics=metrics, data="uci-sklearn", curves=curves, info=info)


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

    Leniency for small test sets (the spec's wine caveat): if exactly one set misses, by no more than
    one test sample of that set (100 / n_test points), the sets are judged on ``mean_metric`` instead.
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
                            ours="gbnn", baselines=MLP_ARMS, within=WITHIN),
        RelativeToBest(metric="rmse_diabetes", ours="gbnn", baselines=MLP_ARMS, rel=RMSE_REL),
        AtMost(metric="half_drop_digits", arm="gbnn", value=ANYTIME_GBNN_MAX),
        AnytimeContrast(metric="half_drop_digits", ours="gbnn", baselines=MLP_ARMS, floor=ANYTIME_MLP_MIN,
                        factor=ANYTIME_FACTOR),
        Below(metric="merge_max_diff", arm="gbnn", value=MERGE_TOL, every_seed=True),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="Sequential Training of Neural Networks with Gradient Boosting",
    arxiv="1909.12098",
    statement=(
        "Training a 50-unit sigmoid hidden layer by gradient boosting (one unit per round, Newton step, "
        "subsample 0.5) is competitive with the same MLP trained jointly by L-BFGS or Adam (accuracy within "
        "1.5 points on breast_cancer/wine/digits, RMSE within 5% on diabetes), its first 50% of units keep "
        "almost all of its accuracy on digits (<= 3 points lost) unlike a jointly trained MLP's (>= max(5, 2x) "
        "lost), and the merged network equals the boosted ensemble (< 1e-5)"
    ),
    paper_figure=(
        "UCI-style classification and regression sets (IEEE Access 2023, tables): GBNN generalises as well "
        "as or better than same-size MLPs trained with Adam, L-BFGS or SGD; removing the last-trained "
        "hidden units costs little accuracy, unlike a jointly trained MLP (per-dataset values unconfirmed)"
    ),
    criterion=_criterion(),
    primary=Primary(metric="acc_mean", ours="gbnn", baseline="mlp_lbfgs", unit="%"),
    run=run,
    uses=("gradkit.nn.gbnn.GradientBoostedMLP", "gradkit.nn.gbnn.BoostedMLP", "gradkit.nn.gbnn.switch_off_units",
          "gradkit.nn.gbnn.BinaryLogisticLoss", "gradkit.nn.gbnn.SoftmaxCrossEntropyLoss",
          "gradkit.nn.gbnn.SquaredLoss", "gradkit.nn.gbnn.one_hidden_mlp", "gradkit.nn.gbnn.make_lbfgs",
          "gradkit.nn.gbnn.l2_weight_penalty"),
    real_data="",
    notes=(
        "Data: scikit-learn's bundled copies of the UCI sets (no --data-root variant). 3 seeds = 3 random "
        "80/20 splits (the spec's 5-fold CV does not fit the quick budget). Diabetes targets are "
        "standardised for training (all arms; RMSE in original units). Inner learners: torch.optim.LBFGS "
        "(strong-Wolfe, history 10, 200 iterations, no tolerance stop) driven by gradkit.engine.fit, "
        "scikit-learn's Glorot-uniform init and L2 convention (0.5 alpha ||W||^2 / n). Multi-class F_0 = "
        "log class priors (the argmin; the official code starts at 0). half_drop_digits = accuracy lost "
        "when keeping the first 25 of 50 units: GBNN by staged prediction (later rounds and their bias "
        "terms removed), MLPs by zeroing the output weights of units 25-49. The smoke scale runs "
        "breast_cancer and diabetes only (subsample 1.0 on diabetes, 10 units); acc_mean is then "
        "breast_cancer's accuracy and the wine/digits metrics are NaN. (c) compares the float32-trained booster, cast to float64, with its merge done in float64 "
        "(train and test inputs, full and half merges); merge_max_rel_diff divides by the largest |score|. "
        "A GBNN fit whose scores overflow is a failed run (its metrics NaN, the error in info). "
        "info['rho'] holds GBNN's Newton steps per round, info['seconds'] the time per arm and set."
    ),
    plots=("digits_anytime_acc", "gbnn_train_loss"),
))
