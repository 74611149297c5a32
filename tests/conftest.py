import os
import random
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread unless GRADKIT_TEST_THREADS says otherwise: results must not depend on how
# many cores a machine has, and CI runs the claim smoke tests a second time with another count.
TEST_THREADS = int(os.environ.get("GRADKIT_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

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
def _seeded_and_threads():
    """Every test starts from the same seeds and thread count, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)
    yield


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Never touch the user's results database or cache from tests."""
    monkeypatch.setenv("GRADKIT_DB", str(tmp_path / "results.db"))
    monkeypatch.setenv("GRADKIT_CACHE", str(Path(os.environ.get("GRADKIT_TEST_CACHE", REPO / ".pytest_cache" / "gradkit"))))


_SMOKE_CACHE: dict = {}


@pytest.fixture(scope="session")
def smoke_run():
    """``smoke_run(slug, seed=0, data_root=None)`` -> the claim's RunOutput at smoke scale, computed once
    per session and shared by the generic smoke test and a claim's own tests."""
    from gradkit.harness.claims import RunContext, get_claim

    def run(slug: str, seed: int = 0, data_root=None):
        key = (slug, seed, str(data_root) if data_root is not None else None)
        if key not in _SMOKE_CACHE:
            _SMOKE_CACHE[key] = get_claim(slug).run(
                RunContext(scale="smoke", seed=seed, data_root=Path(data_root) if data_root is not None else None))
        return _SMOKE_CACHE[key]

    return run
