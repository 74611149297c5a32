"""Procedural driving-like scenes for a toy non-differentiable renderer (dta).

A scene fixes everything a renderer needs except the object's texture: the object's pose (centre, half
sizes, corner radius, rotation, texture cell size), a directional light (azimuth, elevation, intensity,
ambient), the cast shadow (offset, darkness), one specular highlight (position on the body, strength,
width), a per-channel colour cast, the sensor noise (seed and level) and a procedural background
image (base colour + linear gradient + soft blobs). Scenes are numpy arrays, one row per scene:

    scenes = sample_scenes(16, size=32, seed=0)        # SceneBatch with 16 scenes of 32x32 pixels
    scenes[3:5]                                         # a SceneBatch of 2 scenes
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .._validate import integer, positive_int


@dataclass(frozen=True)
class SceneBatch:
    """N scenes as parallel numpy arrays (float64 unless noted); index or slice to select scenes (dta).

    Geometry in pixels: centre (cx, cy), half sizes (half_w, half_h), corner radius, rotation angle
    (radians), texture cell size. Light: azimuth, elevation (radians), intensity, ambient. Shadow: offset
    (shadow_dx, shadow_dy) in pixels, darkness in [0, 1]. Specular: spot (spec_u, spec_v) in body
    coordinates [-1, 1], strength, width (pixels). Colour cast: cast (N, 3). Sensor: noise_seed (int64),
    noise_std. background: (N, 3, size, size) in [0, 1].

    >>> s = sample_scenes(4, size=32, seed=0); len(s), s.background.shape
    (4, (4, 3, 32, 32))
    """

    cx: np.ndarray
    cy: np.ndarray
    half_w: np.ndarray
    half_h: np.ndarray
    radius: np.ndarray
    angle: np.ndarray
    cell: np.ndarray
    light_azimuth: np.ndarray
    light_elevation: np.ndarray
    light_intensity: np.ndarray
    ambient: np.ndarray
    shadow_dx: np.ndarray
    shadow_dy: np.ndarray
    shadow_darkness: np.ndarray
    spec_u: np.ndarray
    spec_v: np.ndarray
    spec_strength: np.ndarray
    spec_width: np.ndarray
    cast: np.ndarray
    noise_seed: np.ndarray
    noise_std: np.ndarray
    background: np.ndarray

    def __len__(self) -> int:
        return int(self.cx.shape[0])

    @property
    def size(self) -> int:
        """Image side length in pixels."""
        return int(self.background.shape[-1])

    def __getitem__(self, idx) -> "SceneBatch":
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1) if idx != -1 else slice(-1, None)
        return SceneBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def procedural_backgrounds(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, size, size) backgrounds in [0, 1]: base colour + linear gradient + 4 soft coloured blobs."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    base = rng.uniform(0.2, 0.8, (n, 3, 1, 1))
    gx, gy = rng.uniform(-0.3, 0.3, (2, n, 3, 1, 1))
    img = base + gx * xx + gy * yy
    for _ in range(4):
        bx, by = rng.uniform(-0.5, 0.5, (2, n, 1, 1, 1))
        w = rng.uniform(0.08, 0.25, (n, 1, 1, 1))
        amp = rng.uniform(-0.35, 0.35, (n, 3, 1, 1))
        img = img + amp * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * w ** 2))
    return np.clip(img, 0.0, 1.0)


def sample_scenes(n: int, size: int = 32, seed: int = 0) -> SceneBatch:
    """Draw ``n`` random scenes of ``size`` x ``size`` pixels, deterministic in ``seed`` (dta).

    Object: a rounded rectangle ("vehicle") about 0.5 x 0.3 of the image, anywhere in the central
    region, any yaw; texture cells of 2-3 pixels; light from any azimuth; noise level 0.01-0.03.

    >>> sample_scenes(2, size=32, seed=1).cast.shape
    (2, 3)
    """
    n = positive_int("n", n)
    size = integer("size", size, low=8)
    rng = np.random.default_rng(int(seed))
    u = lambda lo, hi, shape=(n,): rng.uniform(lo, hi, shape)  # noqa: E731
    half_w = u(0.22, 0.30) * size
    half_h = half_w * u(0.45, 0.65)
    az = u(0.0, 2 * np.pi)
    length = u(1.5, 3.5) * size / 32
    return SceneBatch(
        cx=u(0.35, 0.65) * size, cy=u(0.35, 0.65) * size, half_w=half_w, half_h=half_h,
        radius=half_h * u(0.3, 0.7), angle=u(0.0, np.pi), cell=u(2.0, 3.0) * size / 32,
        light_azimuth=az, light_elevation=u(0.5, 1.1), light_intensity=u(0.35, 0.7), ambient=u(0.25, 0.5),
        shadow_dx=-np.cos(az) * length, shadow_dy=-np.sin(az) * length, shadow_darkness=u(0.3, 0.6),
        spec_u=u(-0.6, 0.6), spec_v=u(-0.6, 0.6), spec_strength=u(0.15, 0.5), spec_width=u(1.2, 2.5) * size / 32,
        cast=u(0.8, 1.2, (n, 3)), noise_seed=rng.integers(0, 2 ** 62, n, dtype=np.int64), noise_std=u(0.01, 0.03),
        background=procedural_backgrounds(n, size, rng))


__all__ = ["SceneBatch", "sample_scenes", "procedural_backgrounds"]
