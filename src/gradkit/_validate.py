"""Argument checks shared by the components: clear errors that name the argument and the value."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch


class ArgumentError(TypeError, ValueError):
    """A public argument of the wrong type or out of range (catchable as TypeError or ValueError)."""


def real_scalar(name: str, value: Any, *, nonneg: bool = False, tensor_ok: bool = True) -> float:
    """A finite real number from a Python number (or a one-element real tensor when ``tensor_ok``).

    Raises :class:`ArgumentError`, e.g. ``eta must be finite and >= 0, got nan``.
    """
    if isinstance(value, torch.Tensor) and tensor_ok:
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ArgumentError(f"{name} must be a real scalar (0-dim tensor), got a tensor of shape "
                                f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.detach().item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v) or (nonneg and v < 0):
        raise ArgumentError(f"{name} must be finite{' and >= 0' if nonneg else ''}, got {value!r}")
    return v
