"""Sharpness: the top eigenvalue of the training loss's Hessian, by power iteration on Hessian-vector products.

Paper slug: ``opposing-signals`` (Rosenfeld & Risteski, ICLR 2024, arXiv 2311.04163), where the sharpness
of full-batch GD rises to the edge of stability ``2 / lr`` while opposing signals oscillate. With
``L(w) = mean_i l_i(w)`` over ``(x, y)`` and ``H = d^2 L / dw^2``::

    H v      = d/dw <grad L(w), v>                 (double backward, no Hessian formed)
    v_{j+1}  = H v_j / ||H v_j||,   lam_j = v_j^T H v_j          (power iteration, Rayleigh quotient)
    if lam < 0 (a negative eigenvalue dominates):  top = lam_max(H + c I) - c,  c = |lam|

The model is evaluated through ``torch.func.functional_call`` on copies of its parameters (cast to
``dtype``; float64 keeps the iteration stable for small models), so the model itself, its ``.grad`` and
its buffers are untouched; it runs in eval mode and its mode is restored, exceptions included.

Example::

    lam, v = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, iters=20, dtype=torch.float64)
    lam, v = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, v0=v)      # warm start a step later
    sharp = SharpnessTracker(model, nn.MSELoss(), x, y, every=50)         # fit(..., on_step_start=sharp)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._validate import boolean, nonneg_int, optional_generator, positive_int, tensor

__all__ = ["hessian_top_eigenvalue", "SharpnessTracker", "paired_examples", "model_and_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _check_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype (e.g. torch.float64), got {dtype!r}")
    return dtype


def paired_examples(x: Any, y: Any, xname: str = "x", yname: str = "y") -> tuple[Tensor, Tensor]:
    """Inputs and targets as tensors with the same, non-zero number of rows (errors name the arguments)."""
    x = tensor(xname, x, min_dim=1)
    y = tensor(yname, y, min_dim=1)
    if len(x) == 0:
        raise ValueError(f"{xname} is empty: at least one example is needed")
    if len(y) != len(x):
        raise ValueError(f"{yname} has {len(y)} rows, expected {len(x)} like {xname}")
    return x, y


def model_and_loss(model: Any, loss_fn: Any) -> None:
    """Check that ``model`` is an ``nn.Module`` and ``loss_fn`` a callable ``loss_fn(output, target)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")


class _Hvp:
    """Hessian-vector products of the mean loss over ``(x, y)`` in chunks, on cast parameter copies."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, dtype: torch.dtype | None,
                 batch_size: int | None) -> None:
        model_and_loss(model, loss_fn)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters that require grad: there is no Hessian to probe")
        dt = dtype or named[0][1].dtype
        self.names = [n for n, _ in named]
        self.params = [p.detach().to(dt).requires_grad_(True) for _, p in named]
        self.buffers = {n: (b.detach().to(dt) if b.is_floating_point() else b.detach()).clone()
                        for n, b in model.named_buffers()}
        self.model, self.loss_fn, self.dtype = model, loss_fn, dt
        cast = lambda t: t.to(dt) if t.is_floating_point() else t  # noqa: E731
        step = len(x) if batch_size is None else batch_size
        self.chunks = [(cast(x[i:i + step]), cast(y[i:i + step])) for i in range(0, len(x), step)]
        self.n = len(x)
        self._grads: list[Tensor] | None = None  # one chunk: the first backward's graph is kept and reused

    def _chunk_grads(self, xb: Tensor, yb: Tensor) -> list[Tensor]:
        out = functional_call(self.model, ({**dict(zip(self.names, self.params)), **self.buffers}), (xb,))
        loss = self.loss_fn(out, yb)
        if not isinstance(loss, Tensor) or not loss.is_floating_point():
            raise TypeError(f"loss_fn must return a floating torch.Tensor, got {type(loss).__name__}")
        loss = loss.mean() * (len(xb) / self.n)
        if not torch.isfinite(loss):
            raise ValueError(f"the loss is not finite ({float(loss.detach())}): the model's outputs or the targets "
                             "contain NaN/inf, or training diverged")
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        missing = [n for n, g in zip(self.names, grads) if g is None]
        if missing:
            raise ValueError(f"the loss does not depend on parameter(s) {missing}: freeze them "
                             "(requires_grad=False) to leave them out of the Hessian")
        return list(grads)

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        if len(self.chunks) == 1:
            if self._grads is None:
                self._grads = self._chunk_grads(*self.chunks[0])
            return list(torch.autograd.grad(self._grads, self.params, grad_outputs=v, retain_graph=True))
        acc = [torch.zeros_like(p) for p in self.params]
        for xb, yb in self.chunks:
            hv = torch.autograd.grad(self._chunk_grads(xb, yb), self.params, grad_outputs=v)
            acc = [a + h for a, h in zip(acc, hv)]
        return acc

    def split(self, flat: Tensor) -> list[Tensor]:
        return [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def _power(hvp: _Hvp, v: Tensor, iters: int, shift: float) -> tuple[float, Tensor]:
    """``iters`` power iterations on ``H + shift * I`` from ``v``; (Rayleigh quotient, unit vector)."""
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = torch.cat([h.reshape(-1) for h in hvp(hvp.split(v))]) + shift * v
        lam = float(torch.dot(v, hv))
        norm = hv.norm()
        if not torch.isfinite(norm):
            raise ValueError("a Hessian-vector product is not finite: the loss has NaN/inf curvature here")
        if float(norm) == 0.0:  # H + shift I annihilates v: the eigenvalue is 0
            return lam, v
        v = hv / norm
    return lam, v


@torch.enable_grad()
def hessian_top_eigenvalue(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, iters: int = 20,
                           v0: Tensor | None = None, *, dtype: torch.dtype | None = None,
                           batch_size: int | None = None, generator: torch.Generator | None = None,
                           eval_mode: bool = True) -> tuple[float, Tensor]:
    """Largest eigenvalue of the Hessian of the mean loss over ``(x, y)`` w.r.t. the trainable parameters.

    Paper slug: ``opposing-signals``. Power iteration ``v <- H v / ||H v||`` with Hessian-vector products
    by double backward, ``lam = v^T H v``. If the dominant eigenvalue is negative (common early in
    training), the iteration is rerun on ``H + |lam| I`` so the top (most positive) eigenvalue is returned,
    with its sign: up to ``2 * iters`` products. ``loss_fn(output, target)`` may return one loss per
    example or a scalar (it is averaged). ``v0`` (flat, ``numel`` = number of trainable parameters, e.g.
    the ``v`` of a previous call) warm-starts; otherwise a random start from ``generator``.
    ``batch_size`` bounds memory by recomputing the graph per chunk. Returns ``(lam, v)``, ``v`` a unit
    vector in ``dtype`` on the parameters' device.

    Example::

        >>> lam, v = hessian_top_eigenvalue(model, nn.MSELoss(), x, y, dtype=torch.float64)
        >>> print(f"sharpness {lam:.2f} vs 2/lr = {2 / lr:.2f}")
    """
    x, y = paired_examples(x, y)
    iters = positive_int("iters", iters)
    if batch_size is not None:
        batch_size = positive_int("batch_size", batch_size)
    optional_generator(generator)
    eval_mode = boolean("eval_mode", eval_mode)
    was_training = model.training if isinstance(model, nn.Module) else False
    try:
        if eval_mode and isinstance(model, nn.Module):
            model.eval()
        hvp = _Hvp(model, loss_fn, x, y, _check_dtype(dtype), batch_size)
        dev, n = hvp.params[0].device, hvp.numel()
        if v0 is None:
            g_dev = "cpu" if generator is None else generator.device
            v = torch.randn(n, generator=generator, device=g_dev, dtype=hvp.dtype).to(dev)
        else:
            v = tensor("v0", v0, floating=True, finite=True).detach().reshape(-1).to(dev, hvp.dtype)
            if v.numel() != n:
                raise ValueError(f"v0 must have {n} elements (one per trainable parameter), got {v.numel()}")
            if float(v.norm()) == 0.0:
                raise ValueError("v0 must be non-zero")
        lam, v = _power(hvp, v, iters, 0.0)
        if lam < 0:
            shift = abs(lam)
            g_dev = "cpu" if generator is None else generator.device
            restart = torch.randn(n, generator=generator, device=g_dev, dtype=hvp.dtype).to(dev)
            mu, v = _power(hvp, restart, iters, shift)
            lam = mu - shift
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return lam, v.detach()


class SharpnessTracker:
    """Engine callback: the Hessian's top eigenvalue every ``every`` steps, warm-started from the last one.

    Paper slug: ``opposing-signals`` (sharpness rising to ``2 / lr``, the edge of stability). Call it with
    the step index (``fit(..., on_step_start=tracker)`` or by hand in a loop); at steps divisible by
    ``every`` it runs :func:`hessian_top_eigenvalue` with ``iters`` iterations from the previous
    eigenvector and appends to ``steps`` and ``values``. ``peak`` is the largest value so far.

    Example::

        >>> sharp = SharpnessTracker(model, nn.MSELoss(), x, y, every=50, dtype=torch.float64)
        >>> fit(model, torch.optim.SGD(model.parameters(), lr=0.05), [(x, y)], epochs=1000, on_step_start=sharp)
        >>> sharp.peak, 2 / 0.05
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *, every: int = 50,
                 iters: int = 20, dtype: torch.dtype | None = None, batch_size: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        model_and_loss(model, loss_fn)
        self.x, self.y = paired_examples(x, y)
        self.every = positive_int("every", every)
        self.iters = positive_int("iters", iters)
        self.dtype = _check_dtype(dtype)
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        self.generator = optional_generator(generator)
        self.model, self.loss_fn = model, loss_fn
        self.steps: list[int] = []
        self.values: list[float] = []
        self._v: Tensor | None = None
        self._count = 0

    def measure(self, step: int | None = None) -> float:
        """Measure now (whatever the step), record it under ``step`` (default: the call count) and return it."""
        lam, self._v = hessian_top_eigenvalue(self.model, self.loss_fn, self.x, self.y, self.iters, self._v,
                                              dtype=self.dtype, batch_size=self.batch_size,
                                              generator=self.generator)
        self.steps.append(self._count if step is None else int(step))
        self.values.append(lam)
        return lam

    def __call__(self, step: int | None = None) -> None:
        s = self._count if step is None else nonneg_int("step", step)
        if s % self.every == 0:
            self.measure(s)
        self._count = s + 1

    @property
    def peak(self) -> float:
        """The largest sharpness measured so far (NaN before the first measurement)."""
        return max(self.values) if self.values else math.nan
