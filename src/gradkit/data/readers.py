"""Readers of standard data files under a root folder (``--data-root``); nothing is downloaded.

Each reader accepts the folder given by the user and looks in the layouts people already have:
the folder itself, a sub-folder named after the data set (``mnist/``, ``MNIST/raw/`` as torchvision
lays it out, ...). Files may be raw or gzip-compressed. Missing, truncated or mismatched files raise
:class:`~gradkit.data.errors.DataError` naming the file and the problem.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Iterable

import numpy as np

from .._validate import choice
from .errors import DataError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST format), raw or ``.gz``, and check its size against its header."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with _open(path) as f:
            buf = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = buf[3]
    if ndim < 1 or len(buf) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[buf[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = memoryview(buf)[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataError(
            f"{path}: truncated or corrupt: header says shape {shape} ({expected} bytes), "
            f"file has {len(body)} bytes of data"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def _candidates(root: Path, subdirs: Iterable[str]) -> list[Path]:
    out = [root]
    for s in subdirs:
        out += [root / s, root / s / "raw"]
    return out


def _find(root: str | Path, subdirs: Iterable[str], names: Iterable[str], what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    names = list(names)
    dirs = _candidates(root, subdirs)
    for d in dirs:
        for n in names:
            for cand in (d / n, d / (n + ".gz")):
                if cand.is_file():
                    return cand
    raise DataError(
        f"{what} not found under {root}: looked for {names[0]}[.gz] in "
        + ", ".join(str(d.relative_to(root)) if d != root else "." for d in dirs)
    )


def _load_idx_pair(root, subdirs, split: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    img = read_idx(_find(root, subdirs, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"], f"{what} {split} images"))
    lab = read_idx(_find(root, subdirs, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"], f"{what} {split} labels"))
    if img.ndim != 3 or lab.ndim != 1:
        raise DataError(f"{what} {split}: expected images (N, H, W) and labels (N,), got {img.shape} and {lab.shape}")
    if len(img) != len(lab):
        raise DataError(f"{what} {split}: {len(img)} images but {len(lab)} labels")
    if lab.size and (lab.min() < 0 or lab.max() > 9):
        raise DataError(f"{what} {split}: labels outside 0..9")
    return img.astype(np.uint8, copy=False), lab.astype(np.int64)


def load_mnist(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST IDX files: returns ``(images uint8 (N, 28, 28), labels int64 (N,))``."""
    return _load_idx_pair(root, ("mnist", "MNIST"), split, "MNIST")


def load_fashion_mnist(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST IDX files: returns ``(images uint8 (N, 28, 28), labels int64 (N,))``."""
    return _load_idx_pair(root, ("fashion_mnist", "fashion-mnist", "FashionMNIST"), split, "Fashion-MNIST")


def _check_xy(x: np.ndarray, y: np.ndarray, what: str, split: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{what} {split}: {len(x)} inputs but {len(y)} labels")


def load_usps(root: str | Path) -> dict[str, np.ndarray]:
    """USPS 16x16 digits from ``usps.npz`` (or ``usps.h5`` when h5py is installed).

    Returns ``x_train`` float32 (N, 256) in [0, 1], ``y_train`` int64, ``x_test``, ``y_test``.
    """
    root_p = Path(root)
    try:
        path = _find(root_p, ("usps", "USPS"), ["usps.npz"], "USPS")
    except DataError:
        path = _find(root_p, ("usps", "USPS"), ["usps.h5"], "USPS (usps.npz or usps.h5)")
    keys = {"x_train": "train/data", "y_train": "train/target", "x_test": "test/data", "y_test": "test/target"}
    try:
        if path.name.endswith(".npz"):
            with np.load(path) as z:
                out = {k: z[k] for k in keys}
        else:
            try:
                import h5py
            except ImportError:
                raise DataError(f"{path}: reading .h5 needs h5py; install it or provide usps.npz") from None
            with h5py.File(path, "r") as h:
                out = {k: h[v][()] for k, v in keys.items()}
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read USPS arrays ({e})") from None
    for s in ("train", "test"):
        x, y = out[f"x_{s}"], out[f"y_{s}"]
        if x.ndim != 2 or x.shape[1] != 256:
            raise DataError(f"{path}: USPS x_{s} must be (N, 256), got {x.shape}")
        _check_xy(x, y, "USPS", s)
    return {k: (v.astype(np.float32) if k.startswith("x") else v.astype(np.int64)) for k, v in out.items()}


def load_mnist_m(root: str | Path) -> dict[str, np.ndarray]:
    """MNIST-M sample ``mnist_m_sample.npz``: ``x_train``/``x_test`` uint8 (N, 32, 32, 3), labels int64."""
    path = _find(root, ("mnist_m", "mnist-m", "MNIST-M"), ["mnist_m_sample.npz"], "MNIST-M")
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception as e:
        raise DataError(f"{path}: cannot read MNIST-M arrays ({e})") from None
    for s in ("train", "test"):
        x = out[f"x_{s}"]
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"{path}: MNIST-M x_{s} must be (N, 32, 32, 3), got {x.shape}")
        _check_xy(x, out[f"y_{s}"], "MNIST-M", s)
    out["y_train"] = out["y_train"].astype(np.int64)
    out["y_test"] = out["y_test"].astype(np.int64)
    return out


AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")


def load_amazon(root: str | Path, domain: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Amazon reviews (DANN's 5,000-feature svmlight files): ``(x float32 dense (N, 5000), y in {0, 1})``."""
    choice("domain", domain, AMAZON_DOMAINS)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_svmlight_file

    path = _find(root, ("amazon_reviews", "amazon"), [f"{domain}_{split}.svmlight"], f"Amazon {domain} {split}")
    try:
        x, y = load_svmlight_file(str(path), n_features=5000, zero_based=True)
    except Exception as e:
        raise DataError(f"{path}: cannot parse svmlight file ({e})") from None
    return np.asarray(x.todense(), dtype=np.float32), (y > 0).astype(np.int64)


def load_cifar10(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches (``cifar-10-batches-py``): ``(images uint8 (N, 32, 32, 3), labels int64)``.

    The batches are pickles: only read files from a source you trust.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        path = _find(root, ("cifar-10-batches-py", "cifar10", "CIFAR10"), [n], f"CIFAR-10 {n}")
        try:
            with _open(path) as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:
            raise DataError(f"{path}: cannot read CIFAR-10 batch ({e})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def fixed_subset_split(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], n_train: int,
                       n_test: int, name: str = ""):
    """A :class:`~gradkit.data.Split` of fixed random subsets of uint8 images, scaled by one global mean/std.

    The subsets are the same for every seed (permutations from seeds 0 and 1), so seeds vary only the training
    run; ``n_train``/``n_test`` larger than the data take all of it. Mean and std come from the training subset
    of ``x / 255``. Image shapes are kept (flatten them for an MLP).

    >>> x = np.arange(40, dtype=np.uint8).reshape(10, 2, 2); y = np.arange(10) % 2
    >>> s = fixed_subset_split((x, y), (x, y), 6, 4, "toy")
    >>> tuple(s.x_train.shape), tuple(s.x_test.shape), round(float(s.x_train.mean()), 6)
    ((6, 2, 2), (4, 2, 2), 0.0)
    """
    import torch

    from .bundled import Split

    (xtr, ytr), (xte, yte) = train, test
    itr = np.random.RandomState(0).permutation(len(ytr))[:n_train]
    ite = np.random.RandomState(1).permutation(len(yte))[:n_test]
    xtr, xte = xtr[itr].astype(np.float32) / 255.0, xte[ite].astype(np.float32) / 255.0
    mu, sd = float(xtr.mean()), float(xtr.std())
    return Split(torch.from_numpy((xtr - mu) / sd), torch.as_tensor(ytr[itr], dtype=torch.int64),
                 torch.from_numpy((xte - mu) / sd), torch.as_tensor(yte[ite], dtype=torch.int64), name=name)
