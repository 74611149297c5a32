"""Tests of per-example gradients, gradient coherence and robust aggregation (paper slug: generalization-mystery)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradkit.data import TensorBatches
from gradkit.engine import fit
from gradkit.optim import robust_gd
from gradkit.optim.robust_gd import (RobustAggregation, median_of_means, robust_loss, robust_step,
                                     winsorized_mean)
from gradkit.probes.coherence import (CoherenceStats, CoherenceTracker, coherence_stats, gradient_coherence,
                                      measure_coherence)
from gradkit.probes.per_example import per_example_grads
from gradkit.testing import assert_same_grads, count_hooks, param_grads

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(seed: int = 0, sizes=(5, 7, 6, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(D)


def batch(n=6, d=5, c=3, seed=1):
    g = gen(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randint(0, c, (n,), generator=g)


class Reused(nn.Module):
    """One Linear called twice per forward, and a Linear on a (b, t, d) sequence input."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.seq = nn.Linear(4, 3)

    def forward(self, x):  # x: (b, t, 4)
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.seq(h).mean(1)


def naive_loop(model, x, y):
    """Reference with no gradkit code: one backward per example, .grad copied out."""
    rows = {n: [] for n, _ in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            rows[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(r) for n, r in rows.items()}


# ------------------------------------------------------------------------------------------ per-example
@pytest.mark.parametrize("method", ["vmap", "linear", "loop"])
def test_per_example_grads_match_naive_loop(method):
    model, (x, y) = mlp(), batch()
    got = per_example_grads(model, F.cross_entropy, x, y, method=method)
    assert_same_grads(got, naive_loop(model, x, y), rtol=1e-10, atol=1e-12)
    assert got["0.weight"].shape == (6, 7, 5) and got["4.bias"].shape == (6, 3)


@pytest.mark.parametrize("method", ["vmap", "linear", "loop"])
def test_reused_module_and_sequence_inputs(method):
    torch.manual_seed(0)
    model = Reused().to(D)
    x, y = torch.randn(5, 3, 4, generator=gen(2), dtype=D), torch.tensor([0, 1, 2, 0, 1])
    assert_same_grads(per_example_grads(model, F.cross_entropy, x, y, method=method), naive_loop(model, x, y),
                      rtol=1e-10, atol=1e-12)


def test_cnn_vmap_matches_loop_and_chunks_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).to(D)
    x, y = torch.randn(5, 1, 4, 4, generator=gen(), dtype=D), torch.tensor([0, 1, 2, 3, 0])
    ref = naive_loop(model, x, y)
    assert_same_grads(per_example_grads(model, F.cross_entropy, x, y), ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(per_example_grads(model, F.cross_entropy, x, y, chunk_size=2), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["vmap", "linear"])
def test_sum_of_per_example_grads_is_the_batch_gradient_float32(method):
    model, (x, y) = mlp().float(), batch()
    x = x.float()
    g = per_example_grads(model, F.cross_entropy, x, y, method=method)
    ref = param_grads(model, lambda m: F.cross_entropy(m(x), y, reduction="sum"))
    assert_same_grads({n: v.sum(0) for n, v in g.items()}, ref, rtol=1e-5, atol=1e-5)


def test_params_subset_losses_and_grad_fields_untouched():
    model, (x, y) = mlp(), batch()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    g, losses = per_example_grads(model, F.cross_entropy, x, y, params=["2.weight"], return_losses=True)
    assert set(g) == {"2.weight"}
    torch.testing.assert_close(g["2.weight"], naive_loop(model, x, y)["2.weight"])
    torch.testing.assert_close(losses, F.cross_entropy(model(x), y, reduction="none").detach())
    model[0].weight.grad = torch.ones_like(model[0].weight)
    per_example_grads(model, F.cross_entropy, x, y, method="linear")
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[2].weight.grad is None


def test_frozen_parameters_are_skipped_by_default():
    model, (x, y) = mlp(), batch()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in per_example_grads(model, F.cross_entropy, x, y)


def test_batchnorm_eval_mode_works_and_train_mode_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).to(D)
    x, y = batch()
    model(x)  # running statistics move off their initial values
    with pytest.raises(ValueError, match=r"model\.1 is a BatchNorm1d in training mode"):
        per_example_grads(model, F.cross_entropy, x, y)
    model.eval()
    assert_same_grads(per_example_grads(model, F.cross_entropy, x, y), naive_loop(model, x, y), rtol=1e-10, atol=1e-12)


def test_dropout_randomness():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)).to(D)
    x, y = batch()
    g = per_example_grads(model, F.cross_entropy, x, y)
    assert torch.isfinite(g["0.weight"]).all()
    with pytest.raises(RuntimeError):
        per_example_grads(model, F.cross_entropy, x, y, randomness="error")


def test_per_example_bad_input():
    model, (x, y) = mlp(), batch()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        per_example_grads(lambda t: t, F.cross_entropy, x, y)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        per_example_grads(model, "ce", x, y)
    with pytest.raises(ValueError, match=r"y must have one row per example of x \(6\)"):
        per_example_grads(model, F.cross_entropy, x, y[:3])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        per_example_grads(model, F.cross_entropy, [1.0], y)
    with pytest.raises(ValueError, match="x must hold at least one example"):
        per_example_grads(model, F.cross_entropy, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"params: 'nope' is not a parameter of the model"):
        per_example_grads(model, F.cross_entropy, x, y, params=["nope"])
    with pytest.raises(ValueError, match="got the string '0.weight'"):
        per_example_grads(model, F.cross_entropy, x, y, params="0.weight")
    with pytest.raises(ValueError, match="method must be one of"):
        per_example_grads(model, F.cross_entropy, x, y, method="opacus")
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        per_example_grads(model, F.cross_entropy, x, y, chunk_size=0)
    bad = x.clone()
    bad[3, 1] = float("nan")
    for method in ("vmap", "linear", "loop"):
        with pytest.raises(ValueError, match="non-finite loss .* for example 3"):
            per_example_grads(model, F.cross_entropy, bad, y, method=method)
    with pytest.raises(ValueError, match="scalar per example"):
        per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y, method="loop")
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        per_example_grads(frozen, F.cross_entropy, x, y)


def test_linear_method_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).to(D)
    x, y = torch.randn(4, 1, 4, 4, dtype=D), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"'0.weight' belongs to a Conv2d: use method='vmap'"):
        per_example_grads(conv, F.cross_entropy, x, y, method="linear")
    assert set(per_example_grads(conv, F.cross_entropy, x, y, params=["2.weight"], method="linear")) == {"2.weight"}

    class Folded(nn.Module):  # folds the batch into the rows of its Linear's input
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 3)

        def forward(self, x):
            return self.lin(x.reshape(-1, 2)).reshape(x.shape[0], -1)[:, :3]

    with pytest.raises(ValueError, match=r"model.lin got an input of shape \(12, 2\)"):
        per_example_grads(Folded().to(D), F.cross_entropy, torch.randn(6, 4, dtype=D), torch.zeros(6, dtype=torch.long),
                          method="linear")

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            return self.a(x)

    xb, yb = batch()
    with pytest.raises(ValueError, match=r"modules \['b'\] were not called"):
        per_example_grads(Unused().to(D), F.cross_entropy, xb, yb, method="linear")


def test_linear_method_removes_hooks_when_the_loss_raises():
    model, (x, y) = mlp(), batch()
    before = count_hooks(model)

    def boom(out, target):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        per_example_grads(model, boom, x, y, method="linear")
    assert count_hooks(model) == before


# ------------------------------------------------------------------------------------------ coherence
def test_coherence_closed_forms():
    m = 5
    same = torch.ones(m, 3, dtype=D) * torch.tensor([1.0, -2.0, 0.5], dtype=D)
    ortho = 3.0 * torch.eye(m, dtype=D)
    assert gradient_coherence(same) == pytest.approx(m)
    assert gradient_coherence(ortho) == pytest.approx(1.0)
    assert gradient_coherence(same, "alpha") == pytest.approx(1.0)
    assert gradient_coherence(ortho, "alpha") == pytest.approx(1 / m)
    assert gradient_coherence(same, "offdiag") == pytest.approx(1.0)
    assert gradient_coherence(ortho, "offdiag") == pytest.approx(0.0, abs=1e-12)
    opposite = torch.tensor([[1.0], [-1.0]], dtype=D)  # cancel exactly: ratio 0, offdiag -1/(m-1)
    assert gradient_coherence(opposite) == pytest.approx(0.0, abs=1e-12)
    assert gradient_coherence(opposite, "offdiag") == pytest.approx(-1.0)


def test_coherence_invariants_and_range():
    g = torch.randn(8, 4, 3, generator=gen(), dtype=D)
    r = gradient_coherence(g)
    assert 0.0 <= r <= 8.0
    assert gradient_coherence(7.5 * g) == pytest.approx(r, rel=1e-12)
    assert gradient_coherence(g, "alpha") == pytest.approx(r / 8)
    assert gradient_coherence(g, "offdiag") == pytest.approx((r - 1) / 7)
    assert gradient_coherence(g[torch.randperm(8, generator=gen(3))]) == pytest.approx(r, rel=1e-12)
    big = torch.randn(4000, 8, generator=gen(), dtype=D)  # independent random directions: about 1
    assert gradient_coherence(big.t()) == pytest.approx(1.0, abs=0.15)


def test_coherence_per_layer_and_whole_vector():
    grads = {"a": torch.randn(6, 3, generator=gen(1), dtype=D), "b": torch.randn(6, 2, 2, generator=gen(2), dtype=D)}
    whole = torch.cat([grads["a"], grads["b"].reshape(6, -1)], dim=1)
    assert gradient_coherence(grads) == pytest.approx(gradient_coherence(whole))
    per = gradient_coherence(grads, per_layer=True)
    assert per["a"] == pytest.approx(gradient_coherence(grads["a"]))
    assert per["b"] == pytest.approx(gradient_coherence(grads["b"]))
    st = coherence_stats(grads)
    assert isinstance(st, CoherenceStats) and st.m == 6 and set(st.per_layer()) == {"a", "b"}


def test_coherence_of_a_linear_model_in_closed_form():
    # f(x) = w.x with w = 0 and loss 0.5 (f - y)^2: g_i = -y_i x_i
    model = nn.Linear(4, 1, bias=False).to(D)
    nn.init.zeros_(model.weight)
    x, y = torch.randn(10, 4, generator=gen(), dtype=D), torch.randn(10, 1, generator=gen(1), dtype=D)

    def loss(out, t):
        return 0.5 * (out - t).square().sum()

    g = -(y * x)
    expected = float(g.sum(0).square().sum() / g.square().sum())
    assert measure_coherence(model, loss, x, y).value() == pytest.approx(expected, rel=1e-12)
    assert measure_coherence(model, loss, x, y, chunk_size=3, method="linear").value() == pytest.approx(expected)
    eye = torch.eye(4, dtype=D)
    assert measure_coherence(model, loss, eye, torch.ones(4, 1, dtype=D)).value() == pytest.approx(1.0)
    assert measure_coherence(model, loss, eye[[1, 1, 1]], torch.ones(3, 1, dtype=D)).value() == pytest.approx(3.0)


def test_streamed_measure_equals_all_at_once():
    model, (x, y) = mlp(), batch(n=11)
    a, b = measure_coherence(model, F.cross_entropy, x, y), measure_coherence(model, F.cross_entropy, x, y, chunk_size=4)
    assert b.m == 11 and a.value() == pytest.approx(b.value(), rel=1e-10)
    for k, v in a.per_layer("offdiag").items():
        assert b.per_layer("offdiag")[k] == pytest.approx(v, rel=1e-9, abs=1e-12)


def test_coherence_bad_input():
    with pytest.raises(ValueError, match="at least 2 examples"):
        gradient_coherence(torch.ones(1, 3))
    with pytest.raises(ValueError, match="variant must be one of"):
        gradient_coherence(torch.ones(3, 3), variant="cosine")
    with pytest.raises(ValueError, match="every per-example gradient is zero"):
        gradient_coherence(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"parameter 'b'.*zero"):
        gradient_coherence({"a": torch.ones(3, 2), "b": torch.zeros(3, 2)}, per_layer=True)
    with pytest.raises(ValueError, match="not finite"):
        gradient_coherence(torch.tensor([[1.0], [float("inf")]]))
    with pytest.raises(ValueError, match=r"grads\['b'\] has 2 examples, expected 3"):
        gradient_coherence({"a": torch.ones(3, 2), "b": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="non-empty dict"):
        gradient_coherence({})
    with pytest.raises(ValueError, match="per_layer must be a bool"):
        gradient_coherence(torch.ones(3, 3), per_layer=1)


def test_tracker_records_every_k_steps_and_restores_mode():
    model, (x, y) = mlp(), batch(n=8)
    model.train()
    t = CoherenceTracker(model, F.cross_entropy, x, y, every=3)
    got = [t.step(s) for s in range(7)]
    assert [v is not None for v in got] == [True, False, False, True, False, False, True]
    assert t.steps() == [0, 3, 6] and len(t.values()) == 3 and model.training
    assert t.history[0].m == 8 and set(t.history[0].per_layer) == {n for n, _ in model.named_parameters()}
    assert len(t.layer_values("0.weight")) == 3
    with pytest.raises(ValueError, match="'nope' is not a tracked parameter"):
        t.layer_values("nope")
    assert "CoherenceTracker(m=8, every=3" in repr(t)


def test_tracker_as_fit_callback_leaves_grads_and_hooks_alone_even_when_training_raises():
    model, (x, y) = mlp(), batch(n=16)
    before = count_hooks(model)
    t = CoherenceTracker(model, F.cross_entropy, x[:8], y[:8], method="linear")
    t.measure(0)
    fit(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorBatches(x, y, batch_size=4, generator=gen()),
        epochs=2, on_epoch_end=t.on_epoch_end)
    assert t.steps() == [0, 4, 8] and count_hooks(model) == before
    calls = []

    def bad_loss(m, b):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("training failed")
        return F.cross_entropy(m(b[0]), b[1])

    with pytest.raises(RuntimeError, match="training failed"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorBatches(x, y, batch_size=4), epochs=3,
            compute_loss=bad_loss, on_step_start=t.step)
    assert count_hooks(model) == before

    def raising_probe_loss(out, target):
        raise RuntimeError("probe failed")

    t2 = CoherenceTracker(model, raising_probe_loss, x[:8], y[:8], method="linear")
    with pytest.raises(RuntimeError, match="probe failed"):
        t2.measure()
    assert count_hooks(model) == before and model.training
    model.zero_grad(set_to_none=True)
    t.measure()
    assert all(p.grad is None for p in model.parameters())


def test_tracker_bad_input():
    model, (x, y) = mlp(), batch()
    with pytest.raises(ValueError, match="probe_x must hold at least 2 examples"):
        CoherenceTracker(model, F.cross_entropy, x[:1], y[:1])
    with pytest.raises(ValueError, match=r"probe_y must have one row per probe example \(6\)"):
        CoherenceTracker(model, F.cross_entropy, x, y[:2])
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        CoherenceTracker(model, F.cross_entropy, x, y, every=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        CoherenceTracker(model, F.cross_entropy, x, y, variant="cos")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        CoherenceTracker("model", F.cross_entropy, x, y)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        CoherenceTracker(model, F.cross_entropy, x, y).step(-1)
    with pytest.raises(ValueError, match="per_layer=True"):
        CoherenceTracker(model, F.cross_entropy, x, y, per_layer=False).layer_values("0.weight")


# ------------------------------------------------------------------------------------------ robust aggregation
def np_winsorized(g: np.ndarray, c: int) -> np.ndarray:
    s = np.sort(g, axis=0)
    return np.clip(g, s[c], s[g.shape[0] - 1 - c]).mean(0)


def np_m3(g: np.ndarray, k: int) -> np.ndarray:
    return np.median(np.stack([c.mean(0) for c in np.array_split(g, min(k, len(g)), axis=0)]), axis=0)


@pytest.mark.parametrize("b", [1, 2, 5, 8, 20])
def test_median_of_means_matches_numpy(b):
    g = torch.randn(b, 4, 3, generator=gen(b), dtype=D)
    g[:, 0, 0] = 0.5  # ties
    for k in sorted({1, 2, 3, 4, 8, b, b + 3}):
        torch.testing.assert_close(median_of_means(g, k), torch.from_numpy(np_m3(g.numpy(), k)))
    torch.testing.assert_close(median_of_means(g, 1), g.mean(0))
    torch.testing.assert_close(median_of_means(g, b), torch.from_numpy(np.median(g.numpy(), axis=0)))


@pytest.mark.parametrize("b", [1, 3, 8, 21])
def test_winsorized_mean_matches_numpy(b):
    g = torch.randn(b, 7, generator=gen(b), dtype=D)
    g[: b // 2, 0] = 1.0  # ties
    for c in range(0, (b - 1) // 2 + 1):
        torch.testing.assert_close(winsorized_mean(g, c), torch.from_numpy(np_winsorized(g.numpy(), c)))
    torch.testing.assert_close(winsorized_mean(g, 0), g.mean(0))


def test_order_statistics_paths_agree(monkeypatch):
    g = torch.randn(30, 50, generator=gen(), dtype=D)
    fast_m, fast_w = median_of_means(g, 30), winsorized_mean(g, 4)
    monkeypatch.setattr(robust_gd, "INSERTION_MAX", 0)  # force the topk path
    torch.testing.assert_close(median_of_means(g, 30), fast_m)
    torch.testing.assert_close(winsorized_mean(g, 4), fast_w)


def test_robust_rules_attenuate_one_outlier():
    g = torch.ones(16, 3, dtype=D)
    g[5] = 1000.0
    torch.testing.assert_close(median_of_means(g, 4), torch.ones(3, dtype=D))
    torch.testing.assert_close(winsorized_mean(g, 1), torch.ones(3, dtype=D))
    assert float(g.mean(0)[0]) > 60


def test_aggregation_of_a_dict_is_the_rule_on_the_concatenated_vector():
    model, (x, y) = mlp(), batch(n=9)
    grads = per_example_grads(model, F.cross_entropy, x, y)
    flat = torch.cat([v.reshape(9, -1) for v in grads.values()], dim=1)
    for agg in (RobustAggregation("m3", k=4), RobustAggregation("winsorize", c=2), RobustAggregation("mean")):
        out = agg(grads)
        assert {n: v.shape for n, v in out.items()} == {n: v.shape[1:] for n, v in grads.items()}
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in out.values()]), agg(flat))
        for n, v in out.items():
            torch.testing.assert_close(v, agg.aggregate(grads[n]))


def test_write_grads_and_accumulate():
    model, (x, y) = mlp(), batch()
    grads = per_example_grads(model, F.cross_entropy, x, y)
    agg = RobustAggregation("m3", k=3)
    out = agg.write_grads(model, grads)
    for n, p in model.named_parameters():
        assert p.grad.shape == p.shape and p.grad.dtype == D
        torch.testing.assert_close(p.grad, out[n])
    agg.write_grads(model, grads, accumulate=True)
    torch.testing.assert_close(model[0].weight.grad, 2 * out["0.weight"])


def test_robust_loss_with_mean_is_ordinary_backward_and_robust_step_is_an_sgd_step():
    model, (x, y) = mlp(), batch()
    ref = param_grads(model, lambda m: F.cross_entropy(m(x), y))
    for method in ("vmap", "linear"):
        model.zero_grad(set_to_none=True)
        loss = robust_loss(model, F.cross_entropy, x, y, RobustAggregation("mean"), method=method)
        assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(model(x), y).detach()))
        loss.backward()
        assert_same_grads({n: p.grad for n, p in model.named_parameters()}, ref, rtol=1e-10, atol=1e-12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lv = robust_step(model, F.cross_entropy, x, y, torch.optim.SGD(model.parameters(), lr=0.1), RobustAggregation("mean"))
    assert lv == pytest.approx(float(F.cross_entropy(torch.func.functional_call(model, before, (x,)), y)))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * ref[n])


def test_robust_training_inside_fit_runs():
    model, (x, y) = mlp(), batch(n=16)
    agg = RobustAggregation("winsorize", c=1)
    hist = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), TensorBatches(x, y, batch_size=8, generator=gen()),
               epochs=2, compute_loss=lambda m, b: robust_loss(m, F.cross_entropy, b[0], b[1], agg, method="linear"))
    assert len(hist.series("train_loss")) == 2 and all(math.isfinite(v) for v in hist.series("train_loss"))


def test_robust_bad_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        RobustAggregation("median")
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        RobustAggregation("m3", k=0)
    with pytest.raises(ValueError, match="c must be a non-negative int, got -1"):
        RobustAggregation("winsorize", c=-1)
    with pytest.raises(ValueError, match="c=2 needs at least 5 examples, got a batch of 4"):
        winsorized_mean(torch.ones(4, 2), 2)
    with pytest.raises(TypeError, match="g must be a floating-point tensor"):
        median_of_means(torch.ones(4, 2, dtype=torch.long), 2)
    agg = RobustAggregation()
    with pytest.raises(ValueError, match="must share the batch size"):
        agg({"a": torch.ones(4, 2), "b": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="non-empty dict"):
        agg([torch.ones(2)])
    model, (x, y) = mlp(), batch()
    with pytest.raises(ValueError, match=r"names \['zzz'\] that are not parameters"):
        agg.write_grads(model, {"zzz": torch.ones(4, 2, dtype=D)})
    with pytest.raises(ValueError, match=r"aggregates to shape \(2,\), but the parameter has shape \(3,\)"):
        agg.write_grads(model, {"4.bias": torch.ones(4, 2, dtype=D)})
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        robust_step(model, F.cross_entropy, x, y, "sgd", agg)
    with pytest.raises(TypeError, match="aggregator must be a RobustAggregation"):
        robust_step(model, F.cross_entropy, x, y, torch.optim.SGD(model.parameters(), lr=0.1), "m3")
    with pytest.raises(TypeError, match="aggregator must be a RobustAggregation"):
        robust_loss(model, F.cross_entropy, x, y, None)
    assert repr(RobustAggregation("winsorize", c=3)) == "RobustAggregation(mode='winsorize', c=3)"


# ------------------------------------------------------------------------------------------ claim, benchmark, docs
def test_claim_smoke_records_coherence_curves_in_range(smoke_run):
    out = smoke_run("generalization-mystery")
    m = out.info["protocol"]["probe_m"]
    for arm in ("real", "random"):
        series = out.curves["coherence"][arm]
        assert len(series) == out.info["protocol"]["coh_epochs"] + 1
        assert all(0.0 <= v <= m for v in series)
    assert out.info["curve_axes"]["coherence"]["x"][0] == 0
    assert out.metrics["random"]["coherence_gain"] == pytest.approx(1.0)
    for arm in ("sgd", "m3", "winsorize"):
        assert len(out.curves["memorised"][arm]) == out.info["protocol"]["noise_epochs"]
    assert out.info["n_corrupted"] == round(0.4 * out.info["protocol"]["noise_n_train"])


def test_corrupt_labels_changes_exactly_the_chosen_fraction():
    from gradkit.harness.claims.generalization_mystery import corrupt_labels

    y = torch.arange(100) % 10
    noisy, mask = corrupt_labels(y, 0.4, 10, gen())
    assert int(mask.sum()) == 40 and bool((noisy[mask] != y[mask]).all()) and torch.equal(noisy[~mask], y[~mask])


def test_benchmarks_registered_and_one_runs():
    import gradkit.harness.benchmarks.generalization_mystery  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    assert BENCHMARKS.get("generalization-mystery-per-example-mlp").target == 0.2
    r = BENCHMARKS.get("generalization-mystery-m3-step").run(2)
    assert r.baseline_s > 0 and r.candidate_s > 0 and math.isfinite(r.ratio)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    model, (x, y) = mlp(), batch()
    cpu = per_example_grads(model, F.cross_entropy, x, y)
    gpu = per_example_grads(model.cuda(), F.cross_entropy, x.cuda(), y.cuda())
    assert_same_grads({n: v.cpu() for n, v in gpu.items()}, cpu, rtol=1e-9, atol=1e-11)
    agg = RobustAggregation("winsorize", c=1)
    torch.testing.assert_close(agg(gpu)["0.weight"].cpu(), agg(cpu)["0.weight"])
