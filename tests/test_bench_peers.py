"""`gradkit bench --peers`: public implementations timed against the same baseline in the same run."""
import json

import pytest

from gradkit.harness.bench import run_benchmarks
from test_cli import gk


def test_peer_is_timed_and_compared(tmp_path):
    pytest.importorskip("captum")
    db = tmp_path / "r.db"
    r = gk("bench", "saliency-attribution", "--repeats", "3", "--peers", "--json", db=db)
    assert r.returncode in (0, 1), r.stderr
    (b,) = json.loads(r.stdout)
    (peer,) = b["peers"]
    assert peer["name"] == "captum" and peer["status"] == "ok"
    assert peer["ours_vs_peer"] == pytest.approx(b["ratio"] / peer["ratio"])
    assert peer["direct_min"] <= peer["direct"] <= peer["direct_max"]  # ours timed head to head with the peer
    out = tmp_path / "rep"
    assert gk("report", "--out", str(out), db=db).returncode == 0
    md = (out / "report.md").read_text()
    assert "vs best peer" in md and "(captum:" in md and "head to head" in md
    r = gk("bench", "saliency-attribution", "--repeats", "3", "--peers", db=db)
    assert "peer captum:" in r.stdout and "ours / peer" in r.stdout and "timed against each other" in r.stdout


def test_without_peers_nothing_extra_is_timed():
    ((_, r),) = list(run_benchmarks(["saliency-attribution"], repeats=3))
    assert "peers" not in r.extra


def test_a_missing_peer_is_recorded_not_fatal(monkeypatch):
    import gradkit.harness.benchmarks.per_example_grads as mod

    monkeypatch.setattr(mod, "import_peer", lambda name: None)
    ((_, r),) = list(run_benchmarks(["per-example-grads-linear"], repeats=3, peers=True))
    assert r.extra["peers"] == [{"name": "opacus", "status": "not installed"}]


@pytest.mark.parametrize("name", ["reversible-mlp-2-blocks", "reversible-conv-2-blocks", "tract-first-conv-step-digits",
                                  "per-example-grads-vmap"])
def test_peer_benchmarks_run(name):
    ((_, r),) = list(run_benchmarks([name], repeats=3, peers=True))
    assert r.ratio > 0 and len(r.extra["peers"]) == 1
    peer = r.extra["peers"][0]
    assert peer["status"] != "ok" or peer["direct"] > 0
    if name.startswith("reversible"):
        assert r.extra["saved_ratio"] < 0.5  # stores less than the plain coupling
