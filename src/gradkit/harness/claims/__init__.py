"""The reproduction suite: one module per paper registers its claim.

Claims of other packages can be added with the ``GRADKIT_CLAIMS`` environment variable
(comma-separated module names imported after the built-in ones).
"""
from __future__ import annotations

import importlib
import os
import pkgutil

from ..protocol import Protocol, scaled
from .base import (CLAIMS, SCALES, ArmContext, ArmResult, Claim, Primary, RunContext, RunOutput, Variant, execute,
                   register)
from .criteria import (AllFinite, AllOf, AtLeast, AtLeastKOf, AtMost, Below, Check, Compare, Criterion, Drop, Gain,
                       Monotonic, Ratio, Within)
from .tuning import Tuned, holdout, tune

_NOT_CLAIMS = {"base", "criteria", "tuning"}

_loaded = False


def builtin_modules() -> list[str]:
    """Names of the claim modules in this package (every module but the framework's own)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_CLAIMS)


def _extra_modules() -> list[str]:
    return [m.strip() for m in os.environ.get("GRADKIT_CLAIMS", "").split(",") if m.strip()]


def load_claims() -> None:
    """Import every built-in claim module and any listed in ``GRADKIT_CLAIMS``."""
    global _loaded
    if _loaded:
        return
    for name in builtin_modules():
        importlib.import_module(f"{__name__}.{name}")
    for mod in _extra_modules():
        importlib.import_module(mod)
    _loaded = True


def get_claim(slug: str) -> Claim:
    """The claim registered as ``slug``, importing as little as possible: its own module first
    (``dann`` -> ``claims.dann``), then the ``GRADKIT_CLAIMS`` modules, every module last."""
    if slug not in CLAIMS:
        name = slug.replace("-", "_")
        if name in builtin_modules():
            importlib.import_module(f"{__name__}.{name}")
    if slug not in CLAIMS:
        for mod in _extra_modules():
            importlib.import_module(mod)
    if slug not in CLAIMS:
        load_claims()
    return CLAIMS.get(slug)


__all__ = [
    "CLAIMS", "SCALES", "Claim", "Primary", "RunContext", "RunOutput", "ArmContext", "ArmResult", "Variant",
    "Protocol", "scaled", "execute", "register", "load_claims", "get_claim", "Criterion", "Check", "Compare",
    "Within", "Ratio", "Gain", "Drop", "Below", "AtLeast", "AtMost", "Monotonic", "AllFinite", "AllOf", "AtLeastKOf",
    "tune", "Tuned", "holdout",
]
