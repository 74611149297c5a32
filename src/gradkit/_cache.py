"""Where gradkit caches what it generates (data sets, the claim catalog). Standard library only."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated data is cached: ``$GRADKIT_CACHE`` or ``~/.cache/gradkit``."""
    root = os.environ.get("GRADKIT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradkit"
