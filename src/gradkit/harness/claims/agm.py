"""Claim ``agm``: adaptive gradient modulation beats joint training when a shortcut modality dominates.

Li et al., "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV 2023
(arXiv 2308.07686). Data: two-modality digits (:func:`gradkit.data.multimodal.load_shortcut_digits`:
``a`` = a partly reliable noisy label one-hot, ``v`` = digit image + Gaussian noise); two fusion
models (:class:`gradkit.nn.modulation.FusionMLP`; ``early`` = concat -> MLP head, ``late`` = sum of
per-modality linear heads). Arms, all from the same init and batch order per seed:

- ``joint_<fusion>``: joint training (the :class:`~gradkit.nn.modulation.AGM` wrapper with
  ``enabled=False``: bit-identical to plain training, but it scores the attributed outputs).
- ``agm_<fusion>``: AGM with the official code's default alpha, modulation over the whole run.
- ``agm_<fusion>_a2.5``: AGM with the README's AV-MNIST alpha (``alpha_secondary``), reported, not judged.
- ``v_only`` / ``a_only``: one branch alone (same encoder and MLP head): each modality's unimodal accuracy.

Joint training here under-uses the shortcut modality ``a``: its attributed accuracy stays far below what
``a`` reaches alone. The criterion asks for that premise (``a_only`` >= joint's attributed ``a`` + 10),
then for AGM's gain on the suppressed modality's attributed accuracy and on fused accuracy.

Every arm uses the official optimiser (SGD with momentum and weight decay), mean cross-entropy and
the official clipping rule (if max |grad| of the output-layer weight exceeds ``grad_trigger``,
``clip_grad_norm_(all parameters, clip_norm)``). Metrics on the test digits after the last epoch:
fused accuracy (``test_acc``) and the attributed accuracies ``phi_v_acc`` / ``phi_a_acc`` (argmax of
the Shapley outputs, all passes in eval mode). ``gradkit show agm`` prints the protocol.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.batches import TensorBatches
from ...data.multimodal import MultimodalSplit, load_shortcut_digits
from ...engine import fit
from ...nn.modulation import AGM, FusionMLP
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllOf, Gain

SLUG = "agm"
FUSIONS = ("early", "late")
UNIMODAL = {"v_only": "v", "a_only": "a"}  # one-branch arms and their modality
# arm -> (kind, fusion, which alpha); kind in {"joint", "agm", "v_only", "a_only"}
ARMS: dict[str, tuple[str, str | None, str]] = {
    "joint_early": ("joint", "early", "alpha"),
    "agm_early": ("agm", "early", "alpha"),
    "joint_late": ("joint", "late", "alpha"),
    "agm_late": ("agm", "late", "alpha"),
    "v_only": ("v_only", None, "alpha"),
    "a_only": ("a_only", None, "alpha"),
    "agm_early_a2.5": ("agm", "early", "alpha_secondary"),
    "agm_late_a2.5": ("agm", "late", "alpha_secondary"),
}


@dataclass(frozen=True)
class AgmProtocol(Protocol):
    """Shortcut digits, early and late fusion MLPs, the official optimiser and clipping rule."""

    epochs: int = scaled(smoke=3, quick=30, full=100)
    alpha: float = 1.0  # the official code's default
    alpha_secondary: float = 2.5  # the README's AV-MNIST example (the *_a2.5 arms)
    clamp: float = 10.0  # the CREMA-D script's exponent clamp
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch: int = 64
    enc_a: int = 16  # encoder width of the shortcut modality
    enc_v: int = 64  # encoder width of the image modality
    head_hidden: int = 64
    grad_trigger: float = 1.0  # clip when max |grad W_out| exceeds this
    clip_norm: float = 1.0
    reliability: float = 0.7  # how often the shortcut one-hot is the true label
    image_noise: float = 0.5
    shortcut_noise: float = 0.1
    data_seed: int = 0


def build_model(arm: str, data: MultimodalSplit, p: AgmProtocol) -> FusionMLP:
    """The arm's network: two-branch FusionMLP (modalities a, v) or the v branch alone."""
    kind, fusion, _ = ARMS[arm]
    dims = data.num_features
    enc = {"a": p.enc_a, "v": p.enc_v}
    if kind in UNIMODAL:
        m = UNIMODAL[kind]
        return FusionMLP([dims[data.index(m)]], [enc[m]], data.num_classes, "concat", p.head_hidden)
    return FusionMLP(list(dims), [enc[m] for m in data.modalities], data.num_classes,
                     "concat" if fusion == "early" else "sum", p.head_hidden)


def clip_rule(model: FusionMLP, grad_trigger: float, clip_norm: float):
    """``before_step``: the official trigger, clip all gradients if |grad W_out| > grad_trigger anywhere."""
    params = [q for q in model.parameters() if q.requires_grad]
    weights = model.final_weights()

    def before_step(step: int) -> None:
        g = max(float(w.grad.abs().max()) for w in weights if w.grad is not None)
        if g > grad_trigger:
            nn.utils.clip_grad_norm_(params, clip_norm)

    return before_step


@torch.no_grad()
def _evaluate(wrapped: AGM | FusionMLP, xs: tuple[Tensor, ...], y: Tensor, multimodal: bool,
              modality: str = "v") -> dict[str, float]:
    was = wrapped.training
    wrapped.eval()
    try:
        if not multimodal:
            acc = 100.0 * (wrapped(*xs).argmax(1) == y).float().mean().item()
            return {"test_acc": acc, f"phi_{modality}_acc": acc}
        phi_a, phi_v = wrapped.attribute(*xs)
        full = wrapped.model(*xs)

        def acc(out: Tensor) -> float:
            return 100.0 * (out.argmax(1) == y).float().mean().item()

        return {"test_acc": acc(full), "phi_v_acc": acc(phi_v), "phi_a_acc": acc(phi_a),
                "sum_phi_err": float((phi_a + phi_v - full).abs().max())}
    finally:
        wrapped.train(was)


def _setup(ctx: ArmContext) -> MultimodalSplit:
    p = ctx.p
    return load_shortcut_digits(image_noise=p.image_noise, reliability=p.reliability,
                                shortcut_noise=p.shortcut_noise, seed=p.data_seed).to(ctx.device)


def train_arm(ctx: ArmContext) -> ArmResult:
    """One arm (``ctx.arm``, a key of :data:`ARMS`) on ``ctx.data``."""
    p, data, arm = ctx.p, ctx.data, ctx.arm
    kind, _, alpha_field = ARMS[arm]
    net = build_model(arm, data, p).to(ctx.device)
    multimodal = kind not in UNIMODAL
    if multimodal:
        model: nn.Module = AGM(net, num_modalities=2, alpha=getattr(p, alpha_field), clamp=p.clamp,
                               enabled=(kind == "agm"))
        tensors = (*data.x_train, data.y_train)
        test_x = data.x_test
    else:
        model = net
        im = data.index(UNIMODAL[kind])
        tensors = (data.x_train[im], data.y_train)
        test_x = (data.x_test[im],)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    batches = TensorBatches(*tensors, batch_size=p.batch, generator=ctx.generator)
    epoch_log: dict[str, list[float]] = {"k_a": [], "k_v": [], "s_a": [], "s_v": []}

    def compute_loss(m: nn.Module, batch) -> Tensor:
        *xs, y = batch
        if not multimodal:
            return F.cross_entropy(m(*xs), y)
        out = m(*xs, target=y)
        (s_a, s_v), (k_a, k_v) = m.last_scores, m.last_coefficients
        for key, v in (("s_a", s_a), ("s_v", s_v), ("k_a", k_a), ("k_v", k_v)):
            epoch_log[key].append(v)
        return F.cross_entropy(out, y)

    per_epoch: dict[str, list[float]] = {k: [] for k in epoch_log}

    def evaluate(m: nn.Module) -> dict[str, float]:
        for k, vals in epoch_log.items():
            if vals:
                per_epoch[k].append(sum(vals) / len(vals))
            vals.clear()
        return _evaluate(m, test_x, data.y_test, multimodal, UNIMODAL.get(kind, "v"))

    hist = fit(model, opt, batches, epochs=p.epochs, compute_loss=compute_loss, evaluate=evaluate,
               before_step=clip_rule(net, p.grad_trigger, p.clip_norm), progress=ctx.progress,
               desc=f"{SLUG}/{arm}")
    phis = ("phi_a_acc", "phi_v_acc") if multimodal else (f"phi_{UNIMODAL[kind]}_acc",)
    metrics = {k: hist.last(k) for k in ("test_acc", *phis)}
    metrics["train_loss"] = hist.last("train_loss")
    curves = {k: hist.series(k) for k in ("test_acc", *phis)}
    if multimodal:
        metrics["sum_phi_err"] = max(hist.series("sum_phi_err"))
        curves["s_a"], curves["s_v"] = per_epoch["s_a"], per_epoch["s_v"]
        if kind == "agm":
            metrics["k_a_mean"], metrics["k_v_mean"] = per_epoch["k_a"][-1], per_epoch["k_v"][-1]
            curves["k_a"], curves["k_v"] = per_epoch["k_a"], per_epoch["k_v"]
    return ArmResult(metrics, curves, {"steps": hist.steps})


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    data = ctx.data
    ia = data.index("a")
    out.info.update({
        "loss": "mean cross-entropy", "modulation": "every epoch",
        "clip": "clip_grad_norm_(all parameters) when max|grad W_out| > grad_trigger (all arms)",
        "n_train": len(data.y_train), "n_test": len(data.y_test),
        "shortcut_test_acc": 100.0 * (data.x_test[ia].argmax(1) == data.y_test).float().mean().item(),
    })


CLAIM = register(Claim(
    slug=SLUG,
    version=2,
    title="Boosting Multi-modal Model Performance with Adaptive Gradient Modulation",
    arxiv="2308.07686",
    statement=(
        "On a two-modality task where joint training under-uses one modality (the partly reliable shortcut "
        "a: its attributed accuracy >= 10 points below a alone), AGM (Shapley-attributed per-modality "
        "outputs, gradients rescaled by k_m = exp(alpha (rb_m - r_m))) raises that modality's attributed "
        "accuracy by >= 3 points and fused test accuracy by >= 1.5 points over joint training, for both "
        "early (concat) and late (sum) fusion (seed means)"
    ),
    paper_figure=(
        "AGM beats joint training and OGM-GE/MSLR/MSES/G-Blending on AV-MNIST, CREMA-D, UR-Funny, AVE and "
        "CMU-MOSEI for late, early and intermediate fusion (Tables 1-3); on CREMA-D the gain over joint "
        "training is several points"
    ),
    protocol=AgmProtocol,
    data="shortcut-digits",
    setup=_setup,
    arms={arm: train_arm for arm in ARMS},
    finish=_finish,
    criterion=AllOf(*(c for f in FUSIONS for c in (
        Gain(metric="phi_a_acc", ours="a_only", baseline=f"joint_{f}", at_least=10.0),
        Gain(metric="phi_a_acc", ours=f"agm_{f}", baseline=f"joint_{f}", at_least=3.0),
        Gain(metric="test_acc", ours=f"agm_{f}", baseline=f"joint_{f}", at_least=1.5),
    ))),
    primary=Primary(metric="test_acc", ours="agm_early", baseline="joint_early", unit="%", ceiling=100.0),
    control={f"agm_{f}": f"joint_{f}" for f in FUSIONS},
    control_note="the same AGM wrapper with the modulation off (k = 1), for both fusions",
    uses=("gradkit.nn.modulation.AGM", "gradkit.nn.modulation.AGMController",
          "gradkit.nn.modulation.shapley_outputs", "gradkit.nn.modulation.modulated_fusion",
          "gradkit.nn.modulation.grad_scale", "gradkit.nn.modulation.FusionMLP",
          "gradkit.data.multimodal.load_shortcut_digits"),
    notes=(
        "Bundled data only: the paper's data sets are not supported, so --data-root is ignored. "
        "Shortcut modality a: a 10-d one-hot that is the true label with probability `reliability`, else "
        "a uniform random class, plus Gaussian noise; image modality v: standardised digit plus Gaussian "
        "noise; corruptions fixed per sample. Mean (not summed) cross-entropy. Modulation on in every "
        "epoch (the official default window is epochs 1-20 of 100). joint_* arms run through the "
        "same AGM wrapper with k=1 (bit-identical to plain training) so their attributed accuracies are "
        "measured the same way. v_only's phi_v_acc and a_only's phi_a_acc are their test accuracies. The *_a2.5 arms (alpha_secondary) "
        "are reported, not judged. sum_phi_err = max |phi_a + phi_v - f(a,v)| on the test set (the "
        "efficiency identity)."
    ),
    scale_note=(
        "Joint training does under-use the shortcut modality here (its attributed accuracy 21-24% against 67% "
        "for a alone), and AGM closes much of that gap (to 48-51%), but fused accuracy rises only 0.6 "
        "(early) and 0.4 (late) points, under the +1.5 required (seeds 0-2). Whether the several-point fused "
        "gains of the paper need its larger encoders and harder modalities (CREMA-D audio-visual, AV-MNIST) "
        "is what a run on those data sets would settle."
    ),
    plots=("test_acc", "phi_a_acc", "k_a"),
    bounds={"test_acc": (0.0, 100.0), "phi_v_acc": (0.0, 100.0), "phi_a_acc": (0.0, 100.0)},
))
