"""Input-gradient attribution and its evaluation by DiffROAR (input-gradients).

Shah, Jain, Netrapalli, "Do Input Gradients Highlight Discriminative Features?", NeurIPS 2021
(arXiv 2102.12781). Attribution A(x) = |grad_x L(f(x), y)| (loss gradient) or |grad_x f(x)[y]| (logit).
DiffROAR keeps only the top-k or only the bottom-k fraction of coordinates by A (the rest set to the
dataset mean), retrains a fresh model on each masked train set and tests it on the equally masked test set:

    DiffROAR(A, k) = Acc(top-k) - Acc(bottom-k)       (in [-100, 100]; < 0 = feature inversion)

>>> a = input_gradient(model, x, y)                          # |d CE / dx|, shaped like x
>>> x_top = attribution_mask(x, a, k=0.2, keep="top", fill=x.mean(0))
>>> table = diffroar(make_model, train_fn, eval_fn, xtr, ytr, xte, yte, a_tr, a_te, ks=(0.1, 0.2))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import choice, is_int, real_scalar, tensor
from .saliency import Saliency

OUTPUTS = ("loss", "logit")
KEEP = ("top", "bottom")


# ------------------------------------------------------------------------------------ attribution
class InputGradient(Saliency):
    """Loss or logit input gradient, captum-shaped: ``.attribute(inputs, target=classes)`` (input-gradients).

    output="loss":  A = d CE(f(x), c) / dx  per example (the paper's default; ``reduction="sum"`` over the
    chunk, so each example's gradient is that of its own loss); output="logit": A = d f(x)[c] / dx (equals
    :class:`gradkit.probes.saliency.Saliency`). c = ``target`` (ints, per-input tensor) or the predicted
    class when None. ``abs=True`` returns |A|. At most ``internal_batch_size`` inputs are in one forward.

    >>> ig = InputGradient(model, output="loss")
    >>> a = ig.attribute(x, target=y, internal_batch_size=64)     # same shape as x
    >>> a.shape == x.shape
    True
    """

    def __init__(self, forward_func: Callable[[Tensor], Tensor], output: str = "loss") -> None:
        super().__init__(forward_func)
        self.output = choice("output", output, OUTPUTS)

    def _objective(self, logits: Tensor, target: Tensor, score: Tensor) -> Tensor:
        if self.output == "loss":
            return F.cross_entropy(logits, target, reduction="sum")
        return score


def input_gradient(model: Callable[[Tensor], Tensor], x: Tensor, y=None, target: str = "loss", abs: bool = True,
                   internal_batch_size: int | None = None) -> Tensor:
    """Input gradient of the loss (``target="loss"``) or of the class logit (``"logit"``) (input-gradients).

    A(x) = |d CE(f(x), y) / dx| or |d f(x)[y] / dx|; ``y`` = classes (None: the predicted class).
    Function form of :class:`InputGradient` (``target`` here names the explained quantity, as in the paper).

    >>> a = input_gradient(model, x, y, target="loss")
    >>> a.shape == x.shape
    True
    """
    if target not in OUTPUTS:
        raise ValueError(f"target must be one of {OUTPUTS} (the explained quantity), got {target!r}")
    return InputGradient(model, output=target).attribute(x, target=y, abs=abs,
                                                          internal_batch_size=internal_batch_size)


# ------------------------------------------------------------------------------------ masking
def _fraction(k) -> float:
    v = real_scalar("k", k)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"k must be a fraction of coordinates kept in (0, 1], got {k!r}")
    return v


def n_kept(k: float, d: int) -> int:
    """Number of coordinates a level-k mask keeps: round(k * d), at least 1 (input-gradients)."""
    return max(1, min(d, int(math.floor(_fraction(k) * d + 0.5))))


def attribution_order(attribution: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per-example coordinate indices sorted by decreasing attribution, ties broken at random (input-gradients).

    attribution: (N, ...) -> (N, d) int64 with d = prod(...). A random permutation is applied before a
    stable sort, so equal scores (e.g. zero gradients on constant border pixels) get a random order.

    >>> attribution_order(torch.tensor([[0.1, 0.9, 0.5]]))
    tensor([[1, 2, 0]])
    """
    if not isinstance(attribution, Tensor) or attribution.dim() < 2:
        raise ValueError(f"attribution must be a tensor of shape (N, ...), got {getattr(attribution, 'shape', None)}")
    a = attribution.detach().flatten(1)
    if a.is_complex() or not torch.isfinite(a.double()).all():
        raise ValueError("attribution must hold finite real scores")
    dev = a.device if generator is None else generator.device
    perm = torch.rand(a.shape, generator=generator, device=dev).argsort(1).to(a.device)
    s = torch.sort(a.gather(1, perm), dim=1, descending=True, stable=True).indices
    return perm.gather(1, s)


def attribution_mask(x: Tensor, attribution: Tensor, k: float, keep: str = "top", fill=None,
                     generator: torch.Generator | None = None) -> Tensor:
    """Keep the top (or bottom) round(k*d) coordinates of each input by attribution; fill the rest (input-gradients).

    order = argsort(A(x), descending) per example (random tie-breaking); keep="top" keeps order[:k*d],
    keep="bottom" keeps order[-k*d:]; every other coordinate is set to ``fill`` (a scalar, or a tensor
    broadcastable to one input, e.g. the training-set mean; default: the mean of ``x`` over the batch).
    ``attribution`` has ``x``'s shape, or fewer channels (e.g. (N, 1, H, W) for (N, C, H, W) images: one
    score per pixel, shared by its channels).

    >>> x, a = torch.arange(4.).reshape(1, 4), torch.tensor([[0.1, 0.9, 0.5, 0.0]])
    >>> attribution_mask(x, a, k=0.5, keep="top", fill=-1.0)
    tensor([[-1.,  1.,  2., -1.]])
    """
    x = tensor("x", x, floating=True, min_dim=2)
    choice("keep", keep, KEEP)
    if not isinstance(attribution, Tensor) or attribution.dim() != x.dim() or attribution.shape[0] != x.shape[0]:
        raise ValueError(f"attribution must have x's number of dims and rows {tuple(x.shape)}, got "
                         f"{tuple(getattr(attribution, 'shape', ()))}")
    try:
        torch.broadcast_shapes(attribution.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"attribution shape {tuple(attribution.shape)} does not broadcast to x {tuple(x.shape)}") from None
    if torch.broadcast_shapes(attribution.shape, x.shape) != x.shape:
        raise ValueError(f"attribution shape {tuple(attribution.shape)} is larger than x {tuple(x.shape)}")
    if fill is None:
        fill_t = x.mean(0, keepdim=True)
    elif isinstance(fill, Tensor):
        fill_t = fill.detach().to(device=x.device, dtype=x.dtype)
        if fill_t.dim() < x.dim():
            fill_t = fill_t.reshape((1,) * (x.dim() - fill_t.dim()) + tuple(fill_t.shape))
        try:
            ok = torch.broadcast_shapes(fill_t.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok or fill_t.shape[0] != 1:
            raise ValueError(f"fill of shape {tuple(fill.shape)} must broadcast to one input {tuple(x.shape[1:])}")
    else:
        fill_t = torch.tensor(real_scalar("fill", fill), dtype=x.dtype, device=x.device)
    n, d = attribution.shape[0], attribution[0].numel()
    m = n_kept(k, d)
    order = attribution_order(attribution.to(x.device), generator)
    idx = order[:, :m] if keep == "top" else order[:, d - m:]
    kept = torch.zeros(n, d, dtype=torch.bool, device=x.device).scatter_(1, idx, True).reshape(attribution.shape)
    return torch.where(kept.expand_as(x), x, fill_t)


# ------------------------------------------------------------------------------------ region mass
def gradient_mass_in_region(grads: Tensor, region_mask: Tensor) -> Tensor:
    """Per-example fraction of |grad| mass inside a region: sum(|g| * R) / sum(|g|) (input-gradients).

    region_mask: bool or 0/1 tensor broadcastable to ``grads`` (per example (N, ...) or shared (...)).
    Returns (N,) values in [0, 1]; an all-zero gradient gives NaN (no mass to locate).

    >>> g = torch.tensor([[3.0, 1.0]]); r = torch.tensor([[True, False]])
    >>> gradient_mass_in_region(g, r)
    tensor([0.7500])
    """
    if not isinstance(grads, Tensor) or grads.dim() < 2 or not grads.is_floating_point():
        raise ValueError(f"grads must be a floating tensor of shape (N, ...), got {getattr(grads, 'shape', None)}")
    if not isinstance(region_mask, Tensor):
        raise TypeError(f"region_mask must be a tensor, got {type(region_mask).__name__}")
    try:
        shape = torch.broadcast_shapes(region_mask.shape, grads.shape)
    except RuntimeError:
        shape = None
    if shape != grads.shape:
        raise ValueError(f"region_mask of shape {tuple(region_mask.shape)} does not broadcast to grads "
                         f"{tuple(grads.shape)}")
    r = region_mask.to(device=grads.device, dtype=grads.dtype).expand_as(grads)
    g = grads.abs()
    total = g.flatten(1).sum(1)
    inside = (g * r).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(g.dtype).tiny),
                       torch.full_like(total, float("nan")))


def top_hit_rate(attribution: Tensor, signal_index: Tensor, which: str = "top") -> float:
    """Pr[argmax_i A_i = j] (``which="top"``) or Pr[argmin_i A_i = j] (``"bottom"``) over examples (input-gradients).

    attribution: (N, d) scores; signal_index: (N,) the signal coordinate j of each example. Ties count as
    a hit only when j is among the tied extremes with the smallest index (``argmax`` convention).

    >>> top_hit_rate(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    """
    choice("which", which, KEEP)
    if not isinstance(attribution, Tensor) or attribution.dim() != 2:
        raise ValueError(f"attribution must be (N, d), got {tuple(getattr(attribution, 'shape', ()))}")
    j = torch.as_tensor(signal_index, device=attribution.device).reshape(-1)
    if j.numel() != attribution.shape[0]:
        raise ValueError(f"signal_index must have one entry per row ({attribution.shape[0]}), got {j.numel()}")
    pick = attribution.argmax(1) if which == "top" else attribution.argmin(1)
    return float((pick == j).double().mean()) if j.numel() else float("nan")


# ------------------------------------------------------------------------------------ DiffROAR
@dataclass
class DiffRoarResult:
    """DiffROAR table: per level k, mean test accuracy (%) of top-k and bottom-k retrainings and their gap.

    ``per_seed[k] = [(acc_top, acc_bottom), ...]`` in the order of ``seeds``.
    """

    ks: tuple[float, ...]
    acc_top: dict[float, float]
    acc_bottom: dict[float, float]
    diffroar: dict[float, float]
    per_seed: dict[float, list[tuple[float, float]]] = field(default_factory=dict)

    def rows(self) -> list[dict[str, float]]:
        return [{"k": k, "acc_top": self.acc_top[k], "acc_bottom": self.acc_bottom[k], "diffroar": self.diffroar[k]}
                for k in self.ks]


def diffroar(make_model: Callable[[], nn.Module], train_fn: Callable[[nn.Module, Tensor, Tensor, int], object],
             eval_fn: Callable[[nn.Module, Tensor, Tensor], float], x_train: Tensor, y_train: Tensor,
             x_test: Tensor, y_test: Tensor, attr_train: Tensor, attr_test: Tensor,
             ks: Sequence[float] = (0.1, 0.2, 0.4), seeds: Sequence[int] = (0,), fill=None,
             mask_seed: int = 0) -> DiffRoarResult:
    """DiffROAR(A, k) = Acc(top-k) - Acc(bottom-k) with retraining from scratch (ROAR) (input-gradients).

    For every k and seed: mask train and test sets with :func:`attribution_mask` (``attr_*`` must come
    from the ORIGINAL model), then ``seed_everything(seed)``, ``model = make_model()``,
    ``train_fn(model, x_masked_train, y_train, seed)`` (train it, e.g. with ``gradkit.engine.fit``) and
    ``eval_fn(model, x_masked_test, y_test) -> accuracy in %``. ``fill`` defaults to the training-set
    mean per coordinate. Masks are drawn once per k (random tie-breaking seeded by ``mask_seed``).

    >>> res = diffroar(lambda: nn.Linear(2, 2), train_fn, lambda m, x, y: accuracy(m, x, y),
    ...                xtr, ytr, xte, yte, a_tr, a_te, ks=(0.5,), seeds=(0, 1))
    >>> res.diffroar[0.5]                                           # > 0: top-ranked features predict better
    """
    from ..engine import seed_everything

    for name, fn in (("make_model", make_model), ("train_fn", train_fn), ("eval_fn", eval_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    ks = tuple(_fraction(k) for k in ks)
    if not ks:
        raise ValueError("ks must hold at least one level k in (0, 1], got an empty sequence")
    seeds = tuple(seeds)
    if not seeds or not all(is_int(s, low=0) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of non-negative ints, got {seeds!r}")
    for nm, xx, aa in (("train", x_train, attr_train), ("test", x_test, attr_test)):
        if not isinstance(aa, Tensor) or aa.shape[0] != xx.shape[0]:
            raise ValueError(f"attr_{nm} must have one row per {nm} input ({xx.shape[0]}), got "
                             f"{tuple(getattr(aa, 'shape', ()))}")
    if fill is None:
        fill = x_train.mean(0, keepdim=True)
    gen_dev = x_train.device if x_train.device.type == "cpu" else torch.device("cpu")
    acc_top: dict[float, float] = {}
    acc_bot: dict[float, float] = {}
    per_seed: dict[float, list[tuple[float, float]]] = {}
    for k in ks:
        g = torch.Generator(device=gen_dev).manual_seed(mask_seed)
        masked = {}
        for keep in KEEP:
            masked[keep] = (attribution_mask(x_train, attr_train, k, keep, fill, generator=g),
                            attribution_mask(x_test, attr_test, k, keep, fill, generator=g))
        rows = []
        for s in seeds:
            accs = []
            for keep in KEEP:
                seed_everything(s)
                model = make_model()
                train_fn(model, masked[keep][0], y_train, s)
                accs.append(float(eval_fn(model, masked[keep][1], y_test)))
            rows.append((accs[0], accs[1]))
        per_seed[k] = rows
        acc_top[k] = sum(r[0] for r in rows) / len(rows)
        acc_bot[k] = sum(r[1] for r in rows) / len(rows)
    return DiffRoarResult(ks=ks, acc_top=acc_top, acc_bottom=acc_bot,
                          diffroar={k: acc_top[k] - acc_bot[k] for k in ks}, per_seed=per_seed)


__all__ = ["OUTPUTS", "InputGradient", "input_gradient", "n_kept", "attribution_order", "attribution_mask",
           "gradient_mass_in_region", "top_hit_rate", "DiffRoarResult", "diffroar"]
