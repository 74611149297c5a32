"""Server-side checks of client updates before they are averaged (no Flower needed).

A federated server must not let one client break the global model: an update with missing or extra
keys, another shape or dtype, or NaN/Inf values is rejected with a reason and the round carries on
with the rest. Paper slug: hyperfl (the Flower path of the HyperFL work).

    reason = check_update(update, reference)        # None when the update is acceptable
    reason = check_weight(num_examples)             # None for a finite count > 0

The accepted updates are then averaged by ``gradkit.distributed.federated.weighted_average``
(``sum_i n_i / sum_j n_j * u_i``).

Example::

    ref = {"w": torch.zeros(2, 3)}
    check_update({"w": torch.full((2, 3), float("nan"))}, ref)   # "'w' has 6 non-finite values"
    check_update({"w": torch.zeros(3, 3)}, ref)                  # "'w' has shape (3, 3), expected (2, 3)"
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..._validate import ArgumentError, positive

__all__ = ["check_update", "check_weight", "as_tensor_dict"]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def as_tensor_dict(arrays: Mapping[str, Any], name: str = "arrays") -> dict[str, torch.Tensor]:
    """``{key: Tensor}`` from a mapping of tensors or numpy arrays (numpy arrays are shared, not copied)."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{name} must be a mapping of str to tensors, got {type(arrays).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in arrays.items():
        if not isinstance(k, str):
            raise TypeError(f"{name} keys must be str, got {type(k).__name__} {k!r}")
        try:
            out[k] = _as_tensor(v)
        except TypeError as e:
            raise TypeError(f"{name}[{k!r}]: {e}") from None
    return out


def _names(keys: Any, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return "[" + shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "") + "]"


def check_update(update: Mapping[str, Any], reference: Mapping[str, Any], *,
                 check_dtype: bool = True) -> str | None:
    """Why ``update`` cannot be averaged into ``reference`` (keys, shapes, dtypes, finiteness), or None.

    ``update`` and ``reference`` map names to tensors or numpy arrays. An update is acceptable when it
    has exactly the reference's keys, each value has the reference's shape (and dtype when
    ``check_dtype``), floating values are all finite, and integer buffers are integers.
    """
    if not isinstance(update, Mapping):
        return f"update is not a mapping of arrays (got {type(update).__name__})"
    ref = as_tensor_dict(reference, "reference")
    missing = set(ref) - set(update)
    if missing:
        return f"missing keys {_names(missing)}"
    extra = set(update) - set(ref)
    if extra:
        return f"unexpected keys {_names(extra)}"
    for k, r in ref.items():
        try:
            u = _as_tensor(update[k])
        except TypeError as e:
            return f"{k!r}: {e}"
        if tuple(u.shape) != tuple(r.shape):
            return f"{k!r} has shape {tuple(u.shape)}, expected {tuple(r.shape)}"
        if check_dtype and u.dtype != r.dtype:
            return f"{k!r} has dtype {u.dtype}, expected {r.dtype}"
        if u.is_floating_point() or u.is_complex():
            bad = int((~torch.isfinite(u)).sum())
            if bad:
                return f"{k!r} has {bad} non-finite value{'s' if bad > 1 else ''}"
        elif r.is_floating_point():
            return f"{k!r} has dtype {u.dtype}, expected a floating dtype like {r.dtype}"
    return None


def check_weight(weight: Any) -> str | None:
    """Why ``weight`` (a client's example count) cannot weight an average, or None."""
    try:
        positive("weight", weight, tensor_ok=False)
    except ArgumentError as e:
        return str(e)
    return None
