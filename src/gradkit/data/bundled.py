"""Data sets that ship with the dependencies or are generated offline.

- :func:`load_digits_split`: scikit-learn's 8x8 digits, standardised, fixed 1437/360 split.
- :func:`load_mnist1d`: MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (never
  downloaded), cached on disk under :func:`cache_dir`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from .._cache import cache_dir


@dataclass(frozen=True)
class Split:
    """A supervised train/test split as tensors (float32 inputs, int64 labels)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str = ""

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()).item()) + 1

    @property
    def num_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                     self.y_test.to(device), self.name)


def standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature standardisation with training statistics (constant features stay 0)."""
    mu = x_train.mean(0, keepdims=True)
    sd = x_train.std(0, keepdims=True)
    sd[sd == 0] = 1.0
    return (x_train - mu) / sd, (x_test - mu) / sd


@functools.lru_cache(maxsize=4)
def load_digits_split(test_size: int = 360, split_seed: int = 0) -> Split:
    """scikit-learn digits (1,797 8x8 images as 64 features), standardised, fixed split.

    The split does not depend on the training seed: every run sees the same 1437/360 split.
    """
    from sklearn.datasets import load_digits

    if not 0 < test_size < 1797:
        raise ValueError(f"test_size must be in (0, 1797), got {test_size}")
    d = load_digits()
    perm = np.random.RandomState(split_seed).permutation(len(d.target))
    te, tr = perm[:test_size], perm[test_size:]
    xtr, xte = standardise(d.data[tr].astype(np.float64), d.data[te].astype(np.float64))
    return Split(
        torch.tensor(xtr, dtype=torch.float32), torch.tensor(d.target[tr], dtype=torch.int64),
        torch.tensor(xte, dtype=torch.float32), torch.tensor(d.target[te], dtype=torch.int64),
        name="digits",
    )


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = cache_dir() / "digits-images-v1.npz"
    try:
        with np.load(path) as f:
            return f["x"], f["y"]
    except (OSError, KeyError, ValueError):
        pass
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed
    return x, y


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as images (N, 1, 8, 8) float32 in [0, 1] (pixel / 16) and int64 labels.

    For work that needs a known pixel range (reconstruction PSNR, masking). Cached on disk, so a fresh
    process (a federated client) does not import scikit-learn. Order = scikit-learn's; the fixed split of
    :func:`load_digits_split` is ``np.random.RandomState(0).permutation(1797)`` (first 360 = test).
    """
    x, y = _digits_arrays()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def load_digits_images_split(test_size: int = 360, split_seed: int = 0) -> Split:
    """:func:`digits_images` ((N, 1, 8, 8) in [0, 1]) with the fixed split of :func:`load_digits_split`."""
    if not 0 < test_size < 1797:
        raise ValueError(f"test_size must be in (0, 1797), got {test_size}")
    x, y = digits_images()
    perm = torch.from_numpy(np.random.RandomState(split_seed).permutation(len(y)))
    te, tr = perm[:test_size], perm[test_size:]
    return Split(x[tr], y[tr], x[te], y[te], name="digits")


def load_mnist1d(num_samples: int = 5000, seed: int = 42, cache: bool = True) -> Split:
    """MNIST-1D (40-sample 1-D signals, 10 classes) generated offline and cached.

    Uses the package's default generation arguments with ``num_samples`` and ``seed``;
    the 80/20 train/test split is the package's own.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10, got {num_samples}")
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    key = hashlib.sha1(json.dumps({k: v for k, v in vars(args).items() if k != "url"},
                                  sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{key}.pkl"
    data = None
    if cache and path.exists():
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except Exception:
            data = None  # a corrupt cache file is regenerated
    if data is None:
        data = make_dataset(args)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                pickle.dump({k: data[k] for k in ("x", "y", "x_test", "y_test")}, f)
            os.replace(tmp, path)
    return Split(
        torch.tensor(np.asarray(data["x"]), dtype=torch.float32),
        torch.tensor(np.asarray(data["y"]), dtype=torch.int64),
        torch.tensor(np.asarray(data["x_test"]), dtype=torch.float32),
        torch.tensor(np.asarray(data["y_test"]), dtype=torch.int64),
        name="mnist1d",
    )
