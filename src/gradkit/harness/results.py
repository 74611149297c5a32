"""The results store: every finished claim run and benchmark, in one SQLite file.

Each run is committed in its own transaction the moment it finishes (WAL journal, busy timeout),
so an interrupted suite loses nothing and several ``gradkit`` processes can write one file at once.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    slug TEXT NOT NULL,
    claim_version INTEGER NOT NULL,
    scale TEXT NOT NULL,
    seed INTEGER NOT NULL,
    data_mode TEXT NOT NULL,
    data TEXT NOT NULL,
    metrics TEXT NOT NULL,
    curves TEXT NOT NULL,
    info TEXT NOT NULL,
    seed_passed INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    git_rev TEXT,
    created_at REAL NOT NULL,
    overrides TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_key ON runs (slug, claim_version, scale, data_mode, seed);
CREATE TABLE IF NOT EXISTS bench (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    description TEXT NOT NULL,
    baseline TEXT NOT NULL,
    baseline_s REAL NOT NULL,
    candidate_s REAL NOT NULL,
    ratio REAL NOT NULL,
    target REAL,
    passed INTEGER,
    repeats INTEGER NOT NULL,
    extra TEXT NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    git_rev TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS compose (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    max_rel_err REAL,
    seconds REAL NOT NULL,
    versions TEXT NOT NULL,
    git_rev TEXT,
    created_at REAL NOT NULL
);
"""


class StoreError(Exception):
    """The results database cannot be opened or written (path, permissions, corruption)."""


def _finite_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def default_db_path() -> Path:
    """``$GRADKIT_DB``, else ``$XDG_DATA_HOME/gradkit/results.db`` (``~/.local/share/...``)."""
    env = os.environ.get("GRADKIT_DB")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "gradkit" / "results.db"


def environment_versions() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__

    return {"gradkit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


_GIT_REV: list[str | None] = []


def git_revision() -> str | None:
    """The git revision of the gradkit source tree, when it is a checkout (else None)."""
    if not _GIT_REV:
        here = Path(__file__).resolve().parent
        try:
            out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                 text=True, timeout=5)
            rev = out.stdout.strip() if out.returncode == 0 else None
            if rev:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                       capture_output=True, text=True, timeout=5).stdout.strip()
                rev += "+dirty" if dirty else ""
        except (OSError, subprocess.SubprocessError):
            rev = None
        _GIT_REV.append(rev)
    return _GIT_REV[0]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become strings so they survive the round trip."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return _clean(obj.item())
    return obj


def _restore(obj: Any) -> Any:
    if isinstance(obj, str) and obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


@dataclass
class RunRecord:
    """One finished claim run for one seed."""

    slug: str
    claim_version: int
    scale: str
    seed: int
    data_mode: str
    data: str
    metrics: dict[str, dict[str, float]]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seed_passed: bool = False
    duration_s: float = 0.0
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    git_rev: str | None = None
    created_at: float = 0.0
    id: int | None = None
    overrides: str = ""
    verdict: str = ""


@dataclass
class BenchRecord:
    name: str
    slug: str
    description: str
    baseline: str
    baseline_s: float
    candidate_s: float
    ratio: float
    target: float | None
    passed: bool | None
    repeats: int
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    git_rev: str | None = None
    created_at: float = 0.0


class ResultStore:
    """SQLite store of claim runs and benchmarks. Safe for concurrent writers.

    >>> store = ResultStore(":memory:")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path | None = None, timeout: float = 60.0) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.timeout = timeout
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder of the results database {self.path}: {e.strerror}") from None
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(f"results database {self.path} is not writable")
        if not os.access(self.path.parent, os.W_OK):
            raise StoreError(f"cannot write the results database {self.path}: folder is not writable")
        deadline = time.monotonic() + self.timeout
        pause = 0.01
        while True:
            try:
                self._init_schema()
                return
            except sqlite3.OperationalError as e:
                # two processes opening a new database at once: switching to WAL and creating the schema can
                # report "locked" without waiting on the busy timeout, so retry until the timeout runs out
                contended = "locked" in str(e) or "busy" in str(e)
                if not contended or time.monotonic() > deadline:
                    raise StoreError(f"results database {self.path} cannot be used: {e}") from None
                time.sleep(pause)
                pause = min(2 * pause, 0.5)
            except sqlite3.DatabaseError as e:
                raise StoreError(f"results database {self.path} cannot be used: {e}") from None

    def _init_schema(self) -> None:
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")  # one writer creates or upgrades the schema at a time
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                cols = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
                for col in ("overrides", "verdict"):  # databases written before schema 2
                    if col not in cols:
                        con.execute(f"ALTER TABLE runs ADD COLUMN {col} TEXT NOT NULL DEFAULT ''")
                con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open results database {self.path}: {e}") from None
        try:
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            yield con
        finally:
            con.close()

    def _write(self, sql: str, params: tuple) -> int:
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                cur = con.execute(sql, params)
                con.execute("COMMIT")
            except sqlite3.Error as e:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise StoreError(f"cannot write to results database {self.path}: {e}") from None
            return int(cur.lastrowid)

    # ---- claim runs -------------------------------------------------------------------------
    def add_run(self, r: RunRecord) -> int:
        """Insert one finished run, committed at once; returns its id."""
        r.created_at = r.created_at or time.time()
        r.id = self._write(
            "INSERT INTO runs (slug, claim_version, scale, seed, data_mode, data, metrics, curves, info, "
            "seed_passed, duration_s, device, versions, git_rev, created_at, overrides, verdict) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.slug, r.claim_version, r.scale, r.seed, r.data_mode, r.data, json.dumps(_clean(r.metrics)),
             json.dumps(_clean(r.curves)), json.dumps(_clean(r.info)), int(bool(r.seed_passed)), r.duration_s,
             r.device, json.dumps(r.versions), r.git_rev, r.created_at, r.overrides, r.verdict),
        )
        return r.id

    def runs(self, slug: str | None = None, scale: str | None = None, data_mode: str | None = None,
             claim_version: int | None = None, overrides: str | None = None) -> list[RunRecord]:
        """All stored runs matching the filters, oldest first."""
        where, params = [], []
        for col, val in (("slug", slug), ("scale", scale), ("data_mode", data_mode), ("claim_version", claim_version),
                         ("overrides", overrides)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        sql = "SELECT id, slug, claim_version, scale, seed, data_mode, data, metrics, curves, info, seed_passed, " \
              "duration_s, device, versions, git_rev, created_at, overrides, verdict FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        with self._connect() as con:
            try:
                rows = con.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read results database {self.path}: {e}") from None
        return [
            RunRecord(slug=row[1], claim_version=row[2], scale=row[3], seed=row[4], data_mode=row[5], data=row[6],
                      metrics=_restore(json.loads(row[7])), curves=_restore(json.loads(row[8])),
                      info=_restore(json.loads(row[9])), seed_passed=bool(row[10]), duration_s=row[11],
                      device=row[12], versions=json.loads(row[13]), git_rev=row[14], created_at=row[15], id=row[0],
                      overrides=row[16], verdict=row[17])
            for row in rows
        ]

    def latest_per_seed(self, slug: str, claim_version: int, scale: str, data_mode: str,
                        overrides: str = "") -> dict[int, RunRecord]:
        """The newest run of each seed for one claim/protocol/scale/data mode/overrides ('' = defaults)."""
        out: dict[int, RunRecord] = {}
        for r in self.runs(slug=slug, scale=scale, data_mode=data_mode, claim_version=claim_version,
                           overrides=overrides):
            out[r.seed] = r
        return out

    def groups(self) -> list[tuple[str, int, str, str, str]]:
        """Distinct (slug, claim_version, scale, data_mode, overrides) groups with stored runs."""
        with self._connect() as con:
            return [tuple(r) for r in con.execute(
                "SELECT DISTINCT slug, claim_version, scale, data_mode, overrides FROM runs "
                "ORDER BY slug, scale, data_mode, overrides"
            ).fetchall()]

    # ---- benchmarks -------------------------------------------------------------------------
    def add_bench(self, b: BenchRecord) -> int:
        b.created_at = b.created_at or time.time()
        return self._write(
            "INSERT INTO bench (name, slug, description, baseline, baseline_s, candidate_s, ratio, target, passed, "
            "repeats, extra, device, versions, git_rev, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (b.name, b.slug, b.description, b.baseline, b.baseline_s, b.candidate_s, b.ratio, b.target,
             None if b.passed is None else int(b.passed), b.repeats, json.dumps(_clean(b.extra)), b.device,
             json.dumps(b.versions), b.git_rev, b.created_at),
        )

    # ---- composition matrix -----------------------------------------------------------------
    def add_compose(self, cells: list[dict[str, Any]]) -> int:
        """Store composition cells (dicts with a, b, status, reason, max_rel_err, seconds) in one transaction."""
        now = time.time()
        versions, rev = json.dumps(environment_versions()), git_revision()
        rows = [(c["a"], c["b"], c["status"], c["reason"], _finite_or_none(c.get("max_rel_err")),
                 float(c.get("seconds", 0.0)), versions, rev, now) for c in cells]
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT INTO compose (a, b, status, reason, max_rel_err, seconds, versions, git_rev, "
                                "created_at) VALUES (?,?,?,?,?,?,?,?,?)", rows)
                con.execute("COMMIT")
            except sqlite3.Error as e:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise StoreError(f"cannot write to results database {self.path}: {e}") from None
        return len(rows)

    def latest_compose(self) -> list[dict[str, Any]]:
        """The newest stored cell of each family pair."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT a, b, status, reason, max_rel_err, seconds, git_rev, created_at FROM compose WHERE id IN "
                "(SELECT MAX(id) FROM compose GROUP BY a, b) ORDER BY id").fetchall()
        keys = ("a", "b", "status", "reason", "max_rel_err", "seconds", "git_rev", "created_at")
        return [dict(zip(keys, r)) for r in rows]

    def latest_benches(self) -> list[BenchRecord]:
        """The newest result of each benchmark, by name."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT name, slug, description, baseline, baseline_s, candidate_s, ratio, target, passed, repeats, "
                "extra, device, versions, git_rev, created_at FROM bench WHERE id IN "
                "(SELECT MAX(id) FROM bench GROUP BY name) ORDER BY slug, name"
            ).fetchall()
        return [BenchRecord(*row[:8], None if row[8] is None else bool(row[8]), row[9],
                            _restore(json.loads(row[10])), row[11], json.loads(row[12]), row[13], row[14])
                for row in rows]
