"""GIFD: gradient inversion over a generator's feature domains, built on the generic attacker.

Paper slug: ``gifd`` (Fang et al., "GIFD: A Generative Gradient Inversion Method with Feature Domain
Optimization", ICCV 2023, arXiv 2308.04699). The generator is cut into stages, G = g_L o ... o g_1
(:class:`~gradkit.generative.LayeredGenerator`). GIFD first searches the latent z (stage 0, the core's
:class:`~gradkit.privacy.LatentSpace`, spherical), then, stage by stage, the intermediate feature
h_k (:class:`FeatureSpace`), started from the previous stage's best solution pushed one block further,
h_k^init = g_k o ... o g_{j+1}(h_j^best), and kept in an l1 ball around it:

    x = g_L o ... o g_{k+1}(h_k),   min_h  1 - cos(grad_w CE(F(x), y), G*) + tv TV(x) + image_norm ||x|| / numel
    after every step:  h_k <- h_k^init + Proj_{||.||_1 <= r_k}(h_k - h_k^init)      (per sample, Duchi et al.)
    r_k = rho_k * ||h_k^init||_1                                                   (relative radius, per sample)

Each restart runs the whole chain of stages; per stage the restart with the lowest gradient loss is kept,
and the output is the stage with the lowest gradient loss (no access to the ground truth). Every stage is
one :meth:`GradientInversion.run` with the frozen ``"gifd"`` preset; the latent-only baseline
(GGL/GIAS-style gradient search) is the same attacker on a ``LatentSpace`` with the ``"latent"`` preset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .._validate import is_int, positive_int, real_scalar
from ..generative.layered import LayeredGenerator
from .inversion import (PRESETS, GradientInversion, InversionPreset, InversionResult, LatentSpace, SearchSpace,
                        register_preset)

__all__ = ["project_l1_ball", "feature_radius", "FeatureSpace", "GIFD", "GIFDResult", "GIFD_PRESET",
           "LATENT_PRESET"]

# GIFD's official settings (configs_biggan.yml / configs_stylegan2.yml): cosine over all layers ('sim_cmpr0'),
# tv 1e-4, image_norm 1e-6, Adam lr 0.1 with warm-up + cosine decay, plain (unsigned) gradients, 1000 steps
# per stage, best iterate kept.
GIFD_PRESET = register_preset(InversionPreset(
    name="gifd", cost="cosine", tv=1e-4, image_norm=1e-6, lr=0.1, iters=1000, signed=False, keep_best=True,
    model_mode="eval", schedule="cosine_warmup"))
# Latent-only generative search (GGL / GIAS's latent stage, gradient-based): the same loss and optimiser on z.
LATENT_PRESET = register_preset(dataclasses.replace(GIFD_PRESET, name="latent"))


def _radius_tensor(radius, n: int, like: Tensor) -> Tensor:
    if isinstance(radius, Tensor):
        r = radius.detach().to(device=like.device, dtype=like.dtype).flatten()
        if r.numel() == 1:
            r = r.expand(n)
        if r.numel() != n:
            raise ValueError(f"radius must be a scalar or hold one value per sample ({n}), got {r.numel()} values")
        if not torch.isfinite(r).all() or (r < 0).any():
            raise ValueError(f"radius must be finite and >= 0, got {r.tolist()}")
        return r
    return torch.full((n,), real_scalar("radius", radius, nonneg=True), device=like.device, dtype=like.dtype)


def project_l1_ball(delta: Tensor, radius: float | Tensor) -> Tensor:
    """Euclidean projection of each sample of ``delta`` (N, ...) onto the l1 ball of radius ``radius``.

    Paper slug: gifd. Sort-based simplex projection (Duchi et al. 2008), per sample on the flattened deviation:
    u = sort(|v|, descending), rho = max{j : u_j > (sum_{i<=j} u_i - r) / j}, theta = (sum_{i<=rho} u_i - r) / rho,
    P(v) = sign(v) * max(|v| - theta, 0); v itself when ||v||_1 <= r. ``radius``: a scalar or one per sample.

    >>> d = torch.randn(4, 3, 5, 5)
    >>> p = project_l1_ball(d, 2.0)
    >>> p.flatten(1).abs().sum(1)           # every entry <= 2
    """
    if not isinstance(delta, Tensor) or delta.dim() < 1 or not delta.is_floating_point():
        raise ValueError(f"delta must be a floating tensor of shape (N, ...), got "
                         f"{getattr(delta, 'shape', type(delta).__name__)}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta holds non-finite values")
    n = delta.shape[0]
    r = _radius_tensor(radius, n, delta)
    v = delta.reshape(n, -1)
    a = v.abs()
    if v.shape[1] == 0:
        return delta.clone()
    u, _ = torch.sort(a, dim=1, descending=True)
    css = torch.cumsum(u, dim=1)
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = u * j > css - r[:, None]
    rho = cond.sum(dim=1).clamp_min(1)                      # the condition holds on a prefix
    theta = (css.gather(1, (rho - 1)[:, None]).squeeze(1) - r) / rho.to(v.dtype)
    w = torch.sign(v) * (a - theta.clamp_min(0)[:, None]).clamp_min(0)
    inside = (a.sum(dim=1) <= r)[:, None]
    return torch.where(inside, v, w).reshape(delta.shape)


def feature_radius(h_init: Tensor, rho: float) -> Tensor:
    """Per-sample l1 radius r = rho * ||h_init||_1 = rho * numel(h) * mean|h| (gifd's rescaling for small generators).

    Paper slug: gifd. The official radii (1000 ... 8000) are absolute values for BigGAN/StyleGAN2 feature sizes.

    >>> r = feature_radius(torch.randn(2, 32, 4, 4), rho=0.2)    # shape (2,)
    """
    if not isinstance(h_init, Tensor) or h_init.dim() < 1:
        raise ValueError(f"h_init must be a tensor of shape (N, ...), got {getattr(h_init, 'shape', type(h_init).__name__)}")
    rho = real_scalar("rho", rho, nonneg=True)
    return rho * h_init.detach().reshape(h_init.shape[0], -1).abs().sum(dim=1)


class FeatureSpace(SearchSpace):
    """Search stage ``k``'s feature h_k of a :class:`LayeredGenerator` inside an l1 ball around ``h_init``.

    Paper slug: gifd. x = generator.forward_from(k, h); after every step h <- h_init + Proj_{l1 <= r}(h - h_init).
    Give ``radius`` (absolute; scalar or per sample) or ``rho`` (relative: r = rho * ||h_init||_1 per sample).

    >>> h0 = gen.forward_to(2, torch.randn(1, 16))
    >>> space = FeatureSpace(gen, 2, h0, rho=0.2)
    >>> result = GradientInversion(model, "gifd").run(shared_grads, labels, space)
    """

    def __init__(self, generator: LayeredGenerator, stage: int, h_init: Tensor, *, radius: float | Tensor | None = None,
                 rho: float | None = None, clamp: tuple[float, float] | None = (0.0, 1.0)) -> None:
        if not isinstance(generator, LayeredGenerator):
            raise TypeError(f"generator must be a LayeredGenerator, got {type(generator).__name__}")
        L = generator.num_blocks
        if not is_int(stage, low=1, high=L - 1):
            raise ValueError(f"stage must be an int in [1, {L - 1}] (0 is the latent: use LatentSpace; {L} is the "
                             f"image: use PixelSpace), got {stage!r}")
        if not isinstance(h_init, Tensor) or not h_init.is_floating_point() or h_init.dim() < 2:
            raise ValueError(f"h_init must be a floating tensor of shape (N, ...), got "
                             f"{getattr(h_init, 'shape', type(h_init).__name__)}")
        expected = generator.stage_shapes()[stage]
        if tuple(h_init.shape[1:]) != expected:
            raise ValueError(f"h_init must have per-sample shape {expected} (stage {stage}), got {tuple(h_init.shape[1:])}")
        if not torch.isfinite(h_init).all():
            raise ValueError("h_init holds non-finite values")
        if (radius is None) == (rho is None):
            raise ValueError(f"give exactly one of radius and rho, got radius={radius!r}, rho={rho!r}")
        if clamp is not None:
            lo, hi = real_scalar("clamp[0]", clamp[0]), real_scalar("clamp[1]", clamp[1])
            if not lo < hi:
                raise ValueError(f"clamp must be (lo, hi) with lo < hi, got {clamp!r}")
            clamp = (lo, hi)
        self.generator = generator
        self.stage = stage
        self.clamp = clamp
        self.h_init = h_init.detach().clone()
        self.radius = (feature_radius(self.h_init, rho) if rho is not None
                       else _radius_tensor(radius, h_init.shape[0], self.h_init))
        self.h = self.h_init.clone().requires_grad_(True)

    def parameters(self) -> list[Tensor]:
        return [self.h]

    def render(self) -> Tensor:
        x = self.generator.forward_from(self.stage, self.h)
        return x.clamp(*self.clamp) if self.clamp is not None else x

    def project(self) -> None:
        self.h.copy_(self.h_init + project_l1_ball(self.h - self.h_init, self.radius))

    def deviation(self, h: Tensor | None = None) -> Tensor:
        """Per-sample ||h - h_init||_1 (of the current h, or of a snapshot's)."""
        h = self.h if h is None else h
        return (h.detach() - self.h_init).reshape(h.shape[0], -1).abs().sum(dim=1)

    def snapshot(self) -> dict[str, Tensor]:
        return {"h": self.h.detach().clone()}


@dataclass
class GIFDResult:
    """Outcome of :meth:`GIFD.run`.

    x: the selected stage's reconstruction; stage: its index; match_loss: its gradient loss.
    stages / stage_losses / stage_images / stage_results: per searched stage, the best restart's loss, image
    and :class:`InversionResult`. l1_ratio: per stage, max over samples of ||h_k - h_k^init||_1 / r_k at the
    kept iterate (0 for the latent stage). restart_losses[r][i]: restart r's loss at stage i. history: the
    matching loss per iteration of the best final restart, stages concatenated.
    """

    x: Tensor
    stage: int
    match_loss: float
    stages: list[int]
    stage_losses: list[float]
    stage_images: list[Tensor]
    stage_results: list[InversionResult]
    l1_ratio: list[float]
    restart_losses: list[list[float]] = field(default_factory=list)
    history: list[float] = field(default_factory=list)


def _int_tuple(name: str, values) -> tuple[int, ...]:
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}") from None
    if not out or not all(is_int(v) for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {values!r}")
    return out


class GIFD:
    """Gradient inversion over feature domains: latent search, then progressively deeper l1-bounded features.

    Paper slug: gifd. For each restart: z ~ N(0, I); stage 0 searches z (spherical); stage k > 0 searches h_k from
    h_k^init = forward_between(previous stage, k, best h) within ||h_k - h_k^init||_1 <= rho_k ||h_k^init||_1.
    Per stage keep the restart with the lowest gradient loss; return the stage with the lowest loss.

    >>> attack = GIFD(model, small_generator(16, 8).eval(), steps_per_stage=100)
    >>> res = attack.run(shared_grads, labels, generator=torch.Generator().manual_seed(0))
    >>> res.x.shape, res.stage, res.stage_losses
    """

    def __init__(self, model: nn.Module, generator: LayeredGenerator, preset: str | InversionPreset = "gifd",
                 stages: Sequence[int] | None = None, steps_per_stage: int | None = None,
                 rho: float | Sequence[float] | None = None, restarts: int = 1, spherical: bool = True,
                 loss_fn: Callable | None = None, params: Sequence[Tensor] | None = None) -> None:
        if not isinstance(generator, LayeredGenerator):
            raise TypeError(f"generator must be a LayeredGenerator, got {type(generator).__name__}")
        L = generator.num_blocks
        stages = tuple(range(L)) if stages is None else _int_tuple("stages", stages)
        if stages[0] != 0 or any(b <= a for a, b in zip(stages, stages[1:])) or stages[-1] > L - 1:
            raise ValueError(f"stages must increase strictly from 0 (the latent) and stay <= {L - 1} (the last "
                             f"feature before the image), got {stages}")
        n_feat = len(stages) - 1
        if rho is None:
            rho = tuple(0.1 + 0.3 * i / max(n_feat - 1, 1) for i in range(n_feat))  # 0.1 .. 0.4, growing with depth
        elif isinstance(rho, (int, float)) and not isinstance(rho, bool):
            rho = (real_scalar("rho", rho, nonneg=True),) * n_feat
        else:
            rho = tuple(rho)
            if len(rho) != n_feat:
                raise ValueError(f"rho must hold one value per feature stage ({n_feat}: stages {stages[1:]}), "
                                 f"got {len(rho)}")
            rho = tuple(real_scalar(f"rho[{i}]", r, nonneg=True) for i, r in enumerate(rho))
        restarts = positive_int("restarts", restarts)
        base = PRESETS.get(preset) if isinstance(preset, str) else preset
        if not isinstance(base, InversionPreset):
            raise TypeError(f"preset must be an InversionPreset or a registered name, got {type(preset).__name__}")
        if steps_per_stage is not None:
            steps_per_stage = positive_int("steps_per_stage", steps_per_stage)
            base = dataclasses.replace(base, iters=steps_per_stage)
        self.generator = generator
        self.stages = stages
        self.rho = rho
        self.restarts = restarts
        self.spherical = bool(spherical)
        self.preset = base
        self.attack = GradientInversion(model, base, loss_fn=loss_fn, params=params)

    def _chain(self, target: Sequence[Tensor], labels: Tensor, z0: Tensor, progress) -> list[tuple]:
        """One restart: [(InversionResult, l1 ratio), ...] per stage."""
        out = []
        gen = self.generator
        space = LatentSpace(gen, z0, spherical=self.spherical)
        res = self.attack.run(target, labels, space, progress=progress)
        out.append((res, 0.0))
        prev_stage, h_prev = 0, res.snapshots["space"]["z"]
        for i, k in enumerate(self.stages[1:]):
            with torch.no_grad():
                h_init = gen.forward_between(prev_stage, k, h_prev)
            space = FeatureSpace(gen, k, h_init, rho=self.rho[i])
            res = self.attack.run(target, labels, space, progress=progress)
            h_best = res.snapshots["space"]["h"]
            ratio = float((space.deviation(h_best) / space.radius.clamp_min(1e-30)).max())
            out.append((res, ratio))
            prev_stage, h_prev = k, h_best
        return out

    def run(self, target_grads: Sequence[Tensor], labels: Tensor, z0: Tensor | None = None,
            generator: torch.Generator | None = None,
            progress: Callable[[int, float], None] | None = None) -> GIFDResult:
        """Reconstruct the batch behind ``target_grads`` (one tensor per victim parameter) with class ``labels``.

        z0: the starting latents (restarts, N, latent_dim) or (N, latent_dim) for one restart; default
        N(0, I) drawn with ``generator`` (a CPU torch.Generator).
        """
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.numel() < 1:
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, got "
                             f"{getattr(labels, 'shape', type(labels).__name__)}")
        n = labels.numel()
        p = next(self.generator.parameters(), None)
        dev = p.device if p is not None else labels.device
        dtype = p.dtype if p is not None else torch.get_default_dtype()
        if self.generator.training:
            raise ValueError("generator must be in eval mode (BatchNorm must use running statistics during "
                             "inversion): call generator.eval()")
        if z0 is None:
            z0 = torch.randn(self.restarts, n, self.generator.latent_dim, generator=generator).to(dev, dtype)
        else:
            if not isinstance(z0, Tensor) or not z0.is_floating_point():
                raise ValueError(f"z0 must be a floating tensor, got {type(z0).__name__}")
            if z0.dim() == 2:
                z0 = z0.unsqueeze(0)
            if tuple(z0.shape) != (self.restarts, n, self.generator.latent_dim):
                raise ValueError(f"z0 must have shape ({self.restarts}, {n}, {self.generator.latent_dim}) "
                                 f"(restarts, batch, latent_dim), got {tuple(z0.shape)}")
            z0 = z0.to(dev, dtype)
        chains = [self._chain(target_grads, labels, z0[r], progress) for r in range(self.restarts)]
        restart_losses = [[res.match_loss for res, _ in ch] for ch in chains]
        per_stage = []
        for i in range(len(self.stages)):
            r_best = min(range(self.restarts), key=lambda r: restart_losses[r][i])
            per_stage.append(chains[r_best][i])
        losses = [res.match_loss for res, _ in per_stage]
        best = min(range(len(losses)), key=lambda i: (losses[i] if math.isfinite(losses[i]) else math.inf, i))
        r_final = min(range(self.restarts), key=lambda r: restart_losses[r][-1])
        history = [v for res, _ in chains[r_final] for v in res.history]
        return GIFDResult(
            x=per_stage[best][0].x, stage=self.stages[best], match_loss=losses[best], stages=list(self.stages),
            stage_losses=losses, stage_images=[res.x for res, _ in per_stage],
            stage_results=[res for res, _ in per_stage], l1_ratio=[ratio for _, ratio in per_stage],
            restart_losses=restart_losses, history=history)
