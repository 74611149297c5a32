import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def real_data_root() -> Path | None:
    """The real data sets folder (``$GRADKIT_TEST_DATA``, default ``../shared/data``) or None."""
    p = Path(os.environ.get("GRADKIT_TEST_DATA", REPO.parent / "shared" / "data"))
    return p if p.is_dir() else None


@pytest.fixture
def data_root():
    root = real_data_root()
    if root is None:
        pytest.skip("real data folder not present (set GRADKIT_TEST_DATA)")
    return root


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the user's results database or cache from tests."""
    monkeypatch.setenv("GRADKIT_DB", str(tmp_path / "results.db"))
    monkeypatch.setenv("GRADKIT_CACHE", str(Path(os.environ.get("GRADKIT_TEST_CACHE", REPO / ".pytest_cache" / "gradkit"))))
