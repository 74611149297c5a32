"""PGI claim: a training-only auxiliary reversible branch improves a deep-and-thin network (paper slug: pgi).

MNIST-1D (80/20 train/test split of 40-sample signals, one global mean/std); main network = ``depth``
Conv1d(k=3)-BN-ReLU stages of ``width`` channels with stride 2 at the ``downsample_at`` stages (an
information bottleneck), global-average-pool + linear head. Three arms, each from the same seed (identical
main-network init and batch order):

- ``plain``: the main network alone;
- ``deep_sup``: + pooled linear heads on the ``ds_heads_at`` main stages, loss ``CE + aux_weight * sum CE_aux``;
- ``pgi``: + auxiliary branch (a fresh copy of the stages and head, fed the raw signal), CBLinear links from
  each ``route_stages`` main stage to the aux stages at the same or lower depth among them (the official
  multi-level routing), loss ``CE_main + aux_weight * CE_aux``.

Adam with a cosine schedule over the epochs. The main path alone is evaluated (test accuracy after the last
epoch); the PGI model is then deployed (aux branch dropped) and checked to have the plain network's parameter
count, FLOPs and the wrapper's eval outputs exactly (the plain arm, the control's stand-in, gets the same
check). A probe records the gradient norm reaching the first and last main stages (mean over steps). Every
setting is a field of :class:`PgiProtocol` (``gradkit show pgi``; stage indices are 0-based).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ...data import Split, TensorBatches, load_mnist1d
from ...engine import accuracy, fit
from ...nn.pgi import DeepSupervision, PGIWrapper, conv_stages, make_aux_copy, pool_head
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllOf, AtMost, Gain

SLUG = "pgi"
ARMS = ("plain", "deep_sup", "pgi")
OURS, BASELINE = "pgi", "plain"
CLASSES = 10  # MNIST-1D
N_PROBE = 256  # test signals the FLOPs are counted on (reported per signal)


@dataclass(frozen=True)
class PgiProtocol(Protocol):
    """MNIST-1D, a deep-and-thin 1-D CNN, Adam + cosine; stage indices 0-based."""

    n_samples: int = scaled(smoke=5000, quick=5000, full=10000)  # 80/20 train/test split of mnist1d
    epochs: int = scaled(smoke=2, quick=20, full=60)
    # deep and thin enough that plain training loses information: depth 16 x width 8 reaches ~77% where
    # depth 8 x width 16 reaches ~97% (measured at this scale)
    depth: int = 16
    width: int = 8
    downsample_at: tuple[int, ...] = (4, 8, 12)  # stride 2 at stages 5, 9, 13 (1-based): lengths 40 -> 5
    ds_heads_at: tuple[int, ...] = (3, 7, 11)  # deep supervision on main stages 4, 8, 12 (1-based)
    route_stages: tuple[int, ...] = (3, 7, 11, 15)  # PGI links: main stage j -> aux stages k <= j among these
    aux_weight: float = 0.25
    lr: float = 3e-3
    batch: int = 128


def routes(p: PgiProtocol) -> dict[int, list[int]]:
    """PGI's multi-level routing: each route stage j of the main network feeds the aux stages k <= j."""
    return {j: [k for k in p.route_stages if k <= j] for j in p.route_stages}


def build_main(p: PgiProtocol) -> tuple[nn.ModuleList, nn.Module]:
    """The claim's deep-and-thin 1-D CNN as (stages, head)."""
    return (conv_stages(1, p.width, p.depth, downsample_at=p.downsample_at, dims=1),
            pool_head(p.width, CLASSES, dims=1))


def build_arm(arm: str, p: PgiProtocol) -> nn.Module:
    """The arm's training model; the main network is built first so its init is the same in every arm."""
    stages, head = build_main(p)
    if arm == "plain":
        return nn.Sequential(*stages, head)
    if arm == "deep_sup":
        return DeepSupervision(stages, head, {i: pool_head(p.width, CLASSES, dims=1) for i in p.ds_heads_at},
                               weight=p.aux_weight)
    if arm == "pgi":
        return PGIWrapper(stages, make_aux_copy(stages), head, pool_head(p.width, CLASSES, dims=1), routes(p),
                          aux_weight=p.aux_weight)
    raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")


def _stages(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, PGIWrapper):
        return list(model.main_stages)
    if isinstance(model, DeepSupervision):
        return list(model.stages)
    return list(model)[:-1]


def _inference_model(model: nn.Module) -> nn.Module:
    return model.deploy() if isinstance(model, (PGIWrapper, DeepSupervision)) else model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _flops(model: nn.Module, x: Tensor) -> int:
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops())


def load_data(n_samples: int) -> Split:
    """MNIST-1D as (N, 1, 40) signals, standardised with one global training mean/std."""
    s = load_mnist1d(num_samples=n_samples)
    xtr = s.x_train.double().numpy()  # numpy float64: the statistics do not depend on torch's thread count
    mu, sd = float(xtr.mean()), float(xtr.std())
    return Split(((s.x_train - mu) / sd).unsqueeze(1), s.y_train, ((s.x_test - mu) / sd).unsqueeze(1), s.y_test,
                 name="mnist1d")


def _grad_norm(params: list[nn.Parameter]) -> Tensor:
    gs = [p.grad for p in params if p.grad is not None]
    if not gs:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))


def _setup(ctx: ArmContext) -> Split:
    return load_data(ctx.p.n_samples).to(ctx.device)


def _train_arm(ctx: ArmContext) -> ArmResult:
    p, split, arm = ctx.p, ctx.data, ctx.arm
    model = build_arm(arm, p).to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(p.epochs, 1))
    batches = TensorBatches(split.x_train, split.y_train, batch_size=p.batch, shuffle=True, generator=ctx.generator)
    stages = _stages(model)
    early, late = list(stages[0].parameters()), list(stages[-1].parameters())
    acc = {"early": [], "late": [], "main": []}

    def compute_loss(m: nn.Module, batch) -> Tensor:
        x, y = batch
        out = m(x)
        if arm == "plain":
            loss = F.cross_entropy(out, y)
            acc["main"].append(loss.detach())
            return loss
        acc["main"].append(F.cross_entropy(out[0], y).detach())
        return m.loss(out, y)

    def before_step(step: int) -> None:
        acc["early"].append(_grad_norm(early))
        acc["late"].append(_grad_norm(late))

    def _pop(key: str) -> float:
        vals = acc[key]
        v = float(torch.stack(vals).mean()) if vals else float("nan")
        vals.clear()
        return v

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(m, split.x_test, split.y_test), "main_loss": _pop("main"),
                "grad_early": _pop("early"), "grad_late": _pop("late")}

    hist = fit(model, opt, batches, epochs=p.epochs, compute_loss=compute_loss, before_step=before_step,
               evaluate=evaluate, scheduler=sched, progress=ctx.progress, desc=f"{SLUG}/{arm}")
    complete = len(hist.records) == p.epochs
    ge, gl = hist.series("grad_early"), hist.series("grad_late")
    x_probe = split.x_test[:N_PROBE]
    deployed = _inference_model(model)
    metrics = {
        "test_acc": hist.last("test_acc") if complete else float("nan"),
        "best_test_acc": hist.best("test_acc"),
        "train_loss": hist.last("main_loss"),
        "total_loss": hist.last("train_loss"),
        "grad_early": sum(ge) / len(ge),
        "grad_late": sum(gl) / len(gl),
        "train_params": float(_count(model)),
        "infer_params": float(_count(deployed)),
        "infer_kflops": _flops(deployed, x_probe) / len(x_probe) / 1e3,
    }
    if arm in (OURS, BASELINE):  # the criterion reads these on pgi; plain stands in for it in the control
        # the deployed model vs a freshly built plain network (params, FLOPs) and vs the training model (outputs)
        ref_stages, ref_head = build_main(p)
        reference = nn.Sequential(*ref_stages, ref_head).to(ctx.device)
        model.eval()
        with torch.no_grad():
            diff = (deployed(split.x_test) - model(split.x_test)).abs().max().item()
        model.train()
        metrics["deploy_out_diff"] = float(diff)
        metrics["deploy_param_diff"] = float(abs(_count(deployed) - _count(reference)))
        metrics["deploy_flop_diff"] = float(abs(_flops(deployed, x_probe) - _flops(reference, x_probe)))
    curves = {"test_acc": hist.series("test_acc"), "train_loss": hist.series("main_loss"),
              "grad_early": ge, "grad_late": gl}
    return ArmResult(metrics, curves)


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    out.info.update(n_train=len(ctx.data.y_train), n_test=len(ctx.data.y_test),
                    routes={str(j): ks for j, ks in routes(ctx.p).items()})


def _criterion() -> AllOf:
    return AllOf(
        Gain(metric="test_acc", ours=OURS, baseline="plain", at_least=1.0),
        Gain(metric="test_acc", ours=OURS, baseline="deep_sup", at_least=0.0),
        AtMost(metric="deploy_out_diff", arm=OURS, value=0.0),
        AtMost(metric="deploy_param_diff", arm=OURS, value=0.0),
        AtMost(metric="deploy_flop_diff", arm=OURS, value=0.0),
    )


CLAIM = register(Claim(
    slug=SLUG,
    version=2,
    title="YOLOv9: Learning What You Want to Learn Using Programmable Gradient Information",
    arxiv="2402.13616",
    statement="Training a deep-and-thin network with PGI's auxiliary reversible branch (multi-level CBLinear/"
              "CBFuse links, auxiliary loss) raises the main network's test accuracy by >= 1 point over "
              "the same network trained alone and at least matches deep supervision, while the deployed model "
              "(aux branch removed) has exactly the plain network's parameters, FLOPs and outputs.",
    paper_figure="MS COCO val AP: GELAN-C 52.3 -> YOLOv9-C (GELAN-C + PGI) 53.0 at the same inference cost "
                 "(25.3M params, 102.1G FLOPs); YOLOv9-T/S/M/C/E 38.3/46.8/51.4/53.0/55.6 AP; PGI ablations: "
                 "+0.1-0.6 AP on every GELAN size, deep supervision alone helps less or hurts small models.",
    protocol=PgiProtocol,
    data="mnist1d",
    setup=_setup,
    arms={arm: _train_arm for arm in ARMS},
    finish=_finish,
    criterion=_criterion(),
    primary=Primary(metric="test_acc", ours=OURS, baseline=BASELINE, unit="%", ceiling=100.0),
    control_note="the main network trained alone (no auxiliary branch) in place of PGI",
    uses=(
        "gradkit.nn.pgi.PGIWrapper",
        "gradkit.nn.pgi.CBLinear",
        "gradkit.nn.pgi.CBFuse",
        "gradkit.nn.pgi.make_aux_copy",
        "gradkit.nn.pgi.DeepSupervision",
        "gradkit.nn.pgi.conv_stages",
        "gradkit.nn.pgi.pool_head",
    ),
    notes="Transferable mechanism only (the paper's detector, GELAN backbone and COCO recipe are out of scope): "
          "a classifier version on MNIST-1D. The aux branch is a plain copy of the main stages "
          "(not an invertible network; the paper's 'reversible' argument is not enforced). The paper's gains are "
          "0.1-0.7 AP on COCO; at this scale the 1-point accuracy gain may not be reproduced, in which case the "
          "structural checks (deployed params/FLOPs/outputs; 0 by construction for plain) and the gradient-norm probe "
          "(grad_early: norm of the gradient reaching main stage 1, mean over steps; PGI adds the aux loss's "
          "gradient through CBLinear) are what the run shows. No real-data variant: COCO is not among the "
          "supported data sets.",
    scale_note=(
        "On a 16-stage, 8-channel 1-D CNN, where plain training loses information (77% on MNIST-1D against "
        "~97% for 8 stages of 16 channels), PGI's auxiliary branch lowers the main network's accuracy to 67% "
        "(deep supervision: 76%; seeds 0-2, 20 epochs); at 8 x 16 both sit at ~97.7%. The paper's gains are "
        "for YOLO detectors on COCO, whose auxiliary branch carries multi-level features of a wide backbone; "
        "whether PGI needs that, or longer training than 20 epochs, is what a detector-scale run would settle."
    ),
    plots=("test_acc", "grad_early"),
    bounds={"test_acc": (0.0, 100.0), "best_test_acc": (0.0, 100.0)},
))
