"""Block data sets and the signal-coordinate synthetic data of input-gradients.

BlockMNIST (Shah et al., NeurIPS 2021): an image is the vertical stack of two blocks, one holding a digit
(the signal) and one a fixed "null" patch with no label information; the signal block is on top or at
the bottom at random per instance. ``block_digits`` builds the 16x8 version from scikit-learn's 8x8
digits, ``block_mnist`` the paper's 56x28 version from MNIST files. ``signal_coordinate_synthetic`` is
the paper's synthetic distribution: y = +-1, x = y * e_j with j random.

>>> X, y, sig = block_dataset(images, labels, checkerboard_patch(8, 8), seed=0)   # (N, 1, 16, 8)
>>> R = block_region_mask(sig, 8, 8)                                             # True on the digit block
>>> X, y, j = signal_coordinate_synthetic(d=10, n=1000, seed=0)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._validate import nonneg_int, positive_int, probability
from .bundled import Split
from .errors import DataError


def checkerboard_patch(height: int, width: int, cell: int = 1, low: float = 0.0, high: float = 1.0) -> Tensor:
    """A fixed checkerboard (height, width) of ``cell``-pixel squares, values ``low``/``high`` (input-gradients).

    >>> checkerboard_patch(2, 3)
    tensor([[1., 0., 1.],
            [0., 1., 0.]])
    """
    h, w, c = positive_int("height", height), positive_int("width", width), positive_int("cell", cell)
    yy, xx = torch.meshgrid(torch.arange(h) // c, torch.arange(w) // c, indexing="ij")
    on = (yy + xx) % 2 == 0
    return torch.where(on, torch.tensor(float(high)), torch.tensor(float(low)))


def block_dataset(base_images, base_labels, null_patch, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Stack each image with the null patch vertically, the image's block on top or bottom at random (input-gradients).

    base_images: (N, H, W); null_patch: (H, W). Returns X (N, 1, 2H, W) float32, y (N,) int64 and the
    signal block index (N,) int64: 0 = digit on top, 1 = digit at the bottom (uniform, from ``seed``).

    >>> X, y, sig = block_dataset(torch.rand(5, 8, 8), torch.arange(5), torch.zeros(8, 8), seed=0)
    >>> X.shape
    torch.Size([5, 1, 16, 8])
    """
    imgs = torch.as_tensor(np.asarray(base_images) if not isinstance(base_images, Tensor) else base_images)
    labels = torch.as_tensor(np.asarray(base_labels) if not isinstance(base_labels, Tensor) else base_labels)
    null = torch.as_tensor(np.asarray(null_patch) if not isinstance(null_patch, Tensor) else null_patch)
    if imgs.dim() != 3:
        raise ValueError(f"base_images must have shape (N, H, W), got {tuple(imgs.shape)}")
    if null.shape != imgs.shape[1:]:
        raise ValueError(f"null_patch must have the images' shape {tuple(imgs.shape[1:])}, got {tuple(null.shape)}")
    if labels.reshape(-1).numel() != imgs.shape[0]:
        raise ValueError(f"base_labels must have one label per image ({imgs.shape[0]}), got {labels.numel()}")
    g = torch.Generator().manual_seed(nonneg_int("seed", seed))
    n = imgs.shape[0]
    sig = torch.randint(0, 2, (n,), generator=g)
    imgs = imgs.float()
    null = null.float().to(imgs.device).expand_as(imgs)
    bottom = (sig == 1).to(imgs.device)[:, None, None]
    top_blk = torch.where(bottom, null, imgs)
    bot_blk = torch.where(bottom, imgs, null)
    X = torch.cat([top_blk, bot_blk], dim=1)[:, None]
    return X.contiguous(), labels.reshape(-1).long(), sig.long()


def block_region_mask(signal_block: Tensor, height: int, width: int) -> Tensor:
    """Bool mask (N, 1, 2H, W) that is True on each example's signal block (input-gradients).

    >>> block_region_mask(torch.tensor([0, 1]), 1, 1)[:, 0, :, 0]
    tensor([[ True, False],
            [False,  True]])
    """
    h, w = positive_int("height", height), positive_int("width", width)
    s = torch.as_tensor(signal_block).reshape(-1)
    rows = torch.arange(2 * h, device=s.device)
    on_top = rows[None, :] < h
    m = torch.where((s == 0)[:, None], on_top, ~on_top)
    return m[:, None, :, None].expand(-1, 1, 2 * h, w).contiguous()


def _two_class(images: np.ndarray, labels: np.ndarray, digits) -> tuple[np.ndarray, np.ndarray]:
    digits = tuple(int(d) for d in digits)
    if len(digits) != 2 or digits[0] == digits[1] or not all(0 <= d <= 9 for d in digits):
        raise ValueError(f"digits must be two different digits in 0..9, got {digits!r}")
    keep = np.isin(labels, digits)
    return images[keep], (labels[keep] == digits[1]).astype(np.int64)


def _blocks_split(xtr, ytr, xte, yte, patch, seed, name, n_train, n_test):
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]
    Xtr, Ytr, Str = block_dataset(torch.from_numpy(xtr), torch.from_numpy(ytr), patch, seed=seed)
    Xte, Yte, Ste = block_dataset(torch.from_numpy(xte), torch.from_numpy(yte), patch, seed=seed + 1_000_003)
    return Split(Xtr, Ytr, Xte, Yte, name=name), Str, Ste


def block_digits(seed: int = 0, digits=(0, 1), test_fraction: float = 0.3):
    """BlockDigits: 16x8 images, an 8x8 scikit-learn digit (in [0, 1]) over/under a checkerboard (input-gradients).

    Binary task: label 1 for ``digits[1]``, 0 for ``digits[0]``. The train/test split of the digit images
    is fixed (independent of ``seed``); the block positions come from ``seed``. Returns
    ``(split, signal_block_train, signal_block_test)``.

    >>> split, s_tr, s_te = block_digits(seed=0)
    >>> split.x_train.shape[1:]
    torch.Size([1, 16, 8])
    """
    from .bundled import digits_images

    x, y = digits_images()
    imgs, labels = _two_class(x[:, 0].numpy(), y.numpy(), digits)
    perm = np.random.RandomState(0).permutation(len(labels))
    n_te = int(round(len(labels) * float(test_fraction)))
    te, tr = perm[:n_te], perm[n_te:]
    return _blocks_split(imgs[tr], labels[tr], imgs[te], labels[te], checkerboard_patch(8, 8), nonneg_int("seed", seed),
                         "block-digits", None, None)


def block_mnist(root: str | Path, n_train: int = 5000, n_test: int = 1000, seed: int = 0, digits=(0, 1)):
    """BlockMNIST: 56x28 images, an MNIST digit (in [0, 1]) over/under a checkerboard of 4-px cells (input-gradients).

    The first ``n_train`` / ``n_test`` images of the two ``digits`` from MNIST's train / test files under
    ``root`` (``gradkit.data.readers.load_mnist``; missing files raise :class:`DataError`). Returns
    ``(split, signal_block_train, signal_block_test)``.

    >>> split, s_tr, s_te = block_mnist("/data", n_train=5000, n_test=1000)
    """
    from .readers import load_mnist

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} is not a folder (expected one holding mnist/)")
    n_train, n_test = positive_int("n_train", n_train), positive_int("n_test", n_test)
    xtr, ytr = load_mnist(root, "train")
    xte, yte = load_mnist(root, "test")
    xtr, ytr = _two_class(xtr.astype(np.float32) / 255.0, ytr, digits)
    xte, yte = _two_class(xte.astype(np.float32) / 255.0, yte, digits)
    return _blocks_split(xtr, ytr, xte, yte, checkerboard_patch(28, 28, cell=4), nonneg_int("seed", seed), "block-mnist",
                         n_train, n_test)


def signal_coordinate_synthetic(d: int, n: int, seed: int = 0, bias_prob: float | None = None,
                                value: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's synthetic data: y = +-1 with prob. 1/2, x = value * y * e_j (input-gradients).

    j = 0 with probability ``bias_prob`` (default 1/d), else uniform over coordinates 1..d-1 (the official
    ``SemiRandomSignalCoordinate``; with the default j is uniform over all d coordinates). Returns
    X (n, d) float32, labels (n,) int64 in {0, 1} (0 <-> y = -1) and j (n,) int64.

    >>> X, y, j = signal_coordinate_synthetic(d=10, n=4, seed=0)
    >>> bool(((X.abs().sum(1) == 1) & (X.gather(1, j[:, None])[:, 0] == 2 * y - 1)).all())
    True
    """
    d, n = positive_int("d", d), positive_int("n", n)
    if d < 2:
        raise ValueError(f"d must be >= 2, got {d}")
    p = 1.0 / d if bias_prob is None else probability("bias_prob", bias_prob)
    g = torch.Generator().manual_seed(nonneg_int("seed", seed))
    labels = torch.randint(0, 2, (n,), generator=g)
    first = torch.rand(n, generator=g) < p
    other = torch.randint(1, d, (n,), generator=g)
    j = torch.where(first, torch.zeros_like(other), other)
    X = torch.zeros(n, d)
    X[torch.arange(n), j] = float(value) * (2.0 * labels.float() - 1.0)
    return X, labels.long(), j.long()


__all__ = ["checkerboard_patch", "block_dataset", "block_region_mask", "block_digits", "block_mnist",
           "signal_coordinate_synthetic"]
