"""Procedural "object on context" scenes: a digit (the object, the label) pasted on a context texture.

Paper slug: ``contextual-fusion``. A scene of ``size x size`` pixels in [0, 1] holds one ``k x k`` object
image (a digit, intensity d in [0, 1]) at a uniformly random position over a background texture b drawn
from one of ten procedural context families, composited as

    x = d + (1 - d) * b        (the object's strokes cover the texture; its dark pixels show it)

The context family equals the label with probability ``context_strength`` (q) and is uniform over the
ten families otherwise, so P(family == label) = q + (1 - q) / 10. Families (periods scale with size / 16):
0-3 gratings of period 4 at 0, 45, 90, 135 degrees; 4-7 the same at period 8; 8 and 9 checkerboards of
period 4 and 8. Every texture has a random phase, a random amplitude in ``amplitude`` and pixel noise.

Two pre-training views stand in for an object-centric (ImageNet) and a scene-centric (Places) data set:
:func:`object_view` pastes objects on neutral i.i.d. noise (label: the object), :func:`context_view` draws
textures with an object-sized hole at a random position (label: the family).

>>> d = object_context_digits(context_strength=0.8, seed=0)     # bundled 8x8 digits on 16x16 scenes
>>> d.split.x_train.shape, d.split.x_test.shape
(torch.Size([2874, 1, 16, 16]), torch.Size([720, 1, 16, 16]))
>>> x, fam = context_view(64, size=16, hole=8, generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import integer, nonneg_int, optional_generator, positive_int, probability, real_in, tensor
from .bundled import Split, load_digits_images_split

__all__ = ["N_FAMILIES", "ObjectContextData", "context_textures", "paste_objects", "object_view", "context_view",
           "make_object_context_dataset", "object_context_digits"]

N_FAMILIES = 10
_ANGLES = (0.0, 45.0, 90.0, 135.0)


def _amplitude(amplitude) -> tuple[float, float]:
    if not isinstance(amplitude, (tuple, list)) or len(amplitude) != 2:
        raise ValueError(f"amplitude must be a pair (low, high) in [0, 1], got {amplitude!r}")
    lo = real_in("amplitude[0]", amplitude[0], 0.0, 1.0)
    hi = real_in("amplitude[1]", amplitude[1], lo, 1.0)
    return lo, hi


def context_textures(families: Tensor, size: int = 16, generator: torch.Generator | None = None,
                     amplitude: tuple[float, float] = (0.35, 0.65), noise: float = 0.03) -> Tensor:
    """Background textures (N, 1, size, size) in [0, 1], one per entry of ``families`` (ints in 0..9).

    b = clamp(a * (1 + wave) / 2 + noise * eps, 0, 1), a ~ U(amplitude), wave a grating
    cos(2 pi (x cos t + y sin t) / P + phi) or a checkerboard cos(2 pi x / P + phi1) cos(2 pi y / P + phi2).

    >>> context_textures(torch.tensor([0, 9]), size=16).shape
    torch.Size([2, 1, 16, 16])
    """
    fam = tensor("families", families)
    if fam.dim() != 1 or fam.is_floating_point() or fam.is_complex():
        raise ValueError(f"families must be a 1-D integer tensor, got dtype {fam.dtype} and shape {tuple(fam.shape)}")
    if fam.numel() and (int(fam.min()) < 0 or int(fam.max()) >= N_FAMILIES):
        raise ValueError(f"families must hold ints in [0, {N_FAMILIES - 1}], got values in "
                         f"[{int(fam.min())}, {int(fam.max())}]")
    size = integer("size", size, low=4)
    generator = optional_generator(generator)
    lo, hi = _amplitude(amplitude)
    noise = real_in("noise", noise, 0.0, 1.0)
    n = fam.numel()
    fam = fam.cpu().long()
    scale = size / 16.0
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.tensor(_ANGLES)[fam % 4] * (math.pi / 180.0)
    grating_period = torch.where(fam < 4, 4.0, 8.0) * scale
    checker_period = torch.where(fam == 8, 4.0, 8.0) * scale
    phase = 2 * math.pi * torch.rand(n, 2, generator=generator)
    amp = lo + (hi - lo) * torch.rand(n, generator=generator)
    eps = torch.randn(n, size, size, generator=generator)
    v = lambda t: t.view(n, 1, 1)  # noqa: E731
    proj = xx * v(torch.cos(angle)) + yy * v(torch.sin(angle))
    grating = torch.cos(2 * math.pi * proj / v(grating_period) + v(phase[:, 0]))
    checker = (torch.cos(2 * math.pi * xx / v(checker_period) + v(phase[:, 0]))
               * torch.cos(2 * math.pi * yy / v(checker_period) + v(phase[:, 1])))
    wave = torch.where(v(fam < 8), grating, checker)
    b = v(amp) * (1 + wave) / 2 + noise * eps
    return b.clamp(0.0, 1.0).unsqueeze(1)


def _canvas(objects: Tensor, size: int, positions: Tensor) -> Tensor:
    """Objects (N, 1, k, k) placed on zero canvases (N, 1, size, size) at top-left ``positions`` (N, 2)."""
    n, k = objects.shape[0], objects.shape[-1]
    canvas = objects.new_zeros(n, 1, size, size)
    ar = torch.arange(k, device=objects.device)
    rows = positions[:, :1].to(objects.device) + ar  # (N, k)
    cols = positions[:, 1:].to(objects.device) + ar
    idx = torch.arange(n, device=objects.device)[:, None, None]
    canvas[idx, 0, rows[:, :, None], cols[:, None, :]] = objects[:, 0]
    return canvas


def _check_objects(objects: Tensor, size: int) -> Tensor:
    tensor("objects", objects, floating=True, finite=True)
    if objects.dim() != 4 or objects.shape[1] != 1 or objects.shape[2] != objects.shape[3]:
        raise ValueError(f"objects must have shape (N, 1, k, k), got {tuple(objects.shape)}")
    if objects.shape[-1] > size:
        raise ValueError(f"objects of side {objects.shape[-1]} do not fit in scenes of size {size}")
    if objects.numel() and (float(objects.min()) < 0.0 or float(objects.max()) > 1.0):
        raise ValueError(f"objects must lie in [0, 1], got values in [{float(objects.min()):.4g}, "
                         f"{float(objects.max()):.4g}]")
    return objects


def _random_positions(n: int, size: int, k: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, size - k + 1, (n, 2), generator=generator)


def paste_objects(objects: Tensor, backgrounds: Tensor, positions: Tensor) -> Tensor:
    """Composite objects (N, 1, k, k) over backgrounds (N, 1, S, S): x = d + (1 - d) * b in the object's square.

    ``positions`` (N, 2): top-left (row, col) of each object, in [0, S - k].

    >>> paste_objects(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 4, 4), torch.tensor([[1, 1]]))[0, 0, 1:3, 1:3]
    tensor([[1., 1.],
            [1., 1.]])
    """
    tensor("backgrounds", backgrounds, floating=True)
    if backgrounds.dim() != 4 or backgrounds.shape[1] != 1 or backgrounds.shape[2] != backgrounds.shape[3]:
        raise ValueError(f"backgrounds must have shape (N, 1, S, S), got {tuple(backgrounds.shape)}")
    size = backgrounds.shape[-1]
    _check_objects(objects, size)
    k = objects.shape[-1]
    tensor("positions", positions)
    if positions.shape != (objects.shape[0], 2) or positions.is_floating_point():
        raise ValueError(f"positions must be an integer tensor of shape ({objects.shape[0]}, 2), got dtype "
                         f"{positions.dtype} and shape {tuple(positions.shape)}")
    if backgrounds.shape[0] != objects.shape[0]:
        raise ValueError(f"backgrounds must have one image per object ({objects.shape[0]}), got {backgrounds.shape[0]}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) > size - k):
        raise ValueError(f"positions must lie in [0, {size - k}] for {k}x{k} objects in {size}x{size} scenes, got "
                         f"values in [{int(positions.min())}, {int(positions.max())}]")
    d = _canvas(objects.to(backgrounds.dtype), size, positions)
    return d + (1 - d) * backgrounds


def object_view(objects: Tensor, size: int = 16, generator: torch.Generator | None = None,
                noise_max: float = 0.6) -> Tensor:
    """Object-centric pre-training view: each object on neutral i.i.d. noise U(0, a), a ~ U(0, noise_max).

    >>> object_view(torch.rand(4, 1, 8, 8), size=16).shape
    torch.Size([4, 1, 16, 16])
    """
    size = integer("size", size, low=1)
    _check_objects(objects, size)
    generator = optional_generator(generator)
    noise_max = real_in("noise_max", noise_max, 0.0, 1.0)
    n, k = objects.shape[0], objects.shape[-1]
    a = noise_max * torch.rand(n, 1, 1, 1, generator=generator)
    bg = (a * torch.rand(n, 1, size, size, generator=generator)).to(objects)
    return paste_objects(objects, bg, _random_positions(n, size, k, generator))


def context_view(n: int, size: int = 16, hole: int = 8, generator: torch.Generator | None = None,
                 amplitude: tuple[float, float] = (0.35, 0.65)) -> tuple[Tensor, Tensor]:
    """Scene-centric pre-training view: ``n`` textures of uniform random families with a ``hole x hole``
    square zeroed at a random position (the object's region masked out). Returns (x, families).

    >>> x, fam = context_view(3, size=16, hole=8)
    >>> x.shape, fam.shape
    (torch.Size([3, 1, 16, 16]), torch.Size([3]))
    """
    n = positive_int("n", n)
    size = integer("size", size, low=4)
    hole = integer("hole", hole, low=0, high=size)
    generator = optional_generator(generator)
    fam = torch.randint(0, N_FAMILIES, (n,), generator=generator)
    b = context_textures(fam, size, generator, amplitude=amplitude)
    if hole > 0:
        mask = _canvas(torch.ones(n, 1, hole, hole), size, _random_positions(n, size, hole, generator))
        b = b * (1 - mask)
    return b, fam


@dataclass(frozen=True)
class ObjectContextData:
    """Scenes as a :class:`Split` (x in [0, 1], y = the object's class), with each scene's context family and
    object position, and the context strength q they were drawn with."""

    split: Split
    context_train: Tensor
    context_test: Tensor
    pos_train: Tensor
    pos_test: Tensor
    context_strength: float

    def to(self, device: torch.device | str) -> "ObjectContextData":
        return ObjectContextData(self.split.to(device), self.context_train, self.context_test, self.pos_train,
                                 self.pos_test, self.context_strength)


def make_object_context_dataset(objects: Tensor, labels: Tensor, context_strength: float = 0.8, seed: int = 0,
                                size: int = 16, copies: int = 1,
                                amplitude: tuple[float, float] = (0.35, 0.65)) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scenes from objects: each object pasted ``copies`` times at random positions on a context texture whose
    family is the label with probability ``context_strength`` and uniform otherwise.

    Returns (x (N*copies, 1, size, size), y, families, positions); deterministic in ``seed``.

    >>> x, y, fam, pos = make_object_context_dataset(torch.rand(5, 1, 8, 8), torch.arange(5), 1.0, seed=0)
    >>> bool((fam == y).all())
    True
    """
    q = probability("context_strength", context_strength)
    seed = nonneg_int("seed", seed)
    size = integer("size", size, low=4)
    copies = positive_int("copies", copies)
    _check_objects(objects, size)
    tensor("labels", labels)
    if labels.shape != (objects.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({objects.shape[0]},), got dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= N_FAMILIES):
        raise ValueError(f"labels must be class ids in [0, {N_FAMILIES - 1}] (one context family per class), got "
                         f"values in [{int(labels.min())}, {int(labels.max())}]")
    g = torch.Generator().manual_seed(seed)
    obj = objects.detach().cpu().float().repeat(copies, 1, 1, 1)
    y = labels.detach().cpu().long().repeat(copies)
    n = y.numel()
    keep = torch.rand(n, generator=g) < q
    fam = torch.where(keep, y, torch.randint(0, N_FAMILIES, (n,), generator=g))
    bg = context_textures(fam, size, g, amplitude=amplitude)
    pos = _random_positions(n, size, obj.shape[-1], g)
    return paste_objects(obj, bg, pos), y, fam, pos


def object_context_digits(context_strength: float = 0.8, seed: int = 0, copies_train: int = 2,
                          copies_test: int = 2, size: int = 16, objects: Split | None = None) -> ObjectContextData:
    """Object/context scenes from the bundled 8x8 digits (fixed 1437/360 split; train digits only in train
    scenes), or from ``objects`` (a Split of (N, 1, k, k) images in [0, 1]). Test scenes use seed + 1.

    >>> d = object_context_digits(context_strength=1.0, seed=0, copies_train=1, copies_test=1)
    >>> bool((d.context_test == d.split.y_test).all())
    True
    """
    s = load_digits_images_split() if objects is None else objects
    xtr, ytr, ftr, ptr = make_object_context_dataset(s.x_train, s.y_train, context_strength, seed, size, copies_train)
    xte, yte, fte, pte = make_object_context_dataset(s.x_test, s.y_test, context_strength, seed + 1, size, copies_test)
    name = f"object-context-{s.name or 'objects'}"
    return ObjectContextData(Split(xtr, ytr, xte, yte, name), ftr, fte, ptr, pte, float(context_strength))
