"""Claim ``dann``: domain-adversarial training raises target accuracy over source-only training.

Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016 (arXiv 1505.07818).
Arms: ``source_only`` (the same network and loop with the domain loss off) and ``dann``.

- Bundled (no ``--data-root``): the authors' inter-twinning moons (source vs target rotated 35
  degrees), 2-15-2 sigmoid net, logistic domain head on the hidden layer, lambda = 6 constant in the
  paper-exact form ``L_y + lambda * L_d(G_d(R_1(h)))`` (the discriminator step carries lambda, as in
  the authors' numpy code), one-sample SGD at lr 0.05 with one random target sample per source
  sample. Quick: 100 epochs (15,000 steps); full: the paper's 500 epochs.
- ``--data-root`` at smoke/quick: MNIST -> MNIST-M sample, the paper's small CNN, batch 64 + 64,
  SGD momentum 0.9 with the paper's lr and lambda schedules, common GRL form
  ``L_y + L_d(G_d(R_lambda(f)))``, 500 steps. Input handling and init, which the paper leaves open,
  follow the public TensorFlow reproduction of the experiment: binarised MNIST, a channel mean that
  weighs both domains equally, truncated-normal weights (sigma 0.1) and biases 0.1.
- ``--data-root`` at full: the 12 Amazon-reviews pairs, 50 sigmoid hidden units, lambda = 0.1,
  batch 32 + 32, lr 0.05, 10 epochs, common GRL form, plus the proxy A-distance of the hidden layer.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.batches import TensorBatches
from ...data.moons import DomainShift, make_moons_domains
from ...engine import accuracy, fit, seed_everything
from ...nn.gradient_reversal import DomainClassifier, domain_loss
from ...probes.domain import proxy_a_distance
from ...schedules.dann import dann_lambda, dann_lr_lambda
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, Variant, register
from .criteria import AllOf, AtLeast, Drop, Gain

ARMS = ("source_only", "dann")
FORMS = ("paper", "common")


# ------------------------------------------------------------------------------------------ models
class ShallowDANN(nn.Module):
    """One sigmoid hidden layer ``h = sigmoid(W x + b)``, softmax label head, logistic domain head on ``h``.

    Initialised as in the authors' numpy code: Glorot-uniform weights, zero biases, zero domain head.
    """

    def __init__(self, in_dim: int, hidden: int, classes: int, grl_lambda: float = 1.0) -> None:
        super().__init__()
        self.hidden_layer = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, classes)
        self.domain = DomainClassifier(hidden, hidden=None, grl=True, lambda_=grl_lambda)
        for lin in (self.hidden_layer, self.out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.domain.net.weight)
        nn.init.zeros_(self.domain.net.bias)

    def features(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.hidden_layer(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


class DigitsDANN(nn.Module):
    """The paper's MNIST -> MNIST-M CNN: G_f conv5x5-32, pool, conv5x5-48, pool; G_y fc100-fc100-fc10; G_d fc100-fc1.

    ``init``: "torch" (PyTorch's default init) or "trunc_normal" (every weight N(0, 0.1^2) truncated at 2 sigma,
    every bias 0.1, as the public TensorFlow reproduction of the experiment initialises it; ``generator`` draws
    the weights)."""

    def __init__(self, init: str = "torch", generator: torch.Generator | None = None) -> None:
        super().__init__()
        if init not in ("torch", "trunc_normal"):
            raise ValueError(f"init must be 'torch' or 'trunc_normal', got {init!r}")
        self.feature = nn.Sequential(
            nn.Conv2d(3, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 48, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.label = nn.Sequential(nn.Linear(1200, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                   nn.Linear(100, 10))
        self.domain = DomainClassifier(1200, hidden=100, grl=True)
        if init == "trunc_normal":  # every weight N(0, 0.1^2) truncated at 2 sigma, every bias 0.1
            for mod in self.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(mod.weight, std=0.1, a=-0.2, b=0.2, generator=generator)
                    nn.init.constant_(mod.bias, 0.1)

    def features(self, x: Tensor) -> Tensor:
        return self.feature(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.label(self.feature(x))


class _Mean:
    """Running mean of detached scalars (per epoch), kept as a tensor to avoid a sync per step."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, v: Tensor) -> None:
        v = v.detach()
        self.total = v if self.total is None else self.total + v
        self.count += 1

    def pop(self) -> float:
        out = float(self.total) / self.count if self.count else float("nan")
        self.total, self.count = None, 0
        return out


# -------------------------------------------------------------------------- shallow (moons, Amazon)
def train_shallow(
    data: DomainShift, *, arm: str, lam: float, form: str, epochs: int, lr: float, batch_size: int,
    hidden: int, seed: int, device: torch.device = torch.device("cpu"), progress=None,
    desc: str = "dann", extra_eval: Callable[[nn.Module], dict[str, float]] | None = None,
):
    """Train a :class:`ShallowDANN` with plain SGD; return ``(model, history)``.

    Every step takes ``batch_size`` source samples (shuffled each epoch) and as many target samples
    drawn at random with replacement (the authors' one-sample SGD with ``batch_size=1``); both go
    through the feature layer together. ``arm="source_only"`` drops the domain term from the same
    loop; the random draws are identical in both arms, so ``lam=0`` reproduces source-only training.
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    gen = seed_everything(seed)
    classes = int(max(data.y_source.max(), data.y_target.max())) + 1
    model = ShallowDANN(data.x_source.shape[1], hidden, classes,
                        grl_lambda=lam if form == "common" else 1.0).to(device)
    xs, ys = data.x_source.to(device), data.y_source.to(device)
    xt, yt = data.x_target.to(device), data.y_target.to(device)
    ns, nt = len(xs), len(xt)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dom = _Mean()

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        perm = torch.randperm(ns, generator=gen).to(device)
        tidx = torch.randint(nt, (ns,), generator=gen).to(device)
        return zip(xs[perm].split(batch_size), ys[perm].split(batch_size), xt[tidx].split(batch_size))

    def compute_loss(m: ShallowDANN, batch) -> Tensor:
        bxs, bys, bxt = batch
        k = len(bxs)
        h = m.features(torch.cat([bxs, bxt]))
        loss = F.cross_entropy(m.out(h[:k]), bys)
        if arm == "source_only":
            return loss
        d = m.domain(h)
        ld = domain_loss(d[:k], d[k:], reduction="per_domain")
        dom.add(ld)
        return loss + lam * ld if form == "paper" else loss + ld

    def evaluate(m: nn.Module) -> dict[str, float]:
        out = {"target_acc": accuracy(m, xt, yt), "source_acc": accuracy(m, xs, ys)}
        if arm == "dann":
            out["domain_loss"] = dom.pop()
        if extra_eval is not None:
            out.update(extra_eval(m))
        return out

    kw = {} if progress is None else {"progress": progress}
    hist = fit(model, opt, batches, epochs=epochs, compute_loss=compute_loss, evaluate=evaluate,
               desc=desc, **kw)
    return model, hist


@torch.no_grad()
def _hidden_pad(model: ShallowDANN, xs: Tensor, xt: Tensor, seed: int) -> float:
    model.eval()
    pad = proxy_a_distance(model.features(xs), model.features(xt), seed=seed)
    model.train()
    return pad


# ------------------------------------------------------------------------------------------ moons
@dataclass(frozen=True)
class MoonsProtocol(Protocol):
    """The authors' inter-twinning moons: 2-15-2 sigmoid net, one-sample SGD, paper-exact GRL form."""

    epochs: int = scaled(smoke=10, quick=100, full=500)
    lambda_max: float = 6.0  # the domain-loss weight, constant on the moons
    lr: float = 0.05
    hidden: int = 15
    batch_size: int = 1
    n_per_domain: int = 150
    noise: float = 0.05
    theta: float = 35.0
    n_heldout: int = 1000
    form: str = "paper"


def _moons_setup(ctx: ArmContext):
    p = ctx.p
    data = make_moons_domains(p.n_per_domain, noise=p.noise, theta=p.theta)
    held = make_moons_domains(p.n_per_domain, noise=p.noise, theta=p.theta, target_state=3, n_target=p.n_heldout)
    return data, held


def _moons_arm(ctx: ArmContext) -> ArmResult:
    p, (data, held) = ctx.p, ctx.data
    xh, yh = held.x_target.to(ctx.device), held.y_target.to(ctx.device)
    model, hist = train_shallow(
        data, arm=ctx.arm, lam=p.lambda_max, form=p.form, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
        hidden=p.hidden, seed=ctx.seed, device=ctx.device, progress=ctx.progress, desc=f"dann/{ctx.arm}",
    )
    m = {
        "target_acc": hist.last("target_acc"),
        "source_acc": hist.last("source_acc"),
        "target_heldout_acc": accuracy(model, xh, yh),
        "pad": _hidden_pad(model, data.x_source.to(ctx.device), data.x_target.to(ctx.device), ctx.seed),
    }
    curves = {"target_acc": hist.series("target_acc"), "source_acc": hist.series("source_acc")}
    if ctx.arm == "dann":
        m["domain_loss"] = hist.last("domain_loss")
        curves["domain_loss"] = hist.series("domain_loss")
    return ArmResult(m, curves)


def _moons_finish(ctx: ArmContext, out: RunOutput) -> None:
    data, _ = ctx.data
    out.info.update({"task": "inter-twinning moons, target rotated by theta degrees",
                     "steps": ctx.p.epochs * ctx.p.n_per_domain // ctx.p.batch_size,
                     "pad_input": proxy_a_distance(data.x_source, data.x_target, seed=ctx.seed)})


# ------------------------------------------------------------------------------- MNIST -> MNIST-M
@dataclass(frozen=True)
class MnistmProtocol(Protocol):
    """MNIST -> MNIST-M sample with the paper's CNN, SGD momentum, the paper's lr and lambda schedules."""

    steps: int = scaled(smoke=20, quick=500)
    epochs: int = scaled(smoke=2, quick=5)
    n_source: int = scaled(smoke=2000, quick=10000)
    n_eval: int = scaled(smoke=300, quick=1000)
    batch: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    lambda_max: float = 1.0
    # input handling and init of the public TensorFlow reproduction of this experiment (the paper gives neither):
    source_binary: bool = True  # MNIST pixels > 0 set to 1 before replication to 3 channels
    balanced_mean: bool = True  # the subtracted channel mean weighs both domains equally (equal-size sets there)
    init: str = "trunc_normal"  # weights N(0, 0.1^2) truncated at 2 sigma, biases 0.1; "torch": PyTorch's defaults


@functools.lru_cache(maxsize=2)
def _mnistm_tensors(root: str, n_source: int, n_eval: int, binary: bool = False,
                    balanced: bool = False) -> dict[str, Tensor]:
    """Source MNIST padded to 32x32 (1 channel, [0, 1]), MNIST-M target/test (3 channels), channel mean."""
    from ...data.readers import load_mnist, load_mnist_m

    src_x, src_y = load_mnist(root, "train")
    te_x, te_y = load_mnist(root, "test")
    mm = load_mnist_m(root)

    def mnist32(x: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
        if binary:
            t = (t > 0).float()
        return F.pad(t, (2, 2, 2, 2)).unsqueeze(1)  # (N, 1, 32, 32)

    def rgb(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()

    xs = mnist32(src_x[:n_source])
    xt = rgb(mm["x_train"])
    # per-channel mean over all training images of both domains (source + target)
    if balanced:
        mean = 0.5 * (xs.mean(dim=(0, 2, 3)).expand(3) + xt.mean(dim=(0, 2, 3)))
    else:
        mean = xs.sum(dim=(0, 2, 3)).expand(3) + xt.sum(dim=(0, 2, 3))
        mean = mean / (len(xs) * 32 * 32 + len(xt) * 32 * 32)
    return {
        "xs": xs, "ys": torch.from_numpy(src_y[:n_source].copy()),
        "xt": xt, "yt": torch.from_numpy(mm["y_train"].copy()),
        "x_test": rgb(mm["x_test"][:n_eval]), "y_test": torch.from_numpy(mm["y_test"][:n_eval].copy()),
        "xs_test": mnist32(te_x[:n_eval]), "ys_test": torch.from_numpy(te_y[:n_eval].copy()),
        "mean": mean.view(1, 3, 1, 1),
    }


def _forever(tb: TensorBatches) -> Iterator[tuple[Tensor, ...]]:
    while True:
        yield from tb


def _mnistm_setup(ctx: ArmContext) -> dict[str, Tensor]:
    return _mnistm_tensors(str(ctx.data_root), ctx.p.n_source, ctx.p.n_eval, ctx.p.source_binary,
                           ctx.p.balanced_mean)


def _mnistm_arm(ctx: ArmContext) -> ArmResult:
    p, d, dev, arm = ctx.p, ctx.data, ctx.device, ctx.arm
    mean = d["mean"].to(dev)
    xs, ys, xt = d["xs"].to(dev), d["ys"].to(dev), d["xt"].to(dev)
    x_test, y_test = (d["x_test"].to(dev) - mean), d["y_test"].to(dev)
    xs_test, ys_test = (d["xs_test"].to(dev).expand(-1, 3, -1, -1) - mean), d["ys_test"].to(dev)
    per_epoch = p.steps // p.epochs
    gen = ctx.generator
    gen_t = torch.Generator().manual_seed(ctx.seed + 7919)
    model = DigitsDANN(init=p.init, generator=gen).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, dann_lr_lambda(p.steps))
    src = _forever(TensorBatches(xs, ys, batch_size=p.batch, shuffle=True, generator=gen, drop_last=True))
    tgt = _forever(TensorBatches(xt, batch_size=p.batch, shuffle=True, generator=gen_t, drop_last=True))
    dom = _Mean()

    def batches(epoch: int):
        return itertools.islice(zip(src, tgt), per_epoch)

    def on_step_start(step: int) -> None:
        model.domain.grl.lambda_ = p.lambda_max * dann_lambda(min(step / p.steps, 1.0))

    def compute_loss(m: DigitsDANN, b) -> Tensor:
        (bxs, bys), (bxt,) = b
        bxs = bxs.expand(-1, 3, -1, -1) - mean
        if arm == "source_only":
            return F.cross_entropy(m(bxs), bys)
        f = m.features(torch.cat([bxs, bxt - mean]))  # one pass: both domains together
        k = len(bxs)
        dl = m.domain(f)
        ld = domain_loss(dl[:k], dl[k:], reduction="mean")
        dom.add(ld)
        return F.cross_entropy(m.label(f[:k]), bys) + ld

    def evaluate(m: nn.Module) -> dict[str, float]:
        out = {"target_acc": accuracy(m, x_test, y_test, batch_size=500)}
        if arm == "dann":
            out["domain_loss"] = dom.pop()
        return out

    hist = fit(model, opt, batches, epochs=p.epochs, compute_loss=compute_loss, evaluate=evaluate,
               on_step_start=on_step_start if arm == "dann" else None, scheduler=sched,
               scheduler_every="step", progress=ctx.progress, desc=f"dann/{arm}")
    m = {"target_acc": hist.last("target_acc"), "source_acc": accuracy(model, xs_test, ys_test, batch_size=500)}
    curves = {"target_acc": hist.series("target_acc")}
    if arm == "dann":
        m["domain_loss"] = hist.last("domain_loss")
        curves["domain_loss"] = hist.series("domain_loss")
    return ArmResult(m, curves)


def _mnistm_finish(ctx: ArmContext, out: RunOutput) -> None:
    out.info.update({
        "task": "MNIST -> MNIST-M sample", "n_target_train": len(ctx.data["xt"]),
        "n_target_test": len(ctx.data["x_test"]),
        "grl_form": "common (L_y + L_d(G_d(R_lambda_p(f))), L_d mean over the 2 x batch images)",
        "note": "accuracies on the 1,000-image MNIST-M sample test set; not comparable to the "
                "paper's full-test-set 52.25% -> 76.66%"})


# ---------------------------------------------------------------------------------- Amazon reviews
@dataclass(frozen=True)
class AmazonProtocol(Protocol):
    """The 12 Amazon sentiment pairs: 50 sigmoid hidden units, common GRL form, proxy A-distance."""

    epochs: int = 10
    lambda_max: float = 0.1  # the reversal coefficient, constant
    lr: float = 0.05
    batch_size: int = 32
    hidden: int = 50
    form: str = "common"


def _amazon_setup(ctx: ArmContext):
    from ...data.readers import AMAZON_DOMAINS, load_amazon

    cache = {}
    for dom in AMAZON_DOMAINS:
        for split in ("train", "test"):
            x, y = load_amazon(ctx.data_root, dom, split)
            cache[(dom, split)] = (torch.from_numpy(x), torch.from_numpy(y))
    pairs = [(s, t) for s in AMAZON_DOMAINS for t in AMAZON_DOMAINS if s != t]
    return {"cache": cache, "pairs": pairs}


def _amazon_arm(ctx: ArmContext) -> ArmResult:
    p, arm = ctx.p, ctx.arm
    cache, pairs = ctx.data["cache"], ctx.data["pairs"]
    metrics: dict[str, float] = {}
    accs, pads, series = [], [], []
    for s, t in pairs:
        xs, ys = cache[(s, "train")]
        xt, yt = cache[(t, "train")]  # target labels only score the history's target_acc, never train
        xte, yte = cache[(t, "test")]
        xte_d, yte_d = xte.to(ctx.device), yte.to(ctx.device)
        data = DomainShift(xs, ys, xt, yt, name=f"{s}->{t}")

        def test_acc(m: nn.Module) -> dict[str, float]:
            return {"test_acc": accuracy(m, xte_d, yte_d)}

        model, hist = train_shallow(
            data, arm=arm, lam=p.lambda_max, form=p.form, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
            hidden=p.hidden, seed=ctx.seed, device=ctx.device, progress=ctx.progress,
            desc=f"dann/{s}->{t}/{arm}", extra_eval=test_acc,
        )
        acc = hist.last("test_acc")
        pad = _hidden_pad(model, xs.to(ctx.device), xt.to(ctx.device), ctx.seed)
        metrics[f"target_acc[{s}->{t}]"] = acc
        metrics[f"pad[{s}->{t}]"] = pad
        accs.append(acc)
        pads.append(pad)
        series.append(hist.series("test_acc"))
    metrics["target_acc"] = float(np.mean(accs))
    metrics["pad"] = float(np.mean(pads))
    return ArmResult(metrics, {"target_acc": [float(v) for v in np.mean(series, axis=0)]})


def _amazon_finish(ctx: ArmContext, out: RunOutput) -> None:
    pairs = [f"{s}->{t}" for s, t in ctx.data["pairs"]]
    for arm in ARMS:
        # the count compares DANN with the other arm; the source-only arm counts against itself (0)
        other = "source_only" if arm == "dann" else "dann"
        out.metrics[arm]["pad_lower_pairs"] = float(sum(
            out.metrics[arm][f"pad[{k}]"] < out.metrics[other][f"pad[{k}]"] for k in pairs))
    out.info.update({"task": "Amazon reviews, 12 source->target pairs", "pairs": pairs,
                     "grl_form": "common (L_y + L_d(G_d(R_lambda(h))))",
                     "target_acc_curve": "mean over the 12 pairs of the target test accuracy per epoch"})


# ------------------------------------------------------------------------------------------- claim
CLAIM = register(Claim(
    slug="dann",
    version=2,  # 2: MNIST-M variant with the TensorFlow reproduction's input handling and init
    title="Domain-Adversarial Training of Neural Networks",
    arxiv="1505.07818",
    statement=("Training a feature extractor against a domain classifier through a gradient reversal "
               "layer raises target-domain accuracy over the same network trained on the labelled "
               "source only, without hurting source accuracy."),
    paper_figure=("Inter-twinning moons (JMLR Sec. 5.1, figure): a shallow NN misclassifies part of the "
                  "35-degree-rotated target, DANN classifies it almost perfectly. MNIST->MNIST-M "
                  "(Table 2): 52.25% source only -> 76.66% DANN (95.96% trained on target)."),
    protocol=MoonsProtocol,
    data="moons",
    setup=_moons_setup,
    arms={"source_only": _moons_arm, "dann": _moons_arm},
    finish=_moons_finish,
    criterion=AllOf(
        Gain(metric="target_acc", ours="dann", baseline="source_only", at_least=4.0),
        Drop(metric="source_acc", ours="dann", baseline="source_only", at_most=2.0),
    ),
    primary=Primary(metric="target_acc", ours="dann", baseline="source_only", unit="%", ceiling=100.0),
    control_note="the same network and loop with the domain loss off",
    variants=(
        Variant(name="mnist->mnist-m", description="mnist/ + mnist_m/: MNIST -> MNIST-M sample with the paper's CNN",
                scales=("smoke", "quick"), protocol=MnistmProtocol, setup=_mnistm_setup,
                arms={"source_only": _mnistm_arm, "dann": _mnistm_arm}, finish=_mnistm_finish,
                criterion=Gain(metric="target_acc", ours="dann", baseline="source_only", at_least=5.0)),
        Variant(name="amazon", description="amazon_reviews/: the 12 Amazon sentiment pairs with the proxy A-distance",
                scales=("full",), protocol=AmazonProtocol, setup=_amazon_setup,
                arms={"source_only": _amazon_arm, "dann": _amazon_arm}, finish=_amazon_finish,
                criterion=AllOf(
                    Drop(metric="target_acc", ours="dann", baseline="source_only", at_most=0.5),
                    AtLeast(metric="pad_lower_pairs", arm="dann", value=9.0),
                )),
    ),
    uses=("gradkit.functional.grad_reverse", "gradkit.nn.GradientReversal", "gradkit.nn.DomainClassifier",
          "gradkit.nn.gradient_reversal.domain_loss", "gradkit.schedules.dann_lambda",
          "gradkit.schedules.dann_lr", "gradkit.probes.proxy_a_distance",
          "gradkit.data.moons.make_moons_domains"),
    notes=("Moons use the paper-exact GRL form (discriminator step scaled by lambda, as in the authors' "
           "numpy code); the CNN and Amazon tasks use the common form (reversal coefficient lambda, "
           "unscaled domain loss). Moons target accuracy is transductive (the 150 unlabelled target "
           "points, as in the paper's figure); target_heldout_acc scores 1,000 fresh rotated points. "
           "MNIST-M accuracies are on the 1,000-image sample test set, not comparable to the paper's "
           "full test set. MNIST-M input handling and init: the paper states only mean subtraction and its "
           "official code covers the Office experiments only, so they follow the public TensorFlow "
           "reproduction of this experiment: MNIST binarised (pixels > 0), the subtracted channel mean "
           "weighing both domains equally (that reproduction pools equal-size sets), every weight N(0, 0.1^2) "
           "truncated at 2 sigma and every bias 0.1 (protocol fields source_binary, balanced_mean, init). Amazon: pad_lower_pairs counts pairs where DANN's hidden-layer proxy "
           "A-distance is below the source-only net's (criterion: seed mean >= 9 of 12). Moons (measured, seeds 0 "
           "and 2): the hidden layer's proxy A-distance is not lower under DANN (0.85, 0.48) than source-only "
           "(0.48, 0.75), and both exceed the input's (0.24). DANN's own domain head ends at chance (47.7%, "
           "50%) while a linear SVM refit to convergence still separates its features, which are mostly "
           "saturated (68% of hidden values within 0.02 of 0 or 1): the adversarial game fools the current "
           "discriminator, not every linear one, and on 2-D inputs that a linear probe barely separates the "
           "proxy A-distance is a poor yardstick. It is reported, not judged, on the moons; the paper's PAD "
           "evidence is the Amazon reviews, judged by the amazon variant."),
    scale_note=(
        "MNIST -> MNIST-M sample, 500 steps: with PyTorch's default init, grey MNIST and a channel mean "
        "dominated by the 10,000 source images (--set init=torch --set source_binary=false --set "
        "balanced_mean=false) DANN is unstable: seeds 0-5 gave 45.2 / 26.1 / 33.5 / 44.7 / 47.5 / 36.6% "
        "against source-only 33.2 / 32.8 / 33.5 / 34.8 / 34.1 / 30.1%, one seed 6.7 points below. The "
        "init alone removes the instability (DANN 44.0 vs 35.0, every seed above source-only); binarising "
        "and the balanced mean raise both arms (seeds 0-5: source-only 44.5 +- 2.0, DANN 53.0 +- 1.2, "
        "+5.5 to +10.3 points per seed). The paper's 76.7% comes from thousands of steps on the full "
        "59,001 MNIST-M training images; here the domain classifier sees 1,000."
    ),
    plots=("target_acc", "domain_loss"),
    bounds={"target_acc": (0.0, 100.0), "source_acc": (0.0, 100.0), "target_heldout_acc": (0.0, 100.0),
            "pad": (0.0, 2.0)},
))
