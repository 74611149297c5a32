"""Hard-negative-mixing claim: MoCHi's synthetic negatives make MoCo's proxy task harder, carry more than their
share of the softmax mass, and do not hurt the linear probe (paper slug: hard-negative-mixing).

Two arms trained in the same run with the same steps, data order and initial weights: MoCo (queue of K past keys,
momentum encoder, InfoNCE at tau) and MoCHi(N, s, s') (the same plus s + s' synthetic negatives per query from the
N hardest queue keys, from ``start_step`` on). The encoder is an MLP 64-256-128 with a 2-layer projection head to
32 dims; views: a random shift of up to 1 pixel, random erasing of one 3x3 patch, a random intensity scale and
Gaussian noise. The frozen 128-d encoder features are read by a standardised logistic-regression probe whose C
is chosen on a validation split of the training images (the same grid for both arms).
With ``--data-root``: the Fashion-MNIST test split (8000 images for contrastive training and the probe fit,
2000 for the probe test), MLP 784-256-128.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data import Split, TensorBatches, load_digits_images_split
from ...nn.hard_negative_mixing import InfoNCEWithMixing, hard_negative_mix
from ...nn.memory_queue import MemoryQueue, momentum_update
from ...nn.projection_head import ProjectionHead, WithProjectionHead
from ...probes.linear_eval import linear_probe
from ...probes.negative_weights import negative_weight_stats
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllFinite, AllOf, Check, Compare, Criterion, fmt, seed_values
from .tuning import holdout, tune

SLUG = "hard-negative-mixing"
MIX_SEED = 7919  # the mixer draws from its own generator, so both arms see the same batches and views


@dataclass(frozen=True)
class MochiProtocol(Protocol):
    """MoCo-v2 on the digits vs MoCHi(n_hard, s, s_prime), the same steps; linear probe on frozen features."""

    steps: int = scaled(smoke=40, quick=1500, full=5000)
    batch: int = 128
    queue: int = 256  # 18% of the 1437 training images (ImageNet-100: 16384 keys, 13% of its images)
    tau: float = 0.2
    momentum: float = 0.99
    lr: float = 1e-3
    widths: tuple[int, int] = (256, 128)  # encoder d_in -> 256 -> 128 (the probed features)
    head: tuple[int, int] = (128, 32)  # projection head 128 -> 128 -> 32
    n_hard: int = 32  # N, s, s' = K/8, K/8, K/32
    s: int = 32
    s_prime: int = 8
    beta_max: float = 0.5
    start_step: int = scaled(smoke=10, quick=150, full=500)  # mixing starts after this many plain MoCo steps
    shift: int = 1
    erase: int = 3  # side of the erased square patch
    intensity: tuple[float, float] = (0.7, 1.3)  # range of the random intensity scale
    noise: float = 0.1
    log_every: int = scaled(smoke=10, quick=50, full=100)
    probe_c_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    val_fraction: float = 0.2
    stats_batch: int = 256  # test images for the final softmax-weight statistics


@dataclass(frozen=True)
class FashionMochiProtocol(MochiProtocol):
    """Fashion-MNIST test split: 8000 images train the encoder and fit the probe, 2000 test it; 2-pixel shifts,
    a 6x6 erased patch; queue 1024 and MoCHi(128, 128, 32)."""

    steps: int = scaled(smoke=20, quick=1500, full=5000)
    queue: int = 1024  # 13% of the 8000 training images, as on ImageNet-100
    n_hard: int = 128
    s: int = 128
    s_prime: int = 32
    shift: int = 2
    erase: int = 6
    split_at: int = 8000
    train_subset: int | None = scaled(smoke=1024, quick=None, full=None)


# ------------------------------------------------------------------------------------------ data and views
def _augment(p, x: Tensor, g: torch.Generator) -> Tensor:
    """(n, 1, h, w) images in [0, 1] -> flattened views: integer shift (zero fill), one erased patch,
    intensity scale, Gaussian noise. All randomness from ``g`` (CPU), applied on ``x``'s device."""
    n, _, h, w = x.shape
    dev = x.device
    s, e = p.shift, p.erase
    padded = F.pad(x[:, 0], (s, s, s, s))
    off = torch.randint(0, 2 * s + 1, (2, n, 1), generator=g).to(dev)
    rows = (off[0] + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
    cols = (off[1] + torch.arange(w, device=dev))[:, None, :]  # (n, 1, w)
    out = padded[torch.arange(n, device=dev)[:, None, None], rows, cols]
    top = torch.randint(0, h - e + 1, (n, 1, 1), generator=g).to(dev)
    left = torch.randint(0, w - e + 1, (n, 1, 1), generator=g).to(dev)
    r, c = torch.arange(h, device=dev)[None, :, None], torch.arange(w, device=dev)[None, None, :]
    patch = (r >= top) & (r < top + e) & (c >= left) & (c < left + e)
    lo, hi = p.intensity
    scale = (lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)).to(dev)
    out = out.masked_fill(patch, 0.0) * scale
    return (out + p.noise * torch.randn(out.shape, generator=g).to(dev)).reshape(n, -1)


def _model(p, d_in: int) -> WithProjectionHead:
    w1, w2 = p.widths
    encoder = nn.Sequential(nn.Linear(d_in, w1), nn.ReLU(), nn.Linear(w1, w2), nn.ReLU())
    return WithProjectionHead(encoder, ProjectionHead(w2, hidden=p.head[0], out_dim=p.head[1], depth=2, kind="mlp"))


def _stream(batches: TensorBatches):
    while True:
        yield from batches


# ------------------------------------------------------------------------------------------ training
def _train(ctx: ArmContext, mixing: bool) -> dict:
    """MoCo training for ``steps`` steps; MoCHi when ``mixing``. The model's initial weights and the data order
    depend on the seed only (the runner re-seeds before every arm), so both arms start alike."""
    p, split, g = ctx.p, ctx.data, ctx.generator
    model_q = _model(p, split.x_train[0].numel()).to(ctx.device)
    model_k = copy.deepcopy(model_q).requires_grad_(False)
    queue = MemoryQueue(p.head[1], p.queue, generator=g).to(ctx.device)
    loss_fn = InfoNCEWithMixing(tau=p.tau, n_hard=p.n_hard, s=p.s if mixing else 0,
                                s_prime=p.s_prime if mixing else 0, beta_max=p.beta_max, start_step=p.start_step,
                                generator=torch.Generator().manual_seed(MIX_SEED + ctx.seed))
    opt = torch.optim.Adam(model_q.parameters(), lr=p.lr)
    batches = TensorBatches(split.x_train, batch_size=p.batch, shuffle=True, generator=g, drop_last=True)
    keys = ("proxy_acc", "proxy_acc_queue", "synthetic_mass", "synthetic_share")
    sums = dict.fromkeys(keys, 0.0)
    counted = 0
    curves: dict[str, list[float]] = {"proxy_acc": [], "loss": [], "synthetic_mass": []}
    window: dict[str, list[float]] = {"proxy_acc": [], "loss": [], "synthetic_mass": []}
    bar = ctx.progress(total=p.steps, desc=f"{SLUG}/{ctx.arm}")
    try:
        for step, (x,) in zip(range(p.steps), _stream(batches)):
            xq, xk = _augment(p, x, g), _augment(p, x, g)
            with torch.no_grad():
                momentum_update(model_q, model_k, p.momentum)
                k = F.normalize(model_k(xk), dim=1)
            loss = loss_fn(model_q(xq), k, queue)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            queue.enqueue(k)
            st = loss_fn.last_stats
            if step >= p.start_step:  # matched steps: both arms average over the same steps
                counted += 1
                for key in keys:
                    sums[key] += st[key]
            for name, v in (("proxy_acc", st["proxy_acc"]), ("loss", loss.item()),
                            ("synthetic_mass", 100.0 * st["synthetic_mass"])):
                window[name].append(v)
            if (step + 1) % p.log_every == 0 or step == p.steps - 1:
                for name, vs in window.items():
                    curves[name].append(float(np.mean(vs)))
                    vs.clear()
            bar.update(1)
    finally:
        bar.close()
    means = {key: sums[key] / max(counted, 1) for key in keys}
    return {"model_q": model_q.eval(), "model_k": model_k.eval(), "queue": queue, "loss_fn": loss_fn, "means": means,
            "curves": curves, "final_loss": curves["loss"][-1]}


def _uniformity(z: Tensor) -> float:
    """Wang & Isola's uniformity log E exp(-2 ||z_i - z_j||^2) over distinct pairs of unit rows (lower: more uniform)."""
    d2 = torch.pdist(z).pow(2)
    return float(torch.logsumexp(-2.0 * d2, 0) - np.log(len(d2)))


def _end_stats(ctx: ArmContext, r: dict, mixing: bool) -> dict[str, float]:
    """Softmax weights of one batch of test views at the end of training (queue and, for MoCHi, synthetic
    negatives), and the uniformity/alignment of the test embeddings."""
    p, split, g = ctx.p, ctx.data, ctx.generator
    x = split.x_test[:p.stats_batch]
    with torch.no_grad():
        q = F.normalize(r["model_q"](_augment(p, x, g)), dim=1)
        k = F.normalize(r["model_k"](_augment(p, x, g)), dim=1)
        syn = hard_negative_mix(q, r["queue"], p.n_hard, p.s, p.s_prime, p.beta_max, generator=g) if mixing else None
        w = negative_weight_stats(q, k, r["queue"], p.tau, synthetic=syn)
        z = F.normalize(r["model_q"](x.flatten(1)), dim=1)
    return {"top5_mass": 100.0 * w.top_share(0.05), "p_pos": float(w.p_pos.mean()),
            "uniformity": _uniformity(z), "alignment": float((q - k).pow(2).sum(1).mean())}


def _probe(ctx: ArmContext, model: WithProjectionHead) -> tuple[float, dict]:
    """Linear-probe test accuracy on the frozen 128-d encoder features, C tuned on a validation split."""
    p, split = ctx.p, ctx.data
    with torch.no_grad():
        f_train = model.features(split.x_train.flatten(1), "pre")
        f_test = model.features(split.x_test.flatten(1), "pre")
    feats = Split(f_train, split.y_train, f_test, split.y_test, split.name)
    fit_split, val_split = holdout(feats, fraction=p.val_fraction, seed=ctx.seed)
    tuned = tune(p.probe_c_grid, lambda c: linear_probe(val_split.x_train, val_split.y_train, val_split.x_test,
                                                         val_split.y_test, C=c))
    return linear_probe(f_train, split.y_train, f_test, split.y_test, C=tuned.value), tuned.as_info()


def _arm(ctx: ArmContext) -> ArmResult:
    """``moco``: plain MoCo (s = s' = 0); ``mochi``: MoCHi(n_hard, s, s_prime) from start_step on."""
    mixing = ctx.arm == "mochi"
    r = _train(ctx, mixing)
    acc, tuned = _probe(ctx, r["model_q"])
    m = r["means"]
    metrics = {"probe_acc": acc, "proxy_acc": m["proxy_acc"], "proxy_acc_queue": m["proxy_acc_queue"],
               "synthetic_mass": 100.0 * m["synthetic_mass"], "synthetic_share": 100.0 * m["synthetic_share"],
               "synthetic_excess": 100.0 * (m["synthetic_mass"] - m["synthetic_share"]),
               "final_loss": r["final_loss"], **_end_stats(ctx, r, mixing)}
    return ArmResult(metrics, curves=r["curves"], info={"probe_c": tuned})


# ------------------------------------------------------------------------------------------ setup, finish
def _setup(ctx: ArmContext) -> Split:
    return load_digits_images_split().to(ctx.device)


def _fashion_setup(ctx: ArmContext) -> Split:
    """Fashion-MNIST's test split as (N, 1, 28, 28) in [0, 1], cut by a fixed, seed-independent permutation."""
    from ...data import readers  # lazy: only the real-data branch needs it

    x, y = readers.load_fashion_mnist(ctx.data_root, "test")
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    x = torch.from_numpy(x.astype(np.float32) / 255.0)[perm][:, None]
    y = torch.as_tensor(y, dtype=torch.int64)[perm]
    n = ctx.p.split_at
    n_fit = n if ctx.p.train_subset is None else min(n, ctx.p.train_subset)
    return Split(x[:n_fit], y[:n_fit], x[n:], y[n:], name="fashion-mnist").to(ctx.device)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p = ctx.p
    xs = [s for s in range(1, p.steps + 1) if s % p.log_every == 0 or s == p.steps]
    for name, label in (("proxy_acc", "proxy-task accuracy (%)"), ("loss", "InfoNCE loss"),
                        ("synthetic_mass", "softmax mass on synthetic negatives (%)")):
        out.info.setdefault("curve_axes", {})[name] = {"xlabel": "training step", "x": xs, "ylabel": label}
    m = out.metrics
    out.info["probe_gain_mochi_minus_moco"] = m["mochi"]["probe_acc"] - m["moco"]["probe_acc"]
    out.info["proxy_drop_moco_minus_mochi"] = m["moco"]["proxy_acc"] - m["mochi"]["proxy_acc"]


# ------------------------------------------------------------------------------------------ criterion
@dataclass(frozen=True)
class LowerEverySeed(Criterion):
    """``metric`` of ``arm`` strictly below that of ``ref`` in every seed (paired by seed: same steps, same data)."""

    metric: str
    arm: str
    ref: str
    text: str = ""

    def describe(self) -> str:
        return self.text or f"{self.metric}: {self.arm} < {self.ref} in every seed"

    def checks(self, per_seed):
        xs, ys = seed_values(per_seed, self.arm, self.metric), seed_values(per_seed, self.ref, self.metric)
        ok = all(np.isfinite(x) and np.isfinite(y) and x < y for x, y in zip(xs, ys))
        return [Check(self.describe(), ok, "seeds: " + ", ".join(f"{fmt(x)} vs {fmt(y)}" for x, y in zip(xs, ys)))]


CRITERION = AllOf(
    LowerEverySeed("proxy_acc", "mochi", "moco",
                   text="harder proxy task: proxy_acc (mean over the mixing steps) mochi < moco in every seed"),
    Compare("synthetic_excess", "mochi", ">", 0.0, every_seed=True,
            text="synthetic negatives are hard: their share of the negatives' softmax mass exceeds their share of "
                 "the count (synthetic_excess > 0 points, every seed)"),
    Compare("probe_acc", "mochi", ">=", "moco", margin=-1.0,
            text="linear probe not worse: probe_acc mochi >= moco - 1 (seed means)"),
    AllFinite(),
)

CLAIM = register(Claim(
    slug=SLUG,
    title="Hard Negative Mixing for Contrastive Learning",
    arxiv="2010.01028",
    statement=(
        "With the same number of MoCo steps, adding MoCHi's synthetic hard negatives (N = 32 hardest of a "
        "256-key queue, s = 32 mixes of two of them, s' = 8 mixes with the query) lowers the proxy-task "
        "accuracy in every seed, the synthetic negatives take a larger share of the negatives' softmax mass than "
        "of their count, and the linear-probe accuracy of the frozen encoder is not more than 1 point below MoCo's"
    ),
    paper_figure=(
        "ImageNet-100 linear top-1, 200 epochs: MoCo-v2 78.0 -> MoCHi(1024, 1024, 128) 79.0; ImageNet-1K linear "
        "on par with MoCo-v2 while VOC/COCO transfer gains about 0.5-1 AP; the proxy task is harder (lower proxy "
        "accuracy during training) and only a few of the 16k negatives carry most of the softmax mass"
    ),
    protocol=MochiProtocol,
    data="digits",
    setup=_setup,
    arms={"moco": _arm, "mochi": _arm},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="probe_acc", ours="mochi", baseline="moco", unit="%", ceiling=100.0),
    control={"mochi": "moco"},
    control_note="plain MoCo (mixing switched off) stands in for MoCHi",
    variants=(
        Variant(name="fashion-mnist",
                description="fashion_mnist/ test split: 8000 images for contrastive training and the probe fit, "
                            "2000 for the probe test; MLP 784-256-128 + head 128-128-32, queue 1024, "
                            "MoCHi(128, 128, 32), 1500 steps",
                protocol=FashionMochiProtocol, setup=_fashion_setup),
    ),
    uses=("gradkit.nn.hard_negative_mixing.InfoNCEWithMixing", "gradkit.nn.hard_negative_mixing.hard_negative_mix",
          "gradkit.nn.memory_queue.MemoryQueue", "gradkit.nn.memory_queue.momentum_update",
          "gradkit.probes.negative_weights.negative_weight_stats", "gradkit.probes.linear_eval.linear_probe"),
    notes=(
        "Queue size: 256 keys rather than 1024, to keep the paper's ratio of queue to data set (ImageNet-100: "
        "16384 keys for 127k images, 13%; here 256 of 1437 images, 18%). A 1024-key queue holds 71% of the digits, "
        "so for most queries an earlier key of the same image sits in the queue as a false negative (measured: "
        "MoCo's proxy accuracy fell from 10% to 3.7%); N, s, s' keep the ratios K/8, K/8, K/32 of MoCHi(128, "
        "128, 32) at K = 1024, which the Fashion-MNIST variant (8000 images) uses unchanged. "
        "Both arms run the same code (InfoNCEWithMixing; MoCo is s = s' = 0), the same steps, data order, views and "
        "initial weights. Mixing starts after start_step plain steps (the queue is full of real keys by then; "
        "public ports also switch mixing on after a number of iterations); proxy_acc and the mass shares are "
        "averaged over the steps from start_step on, the same steps in both arms. proxy_acc counts the synthetic "
        "negatives for MoCHi (the task it trains on); proxy_acc_queue is against the queue only. synthetic_mass: "
        "share of the negatives' softmax mass (the weights of the negatives in dL/dq) on the synthetic ones; "
        "synthetic_share: their share of the negatives' count, s + s' over K + s + s' = 13.5%. Equal tuning: the "
        "contrastive hyperparameters (Adam 1e-3, tau 0.2, momentum 0.99) are one shared setting for both arms, as "
        "in the paper's comparisons (none tuned); the probe's C comes from the same grid, chosen on a validation split of the training images, for each arm. "
        "The task can discriminate: the probe sits below its 100% ceiling, and the control (MoCo standing in for "
        "MoCHi) fails the first two checks (equal proxy accuracy, no synthetic mass), so the verdict rests on the "
        "measured difference. top5_mass: share of the negatives' mass on the hardest 5% of them at the end "
        "(one batch of test views); uniformity: log E exp(-2 ||z_i - z_j||^2) of the test embeddings (lower is "
        "more uniform); both are reported, not judged."
    ),
    scale_note=(
        "The paper's probe gains are about 1 point at ImageNet scale; on the digits (1437 training images, 360 "
        "test images: one image is 0.28 points) a gain of that size is within seed noise, so only non-inferiority "
        "of the probe is checked; a 100-class data set with a 16k queue would settle the gain."
    ),
    plots=("proxy_acc", "synthetic_mass", "loss"),
    bounds={"probe_acc": (0.0, 100.0), "proxy_acc": (0.0, 100.0), "proxy_acc_queue": (0.0, 100.0),
            "synthetic_mass": (0.0, 100.0), "synthetic_share": (0.0, 100.0), "synthetic_excess": (-100.0, 100.0),
            "final_loss": (0.0, float("inf")), "top5_mass": (0.0, 100.0), "p_pos": (0.0, 1.0),
            "uniformity": (-8.0, 0.0), "alignment": (0.0, 4.0)},
))
