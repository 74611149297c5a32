"""Convergent-learning claim: independently trained nets learn matching units (paper slug: convergent-learning).

Data: scikit-learn digits as 64 pixels in [0, 1], fixed 1437/360 split; with ``--data-root``: Fashion-MNIST's
10,000 test images, a fixed 8000/2000 split. Nets: MLP in-128-128-10 (ReLU), Adam, the same batch order for
every net; nets differ only in their random initialisation. Units are the post-ReLU outputs of the two hidden
layers, measured on the held-out images. Arms are measurements of the same nets in one run:

- ``trained``: pairs of trained nets (bipartite / semi matching, within-net redundancy, joint spectral clusters);
- ``untrained``: a trained net against another net's untrained initialisation;
- ``init``: the same nets at epoch 0 against each other (the control: no training);
- ``chance``: a random one-to-one pairing of trained units (the mean of C_AB), plus a matching with the
  held-out samples of B shuffled (the finite-sample bias of a maximum);
- ``sparse``: one-to-many sparse linear prediction of B's layer-1 units from A's (L1 weight tuned on a
  validation split of the training images under a 30% nonzero budget), held-out R^2;
- ``single_partner``: each B unit predicted from its one bipartite partner in A, held-out R^2.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...data import Split, TensorBatches, load_digits_images_split
from ...engine import accuracy, fit
from ...probes.unit_matching import (chance_correlation, collect_activations, dead_units, fit_sparse_prediction,
                                     joint_spectral_clusters, match_units, partner_r2, unit_correlation)
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllFinite, AllOf, AtMost, Gain
from .tuning import tune

SLUG = "convergent-learning"
LAYERS = {"l1": "1", "l2": "3"}   # post-ReLU outputs of the two hidden layers of the Sequential MLP
NNZ_MAX = 0.3                     # the sparse predictor may use at most 30% of the weights
MARGIN_UNTRAINED = 0.15
MARGIN_CHANCE = 0.3
MARGIN_INIT = 0.15
MARGIN_R2 = 0.1


@dataclass(frozen=True)
class ConvergentProtocol(Protocol):
    """The nets (all but their init shared), the sparse-prediction sweep and the cluster count."""

    n_nets: int = scaled(smoke=2, quick=4)           # nets A, B, C, ...: every pair is measured
    epochs: int = scaled(smoke=3, quick=30)
    lr: float = 1e-3                                  # Adam
    batch_size: int = 32
    hidden: tuple[int, int] = (128, 128)
    l1_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)  # L1 weight of the sparse stitch, chosen on validation
    stitch_steps: int = scaled(smoke=100, quick=1000)  # proximal-gradient steps per sparse fit
    val_fraction: float = 0.2                         # of the training images' activations, for the L1 choice
    n_clusters: int = scaled(smoke=4, quick=16)       # spectral clusters of the joint 2k-unit graph


@dataclass(frozen=True)
class FashionProtocol(ConvergentProtocol):
    """Fashion-MNIST: the test file's 10,000 images split 8000 (training) / 2000 (held-out)."""

    epochs: int = scaled(smoke=1, quick=5)
    n_train: int = scaled(smoke=1000, quick=8000)
    n_test: int = 2000


# ------------------------------------------------------------------------------------------ data and nets
def _digits_setup(ctx: ArmContext) -> dict:
    s = load_digits_images_split()
    split = Split(s.x_train.flatten(1), s.y_train, s.x_test.flatten(1), s.y_test, "digits")
    return _train_nets(ctx, split.to(ctx.device))


def _fashion_split(root, n_train: int, n_test: int) -> Split:
    from ...data.readers import load_fashion_mnist

    x, y = load_fashion_mnist(root, "test")
    perm = np.random.RandomState(0).permutation(len(y))  # fixed, independent of the training seed
    if n_train + n_test > len(y):
        raise ValueError(f"n_train + n_test must be <= {len(y)}, got {n_train} + {n_test}")
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    x = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0)
    y = torch.as_tensor(y, dtype=torch.int64)
    return Split(x[tr], y[tr], x[te], y[te], "fashion_mnist")


def _fashion_setup(ctx: ArmContext) -> dict:
    return _train_nets(ctx, _fashion_split(ctx.data_root, ctx.p.n_train, ctx.p.n_test).to(ctx.device))


def build_mlp(n_in: int, hidden: tuple[int, int], n_out: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear -> ReLU -> Linear; the ReLUs are modules "1" and "3"."""
    return nn.Sequential(nn.Linear(n_in, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                         nn.Linear(hidden[1], n_out))


def _train_nets(ctx: ArmContext, split: Split) -> dict:
    """Train ``n_nets`` nets that differ only in init; keep each one's epoch-0 copy; collect unit activations."""
    p = ctx.p
    trained, inits, accs = [], [], []
    for i in range(p.n_nets):
        torch.manual_seed(ctx.seed * 1000 + 17 * i + 1)  # the init: distinct per net and per run seed
        net = build_mlp(split.num_features, p.hidden, split.num_classes).to(ctx.device)
        inits.append(copy.deepcopy(net))
        order = torch.Generator().manual_seed(ctx.seed)  # the same batch order for every net
        fit(net, torch.optim.Adam(net.parameters(), lr=p.lr),
            TensorBatches(split.x_train, split.y_train, batch_size=p.batch_size, generator=order),
            epochs=p.epochs, progress=ctx.progress, desc=f"{SLUG}/net{i}")
        trained.append(net)
        accs.append(accuracy(net, split.x_test, split.y_test))

    def acts(nets, x):
        return [collect_activations(n, list(LAYERS.values()), x) for n in nets]

    return {"split": split, "test_acc": accs, "init_acc": [accuracy(n, split.x_test, split.y_test) for n in inits],
            "trained": acts(trained, split.x_test), "init": acts(inits, split.x_test),
            "trained_train": acts(trained, split.x_train)}


# ------------------------------------------------------------------------------------------ arms
def _pairs(n: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(n), 2))


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def _matching_arm(a_nets: list, b_nets: list, pairs: list[tuple[int, int]], clusters: int | None) -> ArmResult:
    """Bipartite and semi matching of every pair (A = a_nets[i], B = b_nets[j]), per layer."""
    metrics, curves = {}, {}
    for tag, layer in LAYERS.items():
        bi, semi, shared, mixed, cross, sorted_ = [], [], [], [], [], []
        for i, j in pairs:
            a, b = a_nets[i][layer], b_nets[j][layer]
            c = unit_correlation(a, b)
            m = match_units(c)
            s = match_units(c, "semi")
            bi.append(m.mean)
            semi.append(s.mean)
            shared.append(s.n_shared)
            sorted_.append(m.sorted().double().cpu().numpy())
            if clusters is not None and tag == "l1":
                jc = joint_spectral_clusters(unit_correlation(a), c, unit_correlation(b), clusters, random_state=0)
                mixed.append(jc.mixed_fraction)
                cross.append(jc.cross_within)
        metrics[f"matched_{tag}"] = _mean(bi)
        metrics[f"semi_{tag}"] = _mean(semi)
        metrics[f"shared_{tag}"] = _mean(shared)
        if mixed:
            metrics["mixed_clusters_l1"] = _mean(mixed)
            metrics["cluster_cross_l1"] = _mean(cross)
        curves[f"sorted_{tag}"] = [float(v) for v in np.mean(sorted_, axis=0)]
    return ArmResult(metrics, curves)


def _within(nets: list) -> float:
    """Within-net redundancy: bipartite matching of a net's layer-1 units with its own, self-pairs excluded."""
    return _mean(match_units(unit_correlation(n[LAYERS["l1"]]), exclude_self=True).mean for n in nets)


def _same_state_arm(state: str, acc: str):
    """Pairs of nets in one state (``"trained"`` or ``"init"``), with their accuracy and dead-unit count."""

    def arm(ctx: ArmContext) -> ArmResult:
        nets = ctx.data[state]
        res = _matching_arm(nets, nets, _pairs(ctx.p.n_nets), ctx.p.n_clusters)
        res.metrics["within_l1"] = _within(nets)
        res.metrics["test_acc"] = _mean(ctx.data[acc])
        res.metrics["dead_l1"] = _mean(int(dead_units(n[LAYERS["l1"]]).sum()) for n in nets)
        return res

    return arm


def _untrained_arm(ctx: ArmContext) -> ArmResult:
    d, n = ctx.data, ctx.p.n_nets
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]  # trained net i vs net j's untrained init
    return _matching_arm(d["trained"], d["init"], pairs, None)


def _chance_arm(ctx: ArmContext) -> ArmResult:
    d, metrics = ctx.data, {}
    for tag, layer in LAYERS.items():
        metrics[f"matched_{tag}"] = _mean(chance_correlation(unit_correlation(d["trained"][i][layer],
                                                                              d["trained"][j][layer]))
                                          for i, j in _pairs(ctx.p.n_nets))
    shuffled = []
    for i, j in _pairs(ctx.p.n_nets):
        b = d["trained"][j][LAYERS["l1"]]
        perm = torch.randperm(len(b), generator=ctx.generator).to(b.device)
        shuffled.append(match_units(unit_correlation(d["trained"][i][LAYERS["l1"]], b[perm])).mean)
    metrics["shuffled_l1"] = _mean(shuffled)
    return ArmResult(metrics)


def _layer1(d: dict, key: str, i: int) -> torch.Tensor:
    return d[key][i][LAYERS["l1"]]


def _sparse_arm(ctx: ArmContext) -> ArmResult:
    """Per pair A -> B: choose l1 on a validation split of the training images (nnz <= 30%), refit, test R^2."""
    p, d = ctx.p, ctx.data
    r2s, nnzs, chosen = [], [], []
    val_r2 = {l1: [] for l1 in p.l1_grid}
    val_nnz = {l1: [] for l1 in p.l1_grid}
    for i, j in _pairs(p.n_nets):
        a, b = _layer1(d, "trained_train", i), _layer1(d, "trained_train", j)

        def trial(l1: float) -> float:
            g = torch.Generator().manual_seed(ctx.seed)  # the same validation rows for every l1
            f = fit_sparse_prediction(a, b, l1, p.stitch_steps, val_fraction=p.val_fraction, generator=g)
            val_r2[l1].append(f.r2)
            val_nnz[l1].append(f.nnz_fraction)
            return f.r2 if f.nnz_fraction <= NNZ_MAX else -math.inf

        tuned = tune(p.l1_grid, trial)
        # no l1 met the nonzero budget: the largest (sparsest) is refit, and the nnz check shows the miss
        l1 = tuned.value if math.isfinite(tuned.score) else max(p.l1_grid)
        fit_ = fit_sparse_prediction(a, b, l1, p.stitch_steps,
                                     test=(_layer1(d, "trained", i), _layer1(d, "trained", j)))
        r2s.append(fit_.r2)
        nnzs.append(fit_.nnz_fraction)
        chosen.append(l1)
    metrics = {"r2_l1": _mean(r2s), "nnz_frac": _mean(nnzs), "log10_l1": _mean(math.log10(v) for v in chosen
                                                                                 if v > 0)}
    curves = {"sparse_val_r2": [_mean(val_r2[l]) for l in p.l1_grid],
              "sparse_val_nnz": [_mean(val_nnz[l]) for l in p.l1_grid]}
    return ArmResult(metrics, curves, info={"chosen_l1": chosen, "grid": list(p.l1_grid)})


def _single_partner_arm(ctx: ArmContext) -> ArmResult:
    p, d = ctx.p, ctx.data
    r2s = [partner_r2(_layer1(d, "trained_train", i), _layer1(d, "trained_train", j),
                      _layer1(d, "trained", i), _layer1(d, "trained", j)) for i, j in _pairs(p.n_nets)]
    k = _layer1(d, "trained", 0).shape[1]
    return ArmResult({"r2_l1": _mean(r2s), "nnz_frac": 1.0 / k})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    split, m = ctx.data["split"], out.metrics
    k1, k2 = ctx.p.hidden
    out.info.update({
        "n_train": len(split.y_train), "n_heldout": len(split.y_test), "pairs": len(_pairs(ctx.p.n_nets)),
        "net_test_acc": ctx.data["test_acc"],
        "gap_trained_untrained_l1": m["trained"]["matched_l1"] - m["untrained"]["matched_l1"],
        "gap_trained_init_l1": m["trained"]["matched_l1"] - m["init"]["matched_l1"],
        "depth_drop_trained": m["trained"]["matched_l1"] - m["trained"]["matched_l2"],
        "curve_axes": {"sorted_l1": {"xlabel": "layer-1 unit rank (best match first)", "x": list(range(k1)),
                                     "unit": "corr"},
                       "sorted_l2": {"xlabel": "layer-2 unit rank (best match first)", "x": list(range(k2)),
                                     "unit": "corr"},
                       "sparse_val_r2": {"xlabel": "L1 weight of the sparse stitch",
                                         "x": list(ctx.p.l1_grid), "unit": "R^2"},
                       "sparse_val_nnz": {"xlabel": "L1 weight of the sparse stitch",
                                          "x": list(ctx.p.l1_grid), "unit": "fraction"}},
    })


# ------------------------------------------------------------------------------------------ the claim
ARMS = {"trained": _same_state_arm("trained", "test_acc"), "untrained": _untrained_arm,
        "init": _same_state_arm("init", "init_acc"), "chance": _chance_arm,
        "sparse": _sparse_arm, "single_partner": _single_partner_arm}

CRITERION = AllOf(
    Gain("matched_l1", "trained", "untrained", MARGIN_UNTRAINED),
    Gain("matched_l1", "trained", "chance", MARGIN_CHANCE),
    Gain("matched_l1", "trained", "init", MARGIN_INIT),
    Gain("r2_l1", "sparse", "single_partner", MARGIN_R2),
    AtMost("nnz_frac", "sparse", NNZ_MAX),
    AllFinite(),
)

CORR = (-1.0, 1.0)

CLAIM = register(Claim(
    slug=SLUG,
    title="Convergent Learning: Do different neural networks learn the same representations?",
    arxiv="1511.07543",
    statement=(
        "Nets that differ only in their random init learn matching units: the mean bipartite-matched "
        "correlation of layer-1 units between trained nets exceeds a trained-vs-untrained pairing by >= 0.15, "
        "a random pairing by >= 0.3, and the same nets at init by >= 0.15 (training makes them converge); and a "
        "sparse linear map (<= 30% nonzero weights) predicts one net's layer-1 units from the other's with "
        "held-out R^2 >= 0.1 above each unit's single best partner (shared subspaces with different bases)"
    ),
    paper_figure=(
        "ImageNet AlexNets from 4 random inits: many conv1 units have near-perfect one-to-one matches "
        "(matched correlation close to 1), with a tail of units without a good partner; matched correlation "
        "falls with depth; semi-matching exceeds bipartite; sparse prediction with few nonzero weights "
        "approaches the unregularised prediction error (Figs. 2-5, qualitative)"
    ),
    protocol=ConvergentProtocol,
    data="digits",
    setup=_digits_setup,
    arms=ARMS,
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="matched_l1", ours="trained", baseline="untrained", unit="corr", ceiling=1.0,
                    ceiling_tol=0.01),
    control={"trained": "init"},
    control_note="the same nets at epoch 0 (no training) stand in for the trained nets",
    variants=(
        Variant(name="fashion_mnist",
                description="fashion_mnist/ t10k files: MLP 784-128-128-10 for 5 epochs on a fixed 8000/2000 "
                            "split of the 10,000 test images, the same arms and pass rule",
                protocol=FashionProtocol, setup=_fashion_setup),
    ),
    uses=("gradkit.probes.unit_matching.collect_activations", "gradkit.probes.unit_matching.ActivationRecorder",
          "gradkit.probes.unit_matching.unit_correlation", "gradkit.probes.unit_matching.match_units",
          "gradkit.probes.unit_matching.chance_correlation", "gradkit.probes.unit_matching.SparseStitch",
          "gradkit.probes.unit_matching.fit_sparse_prediction", "gradkit.probes.unit_matching.partner_r2",
          "gradkit.probes.unit_matching.joint_spectral_clusters"),
    notes=(
        "Correlations are computed on held-out images (Pearson on post-ReLU units; dead units correlate 0). "
        "The untrained baseline pairs trained net i with net j's untrained init (i != j); the init arm pairs "
        "the epoch-0 copies of the same nets; chance is the exact expectation of a random one-to-one pairing "
        "(the mean of C_AB; permuting columns and re-running the Hungarian algorithm would give the same "
        "optimum, so a random pairing is the chance level), and 'shuffled_l1' the bipartite optimum after "
        "shuffling B's samples (the selection bias of a maximum over pairings). Why the task can discriminate: "
        "untrained ReLU units on digits already correlate well (low-dimensional inputs), so the baselines sit "
        "far below the ceiling of 1 but well above chance; the control (the same nets at init in place of the "
        "trained ones) fails the margin over the untrained pairing. The sparse loss is 1/2 mean_n ||z_b - M z_a||^2 + "
        "l1 ||M||_1 (Caffe's Euclidean loss with L1 weight decay, the paper's setting; the same scale as "
        "scikit-learn's Lasso), solved by accelerated proximal gradient; l1 is chosen per pair on a validation "
        "split of the training images among fits with <= 30% nonzeros, then refit and scored on held-out "
        "images. The single-partner baseline has no hyperparameter to tune (its partner and slope come from "
        "the training images). Reported, not pass/fail: semi-matching (always >= bipartite), 'shared_*' (B units "
        "picked by several A units), within-net redundancy, the share of spectral clusters mixing both nets and "
        "the mean |corr| of the cross-net unit pairs sharing a cluster ('cluster_cross_l1'), "
        "layer 2 (the paper's fall with depth is not expected at this depth and width)."
    ),
    plots=("sorted_l1", "sorted_l2", "sparse_val_r2"),
    bounds={"matched_l1": CORR, "matched_l2": CORR, "semi_l1": CORR, "semi_l2": CORR, "within_l1": CORR,
            "shuffled_l1": CORR, "shared_l1": (0.0, float("inf")), "shared_l2": (0.0, float("inf")),
            "mixed_clusters_l1": (0.0, 1.0), "cluster_cross_l1": (0.0, 1.0), "test_acc": (0.0, 100.0),
            "dead_l1": (0.0, float("inf")),
            "r2_l1": (-float("inf"), 1.0), "nnz_frac": (0.0, 1.0), "log10_l1": (-float("inf"), float("inf"))},
))
