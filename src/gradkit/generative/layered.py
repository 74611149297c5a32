"""Layered generators: a generator cut into stages so that any intermediate feature can be searched.

Paper slug: ``gifd`` (GIFD searches a generator's latent, then its intermediate feature maps). A
:class:`LayeredGenerator` is ``G = g_L o ... o g_1``; stage ``k`` is the feature ``h_k = g_k(h_{k-1})``
with ``h_0 = z`` and ``h_L = G(z)`` (the image). :func:`small_generator` builds the small in-library prior
(a 4-block deconvolutional decoder), :class:`SmallVAE` wraps it with an MLP encoder, and
:func:`train_small_generator` trains that VAE through :func:`gradkit.engine.fit` and returns its decoder —
a prior trained on bundled data, nothing downloaded.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import integer, is_int, real_scalar

__all__ = ["LayeredGenerator", "small_generator", "SmallVAE", "vae_loss", "train_small_generator"]


class LayeredGenerator(nn.Module):
    """A generator as a chain of stages: ``forward_to(k, z) = h_k``, ``forward_from(k, h_k) = G(z)``.

    Paper slug: gifd. G = g_L o ... o g_1, h_0 = z, h_k = g_k(h_{k-1}), h_L = image; hence
    forward_from(k, forward_to(k, z)) == forward(z) for every k in 0..L.

    >>> gen = LayeredGenerator([nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 16), nn.Sigmoid())], latent_dim=4)
    >>> h1 = gen.forward_to(1, torch.randn(2, 4))          # (2, 8): the stage-1 feature
    >>> gen.forward_from(1, h1).shape                      # torch.Size([2, 16])
    """

    def __init__(self, blocks: Sequence[nn.Module], latent_dim: int) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must hold at least one module, got an empty sequence")
        for i, b in enumerate(blocks):
            if not isinstance(b, nn.Module):
                raise TypeError(f"blocks[{i}] must be an nn.Module, got {type(b).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.latent_dim = integer("latent_dim", latent_dim, low=1)

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks; the stages are 0 (latent) .. L (image)."""
        return len(self.blocks)

    def _stage(self, k: int) -> int:
        return integer("stage", k, low=0, high=self.num_blocks)

    def forward_between(self, j: int, k: int, h: torch.Tensor) -> torch.Tensor:
        """h_k from h_j: g_k o ... o g_{j+1} (h_j) for 0 <= j <= k <= L (j = k returns h itself)."""
        j, k = self._stage(j), self._stage(k)
        if j > k:
            raise ValueError(f"forward_between needs j <= k, got j={j}, k={k}")
        for block in self.blocks[j:k]:
            h = block(h)
        return h

    def forward_to(self, k: int, z: torch.Tensor) -> torch.Tensor:
        """h_k = g_k o ... o g_1 (z) (k = 0 returns z itself)."""
        return self.forward_between(0, k, z)

    def forward_from(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """G from stage k on: g_L o ... o g_{k+1} (h_k) (k = L returns h itself)."""
        return self.forward_between(k, self.num_blocks, h)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_from(0, z)

    @torch.no_grad()
    def stage_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of h_0 .. h_L (one dry run on a zero latent, eval mode, restored)."""
        was = self.training
        self.eval()
        p = next(self.parameters(), None)
        h = torch.zeros(1, self.latent_dim, device=p.device if p is not None else None,
                        dtype=p.dtype if p is not None else None)
        shapes = [tuple(h.shape[1:])]
        for block in self.blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
        self.train(was)
        return shapes

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_blocks={self.num_blocks}"


def small_generator(latent_dim: int = 16, image_size: int = 8, channels: tuple[int, int] = (32, 16),
                    out_channels: int = 1, negative_slope: float = 0.2) -> LayeredGenerator:
    """The small deconvolutional prior of the gifd paper's laptop-scale setting as a :class:`LayeredGenerator` (4 blocks).

    Paper slug: gifd. z -> Linear -> c0 x s/4 x s/4 -> [up x2, conv3x3 c0, BN, LeakyReLU] -> c0 x s/2 x s/2
    -> [up x2, conv3x3 c1, BN, LeakyReLU] -> c1 x s x s -> [conv3x3, sigmoid] -> out_channels x s x s.

    >>> gen = small_generator(latent_dim=16, image_size=8)
    >>> gen.stage_shapes()   # [(16,), (32, 2, 2), (32, 4, 4), (16, 8, 8), (1, 8, 8)]
    >>> x = gen.eval()(torch.randn(3, 16))   # (3, 1, 8, 8) in [0, 1]
    """
    integer("latent_dim", latent_dim, low=1)
    integer("image_size", image_size, low=4)
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    if (not isinstance(channels, (tuple, list)) or len(channels) != 2
            or not all(is_int(c, low=1) for c in channels)):
        raise ValueError(f"channels must be two positive ints, got {channels!r}")
    integer("out_channels", out_channels, low=1)
    slope = real_scalar("negative_slope", negative_slope, nonneg=True)
    c0, c1 = channels
    b = image_size // 4
    blocks = [
        nn.Sequential(nn.Linear(latent_dim, c0 * b * b), nn.Unflatten(1, (c0, b, b))),
        nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c0, c0, 3, padding=1),
                      nn.BatchNorm2d(c0), nn.LeakyReLU(slope)),
        nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c0, c1, 3, padding=1),
                      nn.BatchNorm2d(c1), nn.LeakyReLU(slope)),
        nn.Sequential(nn.Conv2d(c1, out_channels, 3, padding=1), nn.Sigmoid()),
    ]
    return LayeredGenerator(blocks, latent_dim)


class SmallVAE(nn.Module):
    """A VAE whose decoder is a :class:`LayeredGenerator`; the encoder is a 1-hidden-layer MLP.

    Paper slug: gifd (the in-library prior). q(z|x) = N(mu(x), diag exp(logvar(x))), z = mu + exp(logvar/2) * eps.

    >>> vae = SmallVAE(small_generator(16, 8), image_shape=(1, 8, 8))
    >>> recon, mu, logvar = vae(torch.rand(4, 1, 8, 8))
    >>> loss = vae_loss(recon, torch.rand(4, 1, 8, 8), mu, logvar)
    """

    def __init__(self, decoder: LayeredGenerator, image_shape: tuple[int, ...], hidden: int = 256) -> None:
        super().__init__()
        if not isinstance(decoder, LayeredGenerator):
            raise TypeError(f"decoder must be a LayeredGenerator, got {type(decoder).__name__}")
        if (not isinstance(image_shape, (tuple, list)) or not image_shape
                or not all(is_int(s, low=1) for s in image_shape)):
            raise ValueError(f"image_shape must be a tuple of positive ints, got {image_shape!r}")
        integer("hidden", hidden, low=1)
        n_in = 1
        for s in image_shape:
            n_in *= s
        self.image_shape = tuple(image_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.LeakyReLU(0.2),
                                     nn.Linear(hidden, 2 * decoder.latent_dim))
        self.decoder = decoder

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        return self.decoder(z), mu, logvar


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1.0) -> torch.Tensor:
    """Negative ELBO per sample (mean over the batch): BCE summed over pixels + beta * KL(q(z|x) || N(0, I)).

    Paper slug: gifd (training the in-library prior). KL = -1/2 sum(1 + logvar - mu^2 - exp(logvar)).
    """
    beta = real_scalar("beta", beta, nonneg=True)
    if recon.shape != x.shape:
        raise ValueError(f"recon and x must have the same shape, got {tuple(recon.shape)} and {tuple(x.shape)}")
    n = x.shape[0]
    rec = F.binary_cross_entropy(recon.clamp(1e-6, 1 - 1e-6), x, reduction="sum") / n
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
    return rec + beta * kl


def train_small_generator(images: torch.Tensor, *, latent_dim: int = 16, kind: str = "vae", epochs: int = 30,
                          batch_size: int = 64, lr: float = 2e-3, beta: float = 1.0, seed: int = 0,
                          channels: tuple[int, int] = (32, 16), progress: Callable = None,
                          desc: str = "gifd/prior") -> LayeredGenerator:
    """Train a small VAE on ``images`` (N, C, H, W) in [0, 1] with :func:`gradkit.engine.fit`; return its decoder.

    Paper slug: gifd (the generative prior, trained in-library instead of a downloaded GAN). Minimises
    :func:`vae_loss` with Adam; the decoder comes back frozen (``requires_grad=False``) and in eval mode
    (its BatchNorm layers use running statistics, as gradient inversion needs).

    >>> imgs = torch.rand(64, 1, 8, 8)
    >>> gen = train_small_generator(imgs, epochs=1)
    >>> gen(torch.randn(2, 16)).shape     # torch.Size([2, 1, 8, 8])
    """
    from ..data import TensorBatches
    from ..engine import fit, null_progress, seed_everything

    if kind != "vae":
        raise ValueError(f"kind must be 'vae' (the only prior trained in-library), got {kind!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a (N, C, H, W) tensor, got "
                         + (f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__))
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError("images must be finite floats in [0, 1]")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"images must lie in [0, 1], got range [{float(images.min()):.3g}, {float(images.max()):.3g}]")
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square, got {images.shape[2]}x{images.shape[3]}")
    integer("epochs", epochs, low=0)
    integer("batch_size", batch_size, low=1)
    lr = real_scalar("lr", lr, nonneg=True)
    gen = seed_everything(seed)
    decoder = small_generator(latent_dim, images.shape[2], channels, images.shape[1])
    vae = SmallVAE(decoder, tuple(images.shape[1:])).to(device=images.device, dtype=images.dtype)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    batches = TensorBatches(images, batch_size=batch_size, shuffle=True, generator=gen, drop_last=len(images) > batch_size)

    def compute_loss(model: SmallVAE, batch) -> torch.Tensor:
        (x,) = batch
        recon, mu, logvar = model(x)
        return vae_loss(recon, x, mu, logvar, beta)

    fit(vae, opt, batches, epochs=epochs, compute_loss=compute_loss, progress=progress or null_progress, desc=desc)
    decoder.eval()
    for p in decoder.parameters():
        p.requires_grad_(False)
    return decoder
