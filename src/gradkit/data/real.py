"""Supervised splits built from the real data sets under a root folder (``--data-root``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .bundled import Split, standardise
from .errors import DataError


def mnist_split(root: str | Path, n_train: int, n_test: int | None = None, *, subset: str = "first",
                normalise: str = "feature", subset_seed: int = 0) -> Split:
    """MNIST as flat 784-feature vectors scaled to [0, 1] and standardised with training statistics.

    subset: ``"first"`` takes the first ``n_train`` training images; ``"random"`` a fixed random subset
        (``subset_seed``; independent of the training seed).
    normalise: ``"feature"`` standardises each pixel; ``"global"`` uses one mean and std for all pixels
        (no blow-up of near-constant border pixels).
    n_test: the first ``n_test`` test images (default: all 10,000).
    """
    from .readers import load_mnist

    if not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be a positive int, got {n_train!r}")
    if subset not in ("first", "random"):
        raise ValueError(f"subset must be 'first' or 'random', got {subset!r}")
    if normalise not in ("feature", "global"):
        raise ValueError(f"normalise must be 'feature' or 'global', got {normalise!r}")
    xtr, ytr = load_mnist(root, "train")
    xte, yte = load_mnist(root, "test")
    if subset == "first":
        idx = np.arange(min(n_train, len(ytr)))
    else:
        idx = np.random.RandomState(subset_seed).permutation(len(ytr))[:n_train]
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]
    xtr = xtr[idx].reshape(len(idx), -1).astype(np.float64) / 255.0
    xte = xte.reshape(len(xte), -1).astype(np.float64) / 255.0
    if normalise == "feature":
        xtr, xte = standardise(xtr, xte)
    else:
        mu, sd = xtr.mean(), xtr.std()
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    return Split(torch.tensor(xtr, dtype=torch.float32), torch.as_tensor(ytr[idx], dtype=torch.int64),
                 torch.tensor(xte, dtype=torch.float32), torch.as_tensor(yte, dtype=torch.int64), name="mnist")


def data_folder(root: str | Path, expects: str) -> Path:
    """``root`` (a ``--data-root``) as a Path, or a DataError saying it is not a folder and what it should hold."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"--data-root {str(path)!r} is not a folder (expected one holding {expects})")
    return path
