"""Claim ``info-plane``: the deep hidden layers of a tanh network compress (I(X;T) falls) while keeping I(T;Y).

Shwartz-Ziv & Tishby, "Opening the Black Box of Deep Neural Networks via Information" (arXiv 1703.00810).
Data: all 4096 patterns of 12 bits in {0, 1} (the paper's input space); label y = 1[f(x) > median f] of a
fixed random 12-8-1 tanh teacher (so p(y=1) = 1/2; the paper thresholds a fixed symmetric function
instead). Each seed trains on a random 80% of the patterns; mutual information is measured on all 4096.
Network 12-10-7-5-4-3-2 (tanh hidden units, softmax output), truncated-normal weights with std
1/sqrt(fan_in), zero biases, Adam, batch 256, cross-entropy (the authors' code). Information at epoch 0
and at log-spaced epochs for every hidden layer and the softmax output, binned (30 bins on [-1, 1]) and
with the kernel bound (Gaussian noise of variance ``kde_noise_var``, on a fixed subset of patterns); every
weight matrix's gradient SNR (mean / std of the epoch's batch gradients) per epoch, the first layer's plotted.

Arms: ``tanh`` (the paper's setting), ``relu`` (the same network with ReLU hidden units and bins on each
layer's own [min, max]: Saxe et al.'s counterpoint, reported) and ``untrained`` (the tanh network never
updated, recorded at the same epochs: the negative control). Numbers: the protocol (``gradkit show
info-plane``).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...data import TensorBatches
from ...engine import accuracy, fit
from ...probes.gradient_snr import GradientSNR
from ...probes.information import InformationPlaneRecorder, log_spaced_steps
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, Check, Criterion, fmt, seed_values

SLUG = "info-plane"
OURS, RELU, CONTROL = "tanh", "relu", "untrained"
N_BITS = 12


@dataclass(frozen=True)
class InfoPlaneProtocol(Protocol):
    """The 12-bit task, the paper's network, the optimiser and the estimators' settings."""

    epochs: int = scaled(smoke=200, quick=1000, full=8000)
    lr: float = scaled(smoke=3e-3, quick=3e-3, full=4e-4)  # the authors' code: Adam 4e-4 over ~8000 epochs
    n_records: int = scaled(smoke=5, quick=40, full=60)  # log-spaced epochs with an information record (+ epoch 0)
    batch_size: int = 256
    train_fraction: float = 0.8
    widths: tuple[int, ...] = (10, 7, 5, 4, 3)
    teacher_hidden: int = 8
    data_seed: int = 0  # the teacher and the kernel subset (the training subset follows the run's seed)
    n_bins: int = 30
    kde_noise_var: float = 0.1
    kde_samples: int = scaled(smoke=256, quick=1024, full=4096)
    compression_bits: float = 0.3  # final I(X;T) <= peak - this, in one of the two deepest hidden layers
    keep_ity: float = 0.9  # ... while final I(T;Y) >= this x its peak
    seed_fraction: float = 2 / 3  # of the seeds that must show compression


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class BitsTask:
    x: torch.Tensor  # (4096, 12) every pattern, in {0, 1}
    y: torch.Tensor  # (4096,) the teacher's labels
    train: torch.Tensor  # indices of this seed's training patterns
    test: torch.Tensor  # the rest
    kde_gen_seed: int


def all_patterns(n_bits: int = N_BITS) -> torch.Tensor:
    """Every pattern of ``n_bits`` bits in {0, 1}, shape (2**n_bits, n_bits)."""
    return torch.tensor(list(itertools.product((0.0, 1.0), repeat=n_bits)), dtype=torch.float32)


def teacher_labels(x: torch.Tensor, hidden: int, seed: int) -> torch.Tensor:
    """y = 1[f(x) > median f] for a fixed random one-hidden-layer tanh teacher f (balanced labels)."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    w1 = torch.randn(d, hidden, generator=g, dtype=torch.float64) / math.sqrt(d)
    b1 = torch.randn(hidden, generator=g, dtype=torch.float64) * 0.5
    w2 = torch.randn(hidden, generator=g, dtype=torch.float64)
    f = torch.tanh(x.double() @ w1 - 0.5 * w1.sum(0) + b1) @ w2  # inputs centred for the teacher only
    return (f > f.median()).long()


def _setup(ctx: ArmContext) -> BitsTask:
    p = ctx.p
    x = all_patterns()
    y = teacher_labels(x, p.teacher_hidden, p.data_seed)
    perm = torch.randperm(len(x), generator=ctx.generator)
    n_train = int(round(p.train_fraction * len(x)))
    dev = ctx.device
    return BitsTask(x.to(dev), y.to(dev), perm[:n_train].to(dev), perm[n_train:].to(dev), p.data_seed)


# ------------------------------------------------------------------------------------------ model
def build_mlp(widths: tuple[int, ...], activation: str, d_in: int = N_BITS, n_out: int = 2) -> nn.Sequential:
    """d_in -> widths (tanh or ReLU) -> n_out logits; truncated-normal weights (std 1/sqrt(fan_in)), zero biases."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    sizes = (d_in, *widths, n_out)
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        lin = nn.Linear(a, b)
        std = 1.0 / math.sqrt(a)
        nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(widths):
            layers.append(act())
    return nn.Sequential(*layers)


def recorded_layers(widths: tuple[int, ...]) -> list[str]:
    """Module names of every hidden activation and of the output layer (read through a softmax)."""
    return [str(2 * i + 1) for i in range(len(widths))] + [str(2 * len(widths))]


# ------------------------------------------------------------------------------------------ metrics
def _first_below_one(ratios: list[float], never: float) -> float:
    for i, r in enumerate(ratios):
        if r < 1.0:
            return float(i + 1)
    return never


def compression(ixt, ity, epochs, layers, drop_bits: float, keep: float) -> dict[str, float]:
    """Per-seed compression summary over ``layers`` (column indices) of (records, layers) arrays."""
    best = None
    for li in layers:
        a, b = ixt[:, li], ity[:, li]
        peak_i = int(a.argmax())
        drop = float(a.max() - a[-1])
        kept = float(b[-1] / b.max()) if b.max() > 0 else 0.0
        ok = drop >= drop_bits and kept >= keep
        cand = (ok, drop, kept, li, float(epochs[peak_i]))
        if best is None or cand[:2] > best[:2]:
            best = cand
    ok, drop, kept, li, peak_epoch = best
    return {"compressed": float(ok), "compression_bits": drop, "ity_kept": kept,
            "compressing_layer": float(li + 1), "ixt_peak_epoch": peak_epoch}


def _train_arm(ctx: ArmContext) -> ArmResult:
    p, task = ctx.p, ctx.data
    activation = "relu" if ctx.arm == RELU else "tanh"
    model = build_mlp(p.widths, activation).to(ctx.device)
    names = recorded_layers(p.widths)
    schedule = log_spaced_steps(p.epochs, p.n_records)
    rec = InformationPlaneRecorder(
        model, names, task.x, task.y, n_bins=p.n_bins,
        value_range="adaptive" if activation == "relu" else (-1.0, 1.0),
        transforms={names[-1]: lambda h: torch.softmax(h, dim=-1)},
        kde_noise_var=p.kde_noise_var, kde_samples=p.kde_samples,
        generator=torch.Generator().manual_seed(task.kde_gen_seed), steps=schedule)
    snr = GradientSNR(model)
    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    rec.record(0)
    if ctx.arm == CONTROL:  # never updated: the same network recorded at every scheduled epoch
        for e in schedule:
            rec.record(e)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=p.lr, fused=True)
        batches = TensorBatches(task.x[task.train], task.y[task.train], batch_size=p.batch_size,
                                generator=ctx.generator)

        def on_epoch_end(epoch, hist):
            snr.on_epoch_end(epoch, hist)
            rec.on_epoch_end(epoch, hist)

        hist = fit(model, opt, batches, epochs=p.epochs, before_step=snr.before_step,
                   on_epoch_end=on_epoch_end, progress=ctx.progress, desc=f"{SLUG}/{ctx.arm}")
        first = next(iter(snr.history.values()))
        metrics.update({
            "train_loss": hist.last("train_loss"),
            "snr_crossover_epoch": _first_below_one(first["ratio"], float(p.epochs + 1)),
            "snr_first_epoch": first["ratio"][0], "snr_last_epoch": first["ratio"][-1],
            "n_snr_ratios": float(len(snr.history)),
        })
        w = first["weight_norm"]
        curves["snr_layer1"] = list(first["ratio"])
        curves["grad_mean_layer1"] = [m / max(n, 1e-30) for m, n in zip(first["mean_norm"], w)]
        curves["grad_std_layer1"] = [s / max(n, 1e-30) for s, n in zip(first["std_norm"], w)]
    h = rec.history
    deep = [len(p.widths) - 2, len(p.widths) - 1]  # the two deepest hidden layers (0-based columns)
    summary = compression(h["ixt"], h["ity"], h["step"], deep, p.compression_bits, p.keep_ity)
    kde = compression(h["ixt_kde"], h["ity_kde"], h["step"], deep, p.compression_bits, p.keep_ity)
    metrics.update(summary)
    metrics.update({"kde_compressed": kde["compressed"], "kde_compression_bits": kde["compression_bits"],
                    "kde_ity_kept": kde["ity_kept"]})
    for li in deep:
        metrics[f"ixt_peak_layer{li + 1}"] = float(h["ixt"][:, li].max())
        metrics[f"ixt_final_layer{li + 1}"] = float(h["ixt"][-1, li])
        metrics[f"ity_final_layer{li + 1}"] = float(h["ity"][-1, li])
    metrics["train_acc"] = accuracy(model, task.x[task.train], task.y[task.train])
    metrics["test_acc"] = accuracy(model, task.x[task.test], task.y[task.test])
    for li in range(len(names)):
        tag = f"layer{li + 1}"
        curves[f"ixt_{tag}"] = h["ixt"][:, li].tolist()
        curves[f"ity_{tag}"] = h["ity"][:, li].tolist()
        curves[f"kde_ixt_{tag}"] = h["ixt_kde"][:, li].tolist()
        curves[f"kde_ity_{tag}"] = h["ity_kde"][:, li].tolist()
    return ArmResult(metrics, curves, info={"record_epochs": h["step"].tolist(),
                                            "seconds_recording": round(rec.seconds, 3),
                                            "snr_ratio_per_matrix_last": {k: v["ratio"][-1] for k, v in
                                                                           snr.history.items() if v["ratio"]}})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p = ctx.p
    record_x = [0] + log_spaced_steps(p.epochs, p.n_records)
    n_layers = len(p.widths) + 1
    axes = {}
    for li in range(1, n_layers + 1):
        what = "softmax output" if li == n_layers else f"hidden layer {li}"
        for est, lab in (("", "binned"), ("kde_", "kernel")):
            axes[f"{est}ixt_layer{li}"] = {"xlabel": "epoch", "x": record_x, "unit": "bits", "logx": True,
                                           "ylabel": f"I(X;T) {lab}, {what}"}
            # x_curve: the partner curve for an information-plane plot (I(T;Y) against I(X;T), per arm)
            axes[f"{est}ity_layer{li}"] = {"xlabel": "epoch", "x": record_x, "unit": "bits", "logx": True,
                                           "ylabel": f"I(T;Y) {lab}, {what}", "x_curve": f"{est}ixt_layer{li}"}
    epochs_x = list(range(1, p.epochs + 1))
    axes["snr_layer1"] = {"xlabel": "epoch", "x": epochs_x, "log": True, "logx": True,
                          "ylabel": "first-layer gradient mean/std"}
    axes["grad_mean_layer1"] = {"xlabel": "epoch", "x": epochs_x, "log": True, "logx": True,
                                "ylabel": "||mean g|| / ||W||, first layer"}
    axes["grad_std_layer1"] = {"xlabel": "epoch", "x": epochs_x, "log": True, "logx": True,
                               "ylabel": "||std g|| / ||W||, first layer"}
    out.info["curve_axes"] = axes
    m = out.metrics
    out.info["h_y_bits"] = _entropy_bits_of_labels(ctx.data.y)
    out.info["crossover_vs_peak"] = {
        arm: {"snr_crossover_epoch": m[arm].get("snr_crossover_epoch"), "ixt_peak_epoch": m[arm]["ixt_peak_epoch"],
              "compressing_layer": m[arm]["compressing_layer"]} for arm in (OURS, RELU) if arm in m}


def _entropy_bits_of_labels(y: torch.Tensor) -> float:
    q = torch.bincount(y).double()
    q = q[q > 0] / q.sum()
    return float(-(q * torch.log2(q)).sum())


# ------------------------------------------------------------------------------------------ criterion
@dataclass(frozen=True)
class CompressedInSeeds(Criterion):
    """A 0/1 per-seed metric of ``arm`` is 1 in at least ``fraction`` of the seeds (rounded up)."""

    metric: str
    arm: str
    fraction: float
    text: str

    def describe(self) -> str:
        return self.text

    def checks(self, per_seed):
        xs = seed_values(per_seed, self.arm, self.metric)
        need = math.ceil(self.fraction * len(xs) - 1e-9)
        hits = sum(1 for x in xs if math.isfinite(x) and x >= 0.5)
        return [Check(self.describe(), hits >= need,
                      f"{hits}/{len(xs)} seeds (need {need}): " + ", ".join(fmt(x) for x in xs))]


_P = InfoPlaneProtocol()
CRITERION = AllOf(
    CompressedInSeeds(
        "compressed", OURS, _P.seed_fraction,
        text=(f"compressed[{OURS}] in >= {_P.seed_fraction:.2g} of seeds: in one of the two deepest hidden layers "
              f"final I(X;T) <= peak - {_P.compression_bits:g} bit while final I(T;Y) >= {_P.keep_ity:g} x its "
              "peak (binned, 30 bins)")),
    AllFinite(),
)

CLAIM = register(Claim(
    slug=SLUG,
    title="Opening the Black Box of Deep Neural Networks via Information",
    arxiv="1703.00810",
    statement=(
        "Training a 12-10-7-5-4-3-2 tanh network on all-pattern 12-bit data, the deepest hidden layers go "
        "through a compression phase: their binned I(X;T) falls at least 0.3 bit below its peak by the end of "
        "training while I(T;Y) stays within 90% of its peak (in at least 2 of 3 seeds)"),
    paper_figure=(
        "Fig. 2/3 (12-bit task, 50 runs averaged, ~8000-10000 epochs): a short fitting phase in which I(X;T) "
        "and I(T;Y) rise, then a long compression phase in which I(X;T) of the deeper layers falls by several "
        "bits while I(T;Y) stays near H(Y) = 1 bit; compression starts with the drift-to-diffusion change of "
        "the gradients (mean/std of the batch gradients crossing 1, Fig. 4, a few hundred epochs in)"),
    protocol=InfoPlaneProtocol,
    data="bits12",
    setup=_setup,
    arms={OURS: _train_arm, RELU: _train_arm, CONTROL: _train_arm},
    finish=_finish,
    criterion=CRITERION,
    primary=Primary(metric="compression_bits", ours=OURS, baseline=RELU, unit="bits"),
    control={OURS: CONTROL},
    control_note="the same tanh network never trained (recorded at the same epochs) stands in for the trained one",
    uses=("gradkit.probes.information.InformationPlaneRecorder",
          "gradkit.probes.information.binned_mutual_information",
          "gradkit.probes.information.kde_mutual_information",
          "gradkit.probes.information.log_spaced_steps", "gradkit.probes.gradient_snr.GradientSNR"),
    notes=(
        "Compression is measured with the paper's binned estimator on every one of the 4096 patterns (exact "
        "plug-in entropies, no sampling noise), so the 0.3-bit drop is not estimator noise; the untrained "
        "network (control) has a constant trajectory and must fail. I(X;T) of a layer can only fall from a "
        "peak below log2(4096) = 12 bits, and I(T;Y) at most H(Y) = 1 bit, so neither metric is at a ceiling. "
        "The relu arm (bins on each layer's own [min, max], as Saxe et al. did) is the counterpoint the paper "
        "did not run: Saxe et al. attribute compression to tanh saturation and report little or none with "
        "ReLU; its outcome is reported, not judged. The kernel estimate (kde_*: Gaussian noise of variance "
        "kde_noise_var, pairwise-distance bound, on kde_samples fixed patterns) checks whether the compression "
        "depends on the bins. The drift/diffusion statement is reported, not judged: snr_crossover_epoch "
        "(first epoch whose first-layer mean/std of batch gradients is < 1; epochs + 1 when it never is) next "
        "to ixt_peak_epoch (where the compressing layer's I(X;T) peaks); the paper says they coincide. The "
        "paper's lr (4e-4 Adam in the authors' code; the text says SGD) over 8000+ epochs is the full scale; "
        "quick uses 3e-3 over 1000 epochs to fit the time budget, and 3 seeds instead of 50. No "
        "hyperparameter is tuned: every arm runs the same fixed settings (equal, zero tuning budgets). The "
        "label is a random teacher thresholded at its median, not the paper's symmetric function."),
    plots=("ixt_layer4", "ixt_layer5", "ity_layer5", "kde_ixt_layer5", "snr_layer1"),
    bounds={
        "compressed": (0.0, 1.0), "kde_compressed": (0.0, 1.0),
        "compression_bits": (0.0, float(N_BITS)), "kde_compression_bits": (0.0, float(N_BITS)),
        "ity_kept": (0.0, 1.0), "kde_ity_kept": (-float("inf"), 1.0),
        "ixt_peak_layer4": (0.0, float(N_BITS)), "ixt_final_layer4": (0.0, float(N_BITS)),
        "ixt_peak_layer5": (0.0, float(N_BITS)), "ixt_final_layer5": (0.0, float(N_BITS)),
        "ity_final_layer4": (0.0, 1.0 + 1e-9), "ity_final_layer5": (0.0, 1.0 + 1e-9),
        "train_acc": (0.0, 100.0), "test_acc": (0.0, 100.0), "train_loss": (0.0, float("inf")),
        "snr_first_epoch": (0.0, float("inf")), "snr_last_epoch": (0.0, float("inf")),
        "n_snr_ratios": (6.0, 6.0),
    },
))
