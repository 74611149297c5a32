"""Reference solutions of periodic 1-D transport equations, computed in code (paper slug: ``lpinn``).

- :func:`convection_diffusion_solution`: ``u_t + c u_x = nu u_xx`` on ``[0, P)``, exact for a band-limited
  initial condition: each Fourier mode k (wavenumber w = 2 pi k / P) is multiplied by
  ``exp(-nu w^2 t - i c w t)``; the series is evaluated at any points (not only on the FFT grid).
- :func:`burgers_solution`: ``u_t + u u_x = nu u_xx``, pseudo-spectral (n modes, 2/3 dealiasing of the
  nonlinear term), classical RK4 with a fixed step ``dt``; an explicit step above RK4's stability bound
  is refused.

Both return numpy arrays of shape ``(len(t), len(x))`` in float64. Example::

    x, t = np.linspace(0, 2 * np.pi, 256), np.linspace(0, 1, 100)
    u = convection_diffusion_solution(np.sin, c=30.0, nu=0.0, x=x, t=t)   # = sin(x - 30 t)
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .._validate import ArgumentError, integer, positive, real_scalar

__all__ = ["convection_diffusion_solution", "burgers_solution", "fourier_coefficients", "RK4_ADVECTION_LIMIT",
           "RK4_DIFFUSION_LIMIT"]

# classical RK4's stability interval: |lambda dt| <= 2.828 on the imaginary axis, 2.785 on the real axis
RK4_ADVECTION_LIMIT = 2.8
RK4_DIFFUSION_LIMIT = 2.78


def _points(name: str, v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or a.size < 1 or not np.all(np.isfinite(a)):
        raise ArgumentError(f"{name} must be a 1-D array of finite numbers, got shape {a.shape}")
    return a


def _sample(u0: Callable[[np.ndarray], Any] | Any, n: int, P: float) -> np.ndarray:
    xs = np.arange(n) * (P / n)
    vals = np.asarray(u0(xs) if callable(u0) else u0, dtype=np.float64)
    if vals.shape != (n,) or not np.all(np.isfinite(vals)):
        raise ArgumentError(f"u0 must give {n} finite values on the uniform grid, got shape {vals.shape}")
    return vals


def _real_coefficients(u_hat: np.ndarray, n: int) -> np.ndarray:
    """``np.fft.rfft`` output -> c_k with u(x) = Re sum_k c_k exp(i w_k x)."""
    coef = u_hat / n
    coef[1:] *= 2.0
    if n % 2 == 0:
        coef[-1] /= 2.0
    return coef


def fourier_coefficients(u0: Callable[[np.ndarray], Any] | Any, n: int, period: float = 2 * math.pi
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(wavenumbers, coefficients)`` of ``u0`` sampled at n uniform points of ``[0, P)``.

    ``u0``: a callable of x (numpy) or its n samples. Equation: u0(x) = Re sum_k c_k exp(i w_k x),
    w_k = 2 pi k / P, c_k = a_k rfft(u0)_k / n with a_0 = 1, a_k = 2 otherwise (a_{n/2} = 1 for even n).
    """
    n = integer("n", n, low=2)
    P = positive("period", period)
    u_hat = np.fft.rfft(_sample(u0, n, P))
    return 2 * math.pi * np.arange(u_hat.size) / P, _real_coefficients(u_hat, n)


def _series(w: np.ndarray, coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Re sum_k coef[..., k] exp(i w_k x) -> shape coef.shape[:-1] + x.shape."""
    return np.real(coef @ np.exp(1j * np.outer(w, x)))


def convection_diffusion_solution(u0: Callable[[np.ndarray], Any] | Any, c: float, nu: float, x: Any, t: Any,
                                  n_modes: int = 256, period: float = 2 * math.pi) -> np.ndarray:
    """Exact solution of ``u_t + c u_x = nu u_xx`` (periodic) at points ``x`` and times ``t`` (paper slug: lpinn).

    Equation: u(x, t) = Re sum_k c_k exp(-nu w_k^2 t) exp(i w_k (x - c t)), the c_k of ``u0`` sampled on
    ``n_modes`` points (exact when u0 is band-limited, e.g. sin x). Returns ``(len(t), len(x))``.

    >>> x = np.linspace(0, 2 * np.pi, 5)
    >>> np.allclose(convection_diffusion_solution(np.sin, 30.0, 0.0, x, [1.0]), np.sin(x - 30.0))
    True
    """
    c = real_scalar("c", c)
    nu = real_scalar("nu", nu, nonneg=True)
    x, t = _points("x", x), _points("t", t)
    w, coef = fourier_coefficients(u0, n_modes, period)
    decay = np.exp(np.outer(t, -nu * w ** 2 - 1j * c * w))  # (T, K)
    return _series(w, coef * decay, x)


def burgers_solution(u0: Callable[[np.ndarray], Any] | Any, nu: float, x: Any, t: Any, n: int = 256,
                     dt: float = 1e-4, period: float = 2 * math.pi) -> np.ndarray:
    """Viscous Burgers ``u_t + u u_x = nu u_xx`` (periodic), pseudo-spectral with RK4 (paper slug: lpinn).

    Equation: d/dt u_hat_k = -i w_k (1/2) FFT(u^2)_k (2/3-dealiased) - nu w_k^2 u_hat_k, classical RK4 with
    step ``dt`` (shortened to land on each requested time). Refuses ``dt`` above RK4's stability bound:
    dt max|u0| w_max <= 2.8 and dt nu w_max^2 <= 2.78. ``t``: non-decreasing times >= 0. Returns
    ``(len(t), len(x))``, the Fourier series evaluated at ``x``.

    >>> x = np.linspace(0, 2 * np.pi, 8)
    >>> u = burgers_solution(lambda s: np.sin(s) + 5.0, 0.01, x, [0.0, 0.1], n=64, dt=1e-3)
    """
    nu = real_scalar("nu", nu, nonneg=True)
    x, t = _points("x", x), _points("t", t)
    dt = positive("dt", dt)
    P = positive("period", period)
    if np.any(t < 0) or np.any(np.diff(t) < 0):
        raise ArgumentError(f"t must be non-decreasing times >= 0, got {t[:5]}...")
    n = integer("n", n, low=4)
    u_hat = np.fft.rfft(_sample(u0, n, P))
    w = 2 * math.pi * np.arange(u_hat.size) / P
    w_max = float(w[-1])
    u_max = float(np.max(np.abs(np.fft.irfft(u_hat, n))))
    if dt * u_max * w_max > RK4_ADVECTION_LIMIT or dt * nu * w_max ** 2 > RK4_DIFFUSION_LIMIT:
        bound = min(RK4_ADVECTION_LIMIT / max(u_max * w_max, 1e-300),
                    RK4_DIFFUSION_LIMIT / max(nu * w_max ** 2, 1e-300))
        raise ArgumentError(f"dt must be <= the explicit RK4 stability bound {bound:.3g} for n={n}, "
                            f"max|u0|={u_max:.3g}, nu={nu:g}, got {dt:g}")
    keep = (np.arange(w.size) < (2 * (n // 2)) // 3 + 1).astype(np.float64)  # 2/3 rule

    def rhs(v: np.ndarray) -> np.ndarray:
        u = np.fft.irfft(v, n)
        return -0.5j * w * keep * np.fft.rfft(u * u) - nu * w ** 2 * v

    out = np.empty((t.size, x.size))
    now = 0.0
    for i, target in enumerate(t):
        while target - now > 1e-12:
            h = min(dt, target - now)
            k1 = rhs(u_hat)
            k2 = rhs(u_hat + 0.5 * h * k1)
            k3 = rhs(u_hat + 0.5 * h * k2)
            k4 = rhs(u_hat + h * k3)
            u_hat = u_hat + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
            now += h
        if not np.all(np.isfinite(u_hat)):
            raise FloatingPointError(f"the Burgers solve diverged before t={target:g}")
        out[i] = _series(w, _real_coefficients(u_hat.copy(), n), x)
    return out
