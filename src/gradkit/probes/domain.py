"""Proxy A-distance between two domains' representations (paper slug: ``dann``).

Ben-David et al. (2007), as used by Ganin et al., JMLR 2016 (Sec. 5.1.5): train a linear classifier
to tell source from target features on one half of each domain, score it on the other half::

    PAD = 2 (1 - 2 err)          err = held-out domain-classification error, folded to <= 0.5

PAD is ~0 for indistinguishable domains and 2 for perfectly separable ones.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from .._validate import nonneg_int

__all__ = ["proxy_a_distance"]

DEFAULT_C = tuple(float(c) for c in np.logspace(-3, 2, 6))


def _as_matrix(name: str, x: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, features) array, got shape {a.shape}")
    if len(a) < 2:
        raise ValueError(f"{name} needs at least 2 samples (one per half), got {len(a)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got non-finite values")
    return a


def proxy_a_distance(feat_src: Any, feat_tgt: Any, seed: int = 0,
                     C: Sequence[float] = DEFAULT_C) -> float:
    """Proxy A-distance ``2 (1 - 2 err)`` of a linear SVM separating source from target features.

    Paper slug: ``dann``. Each domain is split at random (``seed``) into halves; a linear SVM
    (scikit-learn ``LinearSVC``) is fitted on the first halves for each ``C`` and scored on the
    second halves; as in the authors' code, the smallest held-out error over ``C`` is used (each
    folded to ``min(err, 1 - err)``). Accepts numpy arrays or tensors of shape ``(N, D)``.

    Example::

        >>> pad_raw = proxy_a_distance(x_src, x_tgt)
        >>> pad_hidden = proxy_a_distance(model.hidden(x_src), model.hidden(x_tgt))
        >>> pad_hidden < pad_raw        # DANN's features are closer to domain-invariant
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    xs = _as_matrix("feat_src", feat_src)
    xt = _as_matrix("feat_tgt", feat_tgt)
    if xs.shape[1] != xt.shape[1]:
        raise ValueError(f"feat_src and feat_tgt must have the same number of features, got "
                         f"{xs.shape[1]} and {xt.shape[1]}")
    seed = nonneg_int("seed", seed)
    cs = [float(c) for c in C]
    if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError(f"C must be a non-empty sequence of positive finite numbers, got {C!r}")

    rng = np.random.RandomState(seed)
    ps, pt = rng.permutation(len(xs)), rng.permutation(len(xt))
    hs, ht = len(xs) // 2, len(xt) // 2
    x_fit = np.vstack([xs[ps[:hs]], xt[pt[:ht]]])
    y_fit = np.r_[np.zeros(hs), np.ones(ht)]
    x_val = np.vstack([xs[ps[hs:]], xt[pt[ht:]]])
    y_val = np.r_[np.zeros(len(xs) - hs), np.ones(len(xt) - ht)]

    best = 0.5
    for c in cs:
        clf = LinearSVC(C=c, dual=x_fit.shape[0] <= x_fit.shape[1], max_iter=5000,
                        random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_fit, y_fit)
        err = float(np.mean(clf.predict(x_val) != y_val))
        best = min(best, err, 1.0 - err)
    return 2.0 * (1.0 - 2.0 * best)
