"""Tests of HyperFL (paper slug: hyperfl): hypernetwork math, federated rounds, attacks, claim, benchmark."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from gradkit.distributed.federated import (
    ClientData, FedAvgClient, client_accuracies, clip_and_noise, dirichlet_split, dp_fedavg_round, fedavg_round,
    fedavg_shared_state, hyperfl_round, local_train_fedavg, local_train_hyperfl, weighted_average,
)
from gradkit.nn.hypernetwork import HyperClient, HyperNetwork
from gradkit.privacy import PRESETS, model_gradients
from gradkit.privacy.hyperfl_attacks import (
    HiddenClientSpace, HyperFLServerView, first_linear, hyperfl_inversion, hyperfl_readout, linear_readout,
    shared_gradients,
)


def tiny_target(sizes=(6, 5, 4)) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def tiny_client(seed=0, dtype=torch.float32, sizes=(6, 5, 4), classes=3, embed=3, hidden=7) -> HyperClient:
    torch.manual_seed(seed)
    return HyperClient(tiny_target(sizes), nn.Linear(sizes[-1], classes), embed_dim=embed, hidden=hidden).to(dtype)


def tiny_data(n=40, d=6, classes=3, seed=0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    return ClientData(x[:30], y[:30], x[30:], y[30:])


# ------------------------------------------------------------------------------------ hypernetwork
def test_generated_weights_have_target_shapes_and_functional_call_matches_loaded_module():
    target = tiny_target()
    hn = HyperNetwork(target, embed_dim=3, hidden=7)
    w = hn(torch.randn(3))
    assert list(w) == [n for n, _ in target.named_parameters()]
    for n, p in target.named_parameters():
        assert w[n].shape == p.shape
    loaded = copy.deepcopy(target)
    loaded.load_state_dict({k: v.detach() for k, v in w.items()})
    x = torch.rand(5, 6)
    torch.testing.assert_close(functional_call(target, w, (x,)), loaded(x))


def test_include_selects_generated_tensors_and_rest_stays_private():
    target = tiny_target()
    c = HyperClient(target, nn.Linear(4, 3), embed_dim=3, hidden=7, include=lambda n: n.startswith("1."))
    assert c.hypernet.names == ("1.weight", "1.bias")
    priv = {id(p) for p in c.private_parameters()}
    assert id(c.target[3].weight) in priv and id(c.embedding.weight) in priv
    assert c(torch.rand(2, 6)).shape == (2, 3)


def test_gradient_through_hypernetwork_equals_explicit_vjp():
    c = tiny_client()
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 1])
    theta = c.generated_weights()
    loss = F.cross_entropy(c.head(functional_call(c.target, theta, (x,))), y)
    d_theta = torch.autograd.grad(loss, list(theta.values()), retain_graph=True)
    phi = c.shared_parameters() + [c.embedding.weight]
    vjp = torch.autograd.grad(list(theta.values()), phi, grad_outputs=d_theta)
    direct = torch.autograd.grad(F.cross_entropy(c(x), y), phi)
    for a, b in zip(vjp, direct):
        torch.testing.assert_close(a, b)


def test_gradcheck_hypernetwork_float64():
    c = tiny_client(dtype=torch.float64, sizes=(4, 3, 2), embed=2, hidden=3)
    names = [n for n, _ in c.named_parameters()]
    x, y = torch.rand(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])

    def f(*params):
        return F.cross_entropy(functional_call(c, dict(zip(names, params)), (x,)), y)

    params = tuple(p.detach().clone().requires_grad_(True) for p in c.parameters())
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)


def test_phi_gradient_equals_finite_differences_tiny_instance():
    c = tiny_client(dtype=torch.float64, sizes=(4, 3, 2), embed=2, hidden=3)
    x, y = torch.rand(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    g = shared_gradients(c, x, y)
    eps = 1e-6
    for p, gp in zip(c.shared_parameters(), g):
        for idx in [0, p.numel() - 1]:
            flat = p.data.view(-1)
            old = flat[idx].item()
            flat[idx] = old + eps
            lp = F.cross_entropy(c(x), y).item()
            flat[idx] = old - eps
            lm = F.cross_entropy(c(x), y).item()
            flat[idx] = old
            assert abs((lp - lm) / (2 * eps) - gp.view(-1)[idx].item()) < 1e-7


def test_bias_gradient_of_each_head_is_the_generated_tensor_gradient_and_weight_gradient_rank_one():
    c = tiny_client(dtype=torch.float64)
    x, y = torch.rand(2, 6, dtype=torch.float64), torch.tensor([1, 0])
    theta = c.generated_weights()
    loss = F.cross_entropy(c.head(functional_call(c.target, theta, (x,))), y)
    d_theta = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
    g = dict(zip([n for n, _ in c.hypernet.named_parameters()], shared_gradients(c, x, y)))
    for k, name in enumerate(c.hypernet.names):
        torch.testing.assert_close(g[f"heads.{k}.bias"], d_theta[name].reshape(-1))
        assert torch.linalg.matrix_rank(g[f"heads.{k}.weight"]) <= 1


def test_shared_state_is_phi_only_and_roundtrips():
    c = tiny_client()
    s = c.shared_state()
    assert set(s) == {f"hypernet.{k}" for k, _ in c.hypernet.named_parameters()}
    assert not any(k.startswith(("head", "embedding", "target")) for k in s)
    assert "target.1.weight" not in c.state_dict()  # generated tensors are not state
    other = tiny_client(seed=1)
    other.load_shared_state(s)
    for a, b in zip(other.shared_parameters(), c.shared_parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(other.embedding.weight, c.embedding.weight)  # private parts untouched


def test_hyperclient_float64_and_no_grad():
    c = tiny_client(dtype=torch.float64)
    with torch.no_grad():
        out = c(torch.rand(2, 6, dtype=torch.float64))
    assert out.dtype == torch.float64 and not out.requires_grad


def test_hypernetwork_errors():
    with pytest.raises(ValueError, match="embed_dim must be a positive int, got 0"):
        HyperNetwork(tiny_target(), embed_dim=0)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        HyperNetwork(tiny_target(), hidden=-1)
    with pytest.raises(TypeError, match="target must be an nn.Module"):
        HyperNetwork("mlp")
    with pytest.raises(ValueError, match="no parameters to generate"):
        HyperNetwork(tiny_target(), include=lambda n: False)
    hn = HyperNetwork(tiny_target(), embed_dim=3, hidden=4)
    with pytest.raises(ValueError, match="v must hold one embedding of 3 values"):
        hn(torch.randn(4))
    with pytest.raises(KeyError, match="is not generated"):
        hn.head_for("nope")
    c = tiny_client()
    with pytest.raises(KeyError, match="missing"):
        c.load_shared_state({})
    bad = {k: v[..., :1] if v.dim() else v for k, v in c.shared_state().items()}
    with pytest.raises(ValueError, match="has shape"):
        c.load_shared_state(bad)
    with pytest.raises(TypeError, match="head must be an nn.Module"):
        HyperClient(tiny_target(), None)


# ------------------------------------------------------------------------------------ federated glue
def test_dirichlet_split_covers_disjointly_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(600, dtype=torch.float32).unsqueeze(1)
    y = torch.randint(0, 5, (600,), generator=g)
    a = dirichlet_split(x, y, 4, alpha=0.3, min_size=10, seed=3)
    b = dirichlet_split(x, y, 4, alpha=0.3, min_size=10, seed=3)
    ids = torch.cat([torch.cat([c.x_train, c.x_test]).squeeze(1) for c in a]).long()
    assert sorted(ids.tolist()) == list(range(600))
    assert all(torch.equal(c.x_train, d.x_train) for c, d in zip(a, b))
    assert all(c.n_train + len(c.y_test) >= 10 for c in a)
    for c in a:  # labels follow the inputs
        assert torch.equal(y[c.x_train.squeeze(1).long()], c.y_train)
    # strong skew: with alpha 0.05 some client lacks some class
    skew = dirichlet_split(x, y, 4, alpha=0.05, min_size=5, seed=0)
    assert any(len(torch.unique(torch.cat([c.y_train, c.y_test]))) < 5 for c in skew)


def test_dirichlet_split_errors():
    x, y = torch.rand(20, 2), torch.randint(0, 2, (20,))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_split(x, y, 2, alpha=0.0)
    with pytest.raises(ValueError, match="num_clients must be a positive int"):
        dirichlet_split(x, y, 0)
    with pytest.raises(ValueError, match="cannot give 3 clients 10 samples"):
        dirichlet_split(x, y, 3, min_size=10)
    with pytest.raises(ValueError, match="x has 20 rows but y has 19"):
        dirichlet_split(x, y[:19], 2)
    with pytest.raises(ValueError, match="test_frac must be in"):
        dirichlet_split(x, y, 2, test_frac=1.0, min_size=2)


def test_weighted_average_is_data_size_weighted():
    s1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    s2 = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    out = weighted_average([s1, s2], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([3.25, 6.5]))
    assert out["n"].item() == 3  # non-float tensors come from the first state
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([s1, s2], [0, 0])
    with pytest.raises(ValueError, match="weights\\[0\\] must be finite and >= 0"):
        weighted_average([s1, s2], [-1, 2])
    with pytest.raises(ValueError, match="got 2 states but 1 weights"):
        weighted_average([s1, s2], [1])
    with pytest.raises(KeyError, match="different keys"):
        weighted_average([s1, {"w": s2["w"]}], [1, 1])


def test_clip_and_noise():
    u = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    out = clip_and_noise(u, clip=1.0, sigma=0.0)
    torch.testing.assert_close(out["a"], torch.tensor([0.6, 0.8]))
    small = clip_and_noise({"a": torch.tensor([0.3, 0.4])}, clip=1.0, sigma=0.0)
    torch.testing.assert_close(small["a"], torch.tensor([0.3, 0.4]))
    noisy = clip_and_noise({"a": torch.zeros(20000)}, clip=0.5, sigma=2.0, generator=torch.Generator().manual_seed(0))
    assert abs(noisy["a"].std().item() - 1.0) < 0.03
    with pytest.raises(ValueError, match="clip must be > 0"):
        clip_and_noise(u, clip=0.0, sigma=1.0)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        clip_and_noise(u, clip=1.0, sigma=-1.0)


def test_local_train_hyperfl_two_steps_touch_the_right_tensors():
    data = tiny_data()
    c = tiny_client()
    before = copy.deepcopy(c.state_dict())
    local_train_hyperfl(c, data, epochs=0, head_epochs=1, batch_size=10, generator=torch.Generator().manual_seed(0))
    after = c.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    before = copy.deepcopy(c.state_dict())
    local_train_hyperfl(c, data, epochs=1, head_epochs=0, batch_size=10, generator=torch.Generator().manual_seed(0))
    after = c.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "head.weight" not in changed and "embedding.weight" in changed
    assert {k for k in changed if k.startswith("hypernet.")} == set(c.shared_state())
    assert all(p.requires_grad for p in c.head.parameters())
    with pytest.raises(TypeError, match="client must be a HyperClient"):
        local_train_hyperfl(nn.Linear(6, 3), data)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        local_train_hyperfl(c, data, max_norm=0.0)


def test_hyperfl_round_averages_phi_and_keeps_private_state():
    datas = [tiny_data(seed=s) for s in range(2)]
    datas[1] = ClientData(datas[1].x_train[:10], datas[1].y_train[:10], datas[1].x_test, datas[1].y_test)
    clients = [tiny_client(seed=s) for s in range(2)]
    phi0 = clients[0].shared_state()
    # replay each client's local work on a copy (one generator shared in client order, as in the round)
    replay2 = [copy.deepcopy(c) for c in clients]
    new = hyperfl_round(clients, phi0, datas, epochs=1, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    states2 = []
    for c, d in zip(replay2, datas):
        c.load_shared_state(phi0)
        local_train_hyperfl(c, d, 1, 1, generator=gen)
        states2.append(c.shared_state())
    expected = {k: (30 * states2[0][k] + 10 * states2[1][k]) / 40 for k in phi0}
    for k in phi0:
        torch.testing.assert_close(new[k], expected[k])
    assert not torch.equal(clients[0].embedding.weight, clients[1].embedding.weight)
    with pytest.raises(ValueError, match="distinct objects"):
        hyperfl_round([clients[0], clients[0]], phi0, datas)
    with pytest.raises(ValueError, match="got 2 clients but 1 client data sets"):
        hyperfl_round(clients, phi0, datas[:1])


def test_fedavg_and_dp_rounds():
    torch.manual_seed(0)
    model = FedAvgClient(nn.Sequential(nn.Linear(6, 3)))
    data = tiny_data()
    s0 = model.shared_state()
    assert set(s0) == set(fedavg_shared_state(model.model))
    one = fedavg_round([model], s0, [data], generator=torch.Generator().manual_seed(0))
    ref = FedAvgClient(nn.Sequential(nn.Linear(6, 3)))
    ref.load_shared_state(s0)
    local_train_fedavg(ref, data, 1, generator=torch.Generator().manual_seed(0))
    for k, v in ref.shared_state().items():
        torch.testing.assert_close(one[k], v)
    # DP with sigma 0 and a huge clip is plain FedAvg; with a tiny clip the step is at most clip long
    same = dp_fedavg_round([model], s0, [data], clip=1e6, sigma=0.0, generator=torch.Generator().manual_seed(0))
    for k in s0:
        torch.testing.assert_close(same[k], one[k])
    tiny = dp_fedavg_round([model], s0, [data], clip=1e-3, sigma=0.0, generator=torch.Generator().manual_seed(0))
    step = math.sqrt(sum(((tiny[k] - s0[k]) ** 2).sum().item() for k in s0))
    assert step <= 1e-3 + 1e-9
    accs = client_accuracies([model], [data])
    assert 0 <= accs[0] <= 100
    with pytest.raises(TypeError, match="has no shared_state"):
        fedavg_round([nn.Linear(6, 3)], s0, [data])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        FedAvgClient(3)


# ------------------------------------------------------------------------------------ attacks
def test_linear_readout_exact_and_errors():
    lin = nn.Linear(5, 4)
    x = torch.rand(1, 5)
    gw, gb = torch.autograd.grad(lin(x).sin().sum(), [lin.weight, lin.bias])
    torch.testing.assert_close(linear_readout(gw, gb), x[0])
    with pytest.raises(ValueError, match="grad_bias is zero"):
        linear_readout(gw, torch.zeros(4))
    with pytest.raises(ValueError, match="grad_weight must be"):
        linear_readout(gw, gb[:3])


def test_a0_recovers_victim_exactly_from_shared_phi_gradient():
    c = tiny_client(sizes=(64, 16, 8), classes=10, embed=4, hidden=8)
    x, y = torch.rand(1, 1, 8, 8), torch.tensor([3])
    g = shared_gradients(c, x, y)
    assert first_linear(c.hypernet) == ("1.weight", "1.bias")
    x_hat = hyperfl_readout(g, c.hypernet)
    torch.testing.assert_close(x_hat, x.flatten(), atol=1e-5, rtol=1e-4)
    named = dict(zip(c.shared_state(), g))  # keyed as shared_state() works too
    torch.testing.assert_close(hyperfl_readout(named, c.hypernet), x_hat)
    with pytest.raises(KeyError, match="lacks hypernetwork tensors"):
        hyperfl_readout({}, c.hypernet)
    with pytest.raises(ValueError, match="one tensor per hypernetwork parameter"):
        hyperfl_readout(g[:2], c.hypernet)
    with pytest.raises(TypeError, match="hypernet must be a HyperNetwork"):
        hyperfl_readout(g, c)


def test_server_view_with_true_secrets_reproduces_client_gradient():
    c = tiny_client()
    space = HiddenClientSpace(3, (3, 4), optimise=False)
    space.v = c.embedding.weight[0].detach().clone()
    space.weight, space.bias = c.head.weight.detach().clone(), c.head.bias.detach().clone()
    view = HyperFLServerView(c, c.shared_state(), space)
    assert [p.shape for p in view.parameters()] == [p.shape for p in c.shared_parameters()]
    x, y = torch.rand(2, 6), torch.tensor([0, 2])
    for a, b in zip(model_gradients(view, x, y), shared_gradients(c, x, y)):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="space must be a HiddenClientSpace"):
        HyperFLServerView(c, c.shared_state(), None)


def test_a1_and_a2_run_and_a2_keeps_the_guess_fixed():
    c = tiny_client(sizes=(16, 12, 8), classes=3)
    x, y = torch.rand(1, 1, 4, 4), torch.tensor([1])
    g = shared_gradients(c, x, y)
    preset = PRESETS.get("hyperfl")
    assert preset.iters == 400 and preset.cost == "cosine" and preset.signed
    import dataclasses

    short = dataclasses.replace(preset, iters=15, keep_best=False)  # snapshots = last iterate
    r1 = hyperfl_inversion(c, c.shared_state(), g, y, (1, 1, 4, 4), joint=True, preset=short,
                           generator=torch.Generator().manual_seed(0))
    r2 = hyperfl_inversion(c, c.shared_state(), g, y, (1, 1, 4, 4), joint=False, preset=short,
                           generator=torch.Generator().manual_seed(0))
    for r in (r1, r2):
        assert r.iterations == 15 and len(r.history) == 16
        assert r.x.shape == (1, 1, 4, 4) and math.isfinite(r.match_loss)
        assert float(r.x.min()) >= 0 and float(r.x.max()) <= 1
    assert "extra0" in r1.snapshots and "extra0" not in r2.snapshots
    v0 = torch.randn(3, generator=torch.Generator().manual_seed(0))  # the space's first draw (its guess of v)
    assert not torch.equal(r1.snapshots["extra0"]["v"], v0)  # A1 moved v


# ------------------------------------------------------------------------------------ claim and bench
@pytest.fixture(scope="module")
def claim():
    from gradkit.harness.claims import get_claim

    return get_claim("hyperfl")


def test_claim_registered(claim):
    assert claim.arxiv == "2412.07187" and claim.primary.ours == "hyperfl" and claim.primary.baseline == "fedavg"
    assert [v.name for v in claim.variants] == ["fashion_mnist"]
    assert claim.protocol_for("quick", Path(".")).sizes == (784, 128, 32)


def test_claim_smoke(claim, smoke_run):
    out = smoke_run("hyperfl")
    assert set(out.metrics) == {"hyperfl", "fedavg", "dp_fedavg"} and out.data == "digits"
    for arm, m in out.metrics.items():
        assert len(out.curves["client_acc"][arm]) == claim.protocol.at("smoke").rounds + 1
    # accuracy improves over round 0; A0 recovers the victim exactly (PSNR at the 100 dB cap)
    for arm in ("hyperfl", "fedavg"):
        assert out.metrics[arm]["client_acc"] > out.metrics[arm]["round0_acc"]
    assert out.metrics["hyperfl"]["psnr_a0"] > 60 and out.metrics["hyperfl"]["ssim_a0"] > 0.99
    assert out.info["arms"]["hyperfl"]["strongest_attack"] == "a0"
    grid = out.info["images"]["victims"]
    assert list(grid)[0] == "original" and {"hyperfl_a0", "hyperfl_a1", "hyperfl_a2", "fedavg_ig"} <= set(grid)
    assert all("images" not in i for i in out.info["arms"].values())  # moved into the grid, not stored twice
    torch.testing.assert_close(torch.tensor(grid["hyperfl_a0"]), torch.tensor(grid["original"]), atol=1e-4, rtol=0)


def test_claim_real_data_branch(claim, tmp_path):
    from conftest import real_data_root
    from gradkit.harness.claims import RunContext
    from gradkit.harness.claims.hyperfl import _fashion_pool
    from gradkit.data import DataError

    with pytest.raises(DataError):
        claim.run(RunContext(scale="smoke", seed=0, data_root=tmp_path))  # no fashion_mnist/ files
    with pytest.raises(DataError, match="is not a folder"):
        claim.run(RunContext(scale="smoke", seed=0, data_root=tmp_path / "missing"))
    root = real_data_root()
    if root is None or not (root / "fashion_mnist").is_dir():
        pytest.skip("no Fashion-MNIST in the real data folder (set GRADKIT_TEST_DATA)")
    x, y = _fashion_pool(root)
    assert x.shape == (10000, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert y.shape == (10000,) and set(y.unique().tolist()) == set(range(10))


def test_only_phi_is_shared_in_the_claims_clients(claim):
    from gradkit.harness.claims.hyperfl import build_models

    p = claim.protocol.at("quick")
    ext, head = build_models(p.sizes)
    c = HyperClient(ext, head, embed_dim=p.embed_dim, hidden=p.hyper_hidden)
    assert all(k.startswith("hypernet.") for k in c.shared_state())
    n_shared = sum(v.numel() for v in c.shared_state().values())
    assert n_shared == sum(p.numel() for p in c.hypernet.parameters())


def test_benchmark_registered_and_runs():
    import gradkit.harness.benchmarks.hyperfl  # noqa: F401
    from gradkit.harness.bench import BENCHMARKS

    b = BENCHMARKS.get("hyperfl-client-step")
    r = b.run(2)
    assert r.baseline_s > 0 and r.candidate_s > 0
