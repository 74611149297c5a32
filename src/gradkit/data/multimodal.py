"""Procedural multimodal data: an informative image modality and an easy but unreliable shortcut.

Paper slug: ``agm`` (modality competition). Built offline from scikit-learn's digits:

- ``v`` (informative, slower to learn): the standardised 8x8 digit (64 features, the fixed
  1437/360 split of :func:`load_digits_split`) plus Gaussian noise of std ``image_noise``.
- ``a`` (easy shortcut): a one-hot of the label with probability ``reliability`` and of a
  uniformly random class (possibly the right one) otherwise, plus Gaussian noise of std
  ``shortcut_noise``. Its Bayes accuracy is ``reliability + (1 - reliability) / 10``.

Every corruption is drawn once per sample from ``seed`` (fixed per training sample; the test set
gets its own independent draws), so the data set does not depend on the training seed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .._validate import nonneg_int, probability, real_scalar
from .bundled import load_digits_split

__all__ = ["MultimodalSplit", "load_shortcut_digits"]


@dataclass(frozen=True)
class MultimodalSplit:
    """A supervised train/test split with one input tensor per modality (float32), int64 labels."""

    x_train: tuple[torch.Tensor, ...]
    y_train: torch.Tensor
    x_test: tuple[torch.Tensor, ...]
    y_test: torch.Tensor
    modalities: tuple[str, ...]
    name: str = ""

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()).item()) + 1

    @property
    def num_features(self) -> tuple[int, ...]:
        return tuple(int(np.prod(x.shape[1:])) for x in self.x_train)

    def index(self, modality: str) -> int:
        """Position of a modality by name."""
        if modality not in self.modalities:
            raise KeyError(f"unknown modality {modality!r}; known: {', '.join(self.modalities)}")
        return self.modalities.index(modality)

    def to(self, device: torch.device | str) -> "MultimodalSplit":
        return MultimodalSplit(tuple(x.to(device) for x in self.x_train), self.y_train.to(device),
                               tuple(x.to(device) for x in self.x_test), self.y_test.to(device),
                               self.modalities, self.name)


def _shortcut(y: np.ndarray, reliability: float, noise: float, classes: int,
              rng: np.random.RandomState) -> np.ndarray:
    keep = rng.rand(len(y)) < reliability
    shown = np.where(keep, y, rng.randint(classes, size=len(y)))
    onehot = np.eye(classes, dtype=np.float64)[shown]
    return onehot + noise * rng.randn(len(y), classes)


def load_shortcut_digits(image_noise: float = 0.5, reliability: float = 0.7, shortcut_noise: float = 0.1,
                         seed: int = 0) -> MultimodalSplit:
    """Two-modality digits: ``a`` = 70%-reliable noisy label one-hot (10-d), ``v`` = noisy image (64-d).

    Paper slug: ``agm``. ``v = standardised digit + N(0, image_noise^2)``;
    ``a = onehot(y if u < reliability else c ~ U{0..9}) + N(0, shortcut_noise^2)``. Modalities in
    the order ``("a", "v")``. Cached per argument set.

    Example::

        >>> d = load_shortcut_digits()
        >>> [x.shape[1] for x in d.x_train], d.modalities
        ([10, 64], ('a', 'v'))
    """
    image_noise = real_scalar("image_noise", image_noise, nonneg=True, tensor_ok=False)
    shortcut_noise = real_scalar("shortcut_noise", shortcut_noise, nonneg=True, tensor_ok=False)
    reliability = probability("reliability", reliability, tensor_ok=False)
    seed = nonneg_int("seed", seed)
    return _build(image_noise, reliability, shortcut_noise, seed)


@functools.lru_cache(maxsize=4)
def _build(image_noise: float, reliability: float, shortcut_noise: float, seed: int) -> MultimodalSplit:
    d = load_digits_split()
    classes = 10
    rng = np.random.RandomState(seed)
    parts = {}
    for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
        yn = y.numpy()
        v = x.numpy().astype(np.float64) + image_noise * rng.randn(*x.shape)
        a = _shortcut(yn, reliability, shortcut_noise, classes, rng)
        parts[split] = (torch.tensor(a, dtype=torch.float32), torch.tensor(v, dtype=torch.float32), y.clone())
    (a_tr, v_tr, y_tr), (a_te, v_te, y_te) = parts["train"], parts["test"]
    return MultimodalSplit((a_tr, v_tr), y_tr, (a_te, v_te), y_te, ("a", "v"), name="shortcut-digits")
