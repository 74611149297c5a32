"""The inverse-temperature schedule of field-binary networks (paper slug: ``continual-binary``)."""
from __future__ import annotations

import math

from .._validate import positive, positive_int, real_scalar

__all__ = ["field_beta"]


def field_beta(epoch: int, total_epochs: int, beta_max: float = 10.0, offset: float = 0.1) -> float:
    """beta = beta_max * tanh(offset + 2 * epoch / total_epochs): binary weights grow more deterministic.

    Paper slug: continual-binary (official permuted-MNIST code: beta_max = 10, offset = 0.1,
    ``epoch`` = the global epoch counter starting at 1, ``total_epochs`` = n_tasks * epochs_per_task).

    >>> round(field_beta(1, 25), 4)
    1.7808
    >>> round(field_beta(25, 25), 4)
    9.7045
    """
    epoch = positive_int("epoch", epoch)
    total_epochs = positive_int("total_epochs", total_epochs)
    beta_max = positive("beta_max", beta_max)
    offset = real_scalar("offset", offset)
    beta = beta_max * math.tanh(offset + 2.0 * epoch / total_epochs)
    if not beta > 0:
        raise ValueError(f"offset must make beta > 0 at epoch {epoch}, got offset={offset} (beta={beta:.4g})")
    return beta
