"""Every ```python block of the README and of the docs pages runs (blocks of a page share a namespace).

A page whose examples import an optional package that is not installed (e.g. flwr) is skipped."""
import importlib.util
import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)


@pytest.mark.parametrize("page", [p for p in PAGES if BLOCK.search(p.read_text())],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {}
    blocks = BLOCK.findall(page.read_text())
    missing = sorted({m for code in blocks for m in IMPORT.findall(code) if importlib.util.find_spec(m) is None})
    if missing:
        pytest.skip(f"examples need {', '.join(missing)} (optional), not installed")
    from gradkit.harness.claims import CLAIMS

    before = set(CLAIMS.names())
    try:
        for code in blocks:
            exec(compile(code, page.relative_to(REPO).as_posix(), "exec"), namespace)
    finally:  # a page that registers an example claim leaves the registry as it found it
        for name in set(CLAIMS.names()) - before:
            CLAIMS.remove(name)


def test_every_paper_page_has_an_example():
    from gradkit.harness.claims import CLAIMS, load_claims

    load_claims()
    for slug in CLAIMS.names():
        page = REPO / "docs" / f"{slug}.md"
        assert page.exists(), f"no docs page for {slug}"
        assert BLOCK.search(page.read_text()), f"docs/{slug}.md has no runnable python example"
