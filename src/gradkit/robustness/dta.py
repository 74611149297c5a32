"""Differentiable Transformation Attack (DTA): a learned differentiable surrogate of a non-differentiable
renderer, and the expectation-over-scenes texture attack through it (dta).

A renderer R(eta, s) that draws a texture tile eta into a scene s offers no gradient in eta. DTA learns a
Differentiable Transformation Network (DTN) that predicts the re-rendering from a reference rendering
x_ref(s) = R(eta_ref, s) and the texture laid out in image space (the "expanded" texture):

    eta_exp(s)   = m(s) * eta[index(s)]                                    (expand_texture)
    x_hat(s,eta) = m * T(x_ref, eta_exp) + (1 - m) * x_ref                 (DTN, exact outside the mask)
    T            = a(x_ref) * eta_exp + c(x_ref) + r(x_ref, eta_exp)        gain, offset, residual
    train:  min_phi  E_{s, eta} || x_hat(s, eta) - R(eta, s) ||_1             over renderer pairs
    attack: min_eta  E_{s ~ scenes} L(victim(x_hat(s, eta)))   eta in [0, 1]  (EOT over scenes, Adam)

The optimised tile is then judged by the real renderer, never by the surrogate.

>>> dtn = DifferentiableTransformationNetwork()
>>> x_hat = dtn(x_ref, expand_texture(tile, index, mask), mask)       # (N, 3, H, W)
>>> result = eot_texture_attack(dtn, victim, TexturePool(x_ref, index, mask), steps=150, lr=0.05)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import ArgumentError, choice, nonneg_int, optional_generator, positive, positive_int, real_scalar
from ..data.dta_scenes import SceneBatch
from .toy_renderer import ToyRenderer, check_tile

RANGE = (0.0, 1.0)
Surrogate = Callable[[Tensor, Tensor, Tensor], Tensor]


def _check_images(name: str, x: Tensor, channels: int | None = 3) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ArgumentError(f"{name} must be a floating tensor shaped (N, C, H, W), got {got}")
    if channels is not None and x.shape[1] != channels:
        raise ArgumentError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= RANGE[0] and hi <= RANGE[1]):
            raise ArgumentError(f"{name} values must be in [0, 1], got range [{lo:g}, {hi:g}]")
    return x


def expand_texture(tile: Tensor, index: Tensor, mask: Tensor) -> Tensor:
    """Lay a k x k texture tile out in image space: eta_exp = mask * tile[:, index] (dta).

    tile: (3, k, k) or (N, 3, k, k) in [0, 1]; index: (N, H, W) int64 tile-cell index per pixel
    (row * k + col, from :meth:`ToyRenderer.geometry`); mask: (N, 1, H, W) in {0, 1}. A gather, so the
    gradient w.r.t. the tile sums the masked pixels that show each cell.

    >>> expand_texture(torch.rand(3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 1, 8, 8)).shape
    torch.Size([2, 3, 8, 8])
    """
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.dim() != 3:
        raise ArgumentError(f"index must be an int64 tensor shaped (N, H, W), got "
                            f"{tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__}")
    n, h, w = index.shape
    if not isinstance(tile, Tensor) or not tile.is_floating_point():
        raise ArgumentError(f"tile must be a floating tensor, got {type(tile).__name__}")
    k = tile.shape[-1]
    check_tile(tile.detach(), k, batch=n)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (n, 1, h, w):
        raise ArgumentError(f"mask must be a tensor shaped {(n, 1, h, w)}, got "
                            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= k * k):
        raise ArgumentError(f"index values must be tile cells in [0, {k * k}), got range "
                            f"[{int(index.min())}, {int(index.max())}]")
    flat = tile.reshape(-1, 3, k * k).expand(n, 3, k * k)
    out = flat.gather(2, index.reshape(n, 1, h * w).expand(n, 3, h * w)).reshape(n, 3, h, w)
    return out * mask.to(out.dtype)


def naive_paste(x_ref: Tensor, eta_exp: Tensor, mask: Tensor) -> Tensor:
    """The differentiable baseline without scene effects: x = m * eta_exp + (1 - m) * x_ref (dta).

    Stands in for a neural renderer that pastes the texture flat, missing lighting, highlights and the
    camera's colour cast.

    >>> naive_paste(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.ones(1, 1, 4, 4)).mean().item()
    1.0
    """
    return mask * eta_exp + (1.0 - mask) * x_ref


def _block(c_in: int, c_out: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation), nn.ReLU())


class DifferentiableTransformationNetwork(nn.Module):
    """DTN: predicts the renderer's output for a new texture from a reference render (dta).

    x_hat = m * clamp(a * eta_exp + c + r, 0, 1) + (1 - m) * x_ref, with a = softplus(.) (per-pixel
    gain: shading, colour cast) and c = x_ref + (.) (per-pixel offset: highlight, noise, minus the
    reference texture's share) predicted from [x_ref, m] by a dilated CNN, and r a small residual CNN on
    [x_ref, eta_exp] (``residual=False`` drops it; its last layer starts at zero). Outside the mask the
    output is x_ref exactly, so gradients reach the texture only through masked pixels.

    >>> dtn = DifferentiableTransformationNetwork(hidden=16)
    >>> dtn(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.ones(2, 1, 32, 32)).shape
    torch.Size([2, 3, 32, 32])
    """

    def __init__(self, hidden: int = 32, dilations: tuple[int, ...] = (1, 2, 4, 1), residual: bool = True,
                 check_inputs: bool = True) -> None:
        super().__init__()
        self.hidden = positive_int("hidden", hidden)
        if not dilations or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ArgumentError(f"dilations must be a non-empty tuple of ints >= 1, got {dilations!r}")
        self.check_inputs = bool(check_inputs)
        layers, c = [], 4
        for d in dilations:
            layers.append(_block(c, hidden, d))
            c = hidden
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Conv2d(hidden, 6, 1)
        self.residual = nn.Sequential(_block(6, hidden, 1), nn.Conv2d(hidden, 3, 3, padding=1)) if residual else None
        if self.residual is not None:
            nn.init.zeros_(self.residual[-1].weight)
            nn.init.zeros_(self.residual[-1].bias)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, residual={self.residual is not None}"

    def gain_offset(self, x_ref: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The per-pixel gain a (N, 3, H, W) > 0 and offset c predicted from the reference render."""
        out = self.head(self.trunk(torch.cat([x_ref, mask.to(x_ref.dtype)], 1)))
        return F.softplus(out[:, :3]), x_ref + out[:, 3:]

    def forward(self, x_ref: Tensor, eta_exp: Tensor, mask: Tensor) -> Tensor:
        if self.check_inputs:
            _check_images("x_ref", x_ref)
            if tuple(eta_exp.shape) != tuple(x_ref.shape):
                raise ArgumentError(f"eta_exp must have x_ref's shape {tuple(x_ref.shape)}, got {tuple(eta_exp.shape)}")
            if tuple(mask.shape) != (x_ref.shape[0], 1, *x_ref.shape[2:]):
                raise ArgumentError(f"mask must be shaped {(x_ref.shape[0], 1, *x_ref.shape[2:])}, got "
                                    f"{tuple(mask.shape)}")
        a, c = self.gain_offset(x_ref, mask)
        t = a * eta_exp + c
        if self.residual is not None:
            t = t + self.residual(torch.cat([x_ref, eta_exp], 1))
        m = mask.to(x_ref.dtype)
        return m * t.clamp(*RANGE) + (1.0 - m) * x_ref


@dataclass(frozen=True)
class DTNPairs:
    """Renderer pairs for DTN training: x_ref (N, 3, H, W) rendered with the reference tile, eta_exp the
    new tiles expanded, mask (N, 1, H, W), x_eta (N, 3, H, W) rendered with the new tiles, index (N, H, W)."""

    x_ref: Tensor
    eta_exp: Tensor
    mask: Tensor
    x_eta: Tensor
    index: Tensor

    def __len__(self) -> int:
        return int(self.x_ref.shape[0])


def random_tiles(n: int, tile_size: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` "natural" random tiles (n, 3, k, k): every cell a uniform random colour in [0, 1]^3 (dta)."""
    return torch.rand((positive_int("n", n), 3, tile_size, tile_size), generator=optional_generator(generator))


def make_dtn_pairs(renderer: ToyRenderer, scenes: SceneBatch, reference_tile, tiles: Tensor,
                   device: torch.device | str = "cpu") -> DTNPairs:
    """Render each scene twice, with the reference tile and with its own tile from ``tiles`` (N, 3, k, k).

    >>> pairs = make_dtn_pairs(ToyRenderer(4), sample_scenes(8), torch.full((3, 4, 4), 0.5), torch.rand(8, 3, 4, 4))
    """
    k = renderer.tile_size
    check_tile(tiles, k, name="tiles", batch=len(scenes))
    x_ref, mask = renderer.render(reference_tile, scenes)
    x_eta, _ = renderer.render(tiles, scenes)
    geom = renderer.geometry(scenes)
    index = torch.from_numpy(geom.index).to(device)
    m = torch.from_numpy(mask).to(device)
    tiles = torch.as_tensor(tiles, dtype=torch.float32).to(device)
    return DTNPairs(torch.from_numpy(x_ref).to(device), expand_texture(tiles, index, m), m,
                    torch.from_numpy(x_eta).to(device), index)


def masked_psnr(x: Tensor, target: Tensor, mask: Tensor) -> float:
    """PSNR in dB over the masked pixels (peak 1): 10 log10(1 / mean_{m=1} (x - target)^2) (dta)."""
    m = mask.to(x.dtype).expand_as(x)
    mse = float(((x - target) ** 2 * m).sum() / m.sum().clamp_min(1.0))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _pair_loss(x_hat: Tensor, target: Tensor, mask: Tensor, loss: str) -> Tensor:
    m = mask.expand_as(x_hat)
    d = (x_hat - target).abs() if loss == "l1" else (x_hat - target) ** 2
    return (d * m).sum() / m.sum().clamp_min(1.0)


def train_dtn(dtn: nn.Module, pairs: DTNPairs, steps: int, batch_size: int = 32, lr: float = 3e-3,
              loss: str = "l1", generator: torch.Generator | None = None) -> list[float]:
    """Fit the DTN to renderer pairs: min E || x_hat - x_eta ||_1 over the masked pixels (Adam; dta).

    Returns the per-step training loss. ``loss``: "l1" (default) or "l2".

    >>> losses = train_dtn(dtn, pairs, steps=800, batch_size=32, lr=3e-3)
    """
    steps = nonneg_int("steps", steps)
    batch_size = positive_int("batch_size", batch_size)
    lr = positive("lr", lr)
    choice("loss", loss, ("l1", "l2"))
    optional_generator(generator)
    opt = torch.optim.Adam(dtn.parameters(), lr=lr)
    dtn.train()
    hist = []
    n = len(pairs)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(pairs.x_ref.device)
        x_hat = dtn(pairs.x_ref[idx], pairs.eta_exp[idx], pairs.mask[idx])
        val = _pair_loss(x_hat, pairs.x_eta[idx], pairs.mask[idx], loss)
        opt.zero_grad(set_to_none=True)
        val.backward()
        opt.step()
        hist.append(float(val.detach()))
    dtn.eval()
    return hist


@dataclass(frozen=True)
class TexturePool:
    """Reference renders of the scenes an attack takes its expectation over: x_ref (N, 3, H, W) in
    [0, 1], index (N, H, W) int64 tile cells, mask (N, 1, H, W)."""

    x_ref: Tensor
    index: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        _check_images("x_ref", self.x_ref)
        n, _, h, w = self.x_ref.shape
        if tuple(self.index.shape) != (n, h, w) or tuple(self.mask.shape) != (n, 1, h, w):
            raise ArgumentError(f"index and mask must be shaped {(n, h, w)} and {(n, 1, h, w)}, got "
                                f"{tuple(self.index.shape)} and {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return int(self.x_ref.shape[0])

    @classmethod
    def render(cls, renderer: ToyRenderer, scenes: SceneBatch, reference_tile,
               device: torch.device | str = "cpu") -> "TexturePool":
        """Reference renders and geometry of ``scenes`` (the renderer is only run, never differentiated)."""
        x_ref, mask = renderer.render(reference_tile, scenes)
        index = renderer.geometry(scenes).index
        return cls(torch.from_numpy(x_ref).to(device), torch.from_numpy(index).to(device),
                   torch.from_numpy(mask).to(device))


@dataclass
class AttackResult:
    """The optimised tile (3, k, k) in [0, 1] and the EOT loss per step."""

    tile: Tensor
    losses: list[float] = field(default_factory=list)


_LOSSES = ("bce", "conf", "logit")


def _attack_loss(logits: Tensor, loss: str) -> Tensor:
    """Mean over the scenes of the victim's evidence for 'object present' (logits (B,) or (B, 1))."""
    z = logits.reshape(-1)
    if loss == "conf":
        return torch.sigmoid(z).mean()
    if loss == "logit":
        return z.mean()
    return F.softplus(z).mean()  # -log(1 - p): does not vanish when the victim is confident


def eot_texture_attack(surrogate: Surrogate, victim: Callable[[Tensor], Tensor], pool: TexturePool, *,
                       tile_size: int = 4, steps: int = 150, lr: float = 0.05, batch_size: int = 16,
                       loss: str = "bce", init: Tensor | None = None, eps: float | None = None,
                       generator: torch.Generator | None = None) -> AttackResult:
    """Optimise a texture tile against a victim through a differentiable surrogate, EOT over scenes (dta).

    Each step draws ``batch_size`` scenes from ``pool`` and takes an Adam step on
    L = mean_s loss(victim(surrogate(x_ref(s), expand_texture(tile, index(s), mask(s)), mask(s)))),
    then projects the tile onto [0, 1] (printable) and, with ``eps``, onto the l_inf ball of radius eps
    around ``init``. ``victim`` returns the logit of "object present"; ``loss``: "bce" (softplus of the
    logit = -log(1 - p), default), "conf" (the mean confidence p) or "logit". ``init`` defaults to
    mid-gray. The victim is used as given (put it in eval mode); its parameters get no gradient.

    >>> res = eot_texture_attack(dtn, detector.eval(), pool, tile_size=4, steps=150, lr=0.05)
    >>> renderer.render(res.tile, test_scenes)          # judge it with the real renderer
    """
    if not isinstance(pool, TexturePool):
        raise ArgumentError(f"pool must be a TexturePool, got {type(pool).__name__}")
    tile_size = positive_int("tile_size", tile_size)
    steps = nonneg_int("steps", steps)
    lr = positive("lr", lr)
    batch_size = positive_int("batch_size", batch_size)
    choice("loss", loss, _LOSSES)
    if eps is not None:
        eps = real_scalar("eps", eps, nonneg=True)
    optional_generator(generator)
    dev, dtype = pool.x_ref.device, pool.x_ref.dtype
    if init is None:
        init = torch.full((3, tile_size, tile_size), 0.5, dtype=dtype, device=dev)
    check_tile(init, tile_size, name="init")
    if init.dim() != 3:
        raise ArgumentError(f"init must be one tile shaped (3, {tile_size}, {tile_size}), got {tuple(init.shape)}")
    init = init.detach().to(device=dev, dtype=dtype)
    tile = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([tile], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pool), (min(batch_size, len(pool)),), generator=generator).to(dev)
        m = pool.mask[idx]
        x = surrogate(pool.x_ref[idx], expand_texture(tile, pool.index[idx], m), m)
        val = _attack_loss(victim(x), loss)
        opt.zero_grad(set_to_none=True)
        (g,) = torch.autograd.grad(val, tile)
        tile.grad = g
        opt.step()
        with torch.no_grad():
            if eps is not None:
                tile.copy_(torch.minimum(torch.maximum(tile, init - eps), init + eps))
            tile.clamp_(*RANGE)
        losses.append(float(val.detach()))
    return AttackResult(tile.detach(), losses)


def detection_rate(victim: Callable[[Tensor], Tensor], images, batch_size: int = 512) -> float:
    """Percent of images on which the victim's "object present" logit is > 0 (p > 0.5) (dta)."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    _check_images("images", x, channels=None)
    with torch.no_grad():
        z = torch.cat([victim(x[i:i + batch_size]).reshape(-1) for i in range(0, len(x), batch_size)])
    return 100.0 * float((z > 0).float().mean())


__all__ = ["DifferentiableTransformationNetwork", "DTNPairs", "TexturePool", "AttackResult", "expand_texture",
           "naive_paste", "random_tiles", "make_dtn_pairs", "train_dtn", "eot_texture_attack", "masked_psnr",
           "detection_rate"]
