"""A small non-differentiable "photo-realistic" renderer of a textured object in a scene (dta).

The stand-in for the legacy renderer (CARLA/Unreal) whose texture gradient an attacker cannot get. It
renders a rounded-rectangle body covered by a repeated k x k texture tile onto a procedural background
(:class:`gradkit.data.dta_scenes.SceneBatch`), in numpy, with effects a plain texture paste misses:

    body(p)   = cast * (eta_exp(p) * S(p)) + hl(p)              S = ambient + intensity * max(0, n(p) . l)
    ground(p) = cast * bg(p) * (1 - darkness * shadow(p))       shadow: the body's silhouette, shifted
    x         = round(255 * clip(m * body + (1 - m) * ground + noise, 0, 1)) / 255

n(p) is the normal of a "pillow" surface over the body (a Lambert-like gradient across it), hl a
Gaussian highlight, noise a Gaussian field drawn from the scene's own seed (so every texture of one scene
sees the same noise), and the 8-bit quantisation makes the map piecewise constant in the texture: there
is no useful gradient, and none is offered (numpy in, numpy out).

>>> r = ToyRenderer(tile_size=4)
>>> scenes = sample_scenes(8, size=32, seed=0)
>>> images, masks = r.render(np.full((3, 4, 4), 0.5), scenes)     # (8, 3, 32, 32), (8, 1, 32, 32)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import ArgumentError, integer
from ..data.dta_scenes import SceneBatch


def _as_numpy(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: the renderer never sees its graph
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ArgumentError(f"{name} must be a numpy array or tensor, got {type(value).__name__}")
    return value


def check_tile(tile, tile_size: int, name: str = "tile", batch: int | None = None):
    """Validate a texture tile: shape (3, k, k) or (N, 3, k, k) with k = ``tile_size``, values in [0, 1].

    ``batch``: the number of scenes a batch of tiles must match. Works on numpy arrays and tensors alike
    (returns ``tile`` unchanged). Raises ValueError naming the shape or range given.
    """
    shape = tuple(tile.shape)
    ok = shape[-3:] == (3, tile_size, tile_size) and len(shape) in (3, 4)
    if not ok:
        raise ArgumentError(f"{name} must have shape (3, {tile_size}, {tile_size}) or (N, 3, {tile_size}, "
                            f"{tile_size}), got {shape}")
    if len(shape) == 4 and batch is not None and shape[0] != batch:
        raise ArgumentError(f"{name} holds {shape[0]} tiles but there are {batch} scenes (one tile, or one per scene)")
    lo, hi = float(tile.min()), float(tile.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ArgumentError(f"{name} values must be in [0, 1] (a printable texture), got range [{lo:g}, {hi:g}]")
    return tile


def _rounded_rect(u: np.ndarray, v: np.ndarray, hw, hh, r) -> np.ndarray:
    """Signed distance to a rounded rectangle centred at 0 (negative inside)."""
    qx, qy = np.abs(u) - (hw - r), np.abs(v) - (hh - r)
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


@dataclass(frozen=True)
class Geometry:
    """Per-pixel object geometry of a scene batch: mask (N, 1, H, W) float32 in {0, 1}; index (N, H, W)
    int64, the tile cell (row * k + col) seen at each pixel (0 outside the body); u, v body coordinates
    normalised to [-1, 1] over the body's half sizes (float64, N x H x W)."""

    mask: np.ndarray
    index: np.ndarray
    u: np.ndarray
    v: np.ndarray


@dataclass(frozen=True)
class ToyRenderer:
    """Non-differentiable renderer of a tiled texture on a lit object in procedural scenes (dta).

    tile_size: k of the k x k texture tile; pillow: how strongly the body's normal tilts towards its rim.
    ``render(tile, scenes) -> (images, masks)``: float32 numpy, images in [0, 1] on the 8-bit grid.
    ``render_empty(scenes)``: the same scenes without the object (negatives for a detector).
    ``geometry(scenes)``: the mask and tile-cell index map the texture expansion needs.

    >>> ToyRenderer(4).render(np.random.rand(3, 4, 4), sample_scenes(2))[0].shape
    (2, 3, 32, 32)
    """

    tile_size: int = 4
    pillow: float = 0.9

    def __post_init__(self) -> None:
        integer("tile_size", self.tile_size, low=1)

    def _coords(self, s: SceneBatch):
        size = s.size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        c, sn = np.cos(s.angle)[:, None, None], np.sin(s.angle)[:, None, None]
        dx, dy = xx - s.cx[:, None, None], yy - s.cy[:, None, None]
        return c * dx + sn * dy, -sn * dx + c * dy, c, sn

    def geometry(self, scenes: SceneBatch) -> Geometry:
        """Mask and tile-cell index per pixel (nearest-neighbour texture lookup, tiled along the body)."""
        if not isinstance(scenes, SceneBatch):
            raise ArgumentError(f"scenes must be a SceneBatch, got {type(scenes).__name__}")
        s, k = scenes, self.tile_size
        u, v, _, _ = self._coords(s)
        hw, hh, r = (a[:, None, None] for a in (s.half_w, s.half_h, s.radius))
        inside = _rounded_rect(u, v, hw, hh, r) <= 0
        cell = s.cell[:, None, None]
        col = np.floor((u + hw) / cell).astype(np.int64) % k
        row = np.floor((v + hh) / cell).astype(np.int64) % k
        index = np.where(inside, row * k + col, 0)
        return Geometry(inside[:, None].astype(np.float32), index, u / hw, v / hh)

    def _shading(self, s: SceneBatch, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """Lambert shading S (N, H, W) of the pillow body and the specular term (N, H, W)."""
        a = s.angle[:, None, None]
        az, el = s.light_azimuth[:, None, None], s.light_elevation[:, None, None]
        # light direction in body coordinates (rotate the image-plane azimuth into the body frame)
        lu, lv, lz = np.cos(az - a) * np.cos(el), np.sin(az - a) * np.cos(el), np.sin(el)
        nu, nv = self.pillow * g.u, self.pillow * g.v
        lam = np.clip((nu * lu + nv * lv + 1.0 * lz) / np.sqrt(nu ** 2 + nv ** 2 + 1.0), 0.0, 1.0)
        shade = s.ambient[:, None, None] + s.light_intensity[:, None, None] * lam
        hw, hh = s.half_w[:, None, None], s.half_h[:, None, None]
        du, dv = (g.u - s.spec_u[:, None, None]) * hw, (g.v - s.spec_v[:, None, None]) * hh
        highlight = s.spec_strength[:, None, None] * np.exp(
            -(du ** 2 + dv ** 2) / (2 * s.spec_width[:, None, None] ** 2))
        return shade, highlight

    def _shadow(self, s: SceneBatch) -> np.ndarray:
        u, v, c, sn = self._coords(s)
        dx, dy = s.shadow_dx[:, None, None], s.shadow_dy[:, None, None]
        us, vs = u - (c * dx + sn * dy), v - (-sn * dx + c * dy)  # body frame, shifted by the shadow offset
        hw, hh, r = (a[:, None, None] for a in (s.half_w, s.half_h, s.radius))
        return (_rounded_rect(us, vs, hw, hh, r) <= 0).astype(np.float64)

    def _finish(self, s: SceneBatch, img: np.ndarray) -> np.ndarray:
        """Colour cast, seeded sensor noise, clip and 8-bit quantisation."""
        img = img * s.cast[:, :, None, None]
        noise = np.stack([np.random.default_rng(int(seed)).standard_normal((3, s.size, s.size))
                          for seed in s.noise_seed]) if len(s) else np.zeros_like(img)
        img = img + s.noise_std[:, None, None, None] * noise
        return (np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)

    def render(self, tile, scenes: SceneBatch) -> tuple[np.ndarray, np.ndarray]:
        """Render ``tile`` ((3, k, k) for every scene, or (N, 3, k, k) one per scene) into ``scenes``.

        Returns (images (N, 3, H, W), masks (N, 1, H, W)), float32 numpy. Deterministic given the tile
        and the scenes (the noise comes from each scene's seed).
        """
        if not isinstance(scenes, SceneBatch):
            raise ArgumentError(f"scenes must be a SceneBatch, got {type(scenes).__name__}")
        k, n = self.tile_size, len(scenes)
        tile = check_tile(_as_numpy("tile", tile).astype(np.float64), k, batch=n)
        g = self.geometry(scenes)
        flat = np.broadcast_to(tile.reshape(-1, 3, k * k), (n, 3, k * k))
        eta = np.take_along_axis(flat, g.index.reshape(n, 1, -1).repeat(3, axis=1), axis=2)
        eta = eta.reshape(n, 3, scenes.size, scenes.size)
        shade, highlight = self._shading(scenes, g)
        body = eta * shade[:, None] + highlight[:, None]
        m = g.mask.astype(np.float64)
        ground = scenes.background * (1.0 - scenes.shadow_darkness[:, None, None, None] * self._shadow(scenes)[:, None])
        ground = ground * (1.0 - m) + scenes.background * m  # the shadow falls on the ground only
        return self._finish(scenes, m * body + (1.0 - m) * ground), g.mask

    def render_empty(self, scenes: SceneBatch) -> np.ndarray:
        """The scenes' backgrounds through the same camera (cast, noise, quantisation), no object."""
        if not isinstance(scenes, SceneBatch):
            raise ArgumentError(f"scenes must be a SceneBatch, got {type(scenes).__name__}")
        return self._finish(scenes, scenes.background.copy())


__all__ = ["ToyRenderer", "Geometry", "check_tile"]
