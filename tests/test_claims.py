"""Every registered claim, driven by the registry: a new claim is covered by registering it.

At smoke scale each claim runs once (shared with the claim's own tests through ``smoke_run``): its
metrics are numbers in their declared bounds, its criterion and negative control evaluate, the
protocol is stored with the run, and the documented protocol is the one that ran.
"""
import math

import pytest

from gradkit.harness.claims import CLAIMS, builtin_modules, get_claim, load_claims
from gradkit.harness.protocol import SCALES, protocol_table
from gradkit.harness.suite import FAIL, INCONCLUSIVE, PASS, decide

# one claim module per slug (``backprop_saliency`` registers ``backprop-saliency``); each test imports
# only its own claim, so one broken claim module fails its own tests, not every claim's
SLUGS = [m.replace("_", "-") for m in builtin_modules()]


def test_every_module_registers_its_claim():
    load_claims()
    assert set(SLUGS) <= set(CLAIMS.names())


@pytest.mark.parametrize("slug", SLUGS)
def test_claim_declares_protocol_arms_and_control(slug):
    c = get_claim(slug)
    r = c.resolve(None)
    for scale in SCALES:
        c.protocol.at(scale)  # every scale resolves
    assert protocol_table(c.protocol), "a protocol with no fields"
    for arm, stand_in in r.control.items():
        assert stand_in in r.arms or stand_in in c.arms or any(stand_in in (v.arms or {}) for v in c.variants), \
            f"control stand-in {stand_in!r} is not an arm"
    assert r.primary.ours in r.arms and r.primary.baseline in r.arms
    for v in c.variants:
        rv = c.resolve(v)
        assert rv.primary.ours in rv.arms and rv.primary.baseline in rv.arms
        for scale in v.scales:
            rv.protocol.at(scale, **dict(v.overrides))


@pytest.mark.parametrize("slug", SLUGS)
def test_claim_smoke(slug, smoke_run):
    c = get_claim(slug)
    out = smoke_run(slug)
    r = c.resolve(None)
    assert out.data == r.name
    assert set(out.metrics) == set(r.arms)
    for arm, m in out.metrics.items():
        assert m, f"arm {arm} has no metrics"
        for k, v in m.items():
            assert isinstance(v, (int, float)) and not isinstance(v, bool), (arm, k, v)
            assert math.isfinite(v), f"{slug}: {arm}.{k} = {v}"
            if k in c.bounds:
                lo, hi = c.bounds[k]
                assert lo <= v <= hi, f"{slug}: {arm}.{k} = {v} outside [{lo}, {hi}]"
    for name, per_arm in out.curves.items():
        assert set(per_arm) <= set(r.arms), name
    assert out.info["protocol"] == c.protocol.at("smoke").asdict()
    assert set(out.info["seconds_per_arm"]) == set(r.arms)
    v = decide(c, out.data, [out.metrics])
    assert v.verdict in (PASS, FAIL, INCONCLUSIVE) and v.checks and v.control_checks
    if not any(k.detail.startswith("cannot evaluate") for k in v.checks):
        # (a smoke protocol may leave out data sets the criterion reads: then neither can be evaluated)
        assert v.control_passed is not None, f"{slug}: the negative control cannot be evaluated: {v.reason}"


@pytest.mark.parametrize("slug", SLUGS)
def test_claim_plots_are_curves_it_records(slug, smoke_run):
    c = get_claim(slug)
    out = smoke_run(slug)
    missing = [p for p in c.plots if p not in out.curves]
    assert len(missing) < len(c.plots) or not c.plots, f"{slug}: plots {missing} are not recorded curves ({sorted(out.curves)})"
