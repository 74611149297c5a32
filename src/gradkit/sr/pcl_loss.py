"""PCL-SR's losses: the embedder's dual contrastive loss, the multi-positive InfoNCE and ``PCLLoss`` (pcl-sr).

Embedder (discriminator) loss on real logits R (HR and its sharpened copies) and fake logits F (the
detached SR output and the negatives), all patch logits flattened::

    L_phi = mean_i -log(e^R_i / (e^R_i + sum_j e^F_j)) + mean_j -log(e^-F_j / (e^-F_j + sum_i e^-R_i))

Generator term, for features f of a layer, sim(a, b) = spatial mean of the channel cosine similarity::

    L_CL = mean_p -log(e^(sim(sr,p)/tau) / (e^(sim(sr,p)/tau) + sum_n e^(sim(sr,n)/tau)))

``PCLLoss`` puts both together: ``loss = pcl(sr, hr, lr)`` first updates the embedder with its own
optimiser on detached tensors, then returns ``weight * L_CL`` whose gradient reaches ``sr`` only (the
embedder's parameters are frozen for that forward). Use it next to the L1 loss::

    phi = WaveletPatchEmbedder(1, widths=(16, 16, 32, 32))
    pcl = PCLLoss(phi, torch.optim.Adam(phi.parameters(), 1e-4), layers=(1, 3), weight=0.5)
    loss = F.l1_loss(sr, hr) + pcl(sr, hr, lr); loss.backward()
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, is_int, nonneg_int, optional_generator, positive, positive_int, tensor
from .degradations import make_contrastive_samples, upscale_factor

__all__ = ["dual_contrastive_loss", "spatial_cosine", "multi_positive_infonce", "PCLLoss"]


def dual_contrastive_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The embedder's two-sided InfoNCE over flattened real and fake logits (pcl-sr; module docstring)."""
    for name, t in (("real_logits", real_logits), ("fake_logits", fake_logits)):
        tensor(name, t, floating=True)
        if t.numel() == 0:
            raise ArgumentError(f"{name} must hold at least one logit, got shape {tuple(t.shape)}")
    r, f = real_logits.reshape(-1), fake_logits.reshape(-1)
    # -log(e^R_i / (e^R_i + S)) = softplus(log S - R_i), with log S a logsumexp
    real_term = F.softplus(torch.logsumexp(f, 0) - r).mean()
    fake_term = F.softplus(torch.logsumexp(-r, 0) + f).mean()
    return real_term + fake_term


def spatial_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample similarity: cosine along dim 1 (channels), averaged over the remaining dims -> (N,)."""
    if a.shape != b.shape or a.dim() < 2:
        raise ArgumentError(f"features must share one shape of at least 2 dims (N, C, ...), got {tuple(a.shape)} "
                            f"and {tuple(b.shape)}")
    return F.cosine_similarity(a, b, dim=1, eps=1e-8).reshape(a.shape[0], -1).mean(dim=1)


def multi_positive_infonce(f_sr: Tensor, f_pos_list: Sequence[Tensor], f_neg_list: Sequence[Tensor],
                           tau: float = 1.0) -> Tensor:
    """InfoNCE of ``f_sr`` against each positive with all negatives, averaged over positives and samples.

    Paper slug: pcl-sr. Features are (N, C, ...) maps; similarities are :func:`spatial_cosine`.
    Equals ``log(1 + len(f_neg_list))`` when every similarity is the same.
    """
    tensor("f_sr", f_sr, floating=True, min_dim=2)
    tau = positive("tau", tau)
    pos, neg = list(f_pos_list), list(f_neg_list)
    if not pos:
        raise ArgumentError("f_pos_list must hold at least one positive, got an empty list")
    s_neg = torch.stack([spatial_cosine(f_sr, n) for n in neg], dim=1) / tau if neg else f_sr.new_zeros(
        f_sr.shape[0], 0)
    losses = []
    for p in pos:
        s_pos = spatial_cosine(f_sr, p).unsqueeze(1) / tau
        logits = torch.cat([s_pos, s_neg], dim=1)
        losses.append(torch.logsumexp(logits, dim=1) - logits[:, 0])
    return torch.stack(losses).mean()


class PCLLoss(nn.Module):
    """The PCL-SR generator term, with the embedder update inside (paper slug: pcl-sr).

    ``pcl(sr, hr, lr)``: builds positives/negatives from ``hr``/``lr`` (:func:`make_contrastive_samples`),
    runs ``d_steps`` embedder updates of :func:`dual_contrastive_loss` on detached tensors (real and fake
    in one BatchNorm batch), then returns ``weight * mean over layers of multi_positive_infonce`` computed
    with the embedder frozen and in eval mode; its gradient flows into ``sr`` only.
    ``block_generator_grad=True`` computes the SR features without gradient (the term then sends no
    gradient to the SR net; a negative control). ``last`` holds the latest losses as floats.
    """

    def __init__(self, embedder: nn.Module, embedder_optimizer: torch.optim.Optimizer | None,
                 layers: Sequence[int] = (-1,), weight: float = 1.0, d_steps: int = 1, n_pos: int = 2,
                 n_neg: int = 2, tau: float = 1.0, sharp_range: tuple[float, float] = (0.5, 3.0),
                 ksizes: Sequence[int] = (3, 5, 7, 9, 11), sigma: tuple[float, float] = (0.1, 2.0),
                 generator: torch.Generator | None = None, block_generator_grad: bool = False) -> None:
        super().__init__()
        if not isinstance(embedder, nn.Module):
            raise ArgumentError(f"embedder must be an nn.Module, got {type(embedder).__name__}")
        if embedder_optimizer is not None and not isinstance(embedder_optimizer, torch.optim.Optimizer):
            raise ArgumentError(f"embedder_optimizer must be a torch.optim.Optimizer or None, got "
                                f"{type(embedder_optimizer).__name__}")
        layers = tuple(layers)
        if not layers or not all(is_int(i) for i in layers):
            raise ArgumentError(f"layers must be a non-empty sequence of feature indices (ints), got {layers!r}")
        self.embedder, self.optimizer, self.layers = embedder, embedder_optimizer, layers
        self.weight = positive("weight", weight)
        self.d_steps = nonneg_int("d_steps", d_steps)
        self.n_pos, self.n_neg = nonneg_int("n_pos", n_pos), positive_int("n_neg", n_neg)
        self.tau = positive("tau", tau)
        self.sharp_range, self.ksizes, self.sigma = sharp_range, tuple(ksizes), sigma
        self.generator = optional_generator(generator)
        self.block_generator_grad = boolean("block_generator_grad", block_generator_grad)
        self.last: dict[str, float] = {}

    def _features(self, x: Tensor) -> list[Tensor]:
        _, feats = self.embedder(x, return_features=True)
        try:
            return [feats[i] for i in self.layers]
        except IndexError:
            raise ArgumentError(f"layers {self.layers!r} out of range for an embedder with {len(feats)} feature "
                                "maps") from None

    def update_embedder(self, sr: Tensor, positives: Sequence[Tensor], negatives: Sequence[Tensor]) -> float:
        """``d_steps`` optimiser steps of the dual contrastive loss on detached tensors; the last loss."""
        if self.optimizer is None or self.d_steps == 0:
            return float("nan")
        real = torch.cat([p.detach() for p in positives])
        fake = torch.cat([sr.detach()] + [n.detach() for n in negatives])
        self.embedder.train()
        value = float("nan")
        for _ in range(self.d_steps):
            logits = self.embedder(torch.cat([real, fake]), return_features=False)
            loss = dual_contrastive_loss(logits[:real.shape[0]], logits[real.shape[0]:])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            value = float(loss.detach())
        return value

    def contrastive_term(self, sr: Tensor, positives: Sequence[Tensor], negatives: Sequence[Tensor]) -> Tensor:
        """``mean over layers of multi_positive_infonce`` with the embedder frozen and in eval mode."""
        emb = self.embedder
        was_training = emb.training
        flags = [(p, p.requires_grad) for p in emb.parameters()]
        try:
            emb.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.no_grad():  # eval-mode BatchNorm: one forward for all samples equals one per sample
                samples = list(positives) + list(negatives)
                chunks = [f.split(sr.shape[0]) for f in self._features(torch.cat(samples))]
                per_sample = [[c[i] for c in chunks] for i in range(len(samples))]
                f_pos, f_neg = per_sample[:len(positives)], per_sample[len(positives):]
            if self.block_generator_grad:
                with torch.no_grad():
                    f_sr = self._features(sr)
            else:
                f_sr = self._features(sr)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            emb.train(was_training)
        terms = [multi_positive_infonce(f_sr[k], [fp[k] for fp in f_pos], [fn[k] for fn in f_neg], self.tau)
                 for k in range(len(self.layers))]
        return torch.stack(terms).mean()

    def forward(self, sr: Tensor, hr: Tensor, lr: Tensor) -> Tensor:
        tensor("sr", sr, floating=True)
        if sr.shape != hr.shape:
            raise ArgumentError(f"sr must have the shape of hr {tuple(hr.shape)}, got {tuple(sr.shape)}")
        upscale_factor(hr, lr)
        pos, neg = make_contrastive_samples(hr, lr, self.n_pos, self.n_neg, self.sharp_range, self.ksizes,
                                            self.sigma, self.generator)
        d_loss = self.update_embedder(sr, pos, neg)
        cl = self.contrastive_term(sr, pos, neg)
        self.last = {"embedder_loss": d_loss, "cl": float(cl.detach())}
        return self.weight * cl

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, weight={self.weight:g}, d_steps={self.d_steps}, n_pos={self.n_pos}, "
                f"n_neg={self.n_neg}, tau={self.tau:g}")
