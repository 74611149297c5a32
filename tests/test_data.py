"""Data layer: bundled sets and readers (tiny files written here, real files when present)."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from gradkit.data import DataError, load_digits_split, load_mnist1d
from gradkit.data.readers import (load_amazon, load_cifar10, load_fashion_mnist, load_mnist, load_mnist_m,
                                  load_usps, read_idx)


def write_idx(path, arr, gz=False):
    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(folder, n=6, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    imgs = rng.randint(0, 256, size=(n, 28, 28))
    labels = np.arange(n) % 10
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", imgs, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return imgs, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["", "mnist", "MNIST/raw"])
def test_mnist_idx_layouts(tmp_path, gz, layout):
    imgs, labels = make_mnist(tmp_path / layout if layout else tmp_path, gz=gz)
    x, y = load_mnist(tmp_path, "test")
    assert x.dtype == np.uint8 and x.shape == (6, 28, 28) and np.array_equal(x, imgs)
    assert y.dtype == np.int64 and np.array_equal(y, labels)


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match="MNIST train images not found"):
        load_mnist(tmp_path, "train")
    with pytest.raises(DataError, match="not a folder"):
        load_mnist(tmp_path / "missing", "train")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "val")
    make_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_mnist(tmp_path, "train")
    p.write_bytes(b"\x12\x34\x56\x78" * 10)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(p)
    make_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        load_mnist(tmp_path, "test")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_usps_mnistm_amazon_cifar_tiny(tmp_path):
    make_mnist(tmp_path / "fashion_mnist")
    assert load_fashion_mnist(tmp_path, "train")[0].shape == (6, 28, 28)
    (tmp_path / "usps").mkdir()
    np.savez(tmp_path / "usps" / "usps.npz", x_train=np.zeros((4, 256), np.float32), y_train=np.arange(4),
             x_test=np.ones((2, 256), np.float32), y_test=np.arange(2))
    u = load_usps(tmp_path)
    assert u["x_train"].shape == (4, 256) and u["y_test"].dtype == np.int64
    np.savez(tmp_path / "usps" / "usps.npz", x_train=np.zeros((4, 100), np.float32), y_train=np.arange(4),
             x_test=np.ones((2, 256), np.float32), y_test=np.arange(2))
    with pytest.raises(DataError, match=r"must be \(N, 256\)"):
        load_usps(tmp_path)
    (tmp_path / "mnist_m").mkdir()
    np.savez(tmp_path / "mnist_m" / "mnist_m_sample.npz", x_train=np.zeros((3, 32, 32, 3), np.uint8),
             y_train=np.arange(3), x_test=np.zeros((2, 32, 32, 3), np.uint8), y_test=np.arange(2))
    assert load_mnist_m(tmp_path)["x_test"].shape == (2, 32, 32, 3)
    (tmp_path / "amazon_reviews").mkdir()
    with gzip.open(tmp_path / "amazon_reviews" / "books_train.svmlight.gz", "wt") as f:
        f.write("1 0:2 4999:1\n-1 3:1\n")
    x, y = load_amazon(tmp_path, "books", "train")
    assert x.shape == (2, 5000) and x[0, 4999] == 1 and list(y) == [1, 0]
    with pytest.raises(ValueError, match="domain"):
        load_amazon(tmp_path, "cars")
    with pytest.raises(DataError, match="Amazon dvd train not found"):
        load_amazon(tmp_path, "dvd")
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}, f)
    x, y = load_cifar10(tmp_path, "test")
    assert x.shape == (2, 32, 32, 3) and list(y) == [3, 4]
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")


def test_real_files_when_present(data_root):
    x, y = load_mnist(data_root, "test")
    assert x.shape == (10000, 28, 28) and np.bincount(y)[0] == 980
    x, y = load_fashion_mnist(data_root, "test")
    assert x.shape == (10000, 28, 28) and set(np.bincount(y)) == {1000}
    u = load_usps(data_root)
    assert u["x_train"].shape == (7291, 256) and np.bincount(u["y_test"])[0] == 359
    m = load_mnist_m(data_root)
    assert m["x_train"].shape == (1000, 32, 32, 3)
    x, y = load_amazon(data_root, "kitchen", "train")
    assert x.shape == (2000, 5000) and y.sum() == 1000


def test_bundled_digits_and_mnist1d():
    d = load_digits_split()
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64) and d.num_classes == 10
    assert torch.allclose(d.x_train.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.equal(load_digits_split().y_test, d.y_test)  # fixed split
    m = load_mnist1d()
    assert m.x_train.shape == (4000, 40) and m.x_test.shape == (1000, 40)
    assert torch.equal(load_mnist1d().x_train, m.x_train)  # cached, identical
    with pytest.raises(ValueError, match="num_samples"):
        load_mnist1d(num_samples=3)


def test_mnist_split_subsets_and_normalisation(tmp_path):
    from gradkit.data.real import mnist_split

    make_mnist(tmp_path / "mnist", n=8)
    s = mnist_split(tmp_path, 5, 3)
    assert s.x_train.shape == (5, 784) and s.x_test.shape == (3, 784) and s.name == "mnist"
    assert torch.allclose(s.x_train.mean(0), torch.zeros(784), atol=1e-5)
    g = mnist_split(tmp_path, 6, normalise="global", subset="random")
    assert g.x_test.shape == (8, 784) and abs(float(g.x_train.mean())) < 1e-5
    assert torch.equal(g.y_train, mnist_split(tmp_path, 6, normalise="global", subset="random").y_train)
    for kw, msg in ((dict(n_train=0), "n_train"), (dict(n_train=2, subset="last"), "subset"),
                    (dict(n_train=2, normalise="minmax"), "normalise")):
        with pytest.raises(ValueError, match=msg):
            mnist_split(tmp_path, **kw)
    with pytest.raises(DataError):
        mnist_split(tmp_path / "nothing-here", 2)
