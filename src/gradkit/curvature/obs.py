"""One-shot Optimal-Brain-Surgeon pruning with the M-FAC inverse Fisher, and the global magnitude baseline
(paper slug: mfac, arXiv 2107.03356).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .._validate import is_int, nonneg_int, positive, positive_int, real_scalar, tensor_list
from .fisher import EmpiricalFisherInverse

__all__ = ["OBSPruner", "magnitude_prune", "obs_prune_step", "sparsity_schedule"]


def _check_sparsity(sparsity: Any) -> float:
    s = real_scalar("sparsity", sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def _prunable(params: Any) -> list[Tensor]:
    ps = tensor_list(params)
    if not ps:
        raise ValueError("params is empty: pruning needs at least one tensor")
    for i, p in enumerate(ps):
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] must be floating-point, got dtype {p.dtype}")
    return ps


def _flat_masks(params: Sequence[Tensor], masks: Sequence[Tensor] | None) -> Tensor:
    if masks is None:
        return torch.cat([torch.ones(p.numel(), dtype=torch.bool, device=p.device) for p in params])
    masks = list(masks)
    if len(masks) != len(params):
        raise ValueError(f"masks must have one tensor per param ({len(params)}), got {len(masks)}")
    for i, (m, p) in enumerate(zip(masks, params)):
        if not isinstance(m, Tensor) or m.shape != p.shape:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"masks[{i}] must be a tensor of shape {tuple(p.shape)}, got {got}")
    return torch.cat([m.reshape(-1).to(device=p.device, dtype=torch.bool) for m, p in zip(masks, params)])


def _split(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    out, off = [], 0
    for p in params:
        out.append(flat[off: off + p.numel()].view_as(p))
        off += p.numel()
    return out


def _n_to_prune(sparsity: float, d: int, mask: Tensor) -> int:
    return max(int(math.floor(sparsity * d + 1e-9)) - int((~mask).sum()), 0)


def sparsity_schedule(start: float, target: float, steps: int) -> list[float]:
    """Geometric schedule ``s_j = 1 - (1 - start) f^j``, ``f = ((1 - target)/(1 - start))^(1/steps)``, j = 1..steps."""
    start, target = _check_sparsity(start), _check_sparsity(target)
    steps = positive_int("steps (nrecomps)", steps)
    f = ((1 - target) / (1 - start)) ** (1.0 / steps)
    return [1 - (1 - start) * f ** j for j in range(1, steps)] + [target]


@torch.no_grad()
def magnitude_prune(params: Any, sparsity: float, masks: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Global magnitude pruning (the baseline): zero the smallest ``|w|`` over all ``params`` in place.

    Paper: mfac (its baseline). Keeps already-pruned weights (``masks`` False) at 0 and prunes more of
    the remaining ones, smallest ``|w|`` first (stable order on ties), until ``floor(sparsity * d)``
    weights are zero. Returns one bool mask per param (True = kept).

    Example::

        lin = torch.nn.Linear(10, 10)
        masks = magnitude_prune([lin.weight], 0.9)
        int(masks[0].sum())                          # 10
    """
    ps = _prunable(params)
    s = _check_sparsity(sparsity)
    mask = _flat_masks(ps, masks).clone()
    w = torch.cat([p.detach().reshape(-1) for p in ps])
    k = _n_to_prune(s, w.numel(), mask)
    score = w.abs().to(torch.float64).masked_fill(~mask, math.inf)
    idx = torch.argsort(score, stable=True)[:k]
    mask[idx] = False
    out = _split(mask, ps)
    for p, m in zip(ps, out):
        p.mul_(m.to(p.dtype))
    return [m.clone() for m in out]


def obs_prune_step(w: Tensor, mask: Tensor, finv: EmpiricalFisherInverse, n_prune: int) -> tuple[Tensor, Tensor]:
    """One OBS step on flat weights: remove the ``n_prune`` unpruned weights of least saliency, correct the rest.

    Paper: mfac (OBS with the M-FAC inverse Fisher)::

        rho_q   = w_q^2 / (2 [F^{-1}]_qq)             Q = argsort(rho)[:n_prune] over unpruned q
        delta_w = F^{-1} ( sum_{q in Q} -(w_q / [F^{-1}]_qq) e_q ),  w <- (w + delta_w) * mask, w_Q = 0

    (the sum of single-weight OBS corrections; interactions between removed weights are ignored).
    Returns new ``(w, mask)``; inputs are not modified.

    Example::

        finv = EmpiricalFisherInverse(torch.randn(8, 20, dtype=torch.float64), damp=1e-3)
        w, mask = obs_prune_step(torch.randn(20), torch.ones(20, dtype=torch.bool), finv, 5)
        int((w == 0).sum())                            # 5
    """
    if w.dim() != 1 or w.shape != mask.shape or w.numel() != finv.d:
        raise ValueError(f"w and mask must be vectors of length d={finv.d}, got {tuple(w.shape)} and "
                         f"{tuple(mask.shape)}")
    n_prune = nonneg_int("n_prune", n_prune)
    avail = int(mask.sum())
    if n_prune > avail:
        raise ValueError(f"n_prune={n_prune} exceeds the {avail} unpruned weights")
    mask = mask.clone()
    if n_prune == 0:
        return w.clone(), mask
    w64 = w.detach().to(device=finv.u.device, dtype=finv.dtype)
    dg = finv.diag()
    rho = (w64 * w64 / (2 * dg)).masked_fill(~mask.to(dg.device), math.inf)
    q = torch.argsort(rho, stable=True)[:n_prune]
    z = torch.zeros_like(w64)
    z[q] = -w64[q] / dg[q]
    w64 = w64 + finv.mul(z)
    mask[q.to(mask.device)] = False
    w64 = w64 * mask.to(w64.device, w64.dtype)
    return w64.to(device=w.device, dtype=w.dtype), mask


class OBSPruner:
    """One-shot OBS pruning of ``params`` with M-FAC's empirical-Fisher inverse (paper slug: mfac).

    For each recomputation: collect ``ngrads`` gradients (one per batch of ``loader``, model in eval
    mode, pruned coordinates masked out), build ``EmpiricalFisherInverse(G, damp, blocksize)`` over all
    ``params`` as one vector, and apply :func:`obs_prune_step` (saliency ``rho_q = w_q^2 / (2 [F^{-1}]_qq)``,
    correction ``delta_w = F^{-1} sum_q -(w_q/[F^{-1}]_qq) e_q``). ``nrecomps > 1`` reaches the target
    along :func:`sparsity_schedule`, recollecting gradients each time. ``loss_fn(model, batch)`` returns a
    scalar loss; ``loader`` is re-iterated if it has fewer than ``ngrads`` batches.

    Example::

        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        loader = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(8)]
        loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        masks, weights = OBSPruner(model, [model[0].weight, model[2].weight], loss, loader, ngrads=8).prune(0.5)
    """

    def __init__(self, model: nn.Module, params: Iterable[Tensor], loss_fn: Callable[[nn.Module, Any], Tensor],
                 loader: Iterable[Any], ngrads: int = 64, damp: float = 1e-5, blocksize: int | None = None,
                 method: str = "static") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.params = _prunable(params)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(model, batch) -> loss, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.loader = loader
        self.ngrads = positive_int("ngrads", ngrads)
        self.damp = positive("damp", damp)
        if blocksize is not None and not is_int(blocksize, low=1):
            raise ValueError(f"blocksize must be a positive int or None, got {blocksize!r}")
        self.blocksize = blocksize
        if method not in ("static", "woodbury"):
            raise ValueError(f"method must be 'static' or 'woodbury', got {method!r}")
        self.method = method

    def collect_grads(self, mask: Tensor | None = None) -> Tensor:
        """``(ngrads, d)`` float64 gradients of ``loss_fn`` over ``loader`` batches (eval mode, masked)."""
        was_training = self.model.training
        self.model.eval()
        rows: list[Tensor] = []
        try:
            while len(rows) < self.ngrads:
                before = len(rows)
                for batch in self.loader:
                    with torch.enable_grad():
                        loss = self.loss_fn(self.model, batch)
                        gs = torch.autograd.grad(loss, self.params, allow_unused=True)
                    rows.append(torch.cat([(torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
                                            if g is None else g.detach().reshape(-1).to(torch.float64))
                                           for g, p in zip(gs, self.params)]))
                    if len(rows) == self.ngrads:
                        break
                if len(rows) == before:
                    raise ValueError("loader yielded no batches")
        finally:
            self.model.train(was_training)
        grads = torch.stack(rows)
        if mask is not None:
            grads = grads * mask.to(grads.device, grads.dtype)
        return grads

    def inverse(self, grads: Tensor, damp: float | None = None) -> EmpiricalFisherInverse:
        """The (blocked) inverse Fisher of collected gradients."""
        return EmpiricalFisherInverse(grads, damp=self.damp if damp is None else damp, blocksize=self.blocksize,
                                      method=self.method)

    @torch.no_grad()
    def prune(self, sparsity: float, masks: Sequence[Tensor] | None = None,
              nrecomps: int = 1) -> tuple[list[Tensor], list[Tensor]]:
        """Prune to ``sparsity`` (fraction of zeros over all params) in ``nrecomps`` OBS steps, in place.

        Returns ``(masks, weights)``: per param, a bool mask (True = kept) and the new weights (clones).
        """
        s = _check_sparsity(sparsity)
        mask = _flat_masks(self.params, masks).clone()
        current = float((~mask).sum()) / mask.numel()
        if s < current:
            raise ValueError(f"sparsity={s} is below the current sparsity {current:.4f} of masks")
        for target in sparsity_schedule(current, s, nrecomps) if s > current else []:
            w = torch.cat([p.detach().reshape(-1) for p in self.params])
            n = _n_to_prune(target, w.numel(), mask)
            finv = self.inverse(self.collect_grads(mask))
            w, mask = obs_prune_step(w, mask, finv, n)
            for p, new in zip(self.params, _split(w, self.params)):
                p.copy_(new)
        for p, m in zip(self.params, _split(mask, self.params)):
            p.mul_(m.to(p.dtype))
        return [m.clone() for m in _split(mask, self.params)], [p.detach().clone() for p in self.params]
