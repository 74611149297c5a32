"""Projection-head claim: pre-projection features weight features more evenly (the square-root law) and serve
downstream tasks better than post-projection features (paper slug: projection-head).

Part A (synthetic, the paper's linear analysis): x = sum_j s_j z_j mu_j + 0.1 eps in 20 dims, four orthonormal
feature directions mu_j with strengths s = (1, 0.8, 0.5, 0.3), z_j = +-1; a view keeps feature j with
probability keep_j = (1, 1, 0.5, 0.5) and draws fresh eps. A bias-free two-layer linear model h = W2 W1 x (8x20,
8x8) is trained by full-batch gradient descent on the spectral contrastive loss over 2048 samples. Feature
weights are ||W1 mu_j|| (pre) and ||W2 W1 mu_j|| (post); the downstream task is the sign of z_4 with a 5-NN
classifier on the raw representation (weighting-sensitive), trained/tested on clean samples.
Part B (digits): SimCLR-style training of an MLP encoder 64-256-128 with a 2-layer MLP head 128-128-64 (InfoNCE,
tau 0.5; views = 1-pixel shifts + Gaussian noise + 20% pixel masking), then a standardised logistic-regression
probe on the pre- or post-projection features, C chosen on a validation split cut from the training images
(the same grid for every arm). The fixed reweighting head arm trains the encoder through diag(kappa^i) instead.
With ``--data-root``, part B runs on Fashion-MNIST's test split (5000 images to train, 5000 to test the probe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ...data import Split, TensorBatches, load_digits_images_split
from ...engine import fit
from ...nn.contrastive import info_nce_loss, spectral_contrastive_loss
from ...nn.projection_head import ProjectionHead, WithProjectionHead
from ...probes.feature_weights import feature_weights
from ...probes.linear_eval import linear_probe
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllFinite, AllOf, Compare, Gain
from .tuning import holdout, tune

SLUG = "projection-head"
LOSSES = {"spectral": lambda h1, h2, tau: spectral_contrastive_loss(h1, h2),
          "info_nce": lambda h1, h2, tau: info_nce_loss(h1, h2, tau=tau)}


@dataclass(frozen=True)
class ProjectionHeadProtocol(Protocol):
    """Part A (a_*): the synthetic linear model; part B (b_*): digits SimCLR with a linear probe."""

    a_steps: int = scaled(smoke=500, quick=3000, full=3000)
    a_samples: int = 2048
    a_dim_in: int = 20
    a_width: int = 8
    a_strengths: tuple[float, ...] = (1.0, 0.8, 0.5, 0.3)
    a_keep: tuple[float, ...] = (1.0, 1.0, 0.5, 0.5)  # per-feature keep probability of a view
    a_noise: float = 0.1
    a_init: float = 0.05  # std of the initial weight entries (small, so training starts near balanced)
    a_lr: float = 0.05
    a_grown: float = 1e-2  # the square-root law is checked on features whose post weight exceeds this
    a_target: int = 4  # downstream label: the sign of z_target (1-based)
    a_knn: int = 5
    a_eval_samples: int = 1000
    b_epochs: int = scaled(smoke=2, quick=100, full=100)
    b_train: int | None = scaled(smoke=512, quick=None, full=None)  # a fixed subset of the training images
    b_batch: int = 256
    b_lr: float = 1e-3
    b_loss: str = "info_nce"
    b_tau: float = 0.5
    b_shift: int = 1
    b_noise: float = 0.1
    b_mask: float = 0.2
    b_widths: tuple[int, int] = (256, 128)  # encoder 64 -> 256 -> 128
    b_head: tuple[int, int] = (128, 64)  # head 128 -> 128 -> 64
    b_kappa: float = 0.98  # fixed reweighting head: w_i = kappa^i over the 128 coordinates
    probe_c_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    val_fraction: float = 0.2


@dataclass(frozen=True)
class FashionProtocol(ProjectionHeadProtocol):
    """Part B on the Fashion-MNIST test split: 5000 images for SSL and probe training, 5000 for probe testing;
    MLP 784-256-128 + head 128-128-64, 2-pixel shifts, 30 epochs (about 600 steps)."""

    b_epochs: int = scaled(smoke=1, quick=30, full=30)
    b_train: int | None = scaled(smoke=512, quick=None, full=None)
    b_shift: int = 2
    b_split: int = 5000  # the first b_split images of a fixed permutation of the test split train the encoder


# ------------------------------------------------------------------------------------------ part A
def _synthetic_views(p, z: Tensor, mu: Tensor, g: torch.Generator, keep: bool = True) -> Tensor:
    s = torch.tensor(p.a_strengths)
    coef = z * s
    if keep:
        coef = coef * (torch.rand(z.shape, generator=g) < torch.tensor(p.a_keep)).to(coef.dtype)
    return coef @ mu + p.a_noise * torch.randn(len(z), mu.shape[1], generator=g)


def _signs(n: int, k: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1


def _knn_acc(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, k: int) -> float:
    """k-NN (Euclidean, majority vote) accuracy in percent on binary labels."""
    idx = torch.cdist(f_test, f_train).topk(k, largest=False).indices
    pred = (y_train[idx].float().mean(1) > 0.5).long()
    return 100.0 * (pred == y_test).float().mean().item()


def _train_linear(ctx: ArmContext, fixed: bool) -> dict:
    """Full-batch GD on the spectral loss: a two-layer linear model (learned head) or a one-layer encoder
    with the fixed reweighting head. Data and initialisation depend on the seed only."""
    p = ctx.p
    g = torch.Generator().manual_seed(10_000 + ctx.seed)
    k = len(p.a_strengths)
    mu = torch.linalg.qr(torch.randn(p.a_dim_in, p.a_dim_in, generator=g))[0][:, :k].T.contiguous()
    z = _signs(p.a_samples, k, g)
    encoder = nn.Linear(p.a_dim_in, p.a_width, bias=False)
    head = ProjectionHead(p.a_width, kind="fixed_reweight", kappa=0.5) if fixed else \
        ProjectionHead(p.a_width, depth=1, kind="linear")
    model = WithProjectionHead(encoder, head)
    with torch.no_grad():
        for w in model.parameters():
            w.copy_(p.a_init * torch.randn(w.shape, generator=g))
    w_init = feature_weights(model, mu, layers=["encoder", "head"])
    opt = torch.optim.SGD(model.parameters(), lr=p.a_lr)
    target = p.a_target - 1
    traj: dict[str, list[float]] = {"pre": [], "post": []}
    every = max(1, p.a_steps // 50)
    for step in range(p.a_steps):
        x1, x2 = _synthetic_views(p, z, mu, g), _synthetic_views(p, z, mu, g)
        loss = spectral_contrastive_loss(model(x1), model(x2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == p.a_steps - 1:
            w = feature_weights(model, mu, layers=["encoder", "head"])
            traj["pre"].append(math.log10(float(w[0, target])))
            traj["post"].append(math.log10(float(w[1, target])))
    w = feature_weights(model, mu, layers=["encoder", "head"])
    zt, ze = _signs(p.a_eval_samples, k, g), _signs(p.a_eval_samples, k, g)
    xt, xe = _synthetic_views(p, zt, mu, g, keep=False), _synthetic_views(p, ze, mu, g, keep=False)
    with torch.no_grad():  # k-NN accuracy on the sign of every feature; the target's is the claim's
        acc = {layer: [_knn_acc(model.features(xt, layer), (zt[:, j] > 0).long(), model.features(xe, layer),
                                (ze[:, j] > 0).long(), p.a_knn) for j in range(k)] for layer in ("pre", "post")}
    return {"w_pre": w[0], "w_post": w[1], "w_pre_init": w_init[0], "knn": acc, "traj": traj, "loss": loss.item()}


def _part_a(ctx: ArmContext, fixed: bool = False) -> dict:
    key = "a_fixed" if fixed else "a_learned"
    if key not in ctx.shared:
        ctx.shared[key] = _train_linear(ctx, fixed)
    return ctx.shared[key]


def _a_metrics(ctx: ArmContext, layer: str) -> tuple[dict[str, float], list[float]]:
    """Feature weights of the pre/post layer of the learned-head model, the square-root deviation
    max_j |log w_layer_j - 0.5 log w_post_j| over grown features, the spread max/min and the k-NN accuracy."""
    r = _part_a(ctx)
    w, w_post = r[f"w_{layer}"], r["w_post"]
    grown = w_post > ctx.p.a_grown
    dev = (w.log() - 0.5 * w_post.log()).abs()[grown]
    sel = w[grown]
    m = {"sqrt_dev": float(dev.max()) if len(dev) else float("nan"),
         "weight_spread": float(sel.max() / sel.min()) if len(sel) else float("nan"),
         "knn_acc": r["knn"][layer][ctx.p.a_target - 1], "n_grown": float(grown.sum()),
         "target_weight_post": float(w_post[ctx.p.a_target - 1])}
    m.update({f"w{j + 1}": float(v) for j, v in enumerate(w)})
    m.update({f"knn{j + 1}": v for j, v in enumerate(r["knn"][layer])})
    if layer == "pre":  # the square-root deviation of every feature, and over the features layer 1 learned
        devs = (w.log() - 0.5 * w_post.log()).abs()
        m.update({f"dev{j + 1}": float(v) for j, v in enumerate(devs)})
        learned = w > 2.0 * r["w_pre_init"]  # the pre weight left its initial level
        m["n_learned"] = float(learned.sum())
        m["sqrt_dev_learned"] = float(devs[learned].max()) if bool(learned.any()) else float("nan")
    return m, r["traj"][layer]


# ------------------------------------------------------------------------------------------ part B
def _augment(p, x: Tensor, g: torch.Generator) -> Tensor:
    """(N, 1, 8, 8) images -> flattened views: random shifts of up to b_shift pixels (zero fill), Gaussian
    noise, and a fraction b_mask of pixels set to zero."""
    n, _, hgt, wid = x.shape
    s = p.b_shift
    padded = nn.functional.pad(x, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(hgt)[None]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(wid)[None]).to(x.device)  # (n, w)
    ar = torch.arange(n, device=x.device)[:, None, None]
    out = padded[:, 0][ar, rows[:, :, None], cols[:, None, :]].reshape(n, -1)
    out = out + p.b_noise * torch.randn(out.shape, generator=g).to(x.device)
    keep = (torch.rand(out.shape, generator=g) >= p.b_mask).to(x.device, out.dtype)
    return out * keep


def _ssl_model(p, d_in: int, fixed: bool) -> WithProjectionHead:
    w1, w2 = p.b_widths
    encoder = nn.Sequential(nn.Linear(d_in, w1), nn.ReLU(), nn.Linear(w1, w2), nn.ReLU())
    head = ProjectionHead(w2, kind="fixed_reweight", kappa=p.b_kappa) if fixed else \
        ProjectionHead(w2, hidden=p.b_head[0], out_dim=p.b_head[1], depth=2, kind="mlp")
    return WithProjectionHead(encoder, head)


def _train_ssl(ctx: ArmContext, fixed: bool) -> dict:
    p, split = ctx.p, ctx.data
    model = _ssl_model(p, split.x_train[0].numel(), fixed).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=p.b_lr)
    g = ctx.generator
    loss_fn = LOSSES[p.b_loss]

    def ssl_loss(m: nn.Module, batch) -> Tensor:
        (x,) = batch
        return loss_fn(m(_augment(p, x, g)), m(_augment(p, x, g)), p.b_tau)

    batches = TensorBatches(split.x_train, batch_size=p.b_batch, shuffle=True, generator=g, drop_last=True)
    hist = fit(model, opt, batches, epochs=p.b_epochs, compute_loss=ssl_loss, progress=ctx.progress,
               desc=f"{SLUG}/{'fixed' if fixed else 'learned'}-head")
    model.eval()
    with torch.no_grad():
        feats = {layer: (model.features(split.x_train.flatten(1), layer), model.features(split.x_test.flatten(1), layer))
                 for layer in ("pre", "post")}
    return {"feats": feats, "ssl_loss": hist.series("train_loss")}


def _probe(ctx: ArmContext, train: Tensor, test: Tensor) -> tuple[float, dict]:
    """Linear-probe test accuracy, C tuned on a validation split of the training features (same grid per arm)."""
    p, split = ctx.p, ctx.data
    feats = Split(train, split.y_train, test, split.y_test, split.name)
    fit_split, val_split = holdout(feats, fraction=p.val_fraction, seed=ctx.seed)
    tuned = tune(p.probe_c_grid, lambda c: linear_probe(val_split.x_train, val_split.y_train, val_split.x_test,
                                                         val_split.y_test, C=c))
    return linear_probe(train, split.y_train, test, split.y_test, C=tuned.value), tuned.as_info()


def _part_b(ctx: ArmContext, fixed: bool = False) -> dict:
    key = "b_fixed" if fixed else "b_learned"
    if key not in ctx.shared:
        ctx.shared[key] = _train_ssl(ctx, fixed)
    return ctx.shared[key]


# ------------------------------------------------------------------------------------------ arms
def _layer_arm(ctx: ArmContext) -> ArmResult:
    """``pre`` / ``post``: the representation before / after the learned head (one trained model per part)."""
    layer = ctx.arm
    metrics, traj = _a_metrics(ctx, layer)
    b = _part_b(ctx)
    acc, tuned = _probe(ctx, *b["feats"][layer])
    metrics["probe_acc"] = acc
    return ArmResult(metrics, curves={"target_weight": traj, "ssl_loss": b["ssl_loss"]}, info={"probe_c": tuned})


def _fixed_head_arm(ctx: ArmContext) -> ArmResult:
    """The encoder trained through the fixed reweighting head; its own representation is evaluated."""
    r = _part_a(ctx, fixed=True)
    w = r["w_pre"]
    b = _part_b(ctx, fixed=True)
    acc, tuned = _probe(ctx, *b["feats"]["pre"])
    metrics = {"knn_acc": r["knn"]["pre"][ctx.p.a_target - 1], "probe_acc": acc,
               "weight_spread": float(w.max() / w.min())}
    metrics.update({f"knn{j + 1}": v for j, v in enumerate(r["knn"]["pre"])})
    metrics.update({f"w{j + 1}": float(v) for j, v in enumerate(w)})
    return ArmResult(metrics, curves={"target_weight": r["traj"]["pre"], "ssl_loss": b["ssl_loss"]},
                     info={"probe_c": tuned})


def _setup(ctx: ArmContext) -> Split:
    split = load_digits_images_split()
    if ctx.p.b_train is not None:
        n = ctx.p.b_train
        split = Split(split.x_train[:n], split.y_train[:n], split.x_test, split.y_test, split.name)
    return split.to(ctx.device)


def _fashion_setup(ctx: ArmContext) -> Split:
    """Fashion-MNIST's test split as (N, 1, 28, 28) images in [0, 1], cut by a fixed, seed-independent permutation."""
    from ...data import readers  # lazy: only the real-data branch needs it

    x, y = readers.load_fashion_mnist(ctx.data_root, "test")
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    x = torch.from_numpy(x.astype(np.float32) / 255.0)[perm][:, None]
    y = torch.as_tensor(y, dtype=torch.int64)[perm]
    n = ctx.p.b_split
    n_fit = n if ctx.p.b_train is None else min(n, ctx.p.b_train)
    return Split(x[:n_fit], y[:n_fit], x[n:], y[n:], name="fashion-mnist").to(ctx.device)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p = ctx.p
    every = max(1, p.a_steps // 50)
    xs = [s for s in range(p.a_steps) if s % every == 0 or s == p.a_steps - 1]
    out.info["curve_axes"] = {"target_weight": {"xlabel": "GD step (synthetic)", "x": xs,
                                                "ylabel": f"log10 weight of feature {p.a_target}"},
                              "ssl_loss": {"xlabel": "epoch (digits)"}}
    m = out.metrics
    out.info["knn_gap_pre_minus_post"] = m["pre"]["knn_acc"] - m["post"]["knn_acc"]
    out.info["probe_gap_pre_minus_post"] = m["pre"]["probe_acc"] - m["post"]["probe_acc"]


CRITERION = AllOf(
    Compare("sqrt_dev", "pre", "<=", 0.1, every_seed=True,
            text="square-root law: max_j |log w_pre_j - 0.5 log w_post_j| <= 0.1 (grown features, every seed)"),
    Compare("weight_spread", "pre", "<", "post", text="weight spread max/min: pre < post"),
    Gain("knn_acc", "pre", "post", at_least=5.0),
    Gain("probe_acc", "pre", "post", at_least=2.0),
    AllFinite(),
)

CLAIM = register(Claim(
    slug=SLUG,
    title="Investigating the Benefits of Projection Head for Representation Learning",
    arxiv="2403.11391",
    statement=(
        "In a two-layer linear model trained with the spectral contrastive loss from small initialisation, the "
        "pre-projection layer weights each feature by the square root of the end-to-end weight (|log w_pre - "
        "0.5 log w_post| <= 0.1), so its weights are more even (smaller max/min), and a weighting-sensitive 5-NN "
        "classifier of a feature weakened by augmentation (z_4) is >= 5 points more accurate on pre- than on "
        "post-projection features; on the digits, a SimCLR-trained MLP's pre-projection features beat its "
        "post-projection features under a tuned linear probe by >= 2 points"
    ),
    paper_figure=(
        "Theory: layer-wise progressive feature weighting (weight s at the output is s^(l/L) at layer l); "
        "experiments: pre-projection beats post-projection linear evaluation for SimCLR on CIFAR-10/100 and in "
        "transfer/robustness (UrbanCars, shifted ImageNet); a fixed reweighting head gives comparable gains"
    ),
    protocol=ProjectionHeadProtocol,
    data="synthetic+digits",
    setup=_setup,
    arms={"pre": _layer_arm, "post": _layer_arm, "fixed_head": _fixed_head_arm},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="knn_acc", ours="pre", baseline="post", unit="%", ceiling=100.0),
    control={"pre": "post"},
    control_note="post-projection features stand in for pre-projection features",
    variants=(
        Variant(name="fashion-mnist",
                description="fashion_mnist/ test split: part B on 5000 images for SSL and probe training and "
                            "5000 for probe testing (MLP 784-256-128 + head 128-128-64, 30 epochs); part A as "
                            "without --data-root",
                protocol=FashionProtocol, setup=_fashion_setup),
    ),
    uses=("gradkit.nn.projection_head.ProjectionHead", "gradkit.nn.projection_head.WithProjectionHead",
          "gradkit.nn.contrastive.spectral_contrastive_loss", "gradkit.nn.contrastive.info_nce_loss",
          "gradkit.probes.feature_weights.feature_weights", "gradkit.probes.linear_eval.linear_probe"),
    notes=(
        "pre and post are two read-outs of one trained model per part (trained once per seed, in the first arm "
        "that needs it; seconds_per_arm attributes that training to pre and fixed_head). Initialisation: entries "
        "of std 0.05 rather than the analysis' 1e-3: the spectral loss is quartic in a two-layer model's weights, "
        "so from 1e-3 the end-to-end weights grow on a time scale of ~1/(lr * M_j * 1e-6) steps and no feature "
        "leaves the origin in 3000 steps (measured: every post weight below 1e-4 after 3000 steps); 0.05 keeps the layers close to "
        "balanced. The weakest feature z_4 (cross-view covariance 0.3^2 * 0.5^2 = 0.0225) has not grown by 3000 "
        "steps; the downstream task is still its sign, because its post weight passes the 0.01 threshold (see "
        "scale_note). The task can discriminate: the post baseline sits near chance on z_4, far below the 100% "
        "ceiling, and the control (post standing in for pre) fails every check. At convergence the spectral loss "
        "up-weights the augmentation-weakened features (end-to-end weight sqrt(M_j) / Sigma_j), so both read-outs "
        "would then classify z_4 almost perfectly: the 5-NN gap is an effect of finite training. fixed_head: a "
        "one-layer encoder trained through diag(kappa^i) (kappa 0.5 over the synthetic 8 dims, 0.98 over the "
        "digits' 128; the paper's exact weights are not confirmed). It is reported beside the learned head and "
        "is not part of the criterion. Part B uses InfoNCE (SimCLR) with Adam; the probe's C comes from the same "
        "grid, chosen on a validation split, for every arm. With --data-root, part B runs on Fashion-MNIST (the "
        "paper's CIFAR is not available)."
    ),
    scale_note=(
        "The square-root law holds to within 0.01 for the three learned features (dev1-dev3, sqrt_dev_learned "
        "over the features whose pre weight at least doubled from its initial value) but not for z_4, "
        "which has not been learned. Its pre weight stays at the initialisation level (about 0.05 * sqrt(8)), "
        "and its post weight (0.02-0.12) comes only from that random component passing through the learned head. "
        "The 0.01 threshold assumes an initialisation of 1e-3, which is infinitesimal in the analysis' sense. "
        "Skipping z_4 would move the downstream task to z_3, which both read-outs classify perfectly (knn3). "
        "A smaller initialisation, trained for correspondingly longer, would settle it; that training does not "
        "fit the quick budget. Digits saturate near 97% under a linear probe, which leaves little room for part "
        "B's gap."
    ),
    plots=("target_weight", "ssl_loss"),
    bounds={"knn_acc": (0.0, 100.0), "probe_acc": (0.0, 100.0), "sqrt_dev": (0.0, float("inf")),
            "weight_spread": (1.0, float("inf")), "n_grown": (0.0, 4.0), "target_weight_post": (0.0, float("inf")),
            **{f"w{j}": (0.0, float("inf")) for j in range(1, 5)}, **{f"dev{j}": (0.0, float("inf")) for j in range(1, 5)},
            **{f"knn{j}": (0.0, 100.0) for j in range(1, 5)}, "n_learned": (0.0, 4.0),
            "sqrt_dev_learned": (0.0, float("inf"))},
))
