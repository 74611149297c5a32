"""A claim's protocol: its hyperparameters as one frozen dataclass, a value per scale.

A field takes one value at every scale (an ordinary default) or one per scale::

    @dataclass(frozen=True)
    class DannProtocol(Protocol):
        epochs: int = scaled(smoke=10, quick=100, full=500)
        lam: float = 6.0

    DannProtocol.at("quick")                      # epochs=100, lam=6.0
    DannProtocol.at("smoke", lam=0.5)             # overrides, type-checked
    parse_overrides(DannProtocol, ["lam=0.5"])    # {"lam": 0.5}, from the command line

Every stored run carries ``asdict`` of the protocol it ran with; ``gradkit show`` and the docs print
the table of :func:`protocol_table` from the same class, so the numbers cannot drift apart.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from typing import Any, Mapping, Sequence

SCALES = ("smoke", "quick", "full")

_SCALED = "gradkit_scaled"


class ProtocolError(ValueError):
    """An override names no field of the protocol, or gives a value of the wrong type."""


def scaled(smoke: Any, quick: Any, full: Any = dataclasses.MISSING) -> Any:
    """A protocol field with one value per scale (``full`` defaults to ``quick``)."""
    if full is dataclasses.MISSING:
        full = quick
    values = {"smoke": smoke, "quick": quick, "full": full}
    return dataclasses.field(default=quick, metadata={_SCALED: values})


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Base class of claim protocols (frozen dataclasses); see the module docstring."""

    @classmethod
    def at(cls, scale: str, **overrides: Any):
        """The protocol at ``scale`` with ``overrides`` (field -> value) applied after checking them."""
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        values = {}
        for f in dataclasses.fields(cls):
            per_scale = f.metadata.get(_SCALED)
            if per_scale is not None:
                values[f.name] = per_scale[scale]
        checked = {k: check_value(cls, k, v) for k, v in overrides.items()}
        return cls(**{**values, **checked})

    def asdict(self) -> dict[str, Any]:
        """Field -> value, JSON-friendly (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a protocol class (string annotations included)."""
    return typing.get_type_hints(cls)


def _matches(tp: Any, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits type ``tp``; returns (ok, value converted to the field's form)."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, conv = _matches(a, value)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple):
            value = (value,)  # a single value for a tuple field: ``--set sparsities=0.9``
        if len(args) == 2 and args[1] is Ellipsis:
            conv = []
            for x in value:
                ok, c = _matches(args[0], x)
                if not ok:
                    return False, value
                conv.append(c)
            return True, tuple(conv)
        if args and len(args) != len(value):
            return False, value
        conv = []
        for a, x in zip(args, value) if args else ((Any, x) for x in value):
            ok, c = _matches(a, x)
            if not ok:
                return False, value
            conv.append(c)
        return True, tuple(conv)
    if origin is typing.Literal:
        return value in args, value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(cls: type, name: str, value: Any) -> Any:
    """``value`` converted for field ``name`` of ``cls``; ProtocolError naming field, value and type."""
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        raise ProtocolError(f"unknown protocol field {name!r} for {cls.__name__}; fields: {', '.join(names)}")
    tp = field_types(cls)[name]
    ok, conv = _matches(tp, value)
    if not ok:
        raise ProtocolError(f"protocol field {name!r} expects {_type_name(tp)}, got {value!r}")
    if isinstance(conv, float) and not math.isfinite(conv):
        raise ProtocolError(f"protocol field {name!r} must be finite, got {value!r}")
    return conv


def parse_literal(text: str) -> Any:
    """A command-line value: a Python literal (``0.5``, ``True``, ``(1, 2)``, ``None``), ``a,b`` as a
    tuple, ``true``/``false``/``none`` in any case, else the text itself."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(s)  # nan, inf: rejected later as not finite
    except ValueError:
        pass
    if "," in s:
        return tuple(parse_literal(p) for p in s.split(",") if p.strip())
    return s


def parse_overrides(cls: type, items: Sequence[str]) -> dict[str, Any]:
    """``["lam=0.5", "epochs=3"]`` -> ``{"lam": 0.5, "epochs": 3}``, checked against ``cls``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ProtocolError(f"--set expects field=value, got {item!r}")
        name, _, text = item.partition("=")
        name = name.strip()
        if name in out:
            raise ProtocolError(f"--set gives {name!r} twice")
        out[name] = check_value(cls, name, parse_literal(text))
    return out


def protocol_table(cls: type) -> list[tuple[str, str, str, str, str]]:
    """Rows ``(field, type, smoke, quick, full)`` of a protocol class, for docs and ``gradkit show``."""
    rows = []
    types_ = field_types(cls)
    at = {s: cls.at(s) for s in SCALES}
    for f in dataclasses.fields(cls):
        vals = [repr(getattr(at[s], f.name)) for s in SCALES]
        rows.append((f.name, _type_name(types_[f.name]), *vals))
    return rows


def overrides_key(overrides: Mapping[str, Any]) -> str:
    """A canonical text of an overrides mapping ('' for none): runs are grouped and resumed by it."""
    if not overrides:
        return ""
    return ", ".join(f"{k}={_jsonable(overrides[k])!r}" for k in sorted(overrides))
