"""Claim ``boundary-tilting``: adversarial strength of a linear classifier is set by its deviation angle from
the nearest-centroid classifier; tilting along flat directions makes it arbitrarily strong at constant accuracy,
and L2 regularisation removes the tilt.

Two experiments per seed (every number is a field of :class:`TiltProtocol`, ``gradkit show boundary-tilting``):

1. Synthetic tilt sweep (exact check). d = 100, two Gaussian classes with means -/+ 2 e_1, variance 1 along
   e_1 and the next 9 coordinates, variance 1e-8 in the remaining 90 (flat). z = the estimated centroid
   difference; u = a flat coordinate (arm ``tilt_flat``) or, as the negative control, a high-variance data
   coordinate (arm ``tilt_data``), orthogonalised against z; w(phi) = tilt(z, u, phi), both boundaries pass
   through the midpoint of the centroids. Metrics over phi: the spread of test accuracy (points) and the
   largest relative deviation of the median d_C / d_NC from cos(phi).
2. Regularisation sweep on a pair of digits (scikit-learn digits 3 vs 7, 64-d, standardised on the training
   split; a random 50/25/25 train/val/test split per seed). L2-regularised logistic regression (full-batch
   L-BFGS, tight tolerance, warm-started from strong to weak lambda) for lambda in 10^{-6..2} (arm
   ``l2_logistic``); the baseline ``nearest_centroid`` is the NC classifier itself on the same split (no
   lambda, deviation angle 0). lambda_lo = 1e-6; lambda_hi = the largest lambda whose validation accuracy
   is within 3 points of the best (a rule on the validation split; the test split is never used to pick).
   Metrics: Spearman(theta, lambda), the gain of the median minimal l2 adversarial distance (correctly
   classified test points) from lambda_lo to lambda_hi, the test accuracy change, and the relative error
   of that gain against the angle law cos(theta_hi) / cos(theta_lo) (from d_C = d_NC cos(theta)). At quick
   scale the same rule is run on all 45 digit pairs and the fraction that meets it is reported (not part
   of the verdict).

With ``--data-root`` holding MNIST, the sweep runs on the paper's MNIST 3 vs 7 (2,000 training images per
class, 1,000 per class for validation from the rest of the training set, every 3 and 7 of the test set;
784-d, standardised, constant pixels dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...data.bundled import digits_images
from ...robustness.boundary_tilting import (adversarial_strength, boundary_distance, margin, mirror_images,
                                            nearest_centroid_direction, tilt)
from ...robustness.linear_probe import LinearProbe
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, Compare
from .tuning import tune

SLUG = "boundary-tilting"
SWEEP_ARMS = ("l2_logistic", "nearest_centroid")
TILT_ARMS = ("tilt_flat", "tilt_data")


@dataclass(frozen=True)
class TiltProtocol(Protocol):
    """Synthetic tilt sweep and digit-pair regularisation sweep (see the module docstring)."""

    syn_dim: int = 100
    syn_varied: int = 10  # coordinates with variance 1 (e_1 carries the class means -/+ syn_shift)
    syn_shift: float = 2.0
    syn_flat_var: float = 1e-8
    syn_n: int = scaled(smoke=1000, quick=4000)  # train and test points each (balanced)
    phis_deg: tuple[float, ...] = scaled(smoke=(0.0, 60.0), quick=(0.0, 30.0, 60.0, 80.0, 89.0))
    pair: tuple[int, int] = (3, 7)
    lam_exp_lo: int = -6
    lam_exp_hi: int = 2  # lambda in 10^{lam_exp_lo..lam_exp_hi}
    val_tol: float = 3.0  # points: lambda_hi = the largest lambda within this of the best validation accuracy
    lbfgs_tol: float = 1e-9
    lbfgs_iter: int = 2000
    all_pairs: bool = scaled(smoke=False, quick=True)
    n_images: int = 6


# ------------------------------------------------------------------------------------ synthetic


def _synthetic(p: TiltProtocol, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    sd = torch.full((p.syn_dim,), math.sqrt(p.syn_flat_var), dtype=torch.float64)
    sd[:p.syn_varied] = 1.0

    def draw(n: int):
        y = torch.arange(n) % 2
        x = torch.randn(n, p.syn_dim, generator=gen, dtype=torch.float64) * sd
        x[:, 0] += p.syn_shift * (2.0 * y - 1.0)
        return x, y

    return (*draw(p.syn_n), *draw(p.syn_n))


def tilt_sweep(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    xtr, ytr, xte, yte = _synthetic(p, ctx.generator)
    z, bz = nearest_centroid_direction(xtr, ytr)
    mid = (xtr[ytr == 0].mean(0) + xtr[ytr == 1].mean(0)) / 2
    u = torch.zeros(p.syn_dim, dtype=torch.float64)
    u[p.syn_dim - 1 if ctx.arm == "tilt_flat" else 1] = 1.0  # a flat coordinate, or a data coordinate (control)
    d_nc = boundary_distance(xte, z, bz)
    accs, ratios, errs = [], [], []
    for phi in p.phis_deg:
        w = tilt(z, u, math.radians(phi)) if phi > 0 else z
        b = -(w * mid).sum()
        accs.append(100.0 * float(((margin(xte, w, b) > 0).long() == yte).double().mean()))
        r = float((boundary_distance(xte, w, b) / d_nc).median())
        ratios.append(r)
        errs.append(abs(r / math.cos(math.radians(phi)) - 1.0))
    # the idealised identity: data in span(z), shared crossing point -> d_C = d_NC cos(theta) for every point
    z_hat = z / z.norm()
    x_span = mid + ((xte - mid) @ z_hat)[:, None] * z_hat
    w_last = tilt(z, u, math.radians(max(p.phis_deg))) if max(p.phis_deg) > 0 else z
    ident = (boundary_distance(x_span, w_last, -(w_last * mid).sum())
             - boundary_distance(x_span, z, bz) * math.cos(math.radians(max(p.phis_deg)))).abs().max()
    scale = float(boundary_distance(x_span, z, bz).max())
    metrics = {"acc_spread": max(accs) - min(accs), "cos_law_err": max(errs), "acc_mean": float(np.mean(accs)),
               "acc_min": min(accs), "span_identity_err": float(ident) / max(scale, 1e-300)}
    return ArmResult(metrics, curves={"dist_ratio": ratios, "syn_acc": accs},
                     info={"phis_deg": list(p.phis_deg), "u": "flat coordinate" if ctx.arm == "tilt_flat"
                           else "data coordinate (variance 1)"})


# ------------------------------------------------------------------------------------ digit pairs


def _standardise(xtr: torch.Tensor, *others: torch.Tensor, drop_constant: bool = False):
    mu, sd = xtr.mean(0), xtr.std(0, unbiased=False)
    keep = sd > 0 if drop_constant else torch.ones_like(sd, dtype=torch.bool)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return tuple(((x - mu) / sd)[:, keep] for x in (xtr, *others)), (mu, sd, keep)


def _digit_pair(x: torch.Tensor, y: torch.Tensor, pair: tuple[int, int], seed: int):
    """Rows of classes ``pair`` (label 1 = pair[1]), a random 50/25/25 split, standardised on train."""
    m = (y == pair[0]) | (y == pair[1])
    X, Y = x[m].double(), (y[m] == pair[1]).long()
    perm = torch.randperm(len(Y), generator=torch.Generator().manual_seed(seed))
    n = len(Y)
    tr, va, te = perm[:n // 2], perm[n // 2:(3 * n) // 4], perm[(3 * n) // 4:]
    (xtr, xva, xte), stats = _standardise(X[tr], X[va], X[te])
    return (xtr, Y[tr], xva, Y[va], xte, Y[te]), stats


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation; 0 when either sequence is constant (no monotone relation)."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def regularisation_sweep(arm: str, data, p: TiltProtocol) -> dict:
    """One pair: fit every lambda (or the NC classifier), pick lambda_hi on validation, measure on test."""
    xtr, ytr, xva, yva, xte, yte = data
    z, bz = nearest_centroid_direction(xtr, ytr)
    lams = [10.0 ** k for k in range(p.lam_exp_hi, p.lam_exp_lo - 1, -1)]  # strong -> weak: warm starts
    fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    prev = None
    for lam in lams:
        if arm == "nearest_centroid":
            fits[lam] = (z, bz)
        else:
            prev = LinearProbe(lam=lam, tol=p.lbfgs_tol, max_iter=p.lbfgs_iter).fit(xtr, ytr, init=prev)
            fits[lam] = (prev.w, prev.b)

    def acc(lam: float, x, y) -> float:
        w, b = fits[lam]
        return 100.0 * float(((margin(x, w, b) > 0).long() == y).double().mean())

    lams = sorted(lams)
    tuned = tune(lams, lambda lam: acc(lam, xva, yva))  # the same grid (budget) for every arm
    best = max(s for _, s in tuned.scores)
    lam_lo, lam_hi = lams[0], max(v for v, s in tuned.scores if s >= best - p.val_tol)
    rows = {lam: adversarial_strength(xte, yte, *fits[lam], z, bz) for lam in lams}
    th_lo, th_hi = rows[lam_lo]["theta"], rows[lam_hi]["theta"]
    gain = rows[lam_hi]["median_distance"] / rows[lam_lo]["median_distance"]
    law = math.cos(th_hi) / math.cos(th_lo)  # d_C = d_NC cos(theta)
    return {
        "lams": lams, "fits": fits, "lam_lo": lam_lo, "lam_hi": lam_hi, "tuned": tuned.as_info(),
        "metrics": {"spearman": _spearman([rows[l]["theta"] for l in lams], lams), "dist_gain": gain,
                    "acc_change": abs(acc(lam_hi, xte, yte) - acc(lam_lo, xte, yte)),
                    "angle_law_err": abs(gain / law - 1.0),
                    "theta_lo_deg": math.degrees(th_lo), "theta_hi_deg": math.degrees(th_hi),
                    "test_acc_lo": acc(lam_lo, xte, yte), "test_acc_hi": acc(lam_hi, xte, yte),
                    "strength_lo": rows[lam_lo]["ratio_mean"], "lam_hi_log10": math.log10(lam_hi)},
        "curves": {"theta_deg": [math.degrees(rows[l]["theta"]) for l in lams],
                   "median_dist": [rows[l]["median_distance"] for l in lams],
                   "test_acc": [acc(l, xte, yte) for l in lams]},
    }


def _meets(m: dict) -> bool:
    return (m["spearman"] <= SPEARMAN_MAX and m["dist_gain"] >= GAIN_MIN and m["acc_change"] <= ACC_CHANGE_MAX
            and m["angle_law_err"] <= LAW_TOL)


def _to_pixels(x: torch.Tensor, stats) -> np.ndarray:
    mu, sd, keep = stats
    full = mu.expand(x.shape[0], -1).clone()
    full[:, keep] = x * sd[keep] + mu[keep]
    side = int(round(math.sqrt(full.shape[1])))
    return full.clamp(0, 1).reshape(-1, side, side).numpy().round(4)  # raw pixels are scaled to [0, 1]


def _sweep_result(ctx: ArmContext, data, stats, pairs: dict | None) -> ArmResult:
    res = regularisation_sweep(ctx.arm, data, ctx.p)
    metrics = {**res["metrics"], **(pairs or {})}
    xte = data[4][:ctx.p.n_images]
    images = {"test image": _to_pixels(xte, stats).tolist()}
    for lam in (res["lam_lo"], res["lam_hi"]):
        w, b = res["fits"][lam]
        images[f"mirror, lam {lam:g}"] = _to_pixels(mirror_images(xte, w, b), stats).tolist()
    return ArmResult(metrics, curves=res["curves"],
                     info={"lambdas": res["lams"], "lambda_hi": res["lam_hi"], "tuned": res["tuned"],
                           "images": images})


def digits_sweep(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    x, y = ctx.data
    data, stats = _digit_pair(x, y, p.pair, ctx.seed)
    frac = None
    if p.all_pairs:
        pairs = [(a, b) for a in range(10) for b in range(a + 1, 10)]
        ms = [regularisation_sweep(ctx.arm, _digit_pair(x, y, pr, ctx.seed)[0], p)["metrics"] for pr in pairs]
        frac = {"pairs_pass_frac": float(np.mean([_meets(m) for m in ms])),
                "pairs_spearman_frac": float(np.mean([m["spearman"] <= SPEARMAN_MAX for m in ms])),
                "pairs_gain_frac": float(np.mean([m["dist_gain"] >= GAIN_MIN for m in ms])),
                "pairs_acc_frac": float(np.mean([m["acc_change"] <= ACC_CHANGE_MAX for m in ms])),
                "pairs_law_frac": float(np.mean([m["angle_law_err"] <= LAW_TOL for m in ms])),
                "pairs_theta_lo_deg": float(np.mean([m["theta_lo_deg"] for m in ms]))}
    return _sweep_result(ctx, data, stats, frac)


def _digits_setup(ctx: ArmContext):
    x, y = digits_images()
    return x.flatten(1), y


def _mnist_setup(ctx: ArmContext):
    from ...data.readers import load_mnist

    xtr, ytr = load_mnist(ctx.data_root, "train")
    xte, yte = load_mnist(ctx.data_root, "test")
    return {"train": (torch.from_numpy(xtr.reshape(len(xtr), -1).astype(np.float64) / 255.0), torch.from_numpy(ytr)),
            "test": (torch.from_numpy(xte.reshape(len(xte), -1).astype(np.float64) / 255.0), torch.from_numpy(yte))}


def mnist_sweep(ctx: ArmContext) -> ArmResult:
    p = ctx.p
    (x, y), (xt, yt) = ctx.data["train"], ctx.data["test"]
    a, b = p.pair
    idx = [torch.nonzero(y == c).flatten() for c in (a, b)]
    perm = [i[torch.randperm(len(i), generator=torch.Generator().manual_seed(ctx.seed))] for i in idx]
    n = p.mnist_per_class
    tr = torch.cat([q[:n] for q in perm])
    va = torch.cat([q[n:n + p.mnist_val_per_class] for q in perm])
    te = torch.nonzero((yt == a) | (yt == b)).flatten()
    (xtr, xva, xte), stats = _standardise(x[tr], x[va], xt[te], drop_constant=True)
    data = (xtr, (y[tr] == b).long(), xva, (y[va] == b).long(), xte, (yt[te] == b).long())
    return _sweep_result(ctx, data, stats, None)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    arms = out.info.get("arms", {})
    grid = {}
    for arm in SWEEP_ARMS:
        imgs = arms.get(arm, {}).pop("images", {})
        for k, v in imgs.items():
            if k == "test image" or arm == "l2_logistic":
                grid.setdefault(k if k == "test image" else f"{k}", v)
    lams = arms.get("l2_logistic", {}).get("lambdas", [])
    axes = {c: {"xlabel": "log10 lambda (L2 strength)", "x": [math.log10(l) for l in lams]}
            for c in ("theta_deg", "median_dist", "test_acc")}
    phis = arms.get("tilt_flat", {}).get("phis_deg", [])
    axes["dist_ratio"] = {"xlabel": "tilt angle phi (deg); cos(phi) is the law", "x": phis}
    axes["syn_acc"] = {"xlabel": "tilt angle phi (deg)", "x": phis, "unit": "%"}
    out.info["curve_axes"] = axes
    if grid:
        out.info["images"] = {"mirror images": grid}


# ------------------------------------------------------------------------------------ claim

SPEARMAN_MAX, GAIN_MIN, ACC_CHANGE_MAX, LAW_TOL = -0.8, 1.2, 3.0, 0.2
ACC_SPREAD_MAX, COS_TOL = 0.5, 0.02


@dataclass(frozen=True)
class MnistTiltProtocol(TiltProtocol):
    """The digits protocol on MNIST 3 vs 7 (2,000 training images per class)."""

    mnist_per_class: int = scaled(smoke=200, quick=2000)
    mnist_val_per_class: int = scaled(smoke=100, quick=1000)
    all_pairs: bool = False
    n_images: int = 6


CRITERION = AllOf(
    Compare("acc_spread", "tilt_flat", "<", ACC_SPREAD_MAX, every_seed=True,
            text=f"synthetic: accuracy spread over phi < {ACC_SPREAD_MAX:g} points (every seed)"),
    Compare("cos_law_err", "tilt_flat", "<=", COS_TOL, every_seed=True,
            text=f"synthetic: median d_C/d_NC = cos(phi) within {COS_TOL:.0%} (every seed)"),
    Compare("spearman", "l2_logistic", "<=", SPEARMAN_MAX, every_seed=True,
            text=f"pair: Spearman(theta, lambda) <= {SPEARMAN_MAX:g} (every seed)"),
    Compare("dist_gain", "l2_logistic", ">=", GAIN_MIN, every_seed=True,
            text=f"pair: median adversarial distance x{GAIN_MIN:g} from lambda_lo to lambda_hi (every seed)"),
    Compare("acc_change", "l2_logistic", "<=", ACC_CHANGE_MAX, every_seed=True,
            text=f"pair: test accuracy changes <= {ACC_CHANGE_MAX:g} points (every seed)"),
    Compare("angle_law_err", "l2_logistic", "<=", LAW_TOL, every_seed=True,
            text=f"pair: distance gain = cos(theta_hi)/cos(theta_lo) within {LAW_TOL:.0%} (every seed)"),
)

MNIST_ARMS = {"tilt_flat": tilt_sweep, "tilt_data": tilt_sweep, "l2_logistic": mnist_sweep,
              "nearest_centroid": mnist_sweep}

CLAIM = register(Claim(
    slug=SLUG,
    title="A Boundary Tilting Persepective on the Phenomenon of Adversarial Examples",
    arxiv="1608.07690",
    statement="Tilting a linear boundary along a flat (zero-variance) direction leaves accuracy unchanged while "
              "the adversarial distance falls as cos(phi); on a digit pair, L2 regularisation lowers the "
              "deviation angle theta from the nearest-centroid classifier and lengthens the minimal adversarial "
              "perturbation by cos(theta_hi)/cos(theta_lo) at nearly constant test error.",
    paper_figure="Linear SVMs on MNIST 3 vs 7 (figures, no table): the deviation angle and the look of the "
                 "mirror images change strongly with the regularisation level (weak regularisation: noise-like "
                 "perturbations, strong: images that look like the other digit) while test error changes "
                 "little; for linear classifiers adversarial strength is 1/cos(theta) when only the tilt differs.",
    protocol=TiltProtocol,
    data="digits",
    setup=_digits_setup,
    arms={"tilt_flat": tilt_sweep, "tilt_data": tilt_sweep, "l2_logistic": digits_sweep,
          "nearest_centroid": digits_sweep},
    finish=_finish,
    criterion=CRITERION,
    control={"tilt_flat": "tilt_data", "l2_logistic": "nearest_centroid"},
    control_note="tilting into a data direction (variance 1) instead of a flat one, and the nearest-centroid "
                 "classifier (no lambda, theta = 0) in place of the regularisation path",
    primary=Primary("dist_gain", "l2_logistic", "nearest_centroid", unit="x"),
    variants=(Variant(name="mnist", description="mnist/: MNIST 3 vs 7, 2,000 training images per class, 784-d",
                      scales=("smoke", "quick", "full"), arms=MNIST_ARMS, setup=_mnist_setup,
                      protocol=MnistTiltProtocol),),
    uses=("gradkit.robustness.boundary_tilting.nearest_centroid_direction",
          "gradkit.robustness.boundary_tilting.deviation_angle",
          "gradkit.robustness.boundary_tilting.boundary_distance",
          "gradkit.robustness.boundary_tilting.mirror_images",
          "gradkit.robustness.boundary_tilting.tilt",
          "gradkit.robustness.boundary_tilting.adversarial_strength",
          "gradkit.robustness.linear_probe.LinearProbe"),
    notes="Why the task can discriminate: tilting into a direction the data occupy changes predictions, so the "
          "control arm tilt_data loses accuracy with phi and its distance ratio leaves cos(phi); the "
          "nearest-centroid baseline has theta = 0 at every lambda, so its Spearman is 0 and its distance gain "
          "1.0, far from the thresholds; on standardised digits the unregularised angle is about 40 deg, so the "
          "largest gain the angle allows is about 1/cos(40 deg) = 1.3, which is why the gain threshold is 1.2 "
          "(not 2) and the angle law is checked against the measured angles. The paper fits linear SVMs; "
          "L2-regularised logistic regression is used (its direction follows the same regularisation path: "
          "max-margin as lambda -> 0, centroid difference as lambda -> inf); LinearProbe also fits the squared "
          "hinge. The paper gives no numbers for the sweep, so the thresholds are the laws it states. "
          "lambda_hi is chosen on the validation split as the largest lambda within 3 points of the best "
          "validation accuracy (validation ties are common on 3 vs 7), every arm on the same lambda grid.",
    findings="The geometry holds everywhere (tilting along a flat direction: accuracy constant, distance x cos(phi) "
             "to 1e-4; theta falls monotonically with lambda in every split, Spearman -1), but 'larger distance at "
             "nearly constant error' misses the 3-point rule by one test digit on 8x8 digits: in one split of "
             "three, lambda_hi (picked on validation) costs 3.3 test points (3 of 91 images) for a 1.27x distance "
             "gain. On the paper's MNIST 3 vs 7 (--data-root) the effect is larger than the angle law predicts: "
             "theta falls from about 69 to 0.7 deg and the distance grows 3.2-3.5x at <= 2.2 points, while "
             "cos(theta_hi)/cos(theta_lo) predicts 2.7-2.9x (16-23% low): the law's idealised assumptions "
             "(one crossing point, no data variance along w's other directions) do not hold there.",
    plots=("dist_ratio", "syn_acc", "theta_deg", "median_dist", "test_acc"),
    bounds={"acc_spread": (0.0, 100.0), "acc_mean": (0.0, 100.0), "acc_min": (0.0, 100.0),
            "cos_law_err": (0.0, math.inf), "span_identity_err": (0.0, 1e-6), "spearman": (-1.0, 1.0),
            "dist_gain": (0.0, math.inf), "acc_change": (0.0, 100.0), "angle_law_err": (0.0, math.inf),
            "theta_lo_deg": (0.0, 180.0), "theta_hi_deg": (0.0, 180.0), "test_acc_lo": (0.0, 100.0),
            "test_acc_hi": (0.0, 100.0), "strength_lo": (0.0, math.inf), "pairs_pass_frac": (0.0, 1.0),
            "pairs_spearman_frac": (0.0, 1.0), "pairs_gain_frac": (0.0, 1.0), "pairs_acc_frac": (0.0, 1.0),
            "pairs_law_frac": (0.0, 1.0), "pairs_theta_lo_deg": (0.0, 180.0),
            "lam_hi_log10": (-6.0, 2.0)},
))
