"""1-D diffusion-sorption and linear heat problems on a (t, x) grid, with reference solutions computed in code
(paper slug: pihc-moe).

Diffusion-sorption (PDEBench's, used by Chalapathi et al., arXiv 2402.13412), x in [0, 1], t in [0, 500]:

    u_t = D / R(u) * u_xx,   R(u) = 1 + ((1 - phi) / phi) * rho_s * k_f * n_f * (u + 1e-6)^(n_f - 1)  (u > 0;
                             1e-6^(n_f - 1) in place of the power for u <= 0, where it is singular)
    u(t, 0) = 1,   u(t, 1) = D u_x(t, 1),   u(0, x) = a exp(-(x - b)^2 / 0.01),  a ~ U(0.05, 0.2), b ~ U(0.2, 0.8)

with D = 5e-4, phi = 0.29, rho_s = 2880, k_f = 3.5e-4, n_f = 0.874. The reference is the method of lines on a
finer grid (2nd-order differences; the Robin row discretised one-sided to 2nd order and solved for the
boundary value) integrated by scipy's BDF with the
tridiagonal Jacobian sparsity, sampled at the coarse grid. The linear heat problem u_t = kappa u_xx with
u(t, 0) = u(t, 1) = 0 and u0 = sum_k a_k sin(k pi x) has the closed form sum_k a_k exp(-kappa k^2 pi^2 t) sin(k pi x).

>>> prob = diffusion_sorption_problems(4, nt=16, nx=16, seed=0)
>>> prob.u.shape, prob.u0.shape                 # (4, 16, 16), (4, 16)
>>> r = diffusion_sorption_residual(prob.u, torch.zeros_like(prob.u), torch.zeros_like(prob.u))  # pointwise
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .._validate import integer, nonneg_int, positive, positive_int

__all__ = ["DS_CONSTANTS", "PDEProblems", "retardation", "diffusion_sorption_residual", "diffusion_sorption_problems",
           "heat_problems", "gaussian_bumps"]

DS_CONSTANTS = {"D": 5e-4, "phi": 0.29, "rho_s": 2880.0, "k_f": 3.5e-4, "n_f": 0.874}
T_END = 500.0


@dataclass(frozen=True)
class PDEProblems:
    """Instances of one PDE on a (t, x) grid: ``u0`` (n, nx) initial conditions, ``u`` (n, nt, nx) reference
    solutions, the grid ``t`` (nt,) and ``x`` (nx,) and its spacings; float64 CPU tensors."""

    name: str
    u0: Tensor
    u: Tensor
    t: Tensor
    x: Tensor

    @property
    def dt(self) -> float:
        return float(self.t[1] - self.t[0])

    @property
    def dx(self) -> float:
        return float(self.x[1] - self.x[0])


def retardation(u: Tensor) -> Tensor:
    """R(u) = 1 + ((1 - phi)/phi) rho_s k_f n_f (u + 1e-6)^(n_f - 1), with the u <= 0 branch clamped."""
    c = DS_CONSTANTS
    coef = (1 - c["phi"]) / c["phi"] * c["rho_s"] * c["k_f"] * c["n_f"]
    safe = torch.where(u > 0, u, torch.zeros_like(u))
    power = torch.where(u > 0, (safe + 1e-6) ** (c["n_f"] - 1), torch.full_like(u, 1e-6 ** (c["n_f"] - 1)))
    return 1 + coef * power


def diffusion_sorption_residual(u: Tensor, u_t: Tensor, u_xx: Tensor) -> Tensor:
    """The pointwise residual u_t - D / R(u) * u_xx."""
    return u_t - DS_CONSTANTS["D"] / retardation(u) * u_xx


def gaussian_bumps(n: int, x: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """``n`` initial conditions a exp(-(x - b)^2 / 0.01), a ~ U(0.05, 0.2), b ~ U(0.2, 0.8), on ``x``."""
    a = rng.uniform(0.05, 0.2, size=(n, 1))
    b = rng.uniform(0.2, 0.8, size=(n, 1))
    return a * np.exp(-(x[None, :] - b) ** 2 / 0.01)


def _retardation_np(u: np.ndarray) -> np.ndarray:
    c = DS_CONSTANTS
    coef = (1 - c["phi"]) / c["phi"] * c["rho_s"] * c["k_f"] * c["n_f"]
    return 1 + coef * np.where(u > 0, (np.maximum(u, 0) + 1e-6) ** (c["n_f"] - 1), 1e-6 ** (c["n_f"] - 1))


def _ds_mol(u0: np.ndarray, t_eval: np.ndarray, rtol: float) -> np.ndarray:
    """Method of lines for a batch of initial conditions (n, m) on a uniform grid, integrated as one system
    (block-tridiagonal Jacobian); returns (n, len(t_eval), m)."""
    from scipy.integrate import solve_ivp
    from scipy.sparse import block_diag, diags

    n, m = u0.shape
    h = 1.0 / (m - 1)
    d = DS_CONSTANTS["D"]
    c = d / (2 * h)          # u_{m-1} = D (3 u_{m-1} - 4 u_{m-2} + u_{m-3}) / 2h, solved for u_{m-1}

    def edges(v: np.ndarray) -> np.ndarray:   # v: (n, m-2) u at x_1 .. x_{m-2}; u(t, 0) = 1, u(t, 1) from the Robin row
        right = -c * (4 * v[:, -1:] - v[:, -2:-1]) / (1 - 3 * c)
        return np.concatenate([np.ones_like(right), v, right], axis=1)

    def rhs(_t: float, flat: np.ndarray) -> np.ndarray:
        v = flat.reshape(n, m - 2)
        full = edges(v)
        uxx = (full[:, :-2] - 2 * full[:, 1:-1] + full[:, 2:]) / h ** 2
        return (d / _retardation_np(v) * uxx).ravel()

    tri = diags([1.0, 1.0, 1.0], [-1, 0, 1], shape=(m - 2, m - 2))
    sol = solve_ivp(rhs, (t_eval[0], t_eval[-1]), u0[:, 1:-1].ravel(), method="BDF", t_eval=t_eval, rtol=rtol,
                    atol=1e-9, jac_sparsity=block_diag([tri] * n))
    if not sol.success:
        raise RuntimeError(f"diffusion-sorption reference solve failed: {sol.message}")
    v = sol.y.T.reshape(len(t_eval), n, m - 2)
    return np.stack([edges(vt) for vt in v], axis=1)


@lru_cache(maxsize=8)
def _ds_cached(n: int, nt: int, nx: int, refine: int, seed: int, rtol: float) -> tuple[Tensor, Tensor]:
    fine = np.linspace(0.0, 1.0, refine * (nx - 1) + 1)
    u0_fine = gaussian_bumps(n, fine, np.random.RandomState(seed))
    t = np.linspace(0.0, T_END, nt)
    u = _ds_mol(u0_fine, t, rtol)[:, :, ::refine]
    return torch.from_numpy(u0_fine[:, ::refine].copy()), torch.from_numpy(u)


def diffusion_sorption_problems(n: int, nt: int = 32, nx: int = 32, *, seed: int = 0, refine: int = 4,
                                rtol: float = 1e-6) -> PDEProblems:
    """``n`` diffusion-sorption instances with reference solutions on an ``nt`` x ``nx`` grid over
    [0, 500] x [0, 1]; the reference runs on ``refine * (nx - 1) + 1`` points (cached per process)."""
    n, seed = positive_int("n", n), nonneg_int("seed", seed)
    nt, nx = integer("nt", nt, low=4), integer("nx", nx, low=4)
    refine, rtol = positive_int("refine", refine), positive("rtol", rtol)
    u0, u = _ds_cached(n, nt, nx, refine, seed, rtol)
    return PDEProblems("diffusion_sorption", u0.clone(), u.clone(), torch.linspace(0.0, T_END, nt, dtype=torch.float64),
                       torch.linspace(0.0, 1.0, nx, dtype=torch.float64))


def heat_problems(n: int, nt: int = 16, nx: int = 16, *, kappa: float = 0.1, t_end: float = 1.0, modes: int = 2,
                  seed: int = 0) -> PDEProblems:
    """``n`` linear heat instances u_t = kappa u_xx, zero Dirichlet ends, u0 = sum_k a_k sin(k pi x) with
    a_k ~ U(-1, 1) / k; the solution in closed form."""
    n, seed, modes = positive_int("n", n), nonneg_int("seed", seed), positive_int("modes", modes)
    nt, nx = integer("nt", nt, low=4), integer("nx", nx, low=4)
    kappa, t_end = positive("kappa", kappa), positive("t_end", t_end)
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(1, modes + 1, dtype=torch.float64)
    a = (torch.rand(n, modes, generator=g, dtype=torch.float64) * 2 - 1) / k
    t = torch.linspace(0.0, t_end, nt, dtype=torch.float64)
    x = torch.linspace(0.0, 1.0, nx, dtype=torch.float64)
    sines = torch.sin(torch.pi * k[:, None] * x[None, :])                       # (modes, nx)
    decay = torch.exp(-kappa * (torch.pi * k[None, :]) ** 2 * t[:, None])     # (nt, modes)
    u = torch.einsum("nk,tk,kx->ntx", a, decay, sines)
    return PDEProblems("heat", u[:, 0].clone(), u, t, x)
