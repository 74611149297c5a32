"""The reproduction suite: one module per paper registers its claim.

Claims of other packages can be added with the ``GRADKIT_CLAIMS`` environment variable
(comma-separated module names imported after the built-in ones).
"""
from __future__ import annotations

import importlib
import os
import pkgutil

from .base import CLAIMS, SCALES, Claim, Primary, RunContext, RunOutput, register
from .criteria import AllFinite, AllOf, AtLeast, AtLeastKOf, AtMost, Below, Check, Criterion, Drop, Gain, Monotonic

_NOT_CLAIMS = {"base", "criteria"}

_loaded = False


def builtin_modules() -> list[str]:
    """Names of the claim modules in this package (every module but the framework's own)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_CLAIMS)


def load_claims() -> None:
    """Import every built-in claim module and any listed in ``GRADKIT_CLAIMS``."""
    global _loaded
    if _loaded:
        return
    for name in builtin_modules():
        importlib.import_module(f"{__name__}.{name}")
    extra = [m.strip() for m in os.environ.get("GRADKIT_CLAIMS", "").split(",") if m.strip()]
    for mod in extra:
        importlib.import_module(mod)
    _loaded = True


def get_claim(slug: str) -> Claim:
    load_claims()
    return CLAIMS.get(slug)


__all__ = [
    "CLAIMS", "SCALES", "Claim", "Primary", "RunContext", "RunOutput", "register", "load_claims",
    "get_claim", "Criterion", "Check", "Gain", "Drop", "Below", "AtLeast", "AtMost", "Monotonic",
    "AllFinite", "AllOf", "AtLeastKOf",
]
