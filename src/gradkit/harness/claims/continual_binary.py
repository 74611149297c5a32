"""Continual learning with binary weights as variational Bayes over fields (paper slug: continual-binary).

Two experiments in one run, every arm on the same data per seed:

1. Permuted digits (scikit-learn digits, pixels standardised, fixed stratified 1400/397 split; task 1 the
   identity, tasks 2..T fixed random pixel permutations drawn from the seed). MLP 64-256-256-10 whose
   layers are all binary (no biases, 1/sqrt(fan-in) scaling, ReLU). Arms: ``vcl`` (field-binary layers,
   Gaussian preactivation, KL to the previous task's posterior, uniform prior for task 1, one KL per
   epoch), ``vcl_step`` (the official code's online per-step reference), ``no_kl`` (the same field net,
   no KL), ``bnn`` (sign(W_h) with the straight-through gradient and Adam), ``metaplastic`` (the same BNN
   with MetaplasticAdam, m_meta = 1.3). All: Adam betas (0.9, 0.99), batch 64, the learning rate chosen
   per arm from the same grid on a validation split cut from the training data; the field nets follow
   the official beta schedule. Metric: mean test accuracy over all tasks after the last one, MAP weights.
2. Teacher-student binary perceptron (N inputs in {-1, +1}, alpha = |D_t| / N per task, teachers with
   overlap r0): fields trained with the -log H loss, full-batch Adam; task 1 identical in both arms
   (uniform prior), task 2 with (``perc_kl``) or without (``perc_no_kl``) the KL to task 1's posterior.

With ``--data-root`` holding MNIST: permuted MNIST (the paper's benchmark), shrunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...data import DataError, Split, TensorBatches
from ...engine import accuracy, fit
from ...functional.straight_through import sign_pm1, ste_sign
from ...nn.binary import BinaryLinear
from ...nn.field_binary import FieldBinaryLinear, binary_perceptron_logH_loss, field_kl, field_mode, set_field_beta
from ...optim.metaplastic import MetaplasticAdam
from ...optim.variational_continual import VariationalContinual
from ...schedules.field_beta import field_beta
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, Variant, register
from .criteria import AllFinite, AllOf, Compare, Drop, Gain
from .tuning import holdout, tune

SLUG = "continual-binary"
DEEP_ARMS = ("vcl", "vcl_step", "no_kl", "bnn", "metaplastic")
PERC_ARMS = ("perc_kl", "perc_no_kl")
_NO_CLIP = 1e30  # the metaplasticity BNN passes the gradient of sign(W_h) straight through, unclipped


@dataclass(frozen=True)
class ContinualProtocol(Protocol):
    """Permuted digits and the two-task perceptron."""

    n_tasks: int = scaled(smoke=2, quick=5, full=5)
    epochs_per_task: int = scaled(smoke=1, quick=5, full=10)  # quick: the official code's 5
    hidden: tuple[int, ...] = scaled(smoke=(32, 32), quick=(256, 256), full=(512, 512))
    batch_size: int = 64
    lr_grid: tuple[float, ...] = scaled(smoke=(0.01,), quick=(0.005, 0.01, 0.02), full=(0.005, 0.01, 0.02))
    val_fraction: float = 0.2  # of the training data, for choosing the learning rate
    adam_beta2: float = 0.99
    beta_max: float = 10.0  # beta = beta_max * tanh(beta_offset + 2 s / (n_tasks * epochs_per_task))
    beta_offset: float = 0.1
    kl_scale: float = 1.0  # task reference: kl_weight = kl_scale / n_train; step reference: kl_scale / batch
    m_meta: float = 1.3
    n_test: int = 397  # digits: stratified 1400/397 split
    perc_n: int = scaled(smoke=100, quick=500, full=1000)
    perc_alpha: float = 2.0  # examples per task / N
    perc_r0: float = 0.0  # overlap of the two teachers
    perc_steps: int = scaled(smoke=60, quick=300, full=1000)
    perc_lr: float = 5e-3
    perc_weight_decay: float = 5e-4
    perc_n_test: int = scaled(smoke=500, quick=2000, full=10000)


@dataclass(frozen=True)
class MnistProtocol(ContinualProtocol):
    """Permuted MNIST: a class-balanced training subset and the first test images under every permutation."""

    epochs_per_task: int = scaled(smoke=1, quick=2, full=5)
    hidden: tuple[int, ...] = scaled(smoke=(64, 64), quick=(256, 256), full=(512, 512))
    n_train: int = scaled(smoke=500, quick=6000, full=60000)
    n_test: int = scaled(smoke=500, quick=2000, full=10000)


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class ContinualData:
    """One base split, the task permutations of its features, and the perceptron's two tasks."""

    split: Split
    perms: tuple[torch.Tensor, ...]
    perceptron: dict
    name: str


def _task_perms(n_features: int, n_tasks: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(10_007 * seed + 3)
    return (torch.arange(n_features),) + tuple(torch.randperm(n_features, generator=g) for _ in range(n_tasks - 1))


def _perceptron_tasks(p: ContinualProtocol, seed: int, device: torch.device) -> dict:
    """Two teacher-student tasks: x in {-1, +1}^N, y = sign(w_t . x) (sign(0) = +1); overlap(w_1, w_2) ~ r0."""
    g = torch.Generator().manual_seed(20_011 * seed + 5)
    n, m = p.perc_n, int(round(p.perc_alpha * p.perc_n))

    def pm1(*shape: int) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=g).float().mul_(2).sub_(1)

    w1 = pm1(n)
    keep = torch.rand(n, generator=g) < (1.0 + p.perc_r0) / 2.0
    w2 = torch.where(keep, w1, -w1)
    out = {}
    for t, w in enumerate((w1, w2)):
        x, xt = pm1(m, n), pm1(p.perc_n_test, n)
        out[t] = tuple(v.to(device) for v in (x, sign_pm1(x @ w), xt, sign_pm1(xt @ w)))
    return out


def _digits_base(test_size: int) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data.astype(np.float64), d.target, test_size=test_size,
                                          stratify=d.target, random_state=0)
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd == 0] = 1.0
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return Split(f(xtr), torch.as_tensor(ytr, dtype=torch.int64), f(xte), torch.as_tensor(yte, dtype=torch.int64),
                 name="digits")


def _mnist_base(root, n_train: int, n_test: int) -> Split:
    """A class-balanced subset of MNIST's training images (the first n_train / 10 of each class), pixels in
    [0, 1] standardised with one global mean/std, and the first ``n_test`` test images."""
    from ...data.readers import load_mnist

    try:
        xtr, ytr = load_mnist(root, "train")
        xte, yte = load_mnist(root, "test")
    except DataError as e:
        raise DataError(f"{SLUG} needs MNIST (mnist/) under --data-root {str(root)!r}: {e}") from None
    per = n_train // 10
    idx = np.sort(np.concatenate([np.flatnonzero(ytr == c)[:per] for c in range(10)]))
    a = xtr[idx].reshape(len(idx), -1).astype(np.float64) / 255.0
    b = xte[:n_test].reshape(min(n_test, len(xte)), -1).astype(np.float64) / 255.0
    mu, sd = a.mean(), a.std()
    return Split(torch.tensor((a - mu) / sd, dtype=torch.float32), torch.as_tensor(ytr[idx], dtype=torch.int64),
                 torch.tensor((b - mu) / sd, dtype=torch.float32), torch.as_tensor(yte[:n_test], dtype=torch.int64),
                 name="mnist")


def _make_data(ctx: ArmContext, split: Split) -> ContinualData:
    split = split.to(ctx.device)
    perms = tuple(q.to(ctx.device) for q in _task_perms(split.x_train.shape[1], ctx.p.n_tasks, ctx.seed))
    return ContinualData(split, perms, _perceptron_tasks(ctx.p, ctx.seed, ctx.device), split.name)


def _digits_setup(ctx: ArmContext) -> ContinualData:
    return _make_data(ctx, _digits_base(ctx.p.n_test))


def _mnist_setup(ctx: ArmContext) -> ContinualData:
    return _make_data(ctx, _mnist_base(ctx.data_root, ctx.p.n_train, ctx.p.n_test))


# ------------------------------------------------------------------------------------------ models
class _FanInScale(nn.Module):
    """Multiplies by 1/sqrt(fan_in): the BNN's preactivation on the same scale as the field net's."""

    def __init__(self, fan_in: int) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _unclipped_ste(x: torch.Tensor, o: float) -> torch.Tensor:
    return ste_sign(x, _NO_CLIP)


def build_model(kind: str, sizes: tuple[int, ...]) -> nn.Sequential:
    """``"field"``: FieldBinaryLinear layers; ``"bnn"``: sign(W_h) layers (straight-through) scaled by
    1/sqrt(fan-in); both without biases, ReLU between layers."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if kind == "field":
            layers.append(FieldBinaryLinear(a, b))
        else:
            layers += [BinaryLinear(a, b, bias=False, estimator=_unclipped_ste, binarize_act=False, scale=None),
                       _FanInScale(a)]
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------ training
def train_continual(arm: str, p: ContinualProtocol, split: Split, perms, lr: float, generator: torch.Generator,
                    device: torch.device) -> list[list[float]]:
    """Train ``arm`` on the tasks in order; ``acc[t][j]``: accuracy (%, MAP weights) on task j after task t."""
    field = arm in ("vcl", "vcl_step", "no_kl")
    sizes = (split.x_train.shape[1],) + tuple(p.hidden) + (split.num_classes,)
    model = build_model("field" if field else "bnn", sizes).to(device)
    betas = (0.9, p.adam_beta2)
    if field:
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
    else:
        opt = MetaplasticAdam(model.parameters(), lr=lr, betas=betas, m_meta=p.m_meta if arm == "metaplastic" else 0.0)
    vc = None
    if arm == "vcl":
        vc = VariationalContinual(model, reference="task", kl_weight=p.kl_scale / len(split.y_train))
    elif arm == "vcl_step":
        vc = VariationalContinual(model, reference="step", kl_weight=p.kl_scale / p.batch_size)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(m(x), y)
        return loss + vc.penalty() if vc is not None else loss

    def evaluate_all() -> list[float]:
        with field_mode(model, "map"):
            return [accuracy(model, split.x_test[:, q], split.y_test) for q in perms]

    total_epochs, acc = p.n_tasks * p.epochs_per_task, []
    for t, q in enumerate(perms[:p.n_tasks]):
        batches = TensorBatches(split.x_train[:, q], split.y_train, batch_size=p.batch_size, generator=generator)
        def anneal_beta(e: int, t: int = t) -> None:
            set_field_beta(model, field_beta(t * p.epochs_per_task + e + 1, total_epochs, p.beta_max, p.beta_offset))

        on_epoch_start = anneal_beta if field else None
        hist = fit(model, opt, batches, epochs=p.epochs_per_task, compute_loss=loss_fn,
                   before_step=vc.before_step if vc is not None else None, on_epoch_start=on_epoch_start)
        if not math.isfinite(hist.last("train_loss")):
            return [[float("nan")] * len(perms)] * p.n_tasks
        if vc is not None:
            vc.end_task()
        acc.append(evaluate_all())
    return acc


def _deep_arm(ctx: ArmContext) -> ArmResult:
    p, data = ctx.p, ctx.data
    split, perms = data.split, data.perms

    def score(lr: float) -> float:
        fit_split, val_split = holdout(split, fraction=p.val_fraction, seed=ctx.seed)
        acc = train_continual(ctx.arm, p, val_split, perms, lr, torch.Generator().manual_seed(ctx.seed), ctx.device)
        return float(np.mean(acc[-1]))

    tuned = tune(p.lr_grid, score) if len(p.lr_grid) > 1 else None
    lr = tuned.value if tuned is not None else p.lr_grid[0]
    acc = train_continual(ctx.arm, p, split, perms, lr, ctx.generator, ctx.device)
    final = acc[-1]
    metrics = {"avg_acc": float(np.mean(final)), "first_task_acc": final[0], "last_task_acc": final[-1],
               "first_task_forgetting": acc[0][0] - final[0], "lr": lr}
    curves = {"avg_acc_seen": [float(np.mean(row[:t + 1])) for t, row in enumerate(acc)],
              "first_task_acc": [row[0] for row in acc]}
    info = {"acc_matrix": acc}
    if tuned is not None:
        info["tuned"] = tuned.as_info()
    return ArmResult(metrics, curves, info)


# ------------------------------------------------------------------------------------------ perceptron
def _perc_acc(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((sign_pm1(x @ sign_pm1(theta.detach())) == y).float().mean())


def _perceptron_arm(ctx: ArmContext) -> ArmResult:
    p, tasks = ctx.p, ctx.data.perceptron
    g = torch.Generator().manual_seed(30_013 * ctx.seed + 7)
    theta = torch.randn(p.perc_n, generator=g).to(ctx.device).requires_grad_()
    prior = torch.zeros_like(theta)  # task 1: the uniform prior theta_0 = 0
    accs, loss_curve = [], []
    for t in (0, 1):
        x, y, xt, yt = tasks[t]
        use_kl = t == 0 or ctx.arm == "perc_kl"
        opt = torch.optim.AdamW([theta], lr=p.perc_lr, weight_decay=p.perc_weight_decay)
        for _ in range(p.perc_steps):
            opt.zero_grad(set_to_none=True)
            loss = binary_perceptron_logH_loss(theta, x, y)
            if use_kl:
                loss = loss + field_kl(theta, prior) / len(y)
            loss.backward()
            opt.step()
            loss_curve.append(float(loss.detach()))
        prior = theta.detach().clone()
        accs.append([_perc_acc(theta, tasks[j][2], tasks[j][3]) for j in (0, 1)])
    metrics = {"task1_acc": accs[1][0], "task2_acc": accs[1][1], "task1_acc_before": accs[0][0],
               "task1_forgetting": accs[0][0] - accs[1][0]}
    return ArmResult(metrics, {"perceptron_loss": loss_curve[:: max(1, len(loss_curve) // 100)]})


def _finish(ctx: ArmContext, out) -> None:
    out.data = ctx.data.name
    m = out.metrics
    out.info.update({"vcl_minus_no_kl": m["vcl"]["avg_acc"] - m["no_kl"]["avg_acc"],
                     "vcl_minus_metaplastic": m["vcl"]["avg_acc"] - m["metaplastic"]["avg_acc"],
                     "n_train": len(ctx.data.split.y_train), "n_test": len(ctx.data.split.y_test)})


CRITERION = AllOf(
    Gain("avg_acc", "vcl", "bnn", at_least=10.0),
    Drop("avg_acc", "vcl", "metaplastic", at_most=2.0),
    Gain("task1_acc", "perc_kl", "perc_no_kl", at_least=5.0),
    Compare("task2_acc", "perc_kl", ">", 60.0),
    AllFinite(),
)

ARMS = {**{a: _deep_arm for a in DEEP_ARMS}, **{a: _perceptron_arm for a in PERC_ARMS}}

CLAIM = register(Claim(
    slug=SLUG,
    title="Statistical mechanics of continual learning: variational principle and mean-field potential",
    arxiv="2212.02846",
    statement=(
        "Binary networks trained as variational Bayes over weight fields (the previous task's posterior as the "
        "prior, exact binary KL) retain earlier tasks: on permuted digits the field-binary MLP's mean accuracy over "
        "all tasks after the last one beats the straight-through BNN by >= 10 points and is no worse than "
        "metaplasticity by more than 2 points; in the two-task binary perceptron the KL keeps task-1 accuracy >= 5 "
        "points higher than without it while task 2 is learned (> 60%)"
    ),
    paper_figure=(
        "Permuted MNIST, 5 tasks, 784-512-512-10 binary MLP: the variational algorithm retains earlier tasks "
        "better than the metaplasticity algorithm (Laborieux et al. 2021) (Fig. of the deep-network section; exact "
        "numbers not given in text); binary perceptron: the mean-field theory predicts the two-task generalisation "
        "curves, and the KL term protects task 1"
    ),
    protocol=ContinualProtocol,
    data="digits",
    setup=_digits_setup,
    arms=ARMS,
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="avg_acc", ours="vcl", baseline="metaplastic", unit="%", ceiling=100.0),
    control={"vcl": "no_kl", "perc_kl": "perc_no_kl"},
    control_note="our method switched off: the same field-binary nets and perceptron without the KL term",
    variants=(
        Variant(name="mnist",
                description="mnist/ (the paper's permuted MNIST, shrunk: a class-balanced training subset and "
                            "the first test images under each task's permutation)",
                protocol=MnistProtocol, setup=_mnist_setup),
    ),
    uses=("gradkit.nn.field_binary.FieldBinaryLinear", "gradkit.nn.field_binary.field_kl",
          "gradkit.nn.field_binary.binary_perceptron_logH_loss", "gradkit.nn.field_binary.field_mode",
          "gradkit.optim.variational_continual.VariationalContinual", "gradkit.optim.metaplastic.MetaplasticAdam",
          "gradkit.schedules.field_beta.field_beta", "gradkit.nn.binary.BinaryLinear"),
    notes=(
        "Why the task can discriminate: with T permutations of the same images, a network without protection "
        "forgets earlier tasks, so the plain BNN's mean accuracy sits far below the ceiling; the negative control "
        "(the field net without KL standing in for ours) must then fail the perceptron check (no KL, no gain by "
        "construction) and shows whether the field parametrisation and beta schedule alone reach the deep "
        "thresholds (info['vcl_minus_no_kl'] is the KL's own contribution; the schedule alone freezes weights as "
        "sigma -> 0, so it may be small). KL weight: with a mean cross-entropy, one KL per epoch (kl_weight = 1/"
        "|D_t|, the per-example variational free energy, as the official perceptron code's batch/|D_t| scaling); "
        "the first task's prior is the uniform one (theta = 0), as in the perceptron code. vcl_step reproduces the "
        "official deep code's per-step reference (KL gradient beta^2 sigma delta added to a batch-summed gradient, "
        "hence kl_weight = 1/batch for a mean loss). The metaplastic BNN has no batch norm (the field net has "
        "none either); both BNN arms pass the gradient of sign(W_h) straight through, unclipped. Every deep arm "
        "chooses its learning rate from the same grid on a 20% validation split of the training images (mean "
        "validation accuracy over all tasks after the last), then retrains on all training images. Accuracies "
        "are of the MAP weights sign(theta); the perceptron runs are not tuned (the official lr for both arms). "
        "Quick scale trains 5 epochs per task (the official code's number, 25 epochs in all as its beta schedule) "
        "rather than 10, to keep three seeds of five tuned arms within the quick budget. The no-KL field net can "
        "clear both deep thresholds alone (the field parametrisation and the annealed beta protect earlier tasks "
        "far better than the BNNs); the deep checks then separate field nets from BNNs, and the control has to "
        "fail on the perceptron check, where the KL is the only difference."
    ),
    findings=(
        "On shrunk permuted MNIST (--data-root, quick: 2 epochs per task) the variational field net only ties "
        "metaplasticity and is under 10 points above the plain BNN, and its KL lowers the mean accuracy against "
        "the same field net without KL (info['vcl_minus_no_kl'] < 0 in every seed measured), so the deep-network "
        "advantage holds on permuted digits but not there."
    ),
    plots=("avg_acc_seen", "first_task_acc", "perceptron_loss"),
    bounds={"avg_acc": (0.0, 100.0), "first_task_acc": (0.0, 100.0), "last_task_acc": (0.0, 100.0),
            "first_task_forgetting": (-100.0, 100.0), "lr": (0.0, float("inf")), "task1_acc": (0.0, 100.0),
            "task2_acc": (0.0, 100.0), "task1_acc_before": (0.0, 100.0), "task1_forgetting": (-100.0, 100.0)},
))
