"""Lagrangian PINNs and the Eulerian PINN baseline for periodic 1-D transport (paper slug: ``lpinn``).

Mojgani, Balajewicz & Hassanzadeh, "Lagrangian PINNs: A causality-conforming solution to failure modes of
physics-informed neural networks" (arXiv 2205.02902). For ``u_t + F(u) u_x = nu u_xx`` on ``x in [0, P)``
(periodic, P = 2 pi by default) a Lagrangian PINN learns two maps of the characteristic label ``xi`` and time::

    X(xi, t)   the characteristic starting at xi:      R_x = dX/dt - F(u)            (F = c: convection,
    u(xi, t)   the state carried along it:             R_u = du/dt - nu d2u/dX2       F = u: Burgers)
    X(xi, 0) = xi,  u(xi, 0) = u0(xi)
    d2u/dX2 = (u_xi / X_xi)_xi / X_xi   ("physical")   or  u_xi,xi  ("label": the official code, exact
                                                                      only while X_xi = 1)
    L = g_x ||R_x|| + g_u ||R_u|| + g_ic (||X(., 0) - xi|| + ||u(., 0) - u0||),  (g_x, g_u, g_ic) = (10, 1, 1000)

with L2 *norms* over the collocation grid (``norm="l2"``, as the official code; ``"mse"`` uses mean squares).
The Eulerian PINN fits ``u(x, t)`` with ``R = u_t + F(u) u_x - nu u_xx`` and the same soft initial condition.
Both networks see the periodic embedding ``(cos(2 pi x / P), sin(2 pi x / P), t)``, so they are exactly
periodic in space. :func:`lagrangian_to_eulerian` maps ``u`` on the moving characteristics back onto a fixed
grid (wrap ``X`` modulo ``P``, sort, periodic linear interpolation) and refuses folded characteristics.

Example::

    model = LagrangianPINN(width=32, depth_u=3, depth_x=2)
    xi, t = torch.linspace(0, 2 * math.pi, 64), torch.linspace(0, 1, 32)
    loss = lpinn_loss(model, xi, t, torch.sin, flux=30.0).total
    loss.backward()
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, choice, positive, positive_int, real_scalar, tensor

__all__ = ["PeriodicMLP", "LagrangianPINN", "lpinn_residuals", "lpinn_loss", "pinn_residual", "pinn_loss",
           "LPINNLoss", "PINNLoss", "lagrangian_to_eulerian", "characteristic_folds", "CharacteristicFoldError",
           "DEFAULT_WEIGHTS", "PINN_WEIGHTS"]

TWO_PI = 2.0 * math.pi
DEFAULT_WEIGHTS = (10.0, 1.0, 1000.0)  # (g_x, g_u, g_ic) of the official LPINN runs
PINN_WEIGHTS = (1.0, 1000.0)  # (g_r, g_ic) of the official Eulerian (PINN_POLAR) runs

Flux = Union[float, Callable[[Tensor], Tensor]]


class CharacteristicFoldError(ValueError):
    """The learned characteristics cross (X_xi <= 0 somewhere): u is multi-valued on the fixed grid."""


# ------------------------------------------------------------------------------------------ networks
class PeriodicMLP(nn.Module):
    """A tanh MLP of ``(cos(2 pi x / P), sin(2 pi x / P), t)``: exactly P-periodic in x (paper slug: lpinn).

    Equation: z0 = (cos(w x), sin(w x), t), w = 2 pi / P; z_k = tanh(W_k z_{k-1} + b_k), k = 1..depth;
    out = W_o z_depth + b_o. ``periodic=False`` feeds ``(x, t)`` instead (an ablation: not periodic).
    ``depth`` counts the tanh layers (the official ``DEEPu``).

    >>> net = PeriodicMLP(width=16, depth=3)
    >>> u = net(torch.rand(5), torch.rand(5))          # shape (5,)
    >>> torch.allclose(net(torch.zeros(1), torch.ones(1)), net(torch.full((1,), 2 * math.pi), torch.ones(1)))
    True
    """

    def __init__(self, width: int = 50, depth: int = 5, periodic: bool = True, period: float = TWO_PI) -> None:
        super().__init__()
        self.width = positive_int("width", width)
        self.depth = positive_int("depth", depth)
        self.periodic = boolean("periodic", periodic)
        self.period = positive("period", period)
        n_in = 3 if self.periodic else 2
        self.layers = nn.ModuleList(nn.Linear(n_in if k == 0 else self.width, self.width) for k in range(self.depth))
        self.out = nn.Linear(self.width, 1)

    def embed(self, x: Tensor, t: Tensor) -> Tensor:
        """The network's input features, shape ``broadcast(x, t).shape + (3,)`` (``(2,)`` when not periodic)."""
        x, t = torch.broadcast_tensors(x, t)
        if not self.periodic:
            return torch.stack((x, t), -1)
        w = x * (TWO_PI / self.period)
        return torch.stack((torch.cos(w), torch.sin(w), t), -1)

    def hidden(self, z: Tensor, n_layers: int | None = None) -> Tensor:
        """The first ``n_layers`` tanh layers (all by default) applied to embedded features ``z``."""
        for layer in self.layers[: self.depth if n_layers is None else n_layers]:
            z = torch.tanh(layer(z))
        return z

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.out(self.hidden(self.embed(x, t))).squeeze(-1)

    def extra_repr(self) -> str:
        return f"width={self.width}, depth={self.depth}, periodic={self.periodic}, period={self.period:g}"


class LagrangianPINN(nn.Module):
    """Two branches of the characteristic label ``xi`` and time: the state ``u`` and the position ``X``
    (paper slug: lpinn).

    Equation: u(xi, t) = MLP_u(cos xi, sin xi, t) (``depth_u`` tanh layers);
    X(xi, t) = MLP_x(cos xi, sin xi, t) (``depth_x`` layers), or X = xi + MLP_x(...) with ``x_offset=True``
    (a displacement that is exactly periodic; not in the paper, whose X-network outputs X itself).
    ``share_trunk=True`` mirrors the official code: the X-branch re-uses the u-branch's first ``depth_x``
    layers and its output layer (the paper describes two independent branches, the default here).

    >>> model = LagrangianPINN(width=16, depth_u=3, depth_x=2)
    >>> u, X = model(torch.rand(8) * 6.28, torch.rand(8))   # each of shape (8,)
    """

    def __init__(self, width: int = 50, depth_u: int = 5, depth_x: int = 2, periodic: bool = True,
                 share_trunk: bool = False, x_offset: bool = False, period: float = TWO_PI) -> None:
        super().__init__()
        depth_u = positive_int("depth_u", depth_u)
        depth_x = positive_int("depth_x", depth_x)
        self.share_trunk = boolean("share_trunk", share_trunk)
        self.x_offset = boolean("x_offset", x_offset)
        if self.share_trunk and depth_x > depth_u:
            raise ArgumentError(f"depth_x must be <= depth_u with share_trunk=True (the X-branch re-uses the "
                                f"u-branch's first layers), got depth_x={depth_x}, depth_u={depth_u}")
        self.depth_x = depth_x
        self.u_net = PeriodicMLP(width, depth_u, periodic, period)
        self.x_net = None if self.share_trunk else PeriodicMLP(width, depth_x, periodic, period)

    def forward(self, xi: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        z = self.u_net.embed(xi, t)
        u = self.u_net.out(self.u_net.hidden(z)).squeeze(-1)
        if self.share_trunk:
            X = self.u_net.out(self.u_net.hidden(z, self.depth_x)).squeeze(-1)
        else:
            X = self.x_net.out(self.x_net.hidden(z)).squeeze(-1)
        if self.x_offset:
            X = X + torch.broadcast_to(xi, X.shape)
        return u, X

    def extra_repr(self) -> str:
        return f"share_trunk={self.share_trunk}, x_offset={self.x_offset}"


# ------------------------------------------------------------------------------------------ checks
def _flux(flux: Any) -> Callable[[Tensor], Tensor]:
    if callable(flux):
        return flux
    if isinstance(flux, numbers.Real) and not isinstance(flux, bool):
        c = real_scalar("flux", flux)
        return lambda u: torch.full_like(u, c)
    raise ArgumentError(f"flux must be a wave speed (a real number) or a callable F(u) -> tensor, got "
                        f"{type(flux).__name__} {flux!r}")


def _points(xi: Any, t: Any, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    tensor(names[0], xi, floating=True, finite=True)
    tensor(names[1], t, floating=True, finite=True)
    try:
        a, b = torch.broadcast_tensors(xi, t)
    except RuntimeError:
        raise ArgumentError(f"{names[0]} and {names[1]} must have broadcastable shapes, got "
                            f"{tuple(xi.shape)} and {tuple(t.shape)}") from None
    # fresh leaves: the residuals differentiate the network with respect to its inputs
    return a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)


def _d(y: Tensor, x: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _flux_value(F: Callable[[Tensor], Tensor], u: Tensor) -> Tensor:
    f = F(u)
    if not isinstance(f, Tensor) or f.shape != u.shape:
        raise ArgumentError(f"flux(u) must return a tensor of u's shape {tuple(u.shape)}, got "
                            f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
    return f


def _norm_of(kind: str) -> Callable[[Tensor], Tensor]:
    return torch.linalg.vector_norm if kind == "l2" else (lambda r: r.square().mean())


def _grids(xi_grid: Any, t_grid: Any, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    for name, g in zip(names, (xi_grid, t_grid)):
        tensor(name, g, floating=True, finite=True)
        if g.dim() != 1 or g.numel() < 2:
            raise ArgumentError(f"{name} must be a 1-D tensor of >= 2 points, got shape {tuple(g.shape)}")
    return torch.meshgrid(t_grid, xi_grid, indexing="ij")[::-1]  # (M, N) each: rows are times


def _initial(u0: Any, xi_grid: Tensor) -> Tensor:
    target = u0(xi_grid) if callable(u0) else u0
    tensor("u0", target, floating=True, finite=True)
    if target.shape != xi_grid.shape:
        raise ArgumentError(f"u0 must give one value per grid point, shape {tuple(xi_grid.shape)}, got "
                            f"{tuple(target.shape)}")
    return target


def _weights(weights: Any, n: int) -> tuple[float, ...]:
    if not isinstance(weights, (tuple, list)) or len(weights) != n:
        raise ArgumentError(f"weights must be a tuple of {n} numbers >= 0, got {weights!r}")
    return tuple(real_scalar(f"weights[{i}]", w, nonneg=True) for i, w in enumerate(weights))


# ------------------------------------------------------------------------------------------ Lagrangian
def lpinn_residuals(model: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], xi: Tensor, t: Tensor,
                    flux: Flux = 1.0, nu: float = 0.0, diffusion_wrt: str = "physical") -> tuple[Tensor, Tensor]:
    """The LPINN residuals ``(R_x, R_u)`` at points ``(xi, t)`` (paper slug: lpinn).

    Equation: R_x = dX/dt - F(u); R_u = du/dt - nu d2u/dX2 with d2u/dX2 = (u_xi / X_xi)_xi / X_xi
    (``diffusion_wrt="physical"``) or u_xi,xi (``"label"``, the official code). ``flux``: a wave speed c
    (F = c) or a callable F(u) (``lambda u: u`` for Burgers). ``model(xi, t) -> (u, X)`` (any callable).
    Derivatives use ``torch.autograd.grad(create_graph=True)``, so the residuals train the model.

    >>> model = LagrangianPINN(width=8, depth_u=2, depth_x=2)
    >>> r_x, r_u = lpinn_residuals(model, torch.rand(10), torch.rand(10), flux=5.0)
    """
    F = _flux(flux)
    nu = real_scalar("nu", nu, nonneg=True)
    choice("diffusion_wrt", diffusion_wrt, ("physical", "label"))
    xi, t = _points(xi, t, ("xi", "t"))
    u, X = model(xi, t)
    r_x = _d(X, t) - _flux_value(F, u)
    r_u = _d(u, t)
    if nu > 0.0:
        u_xi = _d(u, xi)
        if diffusion_wrt == "label":
            u_xx = _d(u_xi, xi)
        else:
            x_xi = _d(X, xi)
            u_xx = _d(u_xi / x_xi, xi) / x_xi
        r_u = r_u - nu * u_xx
    return r_x, r_u


class LPINNLoss(NamedTuple):
    """The weighted LPINN loss ``total`` and its unweighted terms (norms or mean squares)."""

    total: Tensor
    r_x: Tensor
    r_u: Tensor
    ic_x: Tensor
    ic_u: Tensor


def lpinn_loss(model: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], xi_grid: Tensor, t_grid: Tensor,
               u0: Any, flux: Flux = 1.0, nu: float = 0.0, weights: Any = DEFAULT_WEIGHTS, norm: str = "l2",
               diffusion_wrt: str = "physical") -> LPINNLoss:
    """The LPINN loss on the tensor grid ``xi_grid x t_grid`` (paper slug: lpinn).

    Equation: L = g_x ||R_x|| + g_u ||R_u|| + g_ic (||X(xi, 0) - xi|| + ||u(xi, 0) - u0(xi)||), the norms
    over all grid points (``norm="l2"``: Euclidean norm as in the official code; ``"mse"``: mean squares).
    ``u0``: a callable of ``xi`` or the values at ``xi_grid``; the initial condition is imposed at t = 0.

    >>> model = LagrangianPINN(width=8, depth_u=2, depth_x=2)
    >>> out = lpinn_loss(model, torch.linspace(0, 6.28, 16), torch.linspace(0, 1, 8), torch.sin, flux=5.0)
    >>> out.total.backward()
    """
    g_x, g_u, g_ic = _weights(weights, 3)
    choice("norm", norm, ("l2", "mse"))
    xi, t = _grids(xi_grid, t_grid, ("xi_grid", "t_grid"))
    target = _initial(u0, xi_grid)
    r_x, r_u = lpinn_residuals(model, xi, t, flux, nu, diffusion_wrt)
    u_0, x_0 = model(xi_grid, torch.zeros_like(xi_grid))
    n = _norm_of(norm)
    terms = (n(r_x), n(r_u), n(x_0 - xi_grid), n(u_0 - target))
    total = g_x * terms[0] + g_u * terms[1] + g_ic * (terms[2] + terms[3])
    return LPINNLoss(total, *terms)


# ------------------------------------------------------------------------------------------ Eulerian
def pinn_residual(u_net: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, flux: Flux = 1.0,
                  nu: float = 0.0) -> Tensor:
    """The Eulerian PINN residual ``u_t + F(u) u_x - nu u_xx`` at points ``(x, t)`` (paper slug: lpinn, baseline).

    Equation: R = du/dt + F(u) du/dx - nu d2u/dx2, derivatives by autograd (create_graph=True).

    >>> net = PeriodicMLP(width=8, depth=2)
    >>> r = pinn_residual(net, torch.rand(10), torch.rand(10), flux=5.0)
    """
    F = _flux(flux)
    nu = real_scalar("nu", nu, nonneg=True)
    x, t = _points(x, t, ("x", "t"))
    u = u_net(x, t)
    if not isinstance(u, Tensor) or u.shape != x.shape:
        raise ArgumentError(f"u_net(x, t) must return a tensor of shape {tuple(x.shape)}, got "
                            f"{tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}")
    u_x = _d(u, x)
    r = _d(u, t) + _flux_value(F, u) * u_x
    if nu > 0.0:
        r = r - nu * _d(u_x, x)
    return r


class PINNLoss(NamedTuple):
    """The weighted Eulerian PINN loss ``total`` and its unweighted terms."""

    total: Tensor
    r: Tensor
    ic: Tensor


def pinn_loss(u_net: Callable[[Tensor, Tensor], Tensor], x_grid: Tensor, t_grid: Tensor, u0: Any,
              flux: Flux = 1.0, nu: float = 0.0, weights: Any = PINN_WEIGHTS, norm: str = "l2") -> PINNLoss:
    """The Eulerian PINN loss with a soft initial condition (paper slug: lpinn, baseline).

    Equation: L = g_r ||u_t + F(u) u_x - nu u_xx|| + g_ic ||u(x, 0) - u0(x)||, (g_r, g_ic) = (1, 1000) as in
    the official ``PINN_POLAR`` runs; periodicity comes from the network's embedding, not from a loss term.

    >>> net = PeriodicMLP(width=8, depth=2)
    >>> pinn_loss(net, torch.linspace(0, 6.28, 16), torch.linspace(0, 1, 8), torch.sin, flux=5.0).total.backward()
    """
    g_r, g_ic = _weights(weights, 2)
    choice("norm", norm, ("l2", "mse"))
    x, t = _grids(x_grid, t_grid, ("x_grid", "t_grid"))
    target = _initial(u0, x_grid)
    r = pinn_residual(u_net, x, t, flux, nu)
    n = _norm_of(norm)
    terms = (n(r), n(u_net(x_grid, torch.zeros_like(x_grid)) - target))
    return PINNLoss(g_r * terms[0] + g_ic * terms[1], *terms)


# ------------------------------------------------------------------------------------------ Lagrangian -> Eulerian
def characteristic_folds(X: Tensor, period: float = TWO_PI, tol: float = 1e-4) -> Tensor:
    """Per row of ``X`` (labels along the last dim, in cyclic order), whether the characteristics fold
    (paper slug: lpinn).

    Equation: with circular increments d_i = (X_{i+1} - X_i) mod P (i cyclic; steps back by less than
    ``tol * P`` count as 0, so a repeated end point is fine), a map without folds winds once:
    sum_i d_i = P. A fold (X_xi <= 0 somewhere) adds whole turns.

    >>> xi = torch.linspace(0, 2 * math.pi, 9)[:-1]
    >>> characteristic_folds(torch.stack([xi + 3.0, xi + 0.9 * torch.sin(2 * xi) * 3]))
    tensor([False,  True])
    """
    tensor("X", X, floating=True, finite=True, min_dim=1)
    P = positive("period", period)
    tol = real_scalar("tol", tol, nonneg=True)
    if X.shape[-1] < 2:
        raise ArgumentError(f"X must hold >= 2 labels along its last dim, got shape {tuple(X.shape)}")
    d = torch.remainder(torch.roll(X, -1, -1) - X, P)
    d = torch.where(d > P * (1.0 - tol), torch.zeros_like(d), d)
    return d.sum(-1) > 1.5 * P


def lagrangian_to_eulerian(u: Tensor, X: Tensor, x_grid: Tensor, period: float = TWO_PI,
                           on_fold: str = "raise") -> Tensor:
    """Interpolate ``u`` carried by characteristics at positions ``X`` onto a fixed grid (paper slug: lpinn).

    Equation: per row (one time), w = X mod P, sort w, then periodic linear interpolation at x_grid mod P
    (the segment across the seam joins the last sorted point to the first one plus P). ``u`` and ``X``:
    shape ``(..., N)`` (labels last); returns ``(..., len(x_grid))``. ``on_fold``: ``"raise"``
    (:class:`CharacteristicFoldError`) or ``"ignore"`` (interpolate anyway; see :func:`characteristic_folds`).

    >>> xi = torch.linspace(0, 2 * math.pi, 65)[:-1]
    >>> u = lagrangian_to_eulerian(torch.sin(xi), xi + 30.0, xi)   # ~ sin(x - 30)
    """
    tensor("u", u, floating=True, min_dim=1)
    tensor("X", X, floating=True, finite=True, min_dim=1)
    tensor("x_grid", x_grid, floating=True, finite=True)
    if u.shape != X.shape:
        raise ArgumentError(f"u and X must have the same shape, got {tuple(u.shape)} and {tuple(X.shape)}")
    if x_grid.dim() != 1:
        raise ArgumentError(f"x_grid must be 1-D, got shape {tuple(x_grid.shape)}")
    P = positive("period", period)
    choice("on_fold", on_fold, ("raise", "ignore"))
    if u.shape[-1] < 2:
        raise ArgumentError(f"u and X must hold >= 2 labels along the last dim, got shape {tuple(u.shape)}")
    if on_fold == "raise":
        folded = characteristic_folds(X, P)
        if bool(folded.any()):
            raise CharacteristicFoldError(
                f"the characteristics fold (cross) in {int(folded.sum())} of {folded.numel()} rows: u is "
                "multi-valued there (a shock); pass on_fold='ignore' to interpolate anyway")
    w = torch.remainder(X, P)
    w, order = torch.sort(w, dim=-1)
    us = torch.gather(u, -1, order)
    ws = torch.cat((w[..., -1:] - P, w, w[..., :1] + P), -1)
    uv = torch.cat((us[..., -1:], us, us[..., :1]), -1)
    q = torch.remainder(x_grid.to(w.dtype), P).expand(*w.shape[:-1], x_grid.numel()).contiguous()
    hi = torch.searchsorted(ws.contiguous(), q, right=True).clamp_(1, ws.shape[-1] - 1)
    lo = hi - 1
    w0, w1 = torch.gather(ws, -1, lo), torch.gather(ws, -1, hi)
    u0, u1 = torch.gather(uv, -1, lo), torch.gather(uv, -1, hi)
    span = w1 - w0
    lam = torch.where(span > 0, (q - w0) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
    return u0 + lam * (u1 - u0)
