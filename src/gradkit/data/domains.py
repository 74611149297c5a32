"""Domain-generalisation splits built offline: Colored-MNIST-style environments (paper slug: ``hessian-alignment``).

The construction of Arjovsky et al.'s Colored MNIST (IRM), used by the Hessian-alignment paper
(Hemati et al., ICCV 2023) and by V-REx / Fishr, applied to any grey-scale digit images::

    y     = [digit < 5] xor Bernoulli(label_noise)      (label_noise = 0.25)
    color = y xor Bernoulli(e)                          (e = colour-flip rate of the environment)
    x     = two channels (image, image) with channel (1 - color) zeroed

Colour predicts the label with probability 1 - e (0.9 and 0.8 in the training environments, 0.1 in the
test environment), the shape with probability 0.75 in all of them: a model that follows colour fails
out of domain. Builders: :func:`colored_environments` (any images), :func:`colored_digits`
(scikit-learn's 8x8 digits, bundled), :func:`colored_mnist` (MNIST IDX files under a root, 2x max-pooled
to 14x14), :func:`colored_usps` (USPS 16x16 under a root).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .._validate import ArgumentError, integer, nonneg_int, probability

__all__ = ["DGSplit", "color_environment", "colored_environments", "colored_digits", "colored_mnist",
           "colored_usps", "max_pool"]

TRAIN_ENVS = (0.1, 0.2)
TEST_ENV = 0.9
LABEL_NOISE = 0.25


@dataclass(frozen=True)
class DGSplit:
    """Training environments and an out-of-domain test environment (float32 inputs, int64 labels).

    ``train[i] = (x, y)`` of environment ``i`` with colour-flip rate ``env_noise[i]``; ``test = (x, y)``
    with rate ``test_noise``. Inputs have shape ``(N, 2, H, W)`` (two colour channels).
    """

    train: tuple[tuple[Tensor, Tensor], ...]
    test: tuple[Tensor, Tensor]
    env_noise: tuple[float, ...]
    test_noise: float
    label_noise: float
    name: str = ""

    @property
    def num_features(self) -> int:
        return int(np.prod(self.test[0].shape[1:]))

    def to(self, device: torch.device | str) -> "DGSplit":
        return DGSplit(tuple((x.to(device), y.to(device)) for x, y in self.train),
                       (self.test[0].to(device), self.test[1].to(device)), self.env_noise,
                       self.test_noise, self.label_noise, self.name)


# ------------------------------------------------------------------------------------ validation
def _rate(name: str, value: object) -> float:
    try:
        return probability(name, value, tensor_ok=False)
    except ArgumentError:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}") from None


def _count(name: str, value: object, low: int = 1) -> int:
    return integer(name, value, low=low)


def _images(name: str, images: object) -> Tensor:
    t = torch.as_tensor(images)
    if t.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {tuple(t.shape)}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise ValueError(f"{name} must be intensities in [0, 1] (colour zeroes a channel), got values "
                         f"in [{float(t.min()):g}, {float(t.max()):g}]")
    return t


def _digits(name: str, digits: object, n: int) -> Tensor:
    t = torch.as_tensor(digits)
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer digit labels, got dtype {t.dtype}")
    if len(t) and (int(t.min()) < 0 or int(t.max()) > 9):
        raise ValueError(f"{name} must be digits in 0..9, got values in [{int(t.min())}, {int(t.max())}]")
    return t.long()


# ---------------------------------------------------------------------------------- construction
def max_pool(images: Tensor, k: int = 2) -> Tensor:
    """``k x k`` max-pooling of ``(N, H, W)`` images (H, W divisible by ``k``)."""
    k = _count("k", k)
    n, h, w = images.shape
    if h % k or w % k:
        raise ValueError(f"image size {h}x{w} is not divisible by k={k}")
    return images.reshape(n, h // k, k, w // k, k).amax(dim=(2, 4))


def color_environment(images: Tensor, digits: Tensor, e: float, label_noise: float = LABEL_NOISE,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One coloured environment: ``(x (N, 2, H, W) float32, y (N,) int64)``.

    Paper slug: ``hessian-alignment`` (Colored MNIST). ``y = [digit < 5] xor B(label_noise)``,
    ``color = y xor B(e)``, channel ``color`` keeps the image and channel ``1 - color`` is zeroed.

    Example::

        >>> x, y = color_environment(torch.rand(100, 8, 8), torch.randint(0, 10, (100,)), e=0.1)
        >>> x.shape, y.unique().tolist()
        (torch.Size([100, 2, 8, 8]), [0, 1])
    """
    imgs = _images("images", images)
    dig = _digits("digits", digits, len(imgs))
    e = _rate("e", e)
    label_noise = _rate("label_noise", label_noise)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    n = len(imgs)
    y = (dig < 5).long() ^ (torch.rand(n, generator=generator) < label_noise).long()
    color = y ^ (torch.rand(n, generator=generator) < e).long()
    x = torch.stack([imgs, imgs], dim=1)
    x[torch.arange(n), 1 - color] = 0.0
    return x, y


def colored_environments(train_images: Tensor, train_digits: Tensor, test_images: Tensor,
                         test_digits: Tensor, seed: int, env_noise: Sequence[float] = TRAIN_ENVS,
                         test_noise: float = TEST_ENV, label_noise: float = LABEL_NOISE,
                         n_per_env: int | None = None, n_test: int | None = None,
                         name: str = "colored") -> DGSplit:
    """Split training images at random (``seed``) into disjoint coloured environments; colour a test set.

    Paper slug: ``hessian-alignment``. ``n_per_env`` images per training environment (default: an
    equal share of all of them), ``n_test`` test images drawn at random (default: all). Every draw
    (split, label noise, colours) depends on ``seed`` only.

    Example::

        >>> d = colored_environments(xtr, dtr, xte, dte, seed=0, n_per_env=500)
        >>> [len(y) for _, y in d.train], d.env_noise, d.test_noise
        ([500, 500], (0.1, 0.2), 0.9)
    """
    seed = nonneg_int("seed", seed)
    xtr = _images("train_images", train_images)
    dtr = _digits("train_digits", train_digits, len(xtr))
    xte = _images("test_images", test_images)
    dte = _digits("test_digits", test_digits, len(xte))
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"train and test images differ in size: {tuple(xtr.shape[1:])} vs {tuple(xte.shape[1:])}")
    envs = tuple(_rate(f"env_noise[{i}]", e) for i, e in enumerate(env_noise))
    if not envs:
        raise ValueError("env_noise must name at least one training environment")
    test_noise = _rate("test_noise", test_noise)
    label_noise = _rate("label_noise", label_noise)
    n_env = len(xtr) // len(envs) if n_per_env is None else _count("n_per_env", n_per_env)
    if n_env < 1 or n_env * len(envs) > len(xtr):
        raise ValueError(f"n_per_env={n_env} x {len(envs)} environments needs {n_env * len(envs)} "
                         f"training images, only {len(xtr)} given")
    n_te = len(xte) if n_test is None else _count("n_test", n_test)
    if n_te > len(xte):
        raise ValueError(f"n_test={n_te} exceeds the {len(xte)} test images given")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(xtr), generator=gen)
    train = []
    for i, e in enumerate(envs):
        idx = perm[i * n_env:(i + 1) * n_env]
        train.append(color_environment(xtr[idx], dtr[idx], e, label_noise, gen))
    tidx = torch.randperm(len(xte), generator=gen)[:n_te]
    test = color_environment(xte[tidx], dte[tidx], test_noise, label_noise, gen)
    return DGSplit(tuple(train), test, envs, test_noise, label_noise, name)


# ------------------------------------------------------------------------------------- data sets
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .bundled import load_digits_images_split

    s = load_digits_images_split()  # the split of load_digits_split
    return s.x_train[:, 0], s.y_train, s.x_test[:, 0], s.y_test


def colored_digits(seed: int, env_noise: Sequence[float] = TRAIN_ENVS, test_noise: float = TEST_ENV,
                   label_noise: float = LABEL_NOISE) -> DGSplit:
    """Coloured scikit-learn digits (bundled): random halves of the 1,437 training images, 360 test.

    Paper slug: ``hessian-alignment``. Images ``8x8`` in [0, 1] (pixel / 16), inputs ``2 x 64``; the
    1,437 / 360 split is :func:`gradkit.data.load_digits_split`'s; the halves and colours follow ``seed``.

    Example::

        >>> d = colored_digits(seed=0)
        >>> [tuple(x.shape) for x, _ in d.train], tuple(d.test[0].shape)
        ([(718, 2, 8, 8), (718, 2, 8, 8)], (360, 2, 8, 8))
    """
    xtr, ytr, xte, yte = _digits_arrays()
    return colored_environments(xtr, ytr, xte, yte, seed, env_noise, test_noise, label_noise,
                                name="colored-digits")


@functools.lru_cache(maxsize=2)
def _mnist_pooled(root: str, pool: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .readers import load_mnist

    x, y = load_mnist(root, "train")
    t = torch.from_numpy(x).float().div_(255.0)
    if pool > 1:
        t = max_pool(t, pool)
    y = torch.from_numpy(y)
    # the IRM/Fishr protocol: training environments from the first 50,000 images, test from the rest
    return t[:50000], y[:50000], t[50000:], y[50000:]


def colored_mnist(root: str | Path, seed: int, n_per_env: int | None = 1000, n_test: int | None = 5000,
                  env_noise: Sequence[float] = TRAIN_ENVS, test_noise: float = TEST_ENV,
                  label_noise: float = LABEL_NOISE, pool: int = 2) -> DGSplit:
    """Colored MNIST from the MNIST IDX files under ``root`` (``mnist/`` or torchvision's layout).

    Paper slug: ``hessian-alignment``. Images ``/255``, ``pool x pool`` max-pooled (28 -> 14 by
    default: ``2 x 196`` inputs). Training environments are drawn from the first 50,000 training
    images (``n_per_env`` each, ``None`` = 25,000), the test environment from the last 10,000
    (``n_test``, ``None`` = all), as in the IRM / Fishr scripts. Missing files raise ``DataError``.

    Example::

        >>> d = colored_mnist("/data", seed=0, n_per_env=1000, n_test=5000)
        >>> d.num_features
        392
    """
    pool = _count("pool", pool)
    if 28 % pool:
        raise ValueError(f"pool must divide 28, got {pool}")
    xtr, ytr, xte, yte = _mnist_pooled(str(root), pool)
    return colored_environments(xtr, ytr, xte, yte, seed, env_noise, test_noise, label_noise,
                                n_per_env=n_per_env, n_test=n_test, name="colored-mnist")


def colored_usps(root: str | Path, seed: int, n_per_env: int | None = None, n_test: int | None = None,
                 env_noise: Sequence[float] = TRAIN_ENVS, test_noise: float = TEST_ENV,
                 label_noise: float = LABEL_NOISE, pool: int = 1) -> DGSplit:
    """Colored USPS from ``usps.npz`` / ``usps.h5`` under ``root``: 16x16 digits in [0, 1].

    Paper slug: ``hessian-alignment``. Training environments from USPS's 7,291 training images
    (default: equal halves), the test environment from its 2,007 test images.

    Example::

        >>> d = colored_usps("/data", seed=0)
        >>> [len(y) for _, y in d.train], len(d.test[1])
        ([3645, 3645], 2007)
    """
    from .readers import load_usps

    pool = _count("pool", pool)
    if 16 % pool:
        raise ValueError(f"pool must divide 16, got {pool}")
    u = load_usps(root)
    xtr = torch.from_numpy(u["x_train"]).reshape(-1, 16, 16).clamp_(0.0, 1.0)
    xte = torch.from_numpy(u["x_test"]).reshape(-1, 16, 16).clamp_(0.0, 1.0)
    if pool > 1:
        xtr, xte = max_pool(xtr, pool), max_pool(xte, pool)
    return colored_environments(xtr, torch.from_numpy(u["y_train"]), xte, torch.from_numpy(u["y_test"]),
                                seed, env_noise, test_noise, label_noise, n_per_env=n_per_env,
                                n_test=n_test, name="colored-usps")
