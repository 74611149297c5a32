"""Claim ``contextual-fusion``: fusing an object stream with a context stream keeps a classifier accurate under
attacks crafted on the object stream, without adversarial retraining and without losing clean accuracy.

Akumalla, Haney, Bazhenov, "Contextual Fusion For Adversarial Robustness" (arXiv 2011.09526). Offline
stand-in for ImageNet/Places backbones: procedural 16x16 scenes (an 8x8 scikit-learn digit = the object and
the label, pasted at a random position on one of ten context textures whose family equals the label with
probability q = 0.8). Per seed, two small CNN extractors are pre-trained once (setup) and then frozen:
``fg`` on digits over neutral noise (object-centric view, label = digit), ``bg`` on textures with the digit's
square masked out (scene-centric view, label = texture family; it never sees the target labels). Arms, each a
linear head on frozen features with the same learning-rate grid chosen on a validation split:

- ``fg_only`` (the paper's baseline): head on f_fg(x);
- ``bg_only`` (reported): head on f_bg(x);
- ``joint`` (ours): late fusion, one linear layer on [f_fg(x); f_bg(x)].

Perturbations on the test scenes: (T) FGSM crafted on the fg-only classifier (extractor + head) at each eps,
fed to every arm (the paper's partial-knowledge threat model); (W) white-box FGSM on each arm's own model;
(B) Gaussian blur. Reported sweeps: the known-adversary penalty alpha * ||W_fg||^2 on the joint head, and the
context strength q (heads retrained, extractors reused).

``--data-root`` (variant ``mnist-object-context``): MNIST digits (first 5,000 train / 2,000 test images,
downsampled to 10x10) on 20x20 context scenes, extractors pre-trained for 600 steps; same arms and rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...data import Split, load_digits_images_split
from ...data.object_context import N_FAMILIES, context_view, make_object_context_dataset, object_view
from ...data.real import data_folder
from ...engine import accuracy
from ...nn.late_fusion import LateFusionClassifier
from ...robustness.blur import gaussian_blur
from ...robustness.fgsm import fgsm as robust_fgsm
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, AtLeast, Compare, Drop, Gain
from .tuning import holdout, tune

SLUG = "contextual-fusion"
FG, BG, JOINT = "fg_only", "bg_only", "joint"
ARMS = (FG, BG, JOINT)
STREAMS = {FG: ("fg",), BG: ("bg",), JOINT: ("fg", "bg")}
RANGE = (0.0, 1.0)
EPS_REF, SIGMA_REF = 0.1, 1.0  # the criterion's eps and blur sigma


@dataclass(frozen=True)
class ContextualFusionProtocol(Protocol):
    """Scenes, frozen extractors, linear heads, perturbations and the reported sweeps."""

    context_strength: float = 0.8  # q: P(context family = label) before the uniform draw
    copies_train: int = scaled(smoke=1, quick=2, full=4)  # scenes per training digit
    copies_test: int = scaled(smoke=1, quick=2, full=4)  # scenes per test digit
    ext_channels: tuple[int, ...] = (16, 32)  # 2-conv CNN; the last width is the feature size
    ext_steps: int = scaled(smoke=30, quick=400, full=2000)  # Adam steps of each extractor's pre-training
    ext_batch: int = 128
    ext_lr: float = 3e-3
    noise_max: float = 0.6  # neutral noise of the object-centric view: U(0, a), a ~ U(0, noise_max)
    head_steps: int = scaled(smoke=40, quick=200, full=500)  # full-batch Adam steps of each head
    head_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)  # the same grid for every arm
    val_fraction: float = 0.2
    eps: tuple[float, ...] = scaled(smoke=(0.1,), quick=(0.05, 0.1, 0.2))  # FGSM l_inf radii (pixels in [0, 1])
    sigmas: tuple[float, ...] = scaled(smoke=(1.0,), quick=(0.5, 1.0, 1.5))  # Gaussian blur std (pixels)
    alphas: tuple[float, ...] = scaled(smoke=(0.0, 0.01), quick=(0.0, 0.001, 0.01, 0.1))  # joint head only
    qs: tuple[float, ...] = scaled(smoke=(1.0,), quick=(0.1, 0.5, 0.8, 1.0))  # context-strength sweep
    grid_images: int = 8


@dataclass(frozen=True)
class MnistObjectContextProtocol(ContextualFusionProtocol):
    """Real MNIST objects (10x10) on 20x20 context scenes."""

    n_train: int = scaled(smoke=500, quick=5000, full=5000)
    n_test: int = scaled(smoke=300, quick=2000, full=2000)
    object_size: int = 10
    scene_size: int = 20
    copies_train: int = 1
    copies_test: int = 1
    ext_steps: int = scaled(smoke=50, quick=600, full=2000)


# ------------------------------------------------------------------------------------ models
def extractor(channels: tuple[int, ...]) -> nn.Sequential:
    """The per-stream feature extractor: 2 x (3x3 conv, BatchNorm, ReLU), a 2x2 max-pool between, global
    average pool -> channels[-1] features."""
    c1, c2 = channels
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def pretrain(net: nn.Module, feat: int, sample, steps: int, batch: int, lr: float, gen: torch.Generator,
             device) -> nn.Module:
    """Pre-train ``net`` with a throw-away linear classifier on batches ``sample(batch, gen) -> (x, y)``;
    returns the extractor in eval mode with frozen parameters."""
    clf = nn.Sequential(net, nn.Linear(feat, N_FAMILIES)).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    clf.train()
    for _ in range(steps):
        x, y = sample(batch, gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(clf(x.to(device)), y.to(device)).backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _pretrain_extractors(ctx: ArmContext, objects_train: torch.Tensor, labels_train: torch.Tensor, size: int):
    p, dev, gen = ctx.p, ctx.device, ctx.generator
    feat = p.ext_channels[-1]
    k = objects_train.shape[-1]

    def object_batch(b, g):  # object-centric view: training digits on neutral noise, label = digit
        idx = torch.randint(0, len(labels_train), (b,), generator=g)
        return object_view(objects_train[idx], size, g, noise_max=p.noise_max), labels_train[idx]

    def context_batch(b, g):  # scene-centric view: textures with the object's square masked, label = family
        return context_view(b, size, k, g)

    fg = pretrain(extractor(p.ext_channels), feat, object_batch, p.ext_steps, p.ext_batch, p.ext_lr, gen, dev)
    bg = pretrain(extractor(p.ext_channels), feat, context_batch, p.ext_steps, p.ext_batch, p.ext_lr, gen, dev)
    return {"fg": fg, "bg": bg}


# ------------------------------------------------------------------------------------ setup
def _scenes(ctx: ArmContext, objects: Split, q: float, size: int) -> Split:
    p = ctx.p
    xtr, ytr, _, _ = make_object_context_dataset(objects.x_train, objects.y_train, q, ctx.seed, size, p.copies_train)
    xte, yte, _, _ = make_object_context_dataset(objects.x_test, objects.y_test, q, ctx.seed + 1, size,
                                                 p.copies_test)
    return Split(xtr, ytr, xte, yte, f"scenes-q{q:g}").to(ctx.device)


def _setup_from(ctx: ArmContext, objects: Split, size: int) -> dict:
    extractors = _pretrain_extractors(ctx, objects.x_train, objects.y_train, size)
    return {"objects": objects, "size": size, "extractors": extractors}


def _digits_setup(ctx: ArmContext) -> dict:
    return _setup_from(ctx, load_digits_images_split(), 16)  # the bundled 8x8 digits, fixed split


def _mnist_setup(ctx: ArmContext) -> dict:
    from ...data.readers import load_mnist

    p = ctx.p
    root = data_folder(ctx.data_root, "mnist/")

    def small(split, n):
        x, y = load_mnist(root, split)
        x = torch.as_tensor(x[:n], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        x = F.interpolate(x, size=(p.object_size, p.object_size), mode="area").clamp(0.0, 1.0)
        return x, torch.as_tensor(y[:n], dtype=torch.int64)

    xtr, ytr = small("train", p.n_train)
    xte, yte = small("test", p.n_test)
    return _setup_from(ctx, Split(xtr, ytr, xte, yte, "mnist"), p.scene_size)


# ------------------------------------------------------------------------------------ heads
def _features(model: LateFusionClassifier, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.features(x[i:i + batch]) for i in range(0, len(x), batch)])


def _new_model(ctx: ArmContext, arm: str) -> LateFusionClassifier:
    ext = ctx.data["extractors"]
    names = STREAMS[arm]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)  # the same head initialisation whichever arm builds it first
        model = LateFusionClassifier({n: ext[n] for n in names}, {n: ctx.p.ext_channels[-1] for n in names},
                                     N_FAMILIES)
    return model.to(ctx.device)


def _train_head(model: LateFusionClassifier, feats: torch.Tensor, y: torch.Tensor, lr: float, steps: int,
                alpha: float = 0.0) -> LateFusionClassifier:
    """Full-batch Adam on frozen features: CE(W f + b, y) + alpha * ||W_fg||^2."""
    opt = torch.optim.Adam(model.head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model.head(feats), y)
        if alpha > 0:
            loss = loss + alpha * model.stream_weight_penalty("fg")
        loss.backward()
        opt.step()
    return model.eval()


def _head_accuracy(model: LateFusionClassifier, feats: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model.head(feats).argmax(-1) == y).float().mean())


def _scene_data(ctx: ArmContext, q: float) -> Split:
    key = ("scenes", q)
    if key not in ctx.shared:
        ctx.shared[key] = _scenes(ctx, ctx.data["objects"], q, ctx.data["size"])
    return ctx.shared[key]


def _trained(ctx: ArmContext, arm: str, q: float | None = None, alpha: float = 0.0) -> dict:
    """The arm's head at context strength q (default: the protocol's), cached per run.

    At the protocol's q (alpha 0) the learning rate is tuned on a validation split cut from the training
    scenes (same grid for every arm); the sweeps reuse that arm's tuned rate.
    """
    p = ctx.p
    q = p.context_strength if q is None else q
    key = ("head", arm, q, alpha)
    if key in ctx.shared:
        return ctx.shared[key]
    data = _scene_data(ctx, q)
    probe = _new_model(ctx, arm)
    ftr, fte = _features(probe, data.x_train), _features(probe, data.x_test)
    if q == p.context_strength and alpha == 0.0:
        fit_split, val_split = holdout(Split(ftr, data.y_train, fte, data.y_test), p.val_fraction, ctx.seed)

        def trial(lr: float) -> float:
            m = _train_head(_new_model(ctx, arm), fit_split.x_train, fit_split.y_train, lr, p.head_steps)
            return _head_accuracy(m, val_split.x_test, val_split.y_test)

        tuned = tune(p.head_lrs, trial)
    else:
        tuned = _trained(ctx, arm)["tuned"]
    model = _train_head(_new_model(ctx, arm), ftr, data.y_train, tuned.value, p.head_steps, alpha)
    ctx.shared[key] = {"model": model, "tuned": tuned, "data": data}
    return ctx.shared[key]


# ------------------------------------------------------------------------------------ perturbations
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM at ``eps`` in the pixel range (:func:`gradkit.robustness.fgsm`)."""
    return robust_fgsm(model, x, y, eps, clamp=RANGE)


def _transfer_examples(ctx: ArmContext, q: float, eps: float) -> torch.Tensor:
    """FGSM examples crafted on the fg-only classifier (extractor + head) at context strength q."""
    key = ("transfer", q, eps)
    if key not in ctx.shared:
        src = _trained(ctx, FG, q)
        ctx.shared[key] = fgsm(src["model"], src["data"].x_test, src["data"].y_test, eps)
    return ctx.shared[key]


def _noise_examples(ctx: ArmContext, eps: float) -> torch.Tensor:
    """Random-sign noise of the same l_inf size (no gradient): separates transfer from plain fragility."""
    key = ("noise", eps)
    if key not in ctx.shared:
        x = _scene_data(ctx, ctx.p.context_strength).x_test
        g = torch.Generator().manual_seed(ctx.seed + 2)
        sign = torch.randint(0, 2, x.shape, generator=g).to(x) * 2 - 1
        ctx.shared[key] = (x + eps * sign).clamp(*RANGE)
    return ctx.shared[key]


def _tag(v: float) -> str:
    return f"{round(100 * v):02d}"


def run_arm(ctx: ArmContext) -> ArmResult:
    p, arm = ctx.p, ctx.arm
    q0 = p.context_strength
    h = _trained(ctx, arm)
    model, data = h["model"], h["data"]
    x, y = data.x_test, data.y_test
    m: dict[str, float] = {"clean_acc": accuracy(model, x, y)}
    t_curve, w_curve, b_curve = [m["clean_acc"]], [m["clean_acc"]], [m["clean_acc"]]
    for eps in p.eps:
        m[f"t_acc_e{_tag(eps)}"] = accuracy(model, _transfer_examples(ctx, q0, eps), y)
        xw = fgsm(model, x, y, eps)
        m[f"w_acc_e{_tag(eps)}"] = accuracy(model, xw, y)
        m[f"noise_acc_e{_tag(eps)}"] = accuracy(model, _noise_examples(ctx, eps), y)
        if arm == JOINT and eps == EPS_REF:
            ctx.shared["whitebox_joint"] = xw
        t_curve.append(m[f"t_acc_e{_tag(eps)}"])
        w_curve.append(m[f"w_acc_e{_tag(eps)}"])
    for s in p.sigmas:
        m[f"blur_acc_s{_tag(s)}"] = accuracy(model, gaussian_blur(x, s), y)
        b_curve.append(m[f"blur_acc_s{_tag(s)}"])
    m[f"attack_drop_e{_tag(EPS_REF)}"] = m["clean_acc"] - m.get(f"t_acc_e{_tag(EPS_REF)}", float("nan"))
    curves = {"transfer_fgsm_acc": t_curve, "whitebox_fgsm_acc": w_curve, "blur_acc": b_curve}
    # context-strength sweep: heads retrained on scenes at each q, extractors reused
    q_clean, q_t = [], []
    for q in p.qs:
        hq = _trained(ctx, arm, q)
        xq, yq = hq["data"].x_test, hq["data"].y_test
        q_clean.append(accuracy(hq["model"], xq, yq))
        q_t.append(accuracy(hq["model"], _transfer_examples(ctx, q, EPS_REF), yq))
        m[f"q{_tag(q)}_t_acc_e{_tag(EPS_REF)}"] = q_t[-1]
    if p.qs:
        curves.update(q_clean_acc=q_clean, q_transfer_fgsm_acc=q_t)
    info = {"tuned_lr": h["tuned"].as_info()}
    if arm == JOINT:  # known-adversary penalty on the fg block of the fusion layer
        a_clean, a_t = [], []
        for a in p.alphas:
            ma = _trained(ctx, JOINT, q0, float(a))["model"]
            a_clean.append(accuracy(ma, x, y))
            a_t.append(accuracy(ma, _transfer_examples(ctx, q0, EPS_REF), y))
            m[f"alpha{a:g}_t_acc_e{_tag(EPS_REF)}"] = a_t[-1]
            m[f"alpha{a:g}_clean_acc"] = a_clean[-1]
        curves.update(alpha_clean_acc=a_clean, alpha_transfer_fgsm_acc=a_t)
        info["fg_weight_norm"] = float(model.stream_weight_penalty("fg").detach().sqrt())
        info["bg_weight_norm"] = float(model.stream_weight_penalty("bg").detach().sqrt())
    return ArmResult(m, curves, info)


# ------------------------------------------------------------------------------------ finish
def sanity_checks(ctx: ArmContext) -> dict[str, float]:
    """FGSM raises the loss of the model it is crafted on; the fusion layer's shapes; the stream penalty's
    gradient touches only its own column block."""
    h = _trained(ctx, JOINT)
    model, data = h["model"], h["data"]
    x, y = data.x_test[:256], data.y_test[:256]
    with torch.no_grad():
        before = float(F.cross_entropy(model(x), y))
        after = float(F.cross_entropy(model(fgsm(model, x, y, EPS_REF)), y))
    w = model.head.weight.detach().clone().requires_grad_(True)
    pen = w[:, model.block("fg")].pow(2).sum()
    (g,) = torch.autograd.grad(pen, w)
    return {"fgsm_loss_increase": after - before,
            "logits_shape_ok": float(tuple(model(x).shape) == (len(x), N_FAMILIES)),
            "penalty_grad_outside_block": float(g[:, model.block("bg")].abs().max()),
            "penalty_inside_block_ok": float(torch.allclose(g[:, model.block("fg")], 2 * w[:, model.block("fg")]))}


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p = ctx.p
    q0 = p.context_strength
    data = _scene_data(ctx, q0)
    k = p.grid_images
    rows = {"clean": data.x_test[:k], f"T: fg eps {EPS_REF:g}": _transfer_examples(ctx, q0, EPS_REF)[:k]}
    if "whitebox_joint" in ctx.shared:
        rows[f"W: joint eps {EPS_REF:g}"] = ctx.shared["whitebox_joint"][:k]
    rows[f"blur {SIGMA_REF:g}"] = gaussian_blur(data.x_test[:k], SIGMA_REF)
    grid = {name: [img[0].clamp(0, 1).cpu().numpy().round(4).tolist() for img in t] for name, t in rows.items()}
    out.info["images"] = {"test scenes: FGSM on fg-only (T), on joint (W), blur": grid}
    out.info["labels"] = [int(v) for v in data.y_test[:k]]
    out.info["checks"] = sanity_checks(ctx)
    out.info["n_train"], out.info["n_test"] = int(len(data.y_train)), int(len(data.y_test))
    alphas = ", ".join(f"{a:g}" for a in p.alphas)
    out.info["curve_axes"] = {
        "transfer_fgsm_acc": {"xlabel": "FGSM eps crafted on the fg-only model", "x": [0.0, *p.eps]},
        "whitebox_fgsm_acc": {"xlabel": "white-box FGSM eps on each model", "x": [0.0, *p.eps]},
        "blur_acc": {"xlabel": "Gaussian blur sigma (pixels)", "x": [0.0, *p.sigmas]},
        "q_clean_acc": {"xlabel": "context strength q", "x": list(p.qs)},
        "q_transfer_fgsm_acc": {"xlabel": f"context strength q (FGSM on fg-only, eps {EPS_REF:g})", "x": list(p.qs)},
        "alpha_clean_acc": {"xlabel": f"alpha index (alpha = {alphas})", "x": list(range(len(p.alphas)))},
        "alpha_transfer_fgsm_acc": {"xlabel": f"alpha index (alpha = {alphas}); FGSM on fg-only eps {EPS_REF:g}",
                                    "x": list(range(len(p.alphas)))},
    }


# ------------------------------------------------------------------------------------ claim
T_REF, B_REF, DROP_REF = f"t_acc_e{_tag(EPS_REF)}", f"blur_acc_s{_tag(SIGMA_REF)}", f"attack_drop_e{_tag(EPS_REF)}"

CRITERION = AllOf(
    # (0) the attack works: the fg-only model loses >= 30 points under its own FGSM at eps 0.1
    AtLeast(metric=DROP_REF, arm=FG, value=30.0),
    # (1) no loss of clean accuracy
    Drop(metric="clean_acc", ours=JOINT, baseline=FG, at_most=1.0),
    # (2) fusion keeps accuracy under the attack crafted on the object stream
    Gain(metric=T_REF, ours=JOINT, baseline=FG, at_least=15.0),
    # (3) and under Gaussian blur
    Compare(metric=B_REF, arm=JOINT, op=">=", ref=FG, text=f"{B_REF}: {JOINT} >= {FG}"),
)

_BOUNDS = {k: (0.0, 100.0) for k in (
    "clean_acc", *(f"{a}_acc_e{e}" for a in ("t", "w", "noise") for e in ("05", "10", "20")),
    *(f"blur_acc_s{s}" for s in ("50", "100", "150")),
)}
_BOUNDS[DROP_REF] = (-100.0, 100.0)

CLAIM = register(Claim(
    slug=SLUG,
    title="Contextual Fusion For Adversarial Robustness",
    arxiv="2011.09526",
    statement="A late-fusion classifier over frozen object (fg) and context (bg) feature extractors keeps its clean "
              "accuracy (>= fg-only - 1 point) and, under FGSM crafted on the fg-only classifier at eps 0.1, is "
              ">= 15 points more accurate than the fg-only classifier, and at least as accurate under Gaussian "
              "blur (sigma 1), provided the attack works (fg-only loses >= 30 points); no adversarial retraining.",
    paper_figure="CIFAR-10 / MS COCO subsets with ImageNet (fg) and Places365 (bg) ResNet-18 features: fusion "
                 "'significantly improves' accuracy under FGSM crafted against the object network and under "
                 "Gaussian blur with no clean-accuracy loss (curves of accuracy vs eps and vs sigma, Fig. 3-5); "
                 "gains grow with between-class context variability; an L2 penalty on the attacked stream's "
                 "fusion weights helps further when the adversary is known. Exact values are not quoted here.",
    protocol=ContextualFusionProtocol,
    data="object-context-digits",
    setup=_digits_setup,
    arms={arm: run_arm for arm in ARMS},
    finish=_finish,
    criterion=CRITERION,
    control={JOINT: FG},
    control_note="the attack-works check: the fg-only classifier, attacked by the FGSM crafted on itself, stands in "
                 "for the fused model and must fail gain (2)",
    primary=Primary(metric=T_REF, ours=JOINT, baseline=FG, unit="%", ceiling=100.0),
    variants=(
        Variant(name="mnist-object-context",
                description="mnist/: the first 5,000 train / 2,000 test MNIST digits, downsampled to 10x10, on "
                            "20x20 procedural context scenes; extractors pre-trained 600 steps; same arms and rule",
                protocol=MnistObjectContextProtocol, setup=_mnist_setup),
    ),
    uses=(
        "gradkit.nn.late_fusion.LateFusionClassifier",
        "gradkit.data.object_context.make_object_context_dataset",
        "gradkit.data.object_context.object_view",
        "gradkit.data.object_context.context_view",
        "gradkit.robustness.fgsm.fgsm",
        "gradkit.robustness.blur.gaussian_blur",
    ),
    notes="Threat models: (T) FGSM crafted on the fg-only classifier (fg extractor + its head) and fed to every arm "
          "is our reading of the paper's 'known adversary' setting (the attacker targets the object network; "
          "the paper does not say so explicitly); for fg-only it is white-box. (W) white-box FGSM through each "
          "arm's own model (both streams for joint) is always reported beside it and is not part of the rule: "
          "the paper's claim is not expected to hold there. The bg extractor is pre-trained on the texture "
          "family (as Places365 is trained on scene classes), never on the target labels, so it does not depend "
          "on q; the q sweep retrains only the heads, at each arm's tuned learning rate. Extractors are frozen "
          "and in eval mode (BatchNorm statistics fixed) before any head is trained or attack crafted. Heads: "
          "one linear layer, full-batch Adam, the learning rate chosen per arm from the same grid on a 20% "
          "validation split of the training scenes (clean accuracy). Why the task can discriminate: the scenes "
          "are not saturated (fg-only clean accuracy is well below 100% and drops by far more than 30 points "
          "under FGSM at eps 0.1), the context alone predicts the label at most q + (1 - q)/10 = 82% of the "
          "time, and the control (fg-only standing in for joint) fails gain (2). Sanity checks (FGSM raises the "
          "loss, shapes, the penalty's gradient stays in its block) are in info['checks']. Protocol: gradkit "
          "show contextual-fusion.",
    scale_note=(
        "Not reproduced in this stand-in: the FGSM crafted on the object stream also breaks our small, "
        "unaugmented context stream (bg-only 82.6% -> 24.2% at eps 0.1; random-sign noise of the same size "
        "alone: 41.9%), so the fused head has nothing left to fall back on (joint 2.5% vs fg-only 1.2%), and "
        "fusion helps only with fully reliable context (q = 1: 56.6% vs 32.1%); a context extractor that "
        "survives noise of the attack's size would test the paper's mechanism."
    ),
    plots=("transfer_fgsm_acc", "whitebox_fgsm_acc", "blur_acc", "q_transfer_fgsm_acc", "alpha_transfer_fgsm_acc"),
    bounds=_BOUNDS,
))
