"""Prompts of in-context linear regression, as x/y tokens for a sequence model (icl-newton, after Garg et al.).

A prompt is (x_1, y_1, ..., x_n, y_n) with x_i ~ N(0, Sigma) in R^d, w ~ N(0, I_d) per prompt and
y_i = w . x_i (+ noise). The model must predict y_i from x_i and the earlier pairs (causally).
Two token layouts:

    "interleaved"  (the paper's): 2n tokens x_1, [y_1, 0, ..., 0], x_2, ...  (width d); y_i is read at the x_i token
    "paired"       n tokens [x_i, y_{i-1}] with y_0 = 0 (width d + 1); y_i is read at token i (half the length)

>>> task = InContextLinearRegression(d=4, n_points=16)
>>> xs, ys, w = task.sample(8, generator=torch.Generator().manual_seed(0))   # (8, 16, 4), (8, 16), (8, 4)
>>> tokens = task.tokens(xs, ys, layout="paired")                             # (8, 16, 5)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import ArgumentError, choice, nonneg_int, optional_generator, positive_int, real_in, tensor

LAYOUTS = ("paired", "interleaved")


class InContextLinearRegression:
    """Sampler of in-context linear-regression prompts (icl-newton).

    d: input dimension; n_points: examples per prompt; cond: None for Sigma = I, else the condition number
    of Sigma = Q diag(lambda) Q^T with lambda log-spaced from 1 down to 1/cond, rescaled to trace d, and Q a
    random rotation drawn once from ``cov_seed`` (the paper's ill-conditioned covariates); noise_std: the
    standard deviation of Gaussian label noise (0: noiseless, as in the paper).
    """

    def __init__(self, d: int, n_points: int, cond: float | None = None, noise_std: float = 0.0,
                 cov_seed: int = 0) -> None:
        self.d = positive_int("d", d)
        self.n_points = positive_int("n_points", n_points)
        self.cond = None if cond is None else real_in("cond", cond, 1.0)
        self.noise_std = real_in("noise_std", noise_std, 0.0)
        cov_seed = nonneg_int("cov_seed", cov_seed)
        if self.cond is None:
            self.sqrt_cov = None
        else:
            g = torch.Generator().manual_seed(cov_seed)
            q, _ = torch.linalg.qr(torch.randn(self.d, self.d, generator=g, dtype=torch.float64))
            expo = torch.linspace(0.0, 1.0, self.d, dtype=torch.float64)   # one value (0) when d = 1
            lam = self.cond ** (-expo)
            lam = lam * (self.d / lam.sum())
            self.sqrt_cov = q * lam.sqrt()                      # x = sqrt_cov @ z has covariance Q diag(lam) Q^T

    @property
    def covariance(self) -> Tensor:
        """Sigma (float64, d x d)."""
        if self.sqrt_cov is None:
            return torch.eye(self.d, dtype=torch.float64)
        return self.sqrt_cov @ self.sqrt_cov.T

    def sample(self, batch: int, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``batch`` prompts: xs ``(batch, n_points, d)``, ys ``(batch, n_points)``, w ``(batch, d)``.

        Drawn on the CPU from ``generator`` (so the same generator gives the same prompts on every device),
        then moved to ``device``.
        """
        batch = positive_int("batch", batch)
        generator = optional_generator(generator)
        z = torch.randn(batch, self.n_points, self.d, generator=generator, dtype=torch.float64)
        xs = z if self.sqrt_cov is None else z @ self.sqrt_cov.T
        w = torch.randn(batch, self.d, generator=generator, dtype=torch.float64)
        ys = (xs @ w[..., None])[..., 0]
        if self.noise_std > 0:
            ys = ys + self.noise_std * torch.randn(ys.shape, generator=generator, dtype=torch.float64)
        return tuple(t.to(device=device, dtype=dtype) for t in (xs, ys, w))

    @staticmethod
    def tokens(xs: Tensor, ys: Tensor, layout: str = "paired") -> Tensor:
        """The model's input sequence for prompts ``xs (b, n, d)``, ``ys (b, n)`` (see the module docstring)."""
        xs = tensor("xs", xs, floating=True, min_dim=3)
        ys = tensor("ys", ys, floating=True, min_dim=2)
        choice("layout", layout, LAYOUTS)
        if ys.shape != xs.shape[:-1]:
            raise ArgumentError(f"ys must have shape xs.shape[:-1] = {tuple(xs.shape[:-1])}, got {tuple(ys.shape)}")
        if layout == "paired":
            prev = torch.cat([torch.zeros_like(ys[..., :1]), ys[..., :-1]], dim=-1)
            return torch.cat([xs, prev[..., None].to(xs.dtype)], dim=-1)
        y_tok = torch.zeros_like(xs)
        y_tok[..., 0] = ys
        return torch.stack([xs, y_tok], dim=-2).flatten(-3, -2)

    @staticmethod
    def prediction_positions(n_points: int, layout: str = "paired") -> Tensor:
        """Token indices at which y_1..y_n are read: 0..n-1 (paired) or 0, 2, ..., 2n-2 (interleaved)."""
        n = positive_int("n_points", n_points)
        choice("layout", layout, LAYOUTS)
        return torch.arange(n) if layout == "paired" else 2 * torch.arange(n)

    def __repr__(self) -> str:
        return (f"InContextLinearRegression(d={self.d}, n_points={self.n_points}, cond={self.cond}, "
                f"noise_std={self.noise_std})")
