"""Timestep-gated mixture-of-experts masks and the diffusion prior loss of Switch-DiT (paper slug: switch-dit).

Park et al., "Switch Diffusion Transformer: Synergizing Denoising Tasks with Sparse Mixture-of-Experts"
(ECCV 2024, arXiv 2403.09176). Every transformer block of a diffusion model gets a router that sees only the
timestep embedding and picks the top-k of E experts; the experts act on the tokens and form a token-wise mask

    p_t = softmax(W_r SiLU(e_t) + b_r)                  (for every timestep t = 0..T-1)
    m_b = 1 + sum_{e in topk(p_{t_b})} p_{t_b,e} (x_b W_e + b_e)     (gates not renormalised; W_e, b_e start at 0)

The constant 1 is the path every timestep shares, so at initialisation m = 1 and the block is a plain one.
A diffusion prior loss pulls the routers' usage pattern towards a "nearby timesteps share units" prior:

    P[t, s(t) : s(t) + D k] = 1,  s(t) = round((t / (T - 1))^alpha * (D E - D k))     (D blocks, E experts)
    P's columns are matched to the usage columns U (top-k indicators of all blocks) by the Hungarian method
    L_prior = mean_b JSD( concat_i p^(i)_{t_b} / D ,  P_matched[t_b] / (D k) )

>>> moe = TimestepGatedMoEMask(hidden=16, num_experts=3, k=2)
>>> mask, probs, usage = moe(torch.randn(4, 9, 16), torch.tensor([0, 5, 9, 3]), torch.randn(10, 16))
>>> prior = DiffusionPriorLoss(num_timesteps=10, depth=1, num_experts=3, k=2)
>>> loss = prior([probs], [usage], torch.tensor([0, 5, 9, 3]))
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F

from .._validate import ArgumentError, integer, optional_generator, positive, positive_int, real_in

__all__ = ["TimestepGatedMoEMask", "DiffusionPriorLoss", "diffusion_prior_matrix", "match_prior_columns",
           "jensen_shannon"]


def _check_k(k: int, num_experts: int) -> int:
    k = positive_int("k", k)
    if k > num_experts:
        raise ArgumentError(f"k must be <= num_experts ({num_experts}): top-k picks k of the experts, got k={k}")
    return k


def _check_timesteps(t: Tensor, num_timesteps: int) -> Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ArgumentError(f"t must be a 1-d tensor of integer timesteps, got shape {tuple(t.shape)} "
                            f"and dtype {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_timesteps):
        raise ArgumentError(f"t must lie in 0..{num_timesteps - 1}, got values in {int(t.min())}..{int(t.max())}")
    return t.long()


class TimestepGatedMoEMask(nn.Module):
    """Token-wise mask ``m = 1 + sum_{e in topk} g_e (x W_e + b_e)`` with gates chosen by the timestep alone.

    Paper slug: switch-dit. ``forward(x, t, t_emb_all)`` takes tokens ``x`` (B, L, hidden), integer timesteps
    ``t`` (B,) and the timestep embeddings of *all* T timesteps ``t_emb_all`` (T, cond_dim) (the embedder is
    trained, so it is re-run every step, never cached). Returns ``(mask, probs, usage)``: the mask (B, L, hidden),
    the softmax gate probabilities of each sample's timestep ``probs`` (B, E) (differentiable: the prior loss
    reaches the router through them) and the top-k indicators of every timestep ``usage`` (T, E) (no gradient).
    The selected gate values keep the gradient of the denoising loss; the top-k indices do not have one.
    Experts are zero-initialised, so a fresh module returns a mask of ones. Because the gates are the same for
    every token of a sample, the experts are mixed into one (hidden x hidden) matrix per sample before they are
    applied (one batched matmul instead of E).

    >>> moe = TimestepGatedMoEMask(32, num_experts=3, k=2)
    >>> mask, probs, usage = moe(torch.randn(2, 16, 32), torch.tensor([3, 700]), torch.randn(1000, 32))
    >>> bool((mask == 1).all()), usage.sum(1).unique().tolist()
    (True, [2.0])
    """

    def __init__(self, hidden: int, num_experts: int = 3, k: int = 2, *, cond_dim: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.hidden = positive_int("hidden", hidden)
        self.num_experts = positive_int("num_experts", num_experts)
        self.k = _check_k(k, self.num_experts)
        self.cond_dim = self.hidden if cond_dim is None else positive_int("cond_dim", cond_dim)
        fk = {"device": device, "dtype": dtype}
        self.router = nn.Linear(self.cond_dim, self.num_experts, **fk)
        self.expert_weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden, self.hidden, **fk))
        self.expert_bias = nn.Parameter(torch.zeros(self.num_experts, self.hidden, **fk))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, num_experts={self.num_experts}, k={self.k}, cond_dim={self.cond_dim}"

    def route(self, t_emb_all: Tensor) -> tuple[Tensor, Tensor]:
        """``(p_all, usage_all)``: gate probabilities (T, E) and top-k indicators (T, E) of every timestep."""
        if t_emb_all.dim() != 2 or t_emb_all.shape[1] != self.cond_dim:
            raise ArgumentError(f"t_emb_all must have shape (num_timesteps, {self.cond_dim}), got "
                                f"{tuple(t_emb_all.shape)}")
        p_all = torch.softmax(self.router(F.silu(t_emb_all)), dim=-1)
        with torch.no_grad():
            idx = p_all.topk(self.k, dim=-1).indices
            usage = torch.zeros_like(p_all).scatter_(1, idx, 1.0)
        return p_all, usage

    def forward(self, x: Tensor, t: Tensor, t_emb_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise ArgumentError(f"x must have shape (batch, tokens, {self.hidden}), got {tuple(x.shape)}")
        p_all, usage = self.route(t_emb_all)
        t = _check_timesteps(t, p_all.shape[0]).to(x.device)
        if t.shape[0] != x.shape[0]:
            raise ArgumentError(f"t must hold one timestep per sample ({x.shape[0]}), got {t.shape[0]}")
        probs = p_all[t]                                    # (B, E), gradient to the router
        gates = (probs * usage[t]).to(x.dtype)              # top-k values, the rest 0 (not renormalised)
        w = torch.einsum("be,ehd->bhd", gates, self.expert_weight)   # one mixed expert per sample
        b = gates @ self.expert_bias                        # (B, hidden)
        mask = 1 + torch.baddbmm(b.unsqueeze(1), x, w)
        return mask, probs, usage


def diffusion_prior_matrix(num_timesteps: int, depth: int, num_experts: int, k: int, alpha: float = 4.0,
                           *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The prior ``P`` (T, D*E): row t holds ``D*k`` consecutive ones from ``round((t/(T-1))^alpha * (D*E - D*k))``.

    Paper slug: switch-dit. Nearby timesteps share most units, distant ones few; ``start(0) = 0`` and
    ``start(T-1) = D*E - D*k``.

    >>> diffusion_prior_matrix(5, depth=1, num_experts=3, k=2, alpha=1.0).tolist()[-1]
    [0.0, 1.0, 1.0]
    """
    T = integer("num_timesteps", num_timesteps, low=2)
    depth = positive_int("depth", depth)
    E = positive_int("num_experts", num_experts)
    k = _check_k(k, E)
    alpha = positive("alpha", alpha)
    units, filled = depth * E, depth * k
    frac = (np.arange(T, dtype=np.float64) / (T - 1)) ** alpha
    starts = np.round(frac * (units - filled)).astype(np.int64)
    cols = np.arange(units)
    P = (cols[None] >= starts[:, None]) & (cols[None] < starts[:, None] + filled)
    return torch.as_tensor(P, dtype=dtype, device=device)


def match_prior_columns(usage: Tensor, prior: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Hungarian matching of the prior's columns to the usage columns: ``match[j]`` is the prior column for unit j.

    Paper slug: switch-dit. Minimises ``sum_j sum_t |usage[t, j] - prior[t, match[j]]|``; both matrices are
    randomly column-permuted first (ties are broken at random, as in the paper's code). No gradient.
    """
    if usage.dim() != 2 or usage.shape != prior.shape:
        raise ArgumentError(f"usage must be a matrix of the prior's shape {tuple(prior.shape)}, "
                            f"got {tuple(usage.shape)}")
    generator = optional_generator(generator)
    n = usage.shape[1]
    pu = torch.randperm(n, generator=generator)
    pp = torch.randperm(n, generator=generator)
    with torch.no_grad():
        u = usage.detach().double().cpu()[:, pu]
        p = prior.detach().double().cpu()[:, pp]
        cost = torch.cdist(u.T.contiguous(), p.T.contiguous(), p=1)
    rows, cols = linear_sum_assignment(cost.numpy())
    match = torch.empty(n, dtype=torch.long)
    match[pu[torch.as_tensor(rows)]] = pp[torch.as_tensor(cols)]
    return match.to(usage.device)


def jensen_shannon(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Jensen-Shannon divergence of distributions along the last dim: ``0.5 KL(a||M) + 0.5 KL(b||M)``, M = (a+b)/2.

    Paper slug: switch-dit. ``eps`` is added inside the logs; returns one value per row.
    """
    if a.shape != b.shape:
        raise ArgumentError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    m = 0.5 * (a + b)
    log_m = torch.log(m + eps)
    kl_a = (a * (torch.log(a + eps) - log_m)).sum(-1)
    kl_b = (b * (torch.log(b + eps) - log_m)).sum(-1)
    return 0.5 * (kl_a + kl_b)


class DiffusionPriorLoss(nn.Module):
    """Switch-DiT's diffusion prior loss: JSD between the gates' distribution and the matched timestep prior.

    Paper slug: switch-dit. ``forward(probs_list, usage_list, t)`` takes, per block (D of them), the gate
    probabilities of the batch's timesteps (B, E) and the top-k indicators of all timesteps (T, E), and the
    batch's timesteps ``t`` (B,). ``L = mean_b JSD(concat_i probs_i[b] / D, P_matched[t_b] / (D k))`` with the
    prior matrix :func:`diffusion_prior_matrix` and the columns matched by :func:`match_prior_columns`.
    The gradient reaches the routers through ``probs`` only.

    >>> prior = DiffusionPriorLoss(num_timesteps=1000, depth=4, num_experts=3, k=2)
    >>> prior.prior.shape, int(prior.prior.sum(1).unique())
    (torch.Size([1000, 12]), 8)
    """

    def __init__(self, num_timesteps: int, depth: int, num_experts: int = 3, k: int = 2, alpha: float = 4.0,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.num_timesteps = integer("num_timesteps", num_timesteps, low=2)
        self.depth = positive_int("depth", depth)
        self.num_experts = positive_int("num_experts", num_experts)
        self.k = _check_k(k, self.num_experts)
        self.alpha = positive("alpha", alpha)
        self.eps = real_in("eps", eps, 0.0, None, low_open=True)
        self.register_buffer("prior", diffusion_prior_matrix(self.num_timesteps, self.depth, self.num_experts,
                                                             self.k, self.alpha), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_timesteps={self.num_timesteps}, depth={self.depth}, num_experts={self.num_experts}, "
                f"k={self.k}, alpha={self.alpha:g}")

    def forward(self, probs_list: Sequence[Tensor], usage_list: Sequence[Tensor], t: Tensor, *,
                generator: torch.Generator | None = None) -> Tensor:
        D, E, T = self.depth, self.num_experts, self.num_timesteps
        if len(probs_list) != D or len(usage_list) != D:
            raise ArgumentError(f"probs_list and usage_list must hold one entry per block ({D}), got "
                                f"{len(probs_list)} and {len(usage_list)}")
        t = _check_timesteps(t, T)
        for i, (p, u) in enumerate(zip(probs_list, usage_list)):
            if p.shape != (t.shape[0], E):
                raise ArgumentError(f"probs_list[{i}] must have shape ({t.shape[0]}, {E}), got {tuple(p.shape)}")
            if u.shape != (T, E):
                raise ArgumentError(f"usage_list[{i}] must have shape ({T}, {E}), got {tuple(u.shape)}")
        q = torch.cat(list(probs_list), dim=1) / D                   # (B, D*E), sums to 1 per row
        usage = torch.cat([u.detach() for u in usage_list], dim=1)   # (T, D*E)
        match = match_prior_columns(usage, self.prior, generator=generator)
        target = self.prior.to(q.device)[:, match.to(q.device)][t.to(q.device)].to(q.dtype) / (D * self.k)
        return jensen_shannon(q, target, self.eps).mean()
