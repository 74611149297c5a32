"""Linear evaluation of frozen features: standardised logistic regression, test accuracy in percent
(paper slug: projection-head).

    p(y | z) = softmax(A s(z) + b),  s(z) = (z - mean_train) / std_train,  fitted with L2 penalty 1 / (2 C)

Features are standardised with training statistics first: pre- and post-projection features differ in scale
by orders of magnitude, and an unstandardised probe would compare the scales, not the features.

>>> acc = linear_probe(torch.randn(100, 8), torch.randint(0, 2, (100,)), torch.randn(50, 8), torch.randint(0, 2, (50,)))
>>> 0.0 <= acc <= 100.0
True
"""
from __future__ import annotations

import warnings

import numpy as np
from torch import Tensor

from .._validate import ArgumentError, positive, positive_int, tensor

__all__ = ["linear_probe"]


def _rows(name: str, x: Tensor) -> np.ndarray:
    tensor(name, x, floating=True, finite=True)
    if x.dim() != 2:
        raise ArgumentError(f"{name} must be an (N, d) matrix, got shape {tuple(x.shape)}")
    return x.detach().cpu().double().numpy()


def _labels(name: str, y: Tensor, n: int) -> np.ndarray:
    tensor(name, y)
    if y.dim() != 1 or y.shape[0] != n or y.is_floating_point():
        raise ArgumentError(f"{name} must be {n} integer labels (shape ({n},)), got shape {tuple(y.shape)} and "
                            f"dtype {y.dtype}")
    return y.detach().cpu().numpy()


def linear_probe(feats_train: Tensor, y_train: Tensor, feats_test: Tensor, y_test: Tensor, *, C: float = 1.0,
                 max_iter: int = 1000) -> float:
    """Fit a standardised L2 logistic regression (scikit-learn, lbfgs) on the training features and return
    its test accuracy in percent. ``C``: inverse regularisation strength (tune it on a validation split).

    >>> z = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]]); y = torch.tensor([0, 0, 1, 1])
    >>> linear_probe(z, y, z, y)
    100.0
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xtr, xte = _rows("feats_train", feats_train), _rows("feats_test", feats_test)
    if xtr.shape[1] != xte.shape[1]:
        raise ArgumentError(f"feats_test must have {xtr.shape[1]} columns like feats_train, got {xte.shape[1]}")
    ytr, yte = _labels("y_train", y_train, xtr.shape[0]), _labels("y_test", y_test, xte.shape[0])
    if len(np.unique(ytr)) < 2:
        raise ArgumentError("y_train must hold at least two classes, got one")
    C = positive("C", C)
    max_iter = positive_int("max_iter", max_iter)
    mu, sd = xtr.mean(0, keepdims=True), xtr.std(0, keepdims=True)
    sd[sd == 0] = 1.0
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((xtr - mu) / sd, ytr)
    return float(100.0 * (clf.predict((xte - mu) / sd) == yte).mean())
