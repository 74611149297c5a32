"""Input-convex neural network: a scalar potential psi(x) convex in its input (paper slug: lpn).

A dense ICNN with smooth activations, the potential of a learned proximal network::

    z_1     = s(W_0 x)                          W_0 unconstrained, no bias
    z_{k+1} = s(W_k z_k + H_k x + b_k)          W_k >= 0 (k = 1..layers), H_k, b_k unconstrained
    psi(x)  = w_out . z_L + h_out . x + c + (alpha / 2) ||x||^2        w_out >= 0

with ``s`` the softplus of sharpness ``beta``, ``s(t) = log(1 + exp(beta t)) / beta`` (convex, non-decreasing).
A non-negative combination of convex functions plus an affine map, passed through a convex non-decreasing
function, is convex, so psi is convex in x as long as every W_k and w_out is >= 0. Those weights start tiny
and positive (``exp(N(init_log_mean, init_log_std))``) and must be projected back to >= 0 after every
optimiser step: :meth:`ICNN.clamp_` by hand or :func:`clamp_after_step` as an optimiser hook. A forward pass
with a negative constrained weight raises a ``ValueError`` (``validate=True``, the default), so a forgotten
projection or a manual edit cannot silently break convexity.

Example::

    psi = ICNN(1, hidden=50, layers=4, beta=10.0)
    opt = torch.optim.Adam(psi.parameters(), lr=1e-3)
    clamp_after_step(opt, psi)                # every opt.step() is followed by psi.clamp_()
    values = psi(torch.randn(8, 1))           # shape (8,)
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from .. import _validate as V


def _in_shape(value: int | Sequence[int]) -> tuple[int, ...]:
    if V.is_int(value, low=1):
        return (int(value),)
    if isinstance(value, (tuple, list, torch.Size)) and value and all(V.is_int(v, low=1) for v in value):
        return tuple(int(v) for v in value)
    raise V.ArgumentError(f"in_shape must be a positive int or a non-empty sequence of positive ints, got {value!r}")


class ICNN(nn.Module):
    """Input-convex network ``psi: (N, *in_shape) -> (N,)``, convex in each sample (paper slug: lpn).

    Args:
        in_shape: the shape of one sample (an int for vectors); samples are flattened.
        hidden: width of every hidden layer.
        layers: number of constrained hidden layers ``W_k`` (the official 1-D model uses 4).
        beta: softplus sharpness (larger: closer to ReLU, still smooth).
        strong_convexity: ``alpha >= 0``; adds ``(alpha / 2) ||x||^2``, so ``grad psi`` is ``alpha``-strongly
            monotone (and invertible) when ``alpha > 0``.
        init_log_mean, init_log_std: constrained weights start at ``exp(N(init_log_mean, init_log_std))``.
        validate: check the constraint (one small reduction) on every forward pass; ``False`` skips it.

    ``constrained()`` yields ``(name, weight)`` of the weights that must stay >= 0; ``clamp_()`` projects
    them; ``check_constraints()`` raises naming the first violating weight.
    """

    def __init__(self, in_shape: int | Sequence[int], hidden: int = 64, layers: int = 4, beta: float = 10.0,
                 strong_convexity: float = 0.0, *, init_log_mean: float = -10.0, init_log_std: float = 0.1,
                 validate: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_shape = _in_shape(in_shape)
        self.hidden = V.positive_int("hidden", hidden)
        self.layers = V.nonneg_int("layers", layers)
        self.beta = V.positive("beta", beta)
        self.strong_convexity = V.real_scalar("strong_convexity", strong_convexity, nonneg=True)
        init_log_mean = V.real_scalar("init_log_mean", init_log_mean)
        init_log_std = V.real_scalar("init_log_std", init_log_std, nonneg=True)
        self.validate = V.boolean("validate", validate)
        d = math.prod(self.in_shape)
        kw = {"device": device, "dtype": dtype}
        self.first = nn.Linear(d, hidden, bias=False, **kw)
        self.hidden_z = nn.ModuleList(nn.Linear(hidden, hidden, bias=False, **kw) for _ in range(layers))
        self.hidden_x = nn.ModuleList(nn.Linear(d, hidden, **kw) for _ in range(layers))
        self.out_z = nn.Linear(hidden, 1, bias=False, **kw)
        self.out_x = nn.Linear(d, 1, **kw)
        with torch.no_grad():
            for _, w in self.constrained():
                w.normal_(init_log_mean, init_log_std).exp_()

    def constrained(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, weight)`` of every weight that must stay >= 0 for convexity (the W_k and w_out)."""
        for k, lin in enumerate(self.hidden_z):
            yield f"hidden_z.{k}.weight", lin.weight
        yield "out_z.weight", self.out_z.weight

    @torch.no_grad()
    def clamp_(self) -> "ICNN":
        """Project the constrained weights onto >= 0 (call after every optimiser step); returns self."""
        for _, w in self.constrained():
            w.clamp_(min=0)
        return self

    def check_constraints(self) -> None:
        """Raise ``ValueError`` naming the first constrained weight with a negative (or non-finite) entry."""
        with torch.no_grad():
            ws = [w for _, w in self.constrained()]
            mins = torch.stack([w.min() for w in ws])
            if bool((mins >= 0).all()):
                return
            for (name, _), m in zip(self.constrained(), mins.tolist()):
                if not m >= 0:
                    raise ValueError(
                        f"ICNN weight {name} must be >= 0 for psi to be convex, got min {m:.3g}: call clamp_() "
                        "after every optimizer step (or clamp_after_step(optimizer, icnn))")

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        V.tensor("x", x, floating=True)
        if tuple(x.shape[1:]) != self.in_shape or x.dim() < 2:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """psi(x) for a batch ``x`` of shape ``(N, *in_shape)``; returns shape ``(N,)``."""
        if self.validate:
            self.check_constraints()
        v = self._flat(x)
        b = self.beta
        z = F.softplus(self.first(v), beta=b)
        for wz, hx in zip(self.hidden_z, self.hidden_x):
            z = F.softplus(wz(z) + hx(v), beta=b)
        psi = (self.out_z(z) + self.out_x(v)).squeeze(1)
        if self.strong_convexity:
            psi = psi + 0.5 * self.strong_convexity * v.pow(2).sum(1)
        return psi

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, hidden={self.hidden}, layers={self.layers}, beta={self.beta:g}, "
                f"strong_convexity={self.strong_convexity:g}")


def clamp_after_step(optimizer: torch.optim.Optimizer, *modules: nn.Module) -> RemovableHandle:
    """Register an optimiser step post-hook that calls ``clamp_()`` of each module (paper slug: lpn).

    Keeps an ICNN convex through any training loop that calls ``optimizer.step()``; returns the hook's
    handle (``handle.remove()`` stops it).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise V.ArgumentError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not modules:
        raise V.ArgumentError("modules must name at least one module with a clamp_() method, got none")
    for i, m in enumerate(modules):
        if not callable(getattr(m, "clamp_", None)):
            raise V.ArgumentError(f"modules[{i}] must have a clamp_() method (an ICNN), got {type(m).__name__}")

    def hook(opt, args, kwargs) -> None:
        for m in modules:
            m.clamp_()

    return optimizer.register_step_post_hook(hook)
