"""M-FAC claim: exact matrix-free inverse-Fisher products, OBS pruning beats magnitude pruning, and the
M-FAC optimizer trains (paper slug: mfac).

Protocol (spec ``papers/mfac.md``, laptop scale), one seed per call:

A) IHVP exactness: m random gradients in R^d (float64, entries N(0, 1/d), i.e. norms ~1), damp 1e-5.
   Static, blocked (blocksize 500 vs the dense block-diagonal inverse), dynamic Woodbury and dynamic
   M-FAC-recursion products and diagonals against ``torch.linalg.solve`` / the dense inverse of
   ``F = damp I + G^T G / m``; then 100 ring-buffer replacements and a comparison with the dense
   inverse of the last m gradients.
B) One-shot OBS pruning: MLP 64-128-10 trained 30 epochs with Adam (lr 1e-3, batch 64) on digits
   (fixed 1078/359/360 train/val/test split); m = 64 gradients from mini-batches of 16; full static
   inverse; damp chosen per arm and sparsity from {1e-3, 1e-4, 1e-5} on the validation split. Both
   weight matrices pruned globally to 80% and 90%, no fine-tuning: single step (``mfac``), 4 steps with
   recollected gradients (``mfac_4step``, ours), single step with m = 256 (``mfac_m256``), vs global
   magnitude pruning (``magnitude``).
C) Optimizer: the same MLP, 10 epochs, batch 64: MFAC(m = 32, lr from {1e-3, 3e-3} on validation) vs
   Adam(1e-3) vs SGD(0.1, momentum 0.9). ``opt_mfac_lrwide`` (lr from {1e-3, ..., 3e-2}) is reported only.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from ..curvature import EmpiricalFisherInverse, OBSPruner, SlidingFisherInverse, magnitude_prune
from ..data import TensorBatches, load_digits_split
from ..engine import accuracy, cpu_threads, fit, seed_everything
from ..optim.mfac import MFAC
from .base import Claim, Primary, RunContext, RunOutput, register
from .criteria import AllFinite, AllOf, Below, Drop, Gain

SLUG = "mfac"
DAMP = 1e-5
DAMPS = (1e-3, 1e-4, 1e-5)
SPARSITIES = (0.8, 0.9)
N_VAL = 359
MFAC_LRS = (1e-3, 3e-3)
MFAC_LRS_WIDE = (1e-3, 3e-3, 1e-2, 3e-2)


# ------------------------------------------------------------------------------------------ data/model
def _digits(device: torch.device) -> dict[str, torch.Tensor]:
    """digits with a fixed validation split carved out of the training part (1078/359/360)."""
    sp = load_digits_split()
    perm = torch.randperm(len(sp.y_train), generator=torch.Generator().manual_seed(0))
    va, tr = perm[:N_VAL], perm[N_VAL:]
    out = dict(x_tr=sp.x_train[tr], y_tr=sp.y_train[tr], x_va=sp.x_train[va], y_va=sp.y_train[va],
               x_te=sp.x_test, y_te=sp.y_test)
    return {k: v.to(device) for k, v in out.items()}


def build_mlp(n_in: int = 64, hidden: int = 128, n_out: int = 10) -> nn.Sequential:
    """The claim's MLP 64-128-10 (9.6k parameters, 9,472 prunable weights)."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def _ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


# ------------------------------------------------------------------------------------------ part A
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _exactness(ctx: RunContext) -> dict[str, float]:
    d, m, bs, reps = ctx.pick(smoke=(300, 8, 100, 20), quick=(2000, 32, 500, 100), full=(2000, 32, 500, 100))
    dev, f64 = ctx.device, torch.float64
    gen = torch.Generator().manual_seed(ctx.seed)
    grads = (torch.randn(m + reps, d, generator=gen, dtype=f64) / math.sqrt(d)).to(dev)
    g0 = grads[:m]
    xs = torch.cat([torch.randn(4, d, generator=gen, dtype=f64).to(dev),          # generic vectors
                    torch.randn(2, m, generator=gen, dtype=f64).to(dev) @ g0])    # in span(G): max cancellation
    eye = torch.eye(d, dtype=f64, device=dev)

    def dense_inv(g: torch.Tensor, block: int | None = None) -> torch.Tensor:
        f = DAMP * eye + g.T @ g / g.shape[0]
        if block is not None:
            keep = torch.zeros_like(f, dtype=torch.bool)
            for s in range(0, d, block):
                keep[s:s + block, s:s + block] = True
            f = f * keep
        return torch.cholesky_inverse(torch.linalg.cholesky(f))

    def errs(inv_ref: torch.Tensor, mul, diag=None) -> tuple[float, float]:
        ref = xs @ inv_ref
        e = max(_rel(mul(x), r) for x, r in zip(xs, ref))
        ed = _rel(diag(), torch.diagonal(inv_ref)) if diag is not None else 0.0
        return e, ed

    out: dict[str, float] = {}
    inv = dense_inv(g0)
    static = EmpiricalFisherInverse(g0, DAMP)
    out["err_static"], out["err_diag"] = errs(inv, static.mul, static.diag)
    wood_static = EmpiricalFisherInverse(g0, DAMP, method="woodbury")
    out["err_woodbury_static"], _ = errs(inv, wood_static.mul, wood_static.diag)
    q = int(torch.randint(d, (1,), generator=gen))
    out["err_entry"] = abs(static.entry(q) - float(inv[q, q])) / float(inv[q, q])
    for method in ("woodbury", "mfac"):
        dyn = SlidingFisherInverse(m, d, DAMP, method=method, dtype=f64, device=dev)
        for g in g0:
            dyn.update(g)
        out[f"err_dynamic_{method}"], _ = errs(inv, dyn.mul)
    inv_b = dense_inv(g0, bs)
    blocked = EmpiricalFisherInverse(g0, DAMP, blocksize=bs)
    out["err_blocked"], out["err_diag_blocked"] = errs(inv_b, blocked.mul, blocked.diag)
    a, b = xs[0], xs[1]
    out["err_symmetry"] = abs(float(a @ static.mul(b) - b @ static.mul(a))) / float(a.norm() * static.mul(b).norm())
    # ring buffer: m + reps insertions; the window then holds the last m gradients
    inv_last = dense_inv(grads[-m:])
    ring = []
    for method in ("woodbury", "mfac"):
        dyn = SlidingFisherInverse(m, d, DAMP, method=method, dtype=f64, device=dev)
        for g in grads[:-1]:
            dyn.update(g)
        u = dyn.update_mul(grads[-1])
        ring.append(_rel(u, inv_last @ grads[-1]))
        ring.append(errs(inv_last, dyn.mul)[0])
    out["err_ring"] = max(ring)
    out["err_exact"] = max(v for k, v in out.items() if k != "err_ring")
    out["cond_F"] = 1.0 + float(torch.linalg.svdvals(g0)[0]) ** 2 / (m * DAMP)   # m < d: smallest eigenvalue is damp
    return out


# ------------------------------------------------------------------------------------------ part B
def _train_dense(ctx: RunContext, data: dict, epochs: int) -> nn.Module:
    gen = seed_everything(ctx.seed)
    model = build_mlp().to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(model, opt, TensorBatches(data["x_tr"], data["y_tr"], batch_size=64, generator=gen), epochs=epochs,
        progress=ctx.progress, desc=f"{SLUG}/dense")
    return model


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [model[0].weight, model[2].weight]


def _prune_arm(ctx: RunContext, data: dict, dense: nn.Module, ngrads: int, nrecomps: int, damps, sparsities):
    """Best-on-validation damp per sparsity; returns {acc_sXX, val_sXX, damp_sXX}."""
    res: dict[str, float] = {}
    for s in sparsities:
        best = None
        for damp in damps:
            model = copy.deepcopy(dense)
            loader = TensorBatches(data["x_tr"], data["y_tr"], batch_size=16,
                                   generator=torch.Generator().manual_seed(ctx.seed))
            OBSPruner(model, _weights(model), _ce, loader, ngrads=ngrads, damp=damp).prune(s, nrecomps=nrecomps)
            val = accuracy(model, data["x_va"], data["y_va"])
            if best is None or val > best[0]:
                best = (val, damp, accuracy(model, data["x_te"], data["y_te"]),
                        float(sum((w == 0).sum() for w in _weights(model))) / sum(w.numel() for w in _weights(model)))
        tag = f"s{round(100 * s)}"
        res[f"acc_{tag}"], res[f"val_{tag}"], res[f"damp_{tag}"], res[f"sparsity_{tag}"] = \
            best[2], best[0], best[1], best[3]
    return res


def _pruning(ctx: RunContext, data: dict) -> tuple[dict, dict]:
    epochs = ctx.pick(smoke=5, quick=30, full=30)
    sparsities = ctx.pick(smoke=(0.5, 0.8, 0.9), quick=SPARSITIES, full=SPARSITIES)
    damps = ctx.pick(smoke=(1e-4,), quick=DAMPS, full=DAMPS)
    m_small, m_large = ctx.pick(smoke=(16, 16), quick=(64, 256), full=(64, 256))
    dense = _train_dense(ctx, data, epochs)
    metrics: dict[str, dict[str, float]] = {"dense": {"test_acc": accuracy(dense, data["x_te"], data["y_te"]),
                                                      "val_acc": accuracy(dense, data["x_va"], data["y_va"])}}
    seconds = {}
    mag = {}
    for s in sparsities:
        model = copy.deepcopy(dense)
        magnitude_prune(_weights(model), s)
        mag[f"acc_s{round(100 * s)}"] = accuracy(model, data["x_te"], data["y_te"])
        mag[f"val_s{round(100 * s)}"] = accuracy(model, data["x_va"], data["y_va"])
    metrics["magnitude"] = mag
    for arm, ng, nr in (("mfac", m_small, 1), ("mfac_4step", m_small, 4), ("mfac_m256", m_large, 1)):
        t0 = time.perf_counter()
        metrics[arm] = _prune_arm(ctx, data, dense, ng, nr, damps, sparsities)
        seconds[arm] = round(time.perf_counter() - t0, 3)
    return metrics, {"epochs": epochs, "ngrads": [m_small, m_large], "damps": list(damps), "seconds": seconds}


# ------------------------------------------------------------------------------------------ part C
def _train_opt(ctx: RunContext, data: dict, make_opt, epochs: int, desc: str):
    gen = seed_everything(ctx.seed)
    model = build_mlp().to(ctx.device)
    opt = make_opt(model.parameters())

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_acc": accuracy(m, data["x_va"], data["y_va"]), "test_acc": accuracy(m, data["x_te"], data["y_te"])}

    hist = fit(model, opt, TensorBatches(data["x_tr"], data["y_tr"], batch_size=64, generator=gen), epochs=epochs,
               evaluate=evaluate, progress=ctx.progress, desc=f"{SLUG}/{desc}")
    done = len(hist.records) == epochs and math.isfinite(hist.last("train_loss"))
    metrics = {"test_acc": hist.last("test_acc") if done else float("nan"),
               "val_acc": hist.last("val_acc") if done else float("nan"),
               "train_loss": hist.last("train_loss")}
    return metrics, {"test_acc": hist.series("test_acc"), "train_loss": hist.series("train_loss")}


def _optimizers(ctx: RunContext, data: dict) -> tuple[dict, dict, dict]:
    epochs = ctx.pick(smoke=2, quick=10, full=10)
    ngrads = ctx.pick(smoke=8, quick=32, full=32)
    metrics, curves, seconds = {}, {"opt_test_acc": {}, "opt_train_loss": {}}, {}

    def record(arm: str, m: dict, c: dict) -> None:
        metrics[arm] = m
        curves["opt_test_acc"][arm] = c["test_acc"]
        curves["opt_train_loss"][arm] = c["train_loss"]

    for arm, make in (("opt_adam", lambda p: torch.optim.Adam(p, lr=1e-3)),
                      ("opt_sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))):
        t0 = time.perf_counter()
        record(arm, *_train_opt(ctx, data, make, epochs, arm))
        seconds[arm] = round(time.perf_counter() - t0, 3)
    runs = {}
    t0 = time.perf_counter()
    for lr in MFAC_LRS_WIDE:
        runs[lr] = _train_opt(ctx, data, lambda p, lr=lr: MFAC(p, lr=lr, ngrads=ngrads, damp=DAMP), epochs,
                              f"opt_mfac_lr{lr:g}")

    def pick(lrs) -> tuple[dict, dict]:
        lr = max(lrs, key=lambda v: (runs[v][0]["val_acc"] if math.isfinite(runs[v][0]["val_acc"]) else -1.0))
        m, c = runs[lr]
        return {**m, "lr": lr}, c

    record("opt_mfac", *pick(MFAC_LRS))
    record("opt_mfac_lrwide", *pick(MFAC_LRS_WIDE))
    seconds["opt_mfac(all lrs)"] = round(time.perf_counter() - t0, 3)
    return metrics, curves, {"epochs": epochs, "ngrads": ngrads, "seconds": seconds,
                             "mfac_test_acc_by_lr": {f"{lr:g}": runs[lr][0]["test_acc"] for lr in MFAC_LRS_WIDE}}


# ------------------------------------------------------------------------------------------ run
def run(ctx: RunContext) -> RunOutput:
    with cpu_threads(1, ctx.device):
        t0 = time.perf_counter()
        exact = _exactness(ctx)
        t_a = time.perf_counter() - t0
        data = _digits(ctx.device)
        prune_metrics, prune_info = _pruning(ctx, data)
        t_b = time.perf_counter() - t0 - t_a
        opt_metrics, curves, opt_info = _optimizers(ctx, data)
        t_c = time.perf_counter() - t0 - t_a - t_b
    metrics = {"ihvp": exact, **prune_metrics, **opt_metrics}
    info = {"seconds": {"A_exactness": round(t_a, 3), "B_pruning": round(t_b, 3), "C_optimizer": round(t_c, 3)},
            "pruning": prune_info, "optimizer": opt_info, "damp_exactness": DAMP,
            "split": "digits 1078/359/360 (train/val/test), validation carved from the fixed training split",
            "data_root_ignored": ctx.data_root is not None}
    return RunOutput(metrics=metrics, data="digits", curves=curves, info=info)


def _criterion() -> AllOf:
    return AllOf(
        Below(metric="err_exact", arm="ihvp", value=1e-10),
        Below(metric="err_ring", arm="ihvp", value=1e-8),
        Gain(metric="acc_s90", ours="mfac_4step", baseline="magnitude", at_least=3.0),
        Gain(metric="acc_s80", ours="mfac_4step", baseline="magnitude", at_least=0.0),
        Drop(metric="test_acc", ours="opt_mfac", baseline="opt_adam", at_most=2.0),
        AllFinite(),
    )


CLAIM = register(Claim(
    slug=SLUG,
    title="M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
    arxiv="2107.03356",
    statement="M-FAC's static, blocked and dynamic (ring-buffer) algorithms give the inverse-Fisher-vector "
              "products and diagonal of the damped empirical Fisher exactly (rel. error < 1e-10; < 1e-8 after 100 "
              "ring-buffer replacements); OBS pruning with it beats global magnitude pruning without fine-tuning "
              "(+3 points at 90% sparsity, >= at 80%); the M-FAC optimizer trains within 2 points of Adam.",
    paper_figure="Pruning: M-FAC matches or beats WoodFisher and magnitude pruning for one-shot/gradual pruning "
                 "of ResNet-50/MobileNet (ImageNet) and ResNet-20 (CIFAR-10) at much lower cost; optimizer: "
                 "competitive with tuned SGD/Adam, K-FAC, AdaHessian, GGT on CIFAR ResNets and better on BERT "
                 "GLUE/SQuAD fine-tuning (numbers unconfirmed in the spec). IHVPs in O(dm) per query.",
    criterion=_criterion(),
    primary=Primary(metric="acc_s90", ours="mfac_4step", baseline="magnitude", unit="%"),
    run=run,
    uses=(
        "gradkit.curvature.fisher.EmpiricalFisherInverse",
        "gradkit.curvature.fisher.SlidingFisherInverse",
        "gradkit.curvature.obs.OBSPruner",
        "gradkit.curvature.obs.obs_prune_step",
        "gradkit.curvature.obs.magnitude_prune",
        "gradkit.optim.mfac.MFAC",
    ),
    real_data="",
    notes="Laptop scale on digits; --data-root is ignored (the paper's ImageNet/CIFAR/GLUE are out of reach). "
          "Exactness uses gradients with entries N(0, 1/d) (norm ~1): with N(0, 1) entries cond(F) ~ 1e7 and the "
          "dense float64 reference itself is only good to ~1e-9, whatever the algorithm. Pruning 'ours' is the "
          "4-step variant (nrecomps, the paper's one-shot pipeline recomputes the inverse between steps); the "
          "single-step m=64 arm ('mfac') is reported alongside: with m=64 << d=9,472 the diagonal of F^-1 is "
          "~1/damp for most weights, its saliency degenerates towards magnitude and the summed single-weight OBS "
          "corrections ignore interactions, so it stays close to magnitude pruning ('mfac_m256' shows m=256). "
          "Optimizer: the spec's lr grid {1e-3, 3e-3} is used for the criterion; 'opt_mfac_lrwide' (grid up to "
          "3e-2, chosen on validation) is reported only: on this 9.6k-parameter MLP the natural-gradient-scaled "
          "step m*g/||g||^2 needs a larger lr than the paper's ResNet/BERT defaults.",
    plots=("opt_test_acc", "opt_train_loss"),
))
