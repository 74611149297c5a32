"""peri-ln: LN placements (post/pre/peri/output_only), residual-stream probes, Markov data, claim."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradkit.data.sequences import MarkovLanguage
from gradkit.harness.claims.peri_ln import TinyTransformerLM  # the claim's model
from gradkit.nn.peri_ln import PLACEMENTS, ResidualNormBlock, make_norm, weight_decay_groups
from gradkit.probes.activations import ResidualStreamProbe, count_spikes, hidden_state_stats
from gradkit.testing import assert_same_grads, count_hooks, param_grads

REPO = Path(__file__).resolve().parents[1]


def _lin(d=8, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, d)


def _rms(x, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------- block math
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_placements_match_naive_reference(norm):
    torch.manual_seed(1)
    d, eps = 8, 1e-5
    h = torch.randn(3, 5, d, dtype=torch.float64)
    f = _lin(d).double()
    ln = (lambda x: nn.functional.layer_norm(x, (d,), eps=eps)) if norm == "layernorm" else (lambda x: _rms(x, eps))
    ref = {"post": lambda: ln(h + f(h)), "pre": lambda: h + f(ln(h)), "peri": lambda: h + ln(f(ln(h))),
           "output_only": lambda: h + ln(f(h))}
    for placement in PLACEMENTS:
        blk = ResidualNormBlock(f, d, placement=placement, norm=norm, eps=eps).double()
        torch.testing.assert_close(blk(h), ref[placement](), rtol=1e-12, atol=1e-12)


def test_peri_with_identity_output_norm_equals_pre_bit_for_bit():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    peri = ResidualNormBlock(f, 16, placement="peri", norm="rmsnorm")
    pre = ResidualNormBlock(f, 16, placement="pre", norm="rmsnorm")
    pre.norm_in.load_state_dict(peri.norm_in.state_dict())
    with torch.no_grad():
        peri.norm_in.weight.uniform_(0.5, 1.5)
        pre.norm_in.weight.copy_(peri.norm_in.weight)
    peri.norm_out = nn.Identity()
    h = torch.randn(2, 7, 16)
    assert torch.equal(peri(h), pre(h))
    assert_same_grads(param_grads(peri, lambda m: m(h).square().sum()),
                      param_grads(pre, lambda m: m(h).square().sum()), rtol=0, atol=0)


def test_whole_lm_peri_equals_pre_when_output_norms_removed():
    torch.manual_seed(3)
    peri = TinyTransformerLM(16, 32, 3, 4, placement="peri")
    torch.manual_seed(3)
    pre = TinyTransformerLM(16, 32, 3, 4, placement="pre")
    for blk in peri.blocks:
        blk.attn.norm_out = nn.Identity()
        blk.mlp.norm_out = nn.Identity()
    x = torch.randint(0, 16, (2, 12))
    assert torch.equal(peri(x), pre(x))  # same init across placements: norms draw no random numbers


def test_output_norm_is_per_token_over_last_dim():
    blk = ResidualNormBlock(nn.Linear(8, 8), 8, placement="output_only", norm="rmsnorm")
    h = torch.randn(2, 4, 8)
    inc = blk(h) - h  # Norm_out(F(h)): unit RMS per token (scale 1)
    torch.testing.assert_close(inc.pow(2).mean(-1), torch.ones(2, 4), rtol=1e-4, atol=1e-4)
    # changing one token leaves the increments of the other tokens unchanged (no mixing across tokens)
    h2 = h.clone()
    h2[1, 3] += 5.0
    torch.testing.assert_close((blk(h2) - h2)[0], inc[0])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", ["peri", "output_only", "post"])
def test_all_zero_input_and_zero_sublayer_give_finite_outputs(norm, placement):
    f = nn.Linear(8, 8)
    nn.init.zeros_(f.weight), nn.init.zeros_(f.bias)  # zero-init last projection: F(h) == 0
    blk = ResidualNormBlock(f, 8, placement=placement, norm=norm)
    h = torch.zeros(2, 3, 8, requires_grad=True)
    y = blk(h)
    assert torch.isfinite(y).all() and torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_gradcheck_peri_block_float64():
    torch.manual_seed(0)
    blk = ResidualNormBlock(nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6)), 6,
                            placement="peri", norm="layernorm").double()
    h = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk, (h,))


def test_peri_increment_bounded_pre_not():
    # with huge sublayer weights, Pre-LN's increment explodes while Peri-LN's stays at gamma_out scale
    torch.manual_seed(0)
    f = nn.Linear(16, 16)
    with torch.no_grad():
        f.weight.mul_(1000.0)
    h = torch.randn(4, 8, 16)
    pre = ResidualNormBlock(f, 16, "pre", "rmsnorm")
    peri = ResidualNormBlock(f, 16, "peri", "rmsnorm")
    assert (pre(h) - h).pow(2).mean().sqrt() > 100
    torch.testing.assert_close((peri(h) - h).pow(2).mean().sqrt(), torch.tensor(1.0), rtol=1e-3, atol=1e-3)


def test_parameter_counts_and_weight_decay_groups():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for norm, per_sublayer in (("rmsnorm", 32), ("layernorm", 2 * 32)):  # scale (+ bias for LN)
        pre = TinyTransformerLM(16, 32, 4, 4, placement="pre", norm=norm)
        peri = TinyTransformerLM(16, 32, 4, 4, placement="peri", norm=norm)
        assert n(peri) - n(pre) == per_sublayer * 2 * 4  # 2 sublayers x 4 blocks
    groups = weight_decay_groups(peri, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups[1]["params"]}
    for blk in peri.blocks:
        assert id(blk.attn.norm_out.weight) in no_decay and id(blk.mlp.norm_in.weight) in no_decay
        assert id(blk.attn.sublayer.qkv.weight) not in no_decay
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(peri.parameters()))


def test_embed_norm_option_and_shapes():
    lm = TinyTransformerLM(16, 32, 2, 4, placement="peri", embed_norm=True, norm="layernorm")
    assert isinstance(lm.norm_embed, nn.LayerNorm)
    assert lm(torch.randint(0, 16, (3, 9))).shape == (3, 9, 16)


def test_bad_inputs():
    with pytest.raises(ValueError, match="placement must be one of"):
        ResidualNormBlock(nn.Linear(4, 4), 4, placement="sandwich")
    with pytest.raises(ValueError, match="norm must be one of"):
        ResidualNormBlock(nn.Linear(4, 4), 4, norm="batchnorm")
    with pytest.raises(ValueError, match="eps must be finite"):
        ResidualNormBlock(nn.Linear(4, 4), 4, eps=float("nan"))
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        make_norm("rmsnorm", 4, eps=0.0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        ResidualNormBlock(nn.Linear(4, 4), 0)
    with pytest.raises(TypeError, match="sublayer must be an nn.Module"):
        ResidualNormBlock(lambda x: x, 4)
    with pytest.raises(ValueError, match="last dimension must be dim=4"):
        ResidualNormBlock(nn.Linear(4, 4), 4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="dim must be divisible by heads, got dim=30, heads=4"):
        TinyTransformerLM(16, 30, 2, 4)
    with pytest.raises(ValueError, match="placement must be one of"):
        TinyTransformerLM(16, 32, 2, 4, placement="mid")
    with pytest.raises(ValueError, match="exceeds max_len"):
        TinyTransformerLM(16, 32, 1, 4, max_len=8)(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        weight_decay_groups(nn.Linear(2, 2), float("inf"))


# ----------------------------------------------------------------------------- probes
def test_probe_records_per_call_and_removes_hooks():
    torch.manual_seed(0)
    lm = TinyTransformerLM(16, 32, 3, 4, placement="pre")
    before = count_hooks(lm)
    x = torch.randint(0, 16, (2, 10))
    with ResidualStreamProbe(lm) as p:
        assert count_hooks(lm) == before + 3
        lm(x)
        lm(x)
    assert count_hooks(lm) == before
    assert p.rms().shape == (2, 3) and p.max_abs().shape == (2, 3) and p.std().shape == (2, 3)
    # naive reference: RMS of each block output
    h, refs = lm.tok(x) + lm.pos(torch.arange(10)), []
    for blk in lm.blocks:
        h = blk(h)
        refs.append((h.pow(2).mean().sqrt().item(), h.abs().max().item()))
    np.testing.assert_allclose(p.rms()[0], [r[0] for r in refs], rtol=1e-5)
    np.testing.assert_allclose(p.max_abs()[1], [r[1] for r in refs], rtol=1e-5)


def test_probe_removes_hooks_on_exception_and_handles_reused_module():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # the same module runs twice per forward
    before = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ResidualStreamProbe([shared]) as p:
            model(torch.randn(2, 4))
            raise RuntimeError("boom")
    assert count_hooks(model) == before
    assert p.rms().shape == (2, 1)  # one record per call


def test_probe_grad_norms_and_no_graph_retained():
    torch.manual_seed(0)
    lm = TinyTransformerLM(16, 32, 2, 4)
    x = torch.randint(0, 16, (2, 8))
    with ResidualStreamProbe(lm) as p:
        lm(x).sum().backward()
        norms = p.record_grads()
    ref = [math.sqrt(sum(q.grad.double().pow(2).sum().item() for q in b.parameters())) for b in lm.blocks]
    np.testing.assert_allclose(norms, ref, rtol=1e-9)
    assert p.grad_norms().shape == (1, 2) and p.total_grad_norms().shape == (1,)
    assert all(isinstance(v, float) for v in p.layer_series("rms", 0))


def test_hidden_state_stats_and_probe_errors():
    lm = TinyTransformerLM(16, 32, 2, 4)
    lm.train()
    st = hidden_state_stats(lm, torch.randint(0, 16, (2, 8)))
    assert set(st) == {"rms", "std", "max_abs"} and st["rms"].shape == (2,) and lm.training
    with pytest.raises(ValueError, match="no non-empty .blocks"):
        ResidualStreamProbe(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="non-empty sequence"):
        ResidualStreamProbe([])
    with pytest.raises(TypeError, match=r"layers\[0\] must be an nn.Module"):
        ResidualStreamProbe(["x"])


def test_count_spikes():
    assert count_spikes([3.0, 2.0, 1.0, 2.5, 1.0], 2.0) == 1
    assert count_spikes([1.0, 1.0, 1.0, 6.0, 1.0], 5.0, "median") == 1
    assert count_spikes([1.0, 1.0, 4.0], 5.0, "median") == 0
    assert count_spikes([1.0, float("nan")], 2.0) == 1
    assert count_spikes([], 2.0) == 0
    with pytest.raises(ValueError, match="reference must be"):
        count_spikes([1.0], 2.0, "mean")
    with pytest.raises(ValueError, match="factor must be finite"):
        count_spikes([1.0], float("nan"))
    with pytest.raises(ValueError, match="factor must be > 0"):
        count_spikes([1.0], -1.0)


# ----------------------------------------------------------------------------- data
def test_markov_language():
    lang = MarkovLanguage(16, 2, 4, table_seed=0)
    assert lang.table.shape == (256, 4) and math.isclose(lang.entropy_floor, math.log(4))
    assert all(len(set(r.tolist())) == 4 for r in lang.table)
    s = lang.sample(50, 20, torch.Generator().manual_seed(1))
    assert s.shape == (50, 20) and s.dtype == torch.long and 0 <= s.min() and s.max() < 16
    for t in range(2, 20):  # every token is one of its context's allowed successors
        ctx = s[:, t - 2] * 16 + s[:, t - 1]
        assert (lang.table[ctx] == s[:, t : t + 1]).any(1).all()
    again = lang.sample(50, 20, torch.Generator().manual_seed(1))
    assert torch.equal(s, again)
    assert torch.equal(MarkovLanguage(16, 2, 4, 0).table, lang.table)
    with pytest.raises(ValueError, match="successors must be <= vocab"):
        MarkovLanguage(4, 2, 5)
    with pytest.raises(ValueError, match="vocab must be a positive int"):
        MarkovLanguage(0)
    with pytest.raises(ValueError, match="table_seed must be"):
        MarkovLanguage(table_seed=-1)


# ----------------------------------------------------------------------------- claim, bench, docs
def test_claim_smoke(smoke_run):
    from gradkit.harness.claims.peri_ln import CLAIM, LRS, PLACEMENTS as ARM_PLACEMENTS

    out = smoke_run("peri-ln")
    p = CLAIM.protocol.at("smoke")
    assert out.data == "markov-v16-o2-s4"
    assert set(out.metrics) == {f"{pl}@{lr:g}" for pl in ARM_PLACEMENTS for lr in LRS}
    for arm, m in out.metrics.items():
        if not m["diverged"]:
            assert m["growth"] > 0  # the growth statistic is finite
            assert 0 < m["final_loss"] < 10 and m["max_abs"] > 0
        assert len(out.curves["train_loss"][arm]) == out.info["arms"][arm]["steps"] == p.steps == 12
        assert len(out.curves["rms_by_layer_end"][arm]) == p.depth == 2
    ok, checks = CLAIM.criterion_for(out.data).evaluate([out.metrics])
    judged = [c for c in checks[2:] if "not judged" not in c.description]
    unjudged = [c for c in checks[2:] if "not judged" in c.description]
    assert len(unjudged) <= 1  # spike counts where pre-LN never spiked are listed in one check's detail
    listed = unjudged[0].detail.count(";") + 1 if unjudged else 0
    assert len(judged) + listed == 2 * len(LRS)
    # the negative control puts Pre-LN in place of Peri-LN at every lr
    assert CLAIM.resolve(None).control == {f"peri@{lr:g}": f"pre@{lr:g}" for lr in LRS}


def test_claim_arm_rerun_bit_identical(smoke_run):
    from gradkit.engine import cpu_threads, seed_everything
    from gradkit.harness.claims.base import ArmContext
    from gradkit.harness.claims.peri_ln import CLAIM, _run_arm, _setup

    base = dict(scale="smoke", seed=0, device=torch.device("cpu"), p=CLAIM.protocol.at("smoke"))
    with cpu_threads(1):  # as the runner does: setup, then the arm, each freshly seeded
        seed_everything(0)
        data = _setup(ArmContext(**base, arm="setup"))
        again = _run_arm(ArmContext(**base, arm="peri@0.03", data=data, generator=seed_everything(0)))
    assert again.metrics == smoke_run("peri-ln").metrics["peri@0.03"]


def test_criterion_picks_largest_non_diverged_lr():
    from gradkit.harness.claims.peri_ln import PeriLNRule

    def arm(g, loss, div=0.0, spikes=0.0):
        return {"growth": g, "final_loss": loss, "diverged": div, "loss_spikes": spikes, "grad_spikes": spikes}

    seed = {"pre@0.01": arm(5.0, 2.0), "peri@0.01": arm(2.0, 1.99),
            "pre@0.03": arm(float("nan"), float("nan"), 1.0, 3.0), "peri@0.03": arm(2.0, 1.9, 0.0, 0.0)}
    ok, checks = PeriLNRule().evaluate([seed, seed])
    assert ok and "0.01" in checks[0].description
    seed["peri@0.01"] = arm(3.0, 1.99)
    assert not PeriLNRule().evaluate([seed])[0]
    seed["pre@0.01"]["diverged"] = 1.0
    ok, checks = PeriLNRule().evaluate([seed])
    assert not ok and "diverged at every lr" in checks[0].detail


def test_spikes_are_judged_only_where_pre_ln_spiked():
    from gradkit.harness.claims.peri_ln import PeriLNRule

    def arm(spikes):
        return {"growth": 5.0, "final_loss": 2.0, "diverged": 0.0, "loss_spikes": 0.0, "grad_spikes": spikes}

    def seed(pre, peri):
        s = {"pre@0.01": arm(pre), "peri@0.01": arm(peri)}
        s["peri@0.01"]["growth"] = 1.0
        return s

    ok, checks = PeriLNRule().evaluate([seed(0.0, 1.0)] * 3)  # one peri spike against a pre-LN that never spiked
    assert ok and any("not judged" in c.description and "peri 1 vs pre 0" in c.detail for c in checks)
    ok, checks = PeriLNRule().evaluate([seed(2.0, 3.0)] * 3)  # pre-LN spiked: now it is judged
    assert not ok and any(c.description.startswith("grad_spikes[peri@0.01]") and not c.passed for c in checks)
    assert PeriLNRule().evaluate([seed(3.0, 1.0)] * 3)[0]


def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.peri_ln  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("peri-ln-step")
    assert b.slug == "peri-ln" and b.target is None and b.baseline == "Pre-LN"
    r = b.run(2)
    assert r.baseline_s > 0 and math.isfinite(r.ratio) and r.extra["params_peri"] > r.extra["params_pre"]


