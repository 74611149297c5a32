"""What ``gradkit list``, ``gradkit show`` and ``gradkit bench --help`` print, without importing the experiments.

Importing a claim module imports torch and the library (about a second). The catalog is built once by
importing every claim, then kept as JSON in the cache folder under a key made of the path, size and
modification time of every gradkit source file: any edit to the package rebuilds it, and a stale
entry can never be shown. Claims added through ``GRADKIT_CLAIMS`` are not covered by the key, so with
that variable set the catalog is always built afresh and not stored.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .._cache import cache_dir

FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[1]   # src/gradkit


def catalog_key() -> str:
    """A digest of every gradkit source file's path, size and mtime (and the catalog format)."""
    h = hashlib.sha256(f"{FORMAT}".encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(_PACKAGE).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


def claim_entry(c: Any) -> dict[str, Any]:
    """Everything ``list`` and ``show`` print about claim ``c``, as JSON-ready data."""
    from .protocol import protocol_table

    r = c.resolve(None)
    tables = {"bundled": protocol_table(c.protocol)}
    for v in c.variants:
        rows = protocol_table(v.protocol or c.protocol)
        if v.overrides:
            rows = [(f, t, *[repr(v.overrides[f]) if f in v.overrides else x for x in vals]) for f, t, *vals in rows]
        tables[v.name] = rows
    return {
        "slug": c.slug, "title": c.title, "arxiv": c.arxiv, "statement": c.statement,
        "paper_figure": c.paper_figure, "criterion": c.criterion.describe(),
        "control": ", ".join(f"{b} in place of {a}" for a, b in r.control.items())
                   + (f" ({c.control_note})" if c.control_note else ""),
        "primary": f"{c.primary.metric}: {c.primary.ours} vs {c.primary.baseline}",
        "arms": list(c.arms), "data": c.data, "real_data": c.real_data,
        "variants": {v.name: f"{v.description}; scales {', '.join(v.scales)}; criterion "
                             f"{(v.criterion or c.criterion).describe()}" for v in c.variants},
        "default_seeds": c.default_seeds, "version": c.version,
        "uses": list(c.uses), "notes": c.notes,
        "protocol_tables": {name: [list(map(str, row)) for row in rows] for name, rows in tables.items()},
    }


def _build_claims() -> dict[str, dict[str, Any]]:
    from .claims import CLAIMS, load_claims

    load_claims()
    return {slug: claim_entry(c) for slug, c in CLAIMS.items()}


def _build_benchmarks() -> dict[str, dict[str, Any]]:
    from .bench import BENCHMARKS, load_benchmarks

    load_benchmarks()
    return {name: {"slug": b.slug, "description": b.description, "target": b.target}
            for name, b in BENCHMARKS.items()}


_BUILDERS = {"claims": _build_claims, "benchmarks": _build_benchmarks}


def _cached(kind: str) -> dict[str, dict[str, Any]]:
    build = _BUILDERS[kind]
    if os.environ.get("GRADKIT_CLAIMS", "").strip():
        return build()
    key = catalog_key()
    path = cache_dir() / f"{kind}-catalog.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored["entries"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    entries = build()
    try:  # a read-only cache folder only costs speed
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "entries": entries}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return entries


def load_catalog() -> dict[str, dict[str, Any]]:
    """``{slug: entry}`` for every registered claim, from the cache when it is current."""
    return _cached("claims")


def benchmark_catalog() -> dict[str, dict[str, Any]]:
    """``{name: {slug, description, target}}`` for every registered benchmark, from the cache when current."""
    return _cached("benchmarks")
