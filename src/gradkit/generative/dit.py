"""A tiny class-conditional diffusion transformer (DiT, adaLN-Zero) with optional Switch-DiT routing
(paper slug: switch-dit).

Park et al., "Switch Diffusion Transformer" (ECCV 2024, arXiv 2403.09176). With ``routing="switch"`` every
block gets a :class:`~gradkit.nn.switch_moe.TimestepGatedMoEMask` and computes

    r = x * m;  r = r + gate_msa * Attn(mod(LN(r)));  r = r + gate_mlp * MLP(mod(LN(r)));  out = r + (1 - m) * x

i.e. ``out = x + (the attention and MLP increments computed from x * m)``. The mask's experts start at zero,
so a fresh Switch-DiT computes exactly the DiT with the same shared weights. The routers see the timestep
embedding of all T timesteps (the embedder runs on all of them every forward); the class embedding only
conditions the adaLN modulation. :func:`switch_dit_loss` adds the diffusion prior loss to the
epsilon-prediction loss of :class:`~gradkit.generative.diffusion.GaussianDiffusion`.

>>> model = TinyDiT(img_size=8, patch=2, dim=32, depth=2, heads=4, num_classes=10, routing="switch")
>>> eps, routing = model.forward_with_routing(torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]),
...                                           y=torch.tensor([0, 1, 2, 3]))
>>> eps.shape, len(routing.masks)
(torch.Size([4, 1, 8, 8]), 2)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validate import ArgumentError, choice, integer, optional_generator, positive, positive_int, real_in
from ..nn.switch_moe import DiffusionPriorLoss, TimestepGatedMoEMask
from .diffusion import GaussianDiffusion, timestep_embedding

__all__ = ["TinyDiT", "MaskedDiTBlock", "Routing", "switch_dit_loss"]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


@dataclass
class Routing:
    """What the Switch-DiT blocks of one forward produced, one entry per block.

    masks: (B, L, dim) token masks; probs: (B, E) gate probabilities of the batch's timesteps; usage: (T, E)
    top-k indicators of every timestep. Empty lists for a DiT without routing.
    """

    masks: list[Tensor] = field(default_factory=list)
    probs: list[Tensor] = field(default_factory=list)
    usage: list[Tensor] = field(default_factory=list)


class MaskedDiTBlock(nn.Module):
    """adaLN-Zero DiT block whose attention and MLP see ``x * m``: ``out = x + increments(x * m)``.

    Paper slug: switch-dit. ``moe=None`` is the plain DiT block (m = 1). ``forward(x, c, t=None, t_emb_all=None)``
    returns ``(out, (mask, probs, usage))`` (the tuple is ``None`` without a mask).

    >>> blk = MaskedDiTBlock(32, heads=4, moe=TimestepGatedMoEMask(32))
    >>> out, (m, p, u) = blk(torch.randn(2, 16, 32), torch.randn(2, 32), torch.tensor([1, 2]), torch.randn(10, 32))
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, moe: TimestepGatedMoEMask | None = None) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        if self.dim % self.heads:
            raise ArgumentError(f"dim must be divisible by heads ({self.heads}), got dim={self.dim}")
        hidden = int(self.dim * positive("mlp_ratio", mlp_ratio))
        if moe is not None and (not isinstance(moe, TimestepGatedMoEMask) or moe.hidden != self.dim):
            raise ArgumentError(f"moe must be a TimestepGatedMoEMask of hidden size {self.dim}, got {moe!r}")
        self.norm1 = nn.LayerNorm(self.dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(self.dim, 3 * self.dim)
        self.proj = nn.Linear(self.dim, self.dim)
        self.norm2 = nn.LayerNorm(self.dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, self.dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(self.dim, 6 * self.dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)
        self.moe = moe

    def attention(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, self.dim))

    def forward(self, x: Tensor, c: Tensor, t: Tensor | None = None, t_emb_all: Tensor | None = None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        routed = None
        r = x
        if self.moe is not None:
            if t is None or t_emb_all is None:
                raise ArgumentError("t and t_emb_all are required by a block with a mask (moe is set), got None")
            mask, probs, usage = self.moe(x, t, t_emb_all)
            routed = (mask, probs, usage)
            r = x * mask
        r = r + gate1.unsqueeze(1) * self.attention(_modulate(self.norm1(r), shift1, scale1))
        r = r + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(r), shift2, scale2))
        if routed is not None:
            r = r + (1 - routed[0]) * x
        return r, routed


class TinyDiT(nn.Module):
    """A small DiT for images: patchify, fixed 2-D sin-cos positions, adaLN-Zero blocks, linear unpatchify.

    Paper slug: switch-dit. ``routing=None`` is the DiT, ``"switch"`` Switch-DiT (a timestep-gated MoE mask
    in every block). ``forward(x_t, t, y=None)`` returns the predicted noise (x_t's shape), so the model plugs
    into :class:`~gradkit.generative.diffusion.GaussianDiffusion`; ``forward_with_routing`` also returns
    the :class:`Routing` for the prior loss. ``num_classes=None`` is unconditional.

    >>> model = TinyDiT(img_size=8, patch=2, dim=32, depth=4, heads=4, num_classes=10)
    >>> model(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), y=torch.tensor([4, 5, 6])).shape
    torch.Size([3, 1, 8, 8])
    """

    def __init__(self, img_size: int = 8, patch: int = 2, dim: int = 32, depth: int = 4, heads: int = 4,
                 num_classes: int | None = 10, *, in_channels: int = 1, mlp_ratio: float = 4.0,
                 num_timesteps: int = 1000, routing: str | None = None, num_experts: int = 3, k: int = 2,
                 freq_dim: int = 64) -> None:
        super().__init__()
        self.img_size = positive_int("img_size", img_size)
        self.patch = positive_int("patch", patch)
        if self.img_size % self.patch:
            raise ArgumentError(f"img_size must be divisible by patch ({self.patch}), got img_size={self.img_size}")
        self.dim = positive_int("dim", dim)
        if self.dim % 4:
            raise ArgumentError(f"dim must be divisible by 4 (2-D sin-cos positions), got {self.dim}")
        self.depth = positive_int("depth", depth)
        self.in_channels = positive_int("in_channels", in_channels)
        self.num_classes = None if num_classes is None else positive_int("num_classes", num_classes)
        self.num_timesteps = integer("num_timesteps", num_timesteps, low=2)
        self.routing = choice("routing", routing, (None, "switch"))
        self.freq_dim = positive_int("freq_dim", freq_dim)
        self.patch_embed = nn.Conv2d(self.in_channels, self.dim, self.patch, stride=self.patch)
        grid = self.img_size // self.patch
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        pos = torch.cat([timestep_embedding(rows.reshape(-1), self.dim // 2),
                         timestep_embedding(cols.reshape(-1), self.dim // 2)], dim=1)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(self.freq_dim, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))
        self.y_embed = nn.Embedding(self.num_classes, self.dim) if self.num_classes is not None else None
        self.blocks = nn.ModuleList(
            MaskedDiTBlock(self.dim, heads, mlp_ratio,
                           TimestepGatedMoEMask(self.dim, num_experts, k) if self.routing == "switch" else None)
            for _ in range(self.depth))
        self.final_norm = nn.LayerNorm(self.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(self.dim, 2 * self.dim))
        self.final = nn.Linear(self.dim, self.patch * self.patch * self.in_channels)
        for lin in (self.final_ada[1], self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def extra_repr(self) -> str:
        return (f"img_size={self.img_size}, patch={self.patch}, dim={self.dim}, depth={self.depth}, "
                f"num_classes={self.num_classes}, routing={self.routing!r}")

    def embed_timesteps(self, t: Tensor) -> Tensor:
        """The trained timestep embedding ``MLP(sinusoid(t))`` (len(t), dim)."""
        return self.t_embed(timestep_embedding(t, self.freq_dim).to(self.pos_embed.device, self.pos_embed.dtype))

    def forward_with_routing(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, Routing]:
        C, S, P = self.in_channels, self.img_size, self.patch
        if x.dim() != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ArgumentError(f"x must have shape (batch, {C}, {S}, {S}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() != 1 or t.shape[0] != x.shape[0] or t.is_floating_point():
            raise ArgumentError(f"t must hold one integer timestep per sample ({x.shape[0]}), got shape "
                                f"{tuple(t.shape)} and dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ArgumentError(f"t must lie in 0..{self.num_timesteps - 1}, got {int(t.min())}..{int(t.max())}")
        t = t.long()
        if self.routing == "switch":
            t_all = self.embed_timesteps(torch.arange(self.num_timesteps, device=x.device))
            c = t_all[t]
        else:
            t_all, c = None, self.embed_timesteps(t)
        if self.y_embed is not None:
            if y is None:
                raise ArgumentError(f"y (class labels in 0..{self.num_classes - 1}) is required, got None")
            y = torch.as_tensor(y, device=x.device)
            if y.shape != (x.shape[0],) or y.is_floating_point() or (y.numel() and
                                                                       (int(y.min()) < 0 or int(y.max()) >= self.num_classes)):
                raise ArgumentError(f"y must hold one class label in 0..{self.num_classes - 1} per sample, got "
                                    f"shape {tuple(y.shape)} with values {y.tolist()[:8]}")
            c = c + self.y_embed(y.long())
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        routing = Routing()
        for blk in self.blocks:
            h, routed = blk(h, c, t, t_all)
            if routed is not None:
                routing.masks.append(routed[0])
                routing.probs.append(routed[1])
                routing.usage.append(routed[2])
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = self.final(_modulate(self.final_norm(h), shift, scale))      # (B, L, P*P*C)
        g = S // P
        out = h.view(-1, g, g, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(-1, C, S, S)
        return out, routing

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.forward_with_routing(x, t, y)[0]


def switch_dit_loss(model: TinyDiT, diffusion: GaussianDiffusion, x0: Tensor, *, y: Tensor | None = None,
                    prior: DiffusionPriorLoss | None = None, w_prior: float = 1.0, t: Tensor | None = None,
                    noise: Tensor | None = None, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, diffusion_loss, prior_loss)`` with ``total = diffusion_loss + w_prior * prior_loss``.

    Paper slug: switch-dit. ``diffusion_loss`` is the epsilon-prediction MSE at random (or given) ``t``;
    ``prior_loss`` is the :class:`~gradkit.nn.switch_moe.DiffusionPriorLoss` of the same forward (0 for a
    model without routing or when ``prior`` is None). The prior's column permutations use ``generator``.
    """
    if not isinstance(model, TinyDiT):
        raise ArgumentError(f"model must be a TinyDiT, got {type(model).__name__}")
    w_prior = real_in("w_prior", w_prior, 0.0, None)
    generator = optional_generator(generator)
    if t is None:
        t = diffusion.schedule.sample_timesteps(x0.shape[0], device=x0.device, generator=generator)
    seen: list[Routing] = []

    def net(x_t: Tensor, tt: Tensor) -> Tensor:
        eps, routing = model.forward_with_routing(x_t, tt, y)
        seen.append(routing)
        return eps

    diff = diffusion.loss(net, x0, t=t, noise=noise, generator=generator)
    routing = seen[-1]
    if prior is None or not routing.probs:
        return diff, diff, diff.new_zeros(())
    pl = prior(routing.probs, routing.usage, t, generator=generator)
    return diff + w_prior * pl, diff, pl
