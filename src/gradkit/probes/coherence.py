"""Gradient coherence of a sample of examples, and a tracker that follows it through training (generalization-mystery).

For per-example gradients g_1..g_m (the whole parameter vector, or one layer) of a sample S of m examples,
with z, z' drawn independently and uniformly from S (Chatterjee & Zielinski, arXiv 2203.10036 / 2008.01217):

    alpha(S)       = E[g_z . g_z'] / E[g_z . g_z]  = ||sum_i g_i||^2 / (m * sum_i ||g_i||^2)
    ratio (m-coherence) = alpha / alpha_perp_m     = ||sum_i g_i||^2 / sum_i ||g_i||^2        in [0, m]
    offdiag (z != z')   = (||sum_i g_i||^2 - sum_i ||g_i||^2) / ((m - 1) * sum_i ||g_i||^2)   in [-1/(m-1), 1]

``ratio`` is 1 for pairwise orthogonal gradients of equal norm ("as if orthogonal"), m when all gradients
are equal; it is the average number of sample examples that a small step along one example's gradient
helps (the m-coherence). ``offdiag`` is 0 for orthogonal gradients. All three are invariant to a global
scaling of the gradients and depend on m: always report m. Over the whole vector, ||sum g||^2 and
sum ||g||^2 are sums of the per-layer values, so per-layer and whole-network values come from one pass.

    stats = coherence_stats(per_example_grads(model, F.cross_entropy, x, y))   # streamed over chunks too
    stats.value("ratio"), stats.per_layer("ratio"), stats.m

:class:`CoherenceTracker` measures it on a fixed probe sample during training (``.step(step)`` in any loop,
or ``on_epoch_end`` of :func:`gradkit.engine.fit`) and keeps a history.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, choice, nonneg_int, positive_int
from .per_example import METHODS, per_example_grads

__all__ = ["VARIANTS", "CoherenceStats", "coherence_stats", "gradient_coherence", "measure_coherence",
           "CoherenceRecord", "CoherenceTracker"]

VARIANTS = ("ratio", "alpha", "offdiag")


def _from_sums(variant: str, m: int, sq_of_sum: float, sum_of_sq: float) -> float:
    if variant == "ratio":
        return sq_of_sum / sum_of_sq
    if variant == "alpha":
        return sq_of_sum / (m * sum_of_sq)
    return (sq_of_sum - sum_of_sq) / ((m - 1) * sum_of_sq)


@dataclass(frozen=True)
class CoherenceStats:
    """The two sums coherence is made of, per layer, for a sample of ``m`` examples.

    sq_of_sum[name] = ||sum_i g_i||^2 and sum_of_sq[name] = sum_i ||g_i||^2 for the gradients of parameter
    ``name``; the whole-vector values are the sums over names.
    """

    m: int
    sq_of_sum: dict[str, float]
    sum_of_sq: dict[str, float]

    def _check(self, variant: str, name: str, sq: float, ss: float) -> None:
        choice("variant", variant, VARIANTS)
        if not (math.isfinite(sq) and math.isfinite(ss)):
            raise ValueError(f"coherence of {name}: the per-example gradients are not finite")
        if ss <= 0.0:
            raise ValueError(f"coherence of {name} is undefined: every per-example gradient is zero")

    def value(self, variant: str = "ratio") -> float:
        """Coherence of the whole gradient vector (every parameter)."""
        sq, ss = sum(self.sq_of_sum.values()), sum(self.sum_of_sq.values())
        self._check(variant, "the whole gradient", sq, ss)
        return _from_sums(variant, self.m, sq, ss)

    def per_layer(self, variant: str = "ratio") -> dict[str, float]:
        """Coherence of each parameter tensor's gradient, ``{name: value}``."""
        out = {}
        for n in self.sq_of_sum:
            self._check(variant, f"parameter {n!r}", self.sq_of_sum[n], self.sum_of_sq[n])
            out[n] = _from_sums(variant, self.m, self.sq_of_sum[n], self.sum_of_sq[n])
        return out


class _Accumulator:
    """Running sum_i g_i (per layer, float64 across chunks) and sum_i ||g_i||^2 over chunks of examples."""

    def __init__(self) -> None:
        self.m = 0
        self.sums: dict[str, Tensor] = {}
        self.sum_sq: dict[str, float] = {}

    def add(self, grads: Mapping[str, Tensor]) -> None:
        b = None
        for n, g in grads.items():
            g2 = g.detach().reshape(g.shape[0], -1)
            if g2.dtype not in (torch.float32, torch.float64):
                g2 = g2.float()  # half / bfloat16 / integer: reduce in float32
            if b is None:
                b = g2.shape[0]
            elif g2.shape[0] != b:
                raise ArgumentError(f"grads[{n!r}] has {g2.shape[0]} examples, expected {b} like the first entry")
            s = g2.sum(0).to(torch.float64)  # running sums across chunks in float64
            self.sums[n] = self.sums[n] + s if n in self.sums else s
            flat = g2.reshape(-1)
            self.sum_sq[n] = self.sum_sq.get(n, 0.0) + float(torch.dot(flat, flat))
        self.m += b or 0

    def stats(self) -> CoherenceStats:
        if self.m < 2:
            raise ValueError(f"coherence needs at least 2 examples (pairs of gradients), got m={self.m}")
        return CoherenceStats(self.m, {n: float(s.square().sum()) for n, s in self.sums.items()}, dict(self.sum_sq))


def _as_mapping(grads: Mapping[str, Tensor] | Tensor) -> Mapping[str, Tensor]:
    if isinstance(grads, Tensor):
        if grads.dim() < 1:
            raise ArgumentError("grads must have the examples in dim 0, got a 0-dim tensor")
        return {"grad": grads}
    if not isinstance(grads, Mapping) or not grads:
        raise ArgumentError("grads must be a tensor (m, ...) or a non-empty dict {name: Tensor[m, ...]}, got "
                            f"{type(grads).__name__}{' (empty)' if isinstance(grads, Mapping) else ''}")
    for n, g in grads.items():
        if not isinstance(g, Tensor) or g.dim() < 1:
            raise ArgumentError(f"grads[{n!r}] must be a tensor with the examples in dim 0, got "
                                f"{type(g).__name__}")
    return grads


def coherence_stats(grads: Mapping[str, Tensor] | Tensor) -> CoherenceStats:
    """:class:`CoherenceStats` of per-example gradients ``{name: Tensor[m, ...]}`` (or one tensor (m, ...))."""
    acc = _Accumulator()
    acc.add(_as_mapping(grads))
    return acc.stats()


def gradient_coherence(grads: Mapping[str, Tensor] | Tensor, variant: str = "ratio",
                       per_layer: bool = False) -> float | dict[str, float]:
    """Coherence of per-example gradients (generalization-mystery): ``ratio`` ||sum g||^2 / sum ||g||^2 (default).

    grads: ``{name: Tensor[m, ...]}`` as from :func:`per_example_grads`, or one tensor (m, ...) (rows are
    flattened). variant: ``"ratio"`` (m-coherence, in [0, m]), ``"alpha"`` (ratio / m) or ``"offdiag"``
    (pairs z != z' only, 0 when orthogonal). per_layer: a dict ``{name: value}`` instead of one number for
    the whole vector. Needs m >= 2 and some non-zero, finite gradient.

    Example::

        gradient_coherence(torch.eye(4))                       # 1.0: orthogonal, equal norms
        gradient_coherence(torch.ones(4, 3))                   # 4.0 = m: identical gradients
    """
    choice("variant", variant, VARIANTS)
    boolean("per_layer", per_layer)
    stats = coherence_stats(grads)
    return stats.per_layer(variant) if per_layer else stats.value(variant)


def measure_coherence(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                      params: Iterable[str] | None = None, *, method: str = "vmap",
                      chunk_size: int | None = None) -> CoherenceStats:
    """:class:`CoherenceStats` of the per-example gradients of ``model`` on the sample (x, y), streamed.

    Per-example gradients are computed ``chunk_size`` examples at a time (None: all at once) and only their
    running sums are kept, so memory is O(chunk_size * p), not O(m * p). method: as :func:`per_example_grads`.
    """
    m = x.shape[0] if isinstance(x, Tensor) and x.dim() >= 1 else None
    if chunk_size is not None:
        positive_int("chunk_size", chunk_size)
    if m is None or chunk_size is None or chunk_size >= m:
        return coherence_stats(per_example_grads(model, loss_fn, x, y, params, method=method))
    acc = _Accumulator()
    for i in range(0, m, chunk_size):
        acc.add(per_example_grads(model, loss_fn, x[i:i + chunk_size], y[i:i + chunk_size], params,
                                  method=method))
    return acc.stats()


@dataclass(frozen=True)
class CoherenceRecord:
    """One measurement: the training step, the whole-vector value, per-layer values and the sample size m."""

    step: int
    value: float
    per_layer: dict[str, float] = field(default_factory=dict)
    m: int = 0


class CoherenceTracker:
    """Measure gradient coherence on a fixed probe sample every ``every`` steps of training (generalization-mystery).

    ``tracker.step(step)`` measures when ``step % every == 0`` (call it once per step of any loop, e.g. as
    ``fit(..., on_step_start=tracker.step)``); ``tracker.on_epoch_end(epoch, hist)`` measures after each
    epoch of :func:`gradkit.engine.fit` (at step ``hist.steps``); ``tracker.measure(step)`` measures now.
    The model is measured in eval mode by default (``eval_mode=True``: dropout off, BatchNorm on running
    statistics) and put back in its mode afterwards; no hook stays on the model and no ``.grad`` changes.
    history: the :class:`CoherenceRecord` list; ``steps()``, ``values()``, ``layer_values(name)`` read it.

    Example::

        tracker = CoherenceTracker(model, F.cross_entropy, x[:256], y[:256], every=100)
        for step, (xb, yb) in enumerate(batches):
            tracker.step(step)
            ...                                   # the ordinary training step
        tracker.values()                          # ratio at steps 0, 100, 200, ...
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], probe_x: Tensor,
                 probe_y: Tensor, every: int = 1, *, variant: str = "ratio", per_layer: bool = True,
                 params: Iterable[str] | None = None, method: str = "vmap", chunk_size: int | None = None,
                 eval_mode: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ArgumentError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
        for name, t in (("probe_x", probe_x), ("probe_y", probe_y)):
            if not isinstance(t, Tensor) or t.dim() < 1:
                raise ArgumentError(f"{name} must be a tensor with the examples in dim 0, got {type(t).__name__}")
        if probe_x.shape[0] != probe_y.shape[0]:
            raise ArgumentError(f"probe_y must have one row per probe example ({probe_x.shape[0]}), got "
                                f"shape {tuple(probe_y.shape)}")
        if probe_x.shape[0] < 2:
            raise ArgumentError(f"probe_x must hold at least 2 examples (coherence compares pairs), got "
                                f"{probe_x.shape[0]}")
        self.model, self.loss_fn = model, loss_fn
        self.probe_x, self.probe_y = probe_x, probe_y
        self.every = positive_int("every", every)
        self.variant = choice("variant", variant, VARIANTS)
        self.per_layer = boolean("per_layer", per_layer)
        self.params = None if params is None else list(params)
        self.method = choice("method", method, METHODS)
        self.chunk_size = None if chunk_size is None else positive_int("chunk_size", chunk_size)
        self.eval_mode = boolean("eval_mode", eval_mode)
        self.history: list[CoherenceRecord] = []

    @property
    def m(self) -> int:
        """Size of the probe sample."""
        return int(self.probe_x.shape[0])

    def measure(self, step: int | None = None) -> CoherenceRecord:
        """Measure now and append the record (``step`` defaults to the last record's step + 1, or 0)."""
        if step is None:
            step = self.history[-1].step + 1 if self.history else 0
        step = nonneg_int("step", step)
        was_training = self.model.training
        if self.eval_mode:
            self.model.eval()
        try:
            stats = measure_coherence(self.model, self.loss_fn, self.probe_x, self.probe_y, self.params,
                                      method=self.method, chunk_size=self.chunk_size)
        finally:
            self.model.train(was_training)
        rec = CoherenceRecord(step, stats.value(self.variant),
                              stats.per_layer(self.variant) if self.per_layer else {}, stats.m)
        self.history.append(rec)
        return rec

    def step(self, step: int) -> float | None:
        """Measure if ``step % every == 0``; returns the whole-vector value measured, else None."""
        step = nonneg_int("step", step)
        return self.measure(step).value if step % self.every == 0 else None

    def on_epoch_end(self, epoch: int, hist) -> None:
        """For ``fit(..., on_epoch_end=tracker.on_epoch_end)``: measure after every epoch (every ``every`` epochs)."""
        if (epoch + 1) % self.every == 0:
            self.measure(int(hist.steps))

    def steps(self) -> list[int]:
        return [r.step for r in self.history]

    def values(self) -> list[float]:
        return [r.value for r in self.history]

    def layer_values(self, name: str) -> list[float]:
        """Per-layer series of parameter ``name`` (needs ``per_layer=True``)."""
        if not self.per_layer:
            raise ValueError("layer_values needs a tracker built with per_layer=True")
        if self.history and name not in self.history[0].per_layer:
            raise ArgumentError(f"name {name!r} is not a tracked parameter (tracked: {sorted(self.history[0].per_layer)})")
        return [r.per_layer[name] for r in self.history]

    def __repr__(self) -> str:
        return (f"CoherenceTracker(m={self.m}, every={self.every}, variant={self.variant!r}, method={self.method!r}, "
                f"records={len(self.history)})")
