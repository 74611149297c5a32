"""Composition matrix: every pair of techniques in one model, checked against plain-parts references."""
import contextlib
import json

import pytest
import torch

from gradkit.harness import compose
from gradkit.harness.compose import FAMILIES, check_pair, run_matrix
from test_cli import gk


def test_whole_matrix_is_green_and_fast():
    cells = run_matrix()
    n = len(FAMILIES)
    assert len(cells) == n * (n + 1) // 2
    broken = [(c.a, c.b, c.reason) for c in cells if not c.green]
    assert not broken, broken
    assert sum(c.seconds for c in cells) < 60
    # exact cells really are exact; lossy families are judged by their invariants
    for c in cells:
        if c.status == "ok":
            assert c.max_rel_err < 1e-9
        if "mesa" in (c.a, c.b) or "gradient_noise" in (c.a, c.b):
            assert c.status == "invariant"


def test_a_recompute_that_updates_running_statistics_twice_is_caught(monkeypatch):
    """Negative control: without the state guard around the reversible recompute, EvoNorm-B0's running
    variance moves twice per step; the matrix must flag the pair."""
    import gradkit.functional.reversible as rev

    monkeypatch.setattr(rev, "_restore_buffers", lambda buffers: contextlib.nullcontext())
    cell = check_pair("reversible", "evonorm")
    assert cell.status == "broken" and "running statistics" in cell.reason
    assert check_pair("reversible", "tract").status == "ok"  # stateless blocks do not notice


def test_a_wrong_gradient_is_caught(monkeypatch):
    """Negative control: a reference whose reversal strength differs from the layer's must break the cell."""
    real = compose._RefGRL.__init__

    def init(self, ours):
        real(self, ours)
        self.lam = self.lam * 1.01

    monkeypatch.setattr(compose._RefGRL, "__init__", init)
    cell = check_pair("grl", "mfac")
    assert cell.status == "broken" and "gradients" in cell.reason


def test_dgc_that_sends_the_wrong_entries_is_caught(monkeypatch):
    from gradkit.distributed import DGCCompressor

    real = DGCCompressor.decompress

    def shifted(self, sparse, shape, *a, **k):
        out = real(self, sparse, shape, *a, **k)
        return out.roll(1)  # right values, wrong positions

    monkeypatch.setattr(DGCCompressor, "decompress", shifted)
    assert check_pair("dgc", "kan").status == "broken"


def test_noise_of_the_wrong_size_is_caught(monkeypatch):
    monkeypatch.setattr(compose, "NOISE_ETA", 0.01)
    from gradkit.optim import GradientNoise

    real = GradientNoise.__init__
    monkeypatch.setattr(GradientNoise, "__init__", lambda self, *a, eta=0.01, **k: real(self, *a, eta=4 * eta, **k))
    cell = check_pair("gradient_noise", "binary")
    assert cell.status == "broken" and "noise" in cell.reason


def test_mesa_rounding_from_the_global_rng_shifts_later_random_draws():
    """Why the matrix gives Mesa its own generator: with the default (global RNG) a dropout mask after a
    Mesa layer differs from the one the same model draws in plain float."""
    from gradkit.nn import MesaLinear

    def draw(layer):
        torch.manual_seed(0)
        layer(torch.randn(4, 8, requires_grad=True))
        return torch.rand(3)

    plain = draw(torch.nn.Linear(8, 8))
    shared = draw(MesaLinear(8, 8))
    own = MesaLinear(8, 8)
    own.quantizer.generator = torch.Generator().manual_seed(1)
    assert not torch.equal(plain, shared)
    assert torch.equal(plain, draw(own))


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'foo'"):
        check_pair("foo", "tract")


def test_cli_pair_list_store_and_report(tmp_path):
    db = tmp_path / "r.db"
    r = gk("compose", "mfac", "tract", db=db)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tract + mfac") and " ok " in r.stdout
    r = gk("compose", "--list")
    assert r.returncode == 0 and all(n in r.stdout for n in FAMILIES)
    r = gk("compose", "nope", db=db)
    assert r.returncode == 2 and "unknown family 'nope'" in r.stderr
    r = gk("compose", "a", "b", "c", db=db)
    assert r.returncode == 2
    r = gk("compose", "mesa", "--json", db=db)
    assert json.loads(r.stdout)[0]["status"] == "invariant"
    out = tmp_path / "rep"
    assert gk("report", "--out", str(out), db=db).returncode == 0
    md = (out / "report.md").read_text()
    assert "## Composition" in md and "| **tract** |" in md
    html = (out / "report.html").read_text()
    assert "class='compose'" in html and "c-ok" in html and "c-invariant" in html
