"""Argument checks shared by the components: clear errors that name the argument and the value."""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

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


def tensor_list(params: torch.Tensor | Iterable[torch.Tensor], name: str = "params") -> list[torch.Tensor]:
    """A list of distinct tensors from a tensor or an iterable of tensors (duplicates dropped)."""
    if isinstance(params, torch.Tensor):
        items = [params]
    else:
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(params).__name__}") from None
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for i, p in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_list(params: Any, owner: str) -> list[torch.Tensor]:
    """Tensor, iterable of tensors, or iterable of optimizer-style param-group dicts -> distinct tensors.

    ``owner`` names the component in the error for an empty list.
    """
    if isinstance(params, torch.Tensor):
        return tensor_list(params)
    try:
        items = list(params)
    except TypeError:
        raise TypeError("params must be a tensor, an iterable of tensors or of param-group dicts, "
                        f"got {type(params).__name__}") from None
    flat: list[Any] = []
    for i, it in enumerate(items):
        if isinstance(it, Mapping):
            if "params" not in it:
                raise ValueError(f"params[{i}] is a dict without a 'params' key")
            ps = it["params"]
            flat.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            flat.append(it)
    out = tensor_list(flat)
    if not out:
        raise ValueError(f"params is empty: {owner} needs at least one parameter")
    return out
