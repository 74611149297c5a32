"""Robust aggregation of per-example gradients: median of means and winsorised means (generalization-mystery).

Coherent gradients (Chatterjee 2020; Chatterjee & Zielinski, arXiv 2203.10036): directions that many
examples share survive a robust average, idiosyncratic directions (one example's, e.g. a corrupted label's)
are attenuated. For per-example gradients G in R^{b x p} of a mini-batch:

    mean:       a = (1/b) sum_i G_i                                          (plain SGD)
    m3 (k):     split the b rows into k groups, mu_j = mean of group j, a = coordinate-wise median_j mu_j
    winsorize (c): for each coordinate, clip the b values to [(c+1)-th smallest, (c+1)-th largest], then
                a = the mean of the clipped values (c values at each end are pulled in; c = 0 is the mean)

and the update is w <- w - lr * a, with any optimizer. The median of an even number of values is the mean
of the two middle ones. Three ways to use it in an ordinary loop:

    agg = RobustAggregation("m3", k=8)
    robust_step(model, F.cross_entropy, x, y, opt, agg)              # per-example grads -> .grad -> opt.step()
    loss = robust_loss(model, F.cross_entropy, x, y, agg); loss.backward(); opt.step()   # works inside fit()
    agg.write_grads(model, per_example_grads(model, F.cross_entropy, x, y))             # by hand
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, choice, nonneg_int, positive_int, tensor
from ..probes.per_example import per_example_grads

__all__ = ["median_of_means", "winsorized_mean", "RobustAggregation", "robust_step", "robust_loss", "MODES"]

MODES = ("m3", "winsorize", "mean")


def _rows(g: Tensor, name: str) -> Tensor:
    tensor(name, g, floating=True, min_dim=1)
    if g.shape[0] < 1:
        raise ArgumentError(f"{name} must hold at least one example in dim 0, got shape {tuple(g.shape)}")
    return g.reshape(g.shape[0], -1)


INSERTION_MAX = 8  # up to this many order statistics per column: an insertion network, else topk


def _largest(rows: Tensor, n: int) -> list[Tensor]:
    """The ``n`` largest values of each column of ``rows`` (b, p), in descending order, ties counted.

    For small ``n`` an insertion network over the rows (b * n elementwise max/min on p-vectors), which on
    CPU is an order of magnitude faster than ``topk``/``sort`` along the short dim; else ``topk``.
    """
    if n > INSERTION_MAX:
        vals = rows.t().contiguous().topk(n, dim=1, largest=True, sorted=True).values
        return list(vals.t())
    top = [torch.full_like(rows[0], float("-inf")) for _ in range(n)]
    for r in rows:
        carry = r
        for j in range(n):
            hi = torch.maximum(top[j], carry)
            carry = torch.minimum(top[j], carry)
            top[j] = hi
    return top


def _median0(v: Tensor) -> Tensor:
    """Coordinate-wise median over dim 0 of ``v`` (n, p) (mean of the two middle values for an even n)."""
    n = v.shape[0]
    if n == 1:
        return v[0]
    top = _largest(v, n // 2 + 1)
    return top[n // 2] if n % 2 else 0.5 * (top[n // 2 - 1] + top[n // 2])


def median_of_means(g: Tensor, k: int) -> Tensor:
    """Median of means over dim 0 of per-example gradients ``g`` (b, ...) -> (...) (generalization-mystery).

    The b rows are split, in order, into min(k, b) groups of sizes differing by at most one; each group is
    averaged and the coordinate-wise median of the group means is returned. k = 1 is the mean, k = b the
    coordinate-wise median. Example: ``median_of_means(torch.tensor([[1.], [2.], [9.]]), k=3)`` -> ``[2.]``.
    """
    rows = _rows(g, "g")
    return _median0(_group_means(rows, positive_int("k", k))).reshape(g.shape[1:])


def _group_means(rows: Tensor, k: int) -> Tensor:
    """(b, p) -> (min(k, b), p): means of consecutive groups whose sizes differ by at most one."""
    b = rows.shape[0]
    k = min(k, b)
    if b % k == 0:
        return rows.reshape(k, b // k, -1).mean(1)
    return torch.stack([c.mean(0) for c in torch.tensor_split(rows, k, dim=0)])


def winsorized_mean(g: Tensor, c: int) -> Tensor:
    """Coordinate-wise winsorised mean over dim 0 of ``g`` (b, ...) -> (...) (generalization-mystery).

    Each coordinate's b values are clipped to [(c+1)-th smallest, (c+1)-th largest] and averaged; c = 0 is
    the mean. Needs b >= 2c + 1. The bounds are the (c+1)-th extremes at each end (no full sort).
    Example: ``winsorized_mean(torch.tensor([[0.], [1.], [2.], [100.]]), c=1)`` -> ``[1.5]``.
    """
    rows = _rows(g, "g")
    c = nonneg_int("c", c)
    b = rows.shape[0]
    if c == 0:
        return rows.mean(0).reshape(g.shape[1:])
    if b < 2 * c + 1:
        raise ArgumentError(f"c must leave at least one value unclipped: c={c} needs at least {2 * c + 1} examples, "
                            f"got a batch of {b}")
    hi = _largest(rows, c + 1)[c]
    lo = -_largest(-rows, c + 1)[c]
    return torch.clamp(rows, min=lo, max=hi).mean(0).reshape(g.shape[1:])


class RobustAggregation:
    """Aggregate per-example gradients robustly and write the result into ``.grad`` (generalization-mystery).

    mode: ``"m3"`` (median of ``k`` group means), ``"winsorize"`` (clip ``c`` values at each end of each
    coordinate, then average) or ``"mean"`` (plain SGD, the reference). Calling it maps ``{name:
    Tensor[b, ...]}`` (or one tensor (b, ...)) to ``{name: Tensor[...]}`` (or one tensor). Both rules act
    coordinate-wise and m3's groups are the same for every tensor, so the result is that of the rule applied
    to the concatenated gradient vector.

    Example::

        agg = RobustAggregation("winsorize", c=2)
        agg.write_grads(model, per_example_grads(model, F.cross_entropy, x, y)); opt.step()
    """

    def __init__(self, mode: str = "m3", k: int = 4, c: int = 2) -> None:
        self.mode = choice("mode", mode, MODES)
        self.k = positive_int("k", k)
        self.c = nonneg_int("c", c)

    def aggregate(self, g: Tensor) -> Tensor:
        """One tensor of per-example gradients (b, ...) -> its aggregate (...)."""
        if self.mode == "m3":
            return median_of_means(g, self.k)
        if self.mode == "winsorize":
            return winsorized_mean(g, self.c)
        return _rows(g, "g").mean(0).reshape(g.shape[1:])

    def __call__(self, per_example: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor] | Tensor:
        if isinstance(per_example, Tensor):
            return self.aggregate(per_example)
        if not isinstance(per_example, Mapping) or not per_example:
            raise ArgumentError("per_example must be a tensor (b, ...) or a non-empty dict {name: Tensor[b, ...]}, "
                                f"got {type(per_example).__name__}")
        for n, g in per_example.items():
            _rows(g, f"per_example[{n!r}]")
        sizes = {n: g.shape[0] for n, g in per_example.items()}
        if len(set(sizes.values())) > 1:
            raise ArgumentError(f"per_example tensors must share the batch size in dim 0, got {sizes}")
        dtypes = {g.dtype for g in per_example.values()}
        with torch.no_grad():
            if self.mode == "mean" or len(per_example) == 1 or len(dtypes) > 1:
                return {n: self.aggregate(g) for n, g in per_example.items()}
            # both rules act coordinate-wise: one (., P) matrix for all tensors (far fewer kernel launches)
            rows = [g.reshape(g.shape[0], -1) for g in per_example.values()]
            if self.mode == "m3":
                flat = _median0(torch.cat([_group_means(r, self.k) for r in rows], dim=1))
            else:
                flat = winsorized_mean(torch.cat(rows, dim=1), self.c)
            parts = flat.split([r.shape[1] for r in rows])
            return {n: a.reshape(g.shape[1:]) for (n, g), a in zip(per_example.items(), parts)}

    def write_grads(self, model: nn.Module, per_example: Mapping[str, Tensor], *, accumulate: bool = False
                    ) -> dict[str, Tensor]:
        """Aggregate ``per_example`` and set each named parameter's ``.grad`` (added to it when ``accumulate``).

        Parameters not in ``per_example`` are left alone. Returns the aggregated gradients.
        """
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        boolean("accumulate", accumulate)
        if not isinstance(per_example, Mapping):
            raise ArgumentError("per_example must be a dict {parameter name: Tensor[b, *shape]}, got "
                                f"{type(per_example).__name__}")
        named = dict(model.named_parameters())
        unknown = [n for n in per_example if n not in named]
        if unknown:
            raise ArgumentError(f"per_example names {unknown} that are not parameters of the model "
                                f"(parameters: {sorted(named)})")
        agg = self(per_example)
        for n, a in agg.items():
            p = named[n]
            if a.shape != p.shape:
                raise ArgumentError(f"per_example[{n!r}] aggregates to shape {tuple(a.shape)}, but the parameter has "
                                    f"shape {tuple(p.shape)}")
            a = a.to(p.dtype)
            if accumulate and p.grad is not None:
                p.grad.add_(a)
            else:
                p.grad = a.clone()
        return agg

    def __repr__(self) -> str:
        extra = {"m3": f", k={self.k}", "winsorize": f", c={self.c}", "mean": ""}[self.mode]
        return f"RobustAggregation(mode={self.mode!r}{extra})"


def _check_aggregator(aggregator) -> None:
    if not callable(aggregator):
        raise ArgumentError(f"aggregator must be a RobustAggregation (or a callable on per-example gradients), "
                            f"got {type(aggregator).__name__}")


def robust_loss(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                aggregator: Callable, params: Iterable[str] | None = None, *, method: str = "vmap") -> Tensor:
    """A scalar whose value is the mean per-example loss and whose gradient is the robust aggregate.

    ``robust_loss(...).backward()`` accumulates ``aggregator(per_example_grads(...))`` into the ``.grad`` of
    the selected parameters, so it drops into any loop (``fit(..., compute_loss=lambda m, b:
    robust_loss(m, F.cross_entropy, *b, agg))``), gradient transforms and optimizers alike.
    method: as :func:`gradkit.probes.per_example.per_example_grads` (``"linear"`` for MLPs).
    """
    _check_aggregator(aggregator)
    grads, losses = per_example_grads(model, loss_fn, x, y, params, method=method, return_losses=True)
    agg = aggregator(grads)
    named = dict(model.named_parameters())
    surrogate = sum((named[n] * a.detach().to(named[n].dtype)).sum() for n, a in agg.items())
    return losses.mean() + (surrogate - surrogate.detach())


def robust_step(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                optimizer: torch.optim.Optimizer, aggregator: RobustAggregation, params: Iterable[str] | None = None,
                *, method: str = "vmap") -> float:
    """One robust update: per-example gradients -> ``aggregator`` -> ``.grad`` -> ``optimizer.step()``.

    Returns the mean per-example loss before the step. The optimizer's other parameters keep no gradient.
    Example: ``robust_step(model, F.cross_entropy, xb, yb, opt, RobustAggregation("m3", k=8))``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(aggregator, RobustAggregation):
        raise ArgumentError(f"aggregator must be a RobustAggregation, got {type(aggregator).__name__}")
    grads, losses = per_example_grads(model, loss_fn, x, y, params, method=method, return_losses=True)
    optimizer.zero_grad(set_to_none=True)
    aggregator.write_grads(model, grads)
    optimizer.step()
    return float(losses.mean())
