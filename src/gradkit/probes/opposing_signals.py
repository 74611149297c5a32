"""Opposing signals: the training points whose loss swings most between steps, and their two opposing groups.

Paper slug: ``opposing-signals`` (Rosenfeld & Risteski, "Outliers with Opposing Signals Have an Outsized
Effect on Neural Network Optimization", ICLR 2024, arXiv 2311.04163). Small groups of training points
share a large feature that pulls the output towards one class in one group and towards another class in
the other; once the net relies on it, gradient descent oscillates along it and the two groups' losses
swing in anti-phase. The instruments, for any classifier or regressor:

    Delta_i(t)   = l_i(w_{t+1}) - l_i(w_t)                        (per-example losses, no grad, eval mode)
    outliers(t)  = top-k of |Delta_i(t)|   (or of +Delta / -Delta)  ->  counts_i = #{t >= warmup: i in top-k}
    split        : u = first principal direction of the centred per-example gradients g_i of the pool;
                   A = {i: (g_i - mean g) . u > 0},  B = the rest,   cos(mean g_A, mean g_B) < 0 if opposing
    antiphase    = corr(diff L_A, diff L_B)                          (Pearson; -1 = perfect anti-phase)

Example::

    tracker = PerExampleLossTracker(model, nn.CrossEntropyLoss(reduction="none"), x, y, k=40, warmup=200)
    fit(model, opt, [(x, y)], epochs=3000, on_step_start=tracker); tracker.step()   # close the last Delta
    pool = tracker.frequent_outliers(min_count=100)
    idx_a, idx_b, cos = split_opposing(model, nn.CrossEntropyLoss(reduction="none"), x[pool], y[pool])
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import boolean, choice, integer, nonneg_int, positive_int, tensor
from .sharpness import model_and_loss, paired_examples

__all__ = ["per_example_losses", "PerExampleLossTracker", "OpposingSplit", "split_gradients", "split_opposing",
           "example_gradients", "antiphase_score"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _rows(losses: Any, n: int) -> Tensor:
    """One loss per example from ``loss_fn``'s output: shape ``(n, ...)``, trailing dims averaged."""
    if not isinstance(losses, Tensor) or not losses.is_floating_point():
        raise TypeError(f"loss_fn must return a floating torch.Tensor, got {type(losses).__name__}")
    if losses.dim() == 0 or losses.shape[0] != n:
        raise ValueError(f"loss_fn must return one loss per example, shape ({n},) (use reduction='none'), "
                         f"got shape {tuple(losses.shape)}")
    return losses.reshape(n, -1).mean(1)


@torch.no_grad()
def per_example_losses(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, batch_size: int | None = None,
                       eval_mode: bool = True) -> Tensor:
    """Per-example losses ``l_i(w)`` at the current weights, shape ``(n,)``, without building a graph.

    Paper slug: ``opposing-signals``. ``loss_fn(output, target)`` must keep one loss per example
    (``reduction='none'``); extra trailing dims (``MSELoss`` on ``(n, d)`` outputs) are averaged, so the
    mean of the result is the ``reduction='mean'`` loss. The model runs in eval mode (dropout off, batch
    norm on its running statistics) in chunks of ``batch_size``; its mode is restored. Non-finite losses
    raise ``ValueError``.

    Example::

        >>> l = per_example_losses(model, nn.CrossEntropyLoss(reduction="none"), x, y)   # (n,)
    """
    model_and_loss(model, loss_fn)
    x, y = paired_examples(x, y)
    step = len(x) if batch_size is None else positive_int("batch_size", batch_size)
    eval_mode = boolean("eval_mode", eval_mode)
    was_training = model.training
    try:
        if eval_mode:
            model.eval()
        out = torch.cat([_rows(loss_fn(model(x[i:i + step]), y[i:i + step]), len(x[i:i + step]))
                         for i in range(0, len(x), step)])
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(f"{bad} of {len(out)} per-example losses are not finite (NaN/inf): the model's "
                         "activations or the targets contain NaN/inf, or training diverged")
    return out


class _Rows:
    """Equal-length rows appended to one CPU tensor that doubles when full: a few large allocations instead
    of thousands of small long-lived ones, which fragment the heap next to the per-step activations."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        self.data = torch.empty(0, width, dtype=dtype)
        self.n = 0

    def append(self, row: Tensor) -> None:
        if self.n == len(self.data):
            grown = torch.empty(max(16, 2 * len(self.data)), self.data.shape[1], dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n] = row
        self.n += 1

    def view(self) -> Tensor:
        return self.data[: self.n]


class PerExampleLossTracker:
    """Tracks per-example loss changes across training steps and counts the top-k movers.

    Paper slug: ``opposing-signals``. Each call ``step(t)`` (or ``tracker(t)``, so it can be passed as
    ``gradkit.engine.fit(..., on_step_start=tracker)``) measures ``l_i(w_t)`` on the fixed probe set with
    :func:`per_example_losses`. From the second call on it stores ``Delta_i = l_i(w_t) - l_i(w_prev)``
    under the previous step's index, selects the top-``k`` examples by ``|Delta|`` (``by="abs"``), by the
    largest increase (``"increase"``) or decrease (``"decrease"``), records them (``topk_steps``,
    ``topk_indices`` ``(T, k)``, ``topk_deltas`` ``(T, k)``; as tuples: ``topk_history``) and, for
    ``t_prev >= warmup``, adds one to ``counts`` of each. Every call also appends the probe set's mean loss
    to ``mean_losses`` and each named group's mean loss to ``group_losses[name]`` (``groups={"A": idx_a,
    "B": idx_b}``); with ``keep_losses=True`` all per-example losses are kept (``loss_history``, ``(T, n)``).
    Under ``fit``, call ``step()`` once after training to close the last step's Delta. No hooks are
    installed; the model's mode is restored.

    Example::

        >>> tr = PerExampleLossTracker(model, nn.CrossEntropyLoss(reduction="none"), x, y, k=10)
        >>> for t in range(100):
        ...     tr.step(t); opt.zero_grad(); loss_fn(model(x), y).mean().backward(); opt.step()
        >>> tr.step(100)
        >>> tr.frequent_outliers(min_count=20)          # indices into the probe set, most frequent first
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, probe_x: Tensor, probe_y: Tensor, k: int, *,
                 warmup: int = 0, by: str = "abs", groups: Mapping[str, Any] | None = None,
                 batch_size: int | None = None, eval_mode: bool = True, keep_losses: bool = False) -> None:
        model_and_loss(model, loss_fn)
        self.x, self.y = paired_examples(probe_x, probe_y, "probe_x", "probe_y")
        n = len(self.x)
        self.k = integer("k", k, low=1, high=n)
        self.warmup = nonneg_int("warmup", warmup)
        self.by = choice("by", by, ("abs", "increase", "decrease"))
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        self.eval_mode = boolean("eval_mode", eval_mode)
        self.keep_losses = boolean("keep_losses", keep_losses)
        self.model, self.loss_fn = model, loss_fn
        self.groups = {str(name): self._group(name, idx, n) for name, idx in (groups or {}).items()}
        self.reset()

    @staticmethod
    def _group(name: Any, idx: Any, n: int) -> Tensor:
        t = torch.as_tensor(idx)
        if t.dtype == torch.bool:
            if t.shape != (n,):
                raise ValueError(f"groups[{name!r}] as a mask must have shape ({n},), got {tuple(t.shape)}")
            t = t.nonzero().flatten()
        if t.dim() != 1 or t.numel() == 0 or t.is_floating_point():
            raise ValueError(f"groups[{name!r}] must be a non-empty 1-D list of probe indices or a boolean "
                             f"mask, got shape {tuple(t.shape)} and dtype {t.dtype}")
        if int(t.min()) < 0 or int(t.max()) >= n:
            raise ValueError(f"groups[{name!r}] has indices outside [0, {n - 1}]: min {int(t.min())}, "
                             f"max {int(t.max())}")
        return t.long()

    def reset(self) -> None:
        """Forget every record (the configuration is kept)."""
        self.last_losses: Tensor | None = None
        self.last_step: int | None = None
        self.steps: list[int] = []             # steps at which losses were measured
        self.mean_losses: list[float] = []
        self.group_losses: dict[str, list[float]] = {name: [] for name in self.groups}
        self.topk_steps: list[int] = []        # the step t of each Delta_i(t) = l_i(w_next) - l_i(w_t)
        self._topk_idx = _Rows(self.k, torch.long)
        self._topk_delta: _Rows | None = None
        self._losses: _Rows | None = None
        self.counts = torch.zeros(len(self.x), dtype=torch.long)

    @property
    def topk_indices(self) -> Tensor:
        """``(T, k)`` probe indices of the top-k at each recorded Delta (rows follow ``topk_steps``)."""
        return self._topk_idx.view()

    @property
    def topk_deltas(self) -> Tensor:
        """``(T, k)`` the Delta values of ``topk_indices``."""
        return self._topk_delta.view() if self._topk_delta is not None else torch.empty(0, self.k)

    @property
    def topk_history(self) -> list[tuple[int, Tensor, Tensor]]:
        """``[(t, indices, deltas), ...]``: the top-k of each recorded Delta, as (step, k indices, k values)."""
        return list(zip(self.topk_steps, self.topk_indices, self.topk_deltas))

    @property
    def loss_history(self) -> Tensor:
        """``(len(steps), n)`` per-example losses at every recorded step (``keep_losses=True`` only)."""
        if not self.keep_losses:
            raise RuntimeError("loss_history needs PerExampleLossTracker(..., keep_losses=True)")
        return self._losses.view() if self._losses is not None else torch.empty(0, len(self.x))

    def losses(self) -> Tensor:
        """Per-example losses on the probe set at the current weights (nothing is recorded)."""
        return per_example_losses(self.model, self.loss_fn, self.x, self.y, batch_size=self.batch_size,
                                  eval_mode=self.eval_mode)

    def step(self, t: int | None = None) -> Tensor | None:
        """Measure the losses at step ``t`` (default: the last step + 1); return Delta since the last call."""
        if t is None:
            t = 0 if self.last_step is None else self.last_step + 1
        t = nonneg_int("t", t)
        if self.last_step is not None and t <= self.last_step:
            raise ValueError(f"t must increase between calls: got {t} after {self.last_step}")
        cur = self.losses()
        self.steps.append(t)
        self.mean_losses.append(float(cur.mean()))
        for name, idx in self.groups.items():
            self.group_losses[name].append(float(cur[idx.to(cur.device)].mean()))
        if self.keep_losses:
            if self._losses is None:
                self._losses = _Rows(len(cur), cur.dtype)
            self._losses.append(cur.detach().cpu())
        delta = None
        if self.last_losses is not None:
            delta = cur - self.last_losses
            score = {"abs": delta.abs(), "increase": delta, "decrease": -delta}[self.by]
            top = torch.topk(score, self.k, sorted=True).indices
            idx = top.cpu()
            if self._topk_delta is None:
                self._topk_delta = _Rows(self.k, delta.dtype)
            self.topk_steps.append(self.last_step)
            self._topk_idx.append(idx)
            self._topk_delta.append(delta[top].cpu())
            if self.last_step >= self.warmup:
                self.counts[idx] += 1
        self.last_losses, self.last_step = cur, t
        return delta

    def __call__(self, t: int | None = None) -> None:
        self.step(t)

    def frequent_outliers(self, min_count: int = 1, top: int | None = None) -> Tensor:
        """Probe indices in the top-k at least ``min_count`` times after warm-up, most frequent first
        (ties by index); ``top`` keeps only the first ``top`` of them."""
        min_count = positive_int("min_count", min_count)
        order = sorted(range(len(self.counts)), key=lambda i: (-int(self.counts[i]), i))
        out = [i for i in order if int(self.counts[i]) >= min_count]
        if top is not None:
            out = out[:positive_int("top", top)]
        return torch.tensor(out, dtype=torch.long)

    def topk_precision(self, relevant: Any, after: int = 0) -> float:
        """Mean over recorded steps ``t >= after`` of ``|top-k(t) & relevant| / k``: how much of the
        top-k set a known set (e.g. planted outliers) makes up. NaN when no step qualifies."""
        rel = self._group("relevant", relevant, len(self.x))
        after = nonneg_int("after", after)
        member = torch.zeros(len(self.x), dtype=torch.bool)
        member[rel.cpu()] = True
        rows = [i for i, t in enumerate(self.topk_steps) if t >= after]
        if not rows:
            return math.nan
        return float(member[self.topk_indices[rows]].float().mean())


class OpposingSplit(NamedTuple):
    """Two groups of a pool (indices into it) and the cosine between their mean gradients."""

    idx_a: Tensor
    idx_b: Tensor
    cosine: float


def split_gradients(grads: Tensor) -> OpposingSplit:
    """Split per-example gradients ``(m, P)`` into two groups along their first principal direction.

    Paper slug: ``opposing-signals``. ``u`` = top right-singular vector of ``G - mean(G)`` (sign fixed so
    that its largest-magnitude entry is positive); ``A = {i: (g_i - mean g) . u > 0}``, ``B`` = the rest.
    Centring puts the threshold between the two clusters even when the groups differ in size or share a
    common gradient component. ``cosine`` = cos(mean of A's raw gradients, mean of B's): negative when the
    groups pull the weights in opposite directions.

    Example::

        >>> g = torch.cat([u + 0.1 * torch.randn(5, 8), -u + 0.1 * torch.randn(7, 8)])
        >>> a, b, cos = split_gradients(g)        # a = 0..4, b = 5..11, cos ~ -1
    """
    g = tensor("grads", grads, floating=True, finite=True)
    if g.dim() != 2:
        raise ValueError(f"grads must be a 2-D (examples, parameters) matrix, got shape {tuple(g.shape)}")
    if g.shape[0] < 2:
        raise ValueError(f"grads needs at least 2 examples to split, got {g.shape[0]}")
    c = (g - g.mean(0)).to(torch.float64)
    if float(c.abs().max()) == 0.0:
        raise ValueError("all per-example gradients are identical: there is no direction to split along")
    u = torch.linalg.svd(c, full_matrices=False).Vh[0]
    u = u * torch.sign(u[u.abs().argmax()])
    proj = c @ u
    a, b = (proj > 0).nonzero().flatten(), (proj <= 0).nonzero().flatten()
    ma, mb = g[a].to(torch.float64).mean(0), g[b].to(torch.float64).mean(0)
    denom = float(ma.norm() * mb.norm())
    cos = float(torch.dot(ma, mb)) / denom if denom > 0 else 0.0
    return OpposingSplit(a.cpu(), b.cpu(), cos)


@torch.enable_grad()
def example_gradients(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, eval_mode: bool = True) -> Tensor:
    """Per-example gradients of ``loss_fn`` w.r.t. the trainable parameters, flattened: ``(n, P)``.

    One backward per example (no functional transform, so any module works); meant for pools of tens to a
    few hundred examples. ``.grad`` of the parameters is untouched; eval mode, the mode restored.
    """
    model_and_loss(model, loss_fn)
    x, y = paired_examples(x, y)
    eval_mode = boolean("eval_mode", eval_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")
    was_training = model.training
    rows = []
    try:
        if eval_mode:
            model.eval()
        for i in range(len(x)):
            loss = _rows(loss_fn(model(x[i:i + 1]), y[i:i + 1]), 1).sum()
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    finally:
        model.train(was_training)
    return torch.stack(rows)


def split_opposing(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, eval_mode: bool = True) -> OpposingSplit:
    """Split a pool of examples (e.g. ``tracker.frequent_outliers()``) into two opposing groups.

    Paper slug: ``opposing-signals``. Per-example gradients (:func:`example_gradients`), then
    :func:`split_gradients`. Returns ``(idx_a, idx_b, cosine)`` with indices into ``x``.

    Example::

        >>> idx_a, idx_b, cos = split_opposing(model, nn.CrossEntropyLoss(reduction="none"), x[pool], y[pool])
    """
    x, y = paired_examples(x, y)
    if len(x) < 2:
        raise ValueError(f"x needs at least 2 examples to split into two groups, got {len(x)}")
    return split_gradients(example_gradients(model, loss_fn, x, y, eval_mode=eval_mode))


def _series(name: str, s: Any) -> np.ndarray:
    try:
        a = np.asarray(s.detach().cpu() if isinstance(s, Tensor) else s, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(s).__name__}") from None
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size < 3:
        raise ValueError(f"{name} needs at least 3 values (2 differences), got {a.size}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(a)).sum())} NaN/inf value(s)")
    return a


def antiphase_score(series_a: Sequence[float], series_b: Sequence[float]) -> float:
    """Pearson correlation of the first differences of two series, in [-1, 1] (-1: perfect anti-phase).

    Paper slug: ``opposing-signals``: the group losses ``L_A(t)``, ``L_B(t)`` of two opposing groups
    oscillate in anti-phase, ``corr(diff L_A, diff L_B) < 0``. Raises ``ValueError`` for series of
    different lengths, fewer than 3 values, NaN/inf, or constant differences (correlation undefined).

    Example::

        >>> antiphase_score([1, 2, 1, 2, 1], [2, 1, 2, 1, 2])
        -1.0
    """
    a, b = _series("series_a", series_a), _series("series_b", series_b)
    if a.size != b.size:
        raise ValueError(f"series_a and series_b must have the same length, got {a.size} and {b.size}")
    da, db = np.diff(a), np.diff(b)
    for name, d in (("series_a", da), ("series_b", db)):
        if float(np.std(d)) == 0.0:
            raise ValueError(f"{name} has constant first differences: its correlation is undefined")
    da, db = da - da.mean(), db - db.mean()
    r = float(np.dot(da, db) / math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db))))
    return max(-1.0, min(1.0, r))
