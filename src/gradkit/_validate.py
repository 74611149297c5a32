"""Argument checks shared by the components: clear errors that name the argument, the value and what is expected.

Checks return the validated value and raise :class:`ArgumentError` (both a TypeError and a ValueError):
numbers (``real_scalar``, ``real_in``, ``positive``, ``probability``), ints (``integer``, ``positive_int``,
``nonneg_int``), ``boolean``, ``choice``, ``optional_generator``, tensors (``tensor``, ``tensor_list``,
``param_list``). ``is_int`` / ``is_real`` are the predicates behind them, for checks that word their own
message (a list of ints, ``None or an int``). Use these instead of private copies in each module.
"""
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


def real_in(name: str, value: Any, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False, tensor_ok: bool = True) -> float:
    """A finite real number in an interval, e.g. ``real_in("p", p, 0, 1, high_open=True)`` for ``[0, 1)``.

    Raises :class:`ArgumentError`: ``p must be in [0, 1), got 1.5`` (``must be > 0`` / ``must be >= 0``
    when only ``low`` is given, ``must be <= 1`` when only ``high`` is).
    """
    v = real_scalar(name, value, tensor_ok=tensor_ok)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        if low is not None and high is not None:
            rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rng = f"{'>' if low_open else '>='} {low:g}"
        else:
            rng = f"{'<' if high_open else '<='} {high:g}"
        raise ArgumentError(f"{name} must be {rng}, got {value!r}")
    return v


def positive(name: str, value: Any, *, tensor_ok: bool = True) -> float:
    """A finite real number > 0. Raises :class:`ArgumentError`: ``lr must be finite and > 0, got 0``."""
    v = real_scalar(name, value, tensor_ok=tensor_ok)
    if not v > 0:
        raise ArgumentError(f"{name} must be finite and > 0, got {value!r}")
    return v


def probability(name: str, value: Any, *, tensor_ok: bool = True) -> float:
    """A real number in ``[0, 1]``. Raises :class:`ArgumentError`: ``p must be in [0, 1], got 1.5``."""
    return real_in(name, value, 0.0, 1.0, tensor_ok=tensor_ok)


def _int_phrase(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an int in [{low}, {high}]"
    if low is not None:
        return f"an int >= {low}"
    if high is not None:
        return f"an int <= {high}"
    return "an int"


def _integer(name: str, value: Any, low: int | None, high: int | None, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ArgumentError(f"{name} must be {expected}, got {v}")
    return v


def is_int(value: Any, *, low: int | None = None, high: int | None = None) -> bool:
    """Whether ``value`` is an int (not a bool; numpy integers count) in ``[low, high]``: for checks that
    raise their own message (lists of ints, ``None or an int``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real Python/numpy number (not a bool): for checks with their own message."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An int (``bool`` excluded; numpy integers accepted) in ``[low, high]`` (either bound optional).

    Raises :class:`ArgumentError` (a TypeError and a ValueError), e.g. ``size must be an int >= 2, got 1``,
    ``stage must be an int in [1, 3], got 4``, ``k must be an int, got float 1.5``.
    """
    return _integer(name, value, low, high, _int_phrase(low, high))


def positive_int(name: str, value: Any) -> int:
    """An int >= 1. Raises :class:`ArgumentError`: ``hidden must be a positive int, got 0``."""
    return _integer(name, value, 1, None, "a positive int")


def nonneg_int(name: str, value: Any) -> int:
    """An int >= 0. Raises :class:`ArgumentError`: ``seed must be a non-negative int, got -1``."""
    return _integer(name, value, 0, None, "a non-negative int")


def boolean(name: str, value: Any) -> bool:
    """A Python bool. Raises :class:`ArgumentError`: ``hard must be a bool, got int 1``."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def choice(name: str, value: Any, options: Iterable[Any]) -> Any:
    """One of ``options``. Raises :class:`ArgumentError`: ``mode must be one of ('a', 'b'), got 'c'``."""
    opts = tuple(options)
    try:
        ok = value in opts
    except TypeError:  # unhashable / incomparable value
        ok = False
    if not ok:
        raise ArgumentError(f"{name} must be one of {opts}, got {value!r}")
    return value


def optional_generator(value: Any, name: str = "generator") -> torch.Generator | None:
    """A ``torch.Generator`` or None. Raises :class:`ArgumentError` naming the type given."""
    if value is not None and not isinstance(value, torch.Generator):
        raise ArgumentError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def tensor(name: str, value: Any, *, floating: bool = False, finite: bool = False, min_dim: int = 0) -> torch.Tensor:
    """A ``torch.Tensor``; ``floating``: of a floating dtype; ``finite``: without NaN/inf; at least ``min_dim`` dims.

    Raises :class:`ArgumentError`: ``x must be a torch.Tensor, got list``, ``x must be a floating-point
    tensor, got dtype torch.int64``, ``x must have at least 2 dims, got shape (3,)``, ``x must be finite,
    got 2 non-finite value(s) (NaN/inf) ...``.
    """
    if not isinstance(value, torch.Tensor):
        raise ArgumentError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ArgumentError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ArgumentError(f"{name} must have at least {min_dim} dims, got shape {tuple(value.shape)}")
    if finite and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ArgumentError(f"{name} must be finite, got {bad} non-finite value(s) (NaN/inf) in a tensor of "
                            f"shape {tuple(value.shape)}")
    return value


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
