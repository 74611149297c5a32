"""Registry, criteria, engine, batching, results store, testing oracles."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradkit.harness.claims import AllFinite, AllOf, AtLeast, AtMost, Below, Drop, Gain, Monotonic
from gradkit.data import TensorBatches
from gradkit.engine import History, accuracy, fit, resolve_device, seed_everything
from gradkit.registry import Registry
from gradkit.harness.results import ResultStore, RunRecord, StoreError
from gradkit.harness.suite import parse_seeds
from gradkit.testing import SavedBytesMeter, assert_no_hooks_left, assert_same_grads, count_hooks, param_grads


def test_registry_duplicates_and_unknown():
    r = Registry("thing")
    r.add("a", 1)
    with pytest.raises(ValueError, match="'a' is already registered"):
        r.add("a", 2)
    with pytest.raises(KeyError, match="unknown thing 'b'; known: a"):
        r.get("b")
    with pytest.raises(ValueError, match="non-empty"):
        r.add("", 3)
    assert "a" in r and len(r) == 1 and r.names() == ["a"]


SEEDS = [{"ours": {"acc": 80.0, "gs": 1.0}, "base": {"acc": 70.0, "gs": 2.0}},
         {"ours": {"acc": 84.0, "gs": 1.5}, "base": {"acc": 72.0, "gs": 2.5}}]


def test_criteria_compare_seed_means():
    assert Gain("acc", "ours", "base", 10.0).evaluate(SEEDS)[0]  # 82 - 71 = 11
    assert not Gain("acc", "ours", "base", 12.0).evaluate(SEEDS)[0]
    assert Drop("acc", "base", "ours", 11.0).evaluate(SEEDS)[0]
    assert not Drop("acc", "base", "ours", 10.9).evaluate(SEEDS)[0]
    assert Below("acc", "base", 73.0).evaluate(SEEDS)[0]
    assert not Below("acc", "base", 72.0).evaluate(SEEDS)[0]
    assert Below("acc", "base", 71.5, every_seed=False).evaluate(SEEDS)[0]
    assert AtLeast("acc", "ours", 82.0).evaluate(SEEDS)[0] and not AtLeast("acc", "ours", 82.1).evaluate(SEEDS)[0]
    assert AtMost("gs", "ours", 1.25).evaluate(SEEDS)[0]
    assert Monotonic("gs", ("ours", "base")).evaluate(SEEDS)[0]
    assert not Monotonic("gs", ("base", "ours")).evaluate(SEEDS)[0]
    both = AllOf(Gain("acc", "ours", "base", 10.0), Monotonic("gs", ("base", "ours")))
    ok, checks = both.evaluate(SEEDS)
    assert not ok and [c.passed for c in checks] == [True, False]
    assert "diff +11" in checks[0].detail


def test_compare_is_the_one_comparison_and_within():
    from gradkit.harness.claims import Compare, Within

    assert isinstance(Gain("acc", "ours", "base", 1.0), Compare) and isinstance(Below("acc", "ours", 1.0), Compare)
    assert Compare("acc", "ours", ">", "base", margin=10.9).evaluate(SEEDS)[0]
    assert not Compare("acc", "ours", ">", "base", margin=11.0).evaluate(SEEDS)[0]
    assert Compare("gs", "ours", "<=", 1.25).evaluate(SEEDS)[0]
    assert Compare("gs", "ours", "<", 1.6, every_seed=True).evaluate(SEEDS)[0]
    assert not Compare("gs", "ours", "<", 1.5, every_seed=True).evaluate(SEEDS)[0]
    assert Gain("acc", "ours", "base", 10.0).describe() == "acc: ours >= base + 10"
    assert Drop("acc", "ours", "base", 1.0).describe() == "acc: ours >= base - 1"
    assert Below("acc", "base", 73.0).describe() == "acc[base] < 73 (every seed)"
    with pytest.raises(ValueError, match="op must be one of"):
        Compare("acc", "ours", "=>", "base")
    with pytest.raises(ValueError, match="every_seed"):
        Compare("acc", "ours", ">=", "base", every_seed=True)
    assert Within("acc", "ours", "base", 11.0).evaluate(SEEDS)[0]  # |82 - 71| = 11
    assert not Within("acc", "ours", "base", 10.9).evaluate(SEEDS)[0]
    assert Within("acc", "base", "ours", 11.0).describe() == "acc: |base - ours| <= 11"
    with pytest.raises(ValueError, match="tol"):
        Within("acc", "a", "b", -1.0)
    nan = [{"ours": {"acc": float("nan")}, "base": {"acc": 1.0}}]
    assert not Within("acc", "ours", "base", 1e9).evaluate(nan)[0]


def test_criteria_nan_fails_and_missing_is_clear():
    bad = [{"ours": {"acc": float("nan")}, "base": {"acc": 1.0}}]
    assert not Gain("acc", "ours", "base", -100).evaluate(bad)[0]
    assert not AllFinite().evaluate(bad)[0]
    assert not Gain("acc", "ours", "base", 0).evaluate([])[0]
    with pytest.raises(KeyError, match="arm 'x' missing"):
        Gain("acc", "x", "base", 0).evaluate(bad)
    with pytest.raises(ValueError):
        AllOf()


def test_parse_seeds():
    assert parse_seeds(None, 3) == [0, 1, 2]
    assert parse_seeds("2", 3) == [0, 1]
    assert parse_seeds("11,12,13", 3) == [11, 12, 13]
    assert parse_seeds("7,", 3) == [7]
    for bad in ("0", "-1,2", "x", "1,1", ","):
        with pytest.raises(ValueError):
            parse_seeds(bad, 3)


def _toy(seed):
    g = seed_everything(seed)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hist = fit(model, opt, TensorBatches(x, y, batch_size=16, generator=g), epochs=5,
               evaluate=lambda m: {"acc": accuracy(m, x, y)})
    return model, hist


def test_fit_is_bit_identical_on_rerun_and_learns():
    m1, h1 = _toy(3)
    m2, h2 = _toy(3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert h1.records == h2.records
    assert h1.series("train_loss")[-1] < h1.series("train_loss")[0]
    assert h1.best("acc") >= 80.0 and h1.steps == 20
    m3, _ = _toy(4)
    assert not torch.equal(next(m1.parameters()), next(m3.parameters()))


def test_fit_hooks_order_and_nan_stop():
    calls = []
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.ones(1, 2), torch.zeros(1))] * 3

    def loss(m, b):
        calls.append("loss")
        out = m(b[0]).sum()
        return out * float("nan") if len([c for c in calls if c == "loss"]) == 5 else out

    h = fit(model, opt, data, epochs=3, compute_loss=loss, on_step_start=lambda s: calls.append(f"start{s}"),
            before_step=lambda s: calls.append(f"pre{s}"))
    assert calls[:3] == ["start0", "loss", "pre0"]
    assert len(h.records) == 2 and math.isnan(h.records[-1]["train_loss"])
    assert math.isnan(h.best("train_loss"))
    with pytest.raises(ValueError, match="epochs"):
        fit(model, opt, data, epochs=-1)
    with pytest.raises(KeyError):
        History().last("x")


def test_seed_and_device_validation():
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_tensor_batches():
    x, y = torch.arange(10.0), torch.arange(10)
    b = list(TensorBatches(x, y, batch_size=4, shuffle=False))
    assert [len(t[0]) for t in b] == [4, 4, 2] and torch.equal(b[0][1], torch.arange(4))
    assert len(TensorBatches(x, y, batch_size=4, drop_last=True)) == 2
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([t[0] for t in TensorBatches(x, batch_size=3, generator=g)])
    assert sorted(seen.tolist()) == x.tolist()
    with pytest.raises(ValueError, match="tensor #1 has 3 rows"):
        TensorBatches(x, torch.arange(3), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(x, batch_size=0)


def test_store_round_trip_and_nan(tmp_path):
    s = ResultStore(tmp_path / "a" / "r.db")
    rec = RunRecord(slug="x", claim_version=1, scale="quick", seed=0, data_mode="bundled", data="d",
                    metrics={"ours": {"acc": float("nan"), "b": 1.5}}, curves={"c": {"ours": [1.0, 2.0]}})
    s.add_run(rec)
    s.add_run(RunRecord(slug="x", claim_version=1, scale="quick", seed=0, data_mode="bundled", data="d",
                        metrics={"ours": {"acc": 3.0, "b": 1.0}}))
    (got,) = s.latest_per_seed("x", 1, "quick", "bundled").values()
    assert got.metrics["ours"]["acc"] == 3.0
    first = s.runs()[0]
    assert math.isnan(first.metrics["ours"]["acc"]) and first.curves == {"c": {"ours": [1.0, 2.0]}}
    assert s.groups() == [("x", 1, "quick", "bundled", "")]
    assert s.latest_per_seed("x", 2, "quick", "bundled") == {}


def test_store_errors(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="cannot create the folder"):
        ResultStore(tmp_path / "f" / "r.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError, match="cannot be used"):
        ResultStore(bad)


def _open_and_write(path, go, seed, errors):
    go.wait()
    try:
        ResultStore(path).add_run(RunRecord(slug="x", claim_version=1, scale="smoke", seed=seed, data_mode="bundled",
                                            data="d", metrics={"a": {"m": 1.0}}))
    except Exception as e:  # reported to the test, which names it
        errors.put(repr(e))


def test_store_opened_by_many_processes_at_once(tmp_path):
    """Processes that create the same new database at the same moment all open it and write (switching to WAL
    and creating the schema can report 'locked' without waiting on the busy timeout; the store retries)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # forked children start within microseconds of the signal
    for trial in range(10):
        db = tmp_path / f"r{trial}.db"
        go, errors = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open_and_write, args=(db, go, i, errors)) for i in range(8)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(timeout=120)
        got = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
        assert not got, got
        assert sorted(r.seed for r in ResultStore(db).runs()) == list(range(8))


def test_testing_oracles():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    g1 = param_grads(m, lambda mm: mm(x).sum())
    g2 = param_grads(m, lambda mm: mm(x).sum())
    assert_same_grads(g1, g2)
    with pytest.raises(AssertionError, match="gradients differ"):
        assert_same_grads(g1, param_grads(m, lambda mm: 2 * mm(x).sum()))
    with SavedBytesMeter() as meter:
        m(x).sum().backward()
    # saved: x for Linear1 (input), tanh output, its input to Linear2 -> at least 5x3 + 5x4 floats
    assert meter.bytes >= (15 + 20) * 4
    before = count_hooks(m)
    h = m[0].register_forward_hook(lambda *a: None)
    with pytest.raises(AssertionError, match="1 hook"):
        assert_no_hooks_left(m, before)
    h.remove()
    assert_no_hooks_left(m, before)


def test_every_claim_is_complete_and_its_components_resolve():
    import importlib

    from gradkit.harness.claims import CLAIMS, load_claims

    load_claims()
    assert {"dann", "gradient-noise", "reste"} <= set(CLAIMS.names())
    for slug, c in CLAIMS.items():
        assert c.title and c.arxiv and c.statement and c.paper_figure and c.uses, slug
        for dotted in c.uses:
            mod, _, attr = dotted.rpartition(".")
            assert hasattr(importlib.import_module(mod), attr), f"{slug}: {dotted} does not resolve"


def test_fit_drives_lbfgs_with_a_closure():
    g = seed_everything(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    model = nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20, line_search_fn="strong_wolfe")
    calls = []
    h = fit(model, opt, [(x, y)], epochs=3, compute_loss=lambda m, b: ((m(b[0]).squeeze(1) - b[1]) ** 2).mean(),
            before_step=lambda s: calls.append(s))
    assert h.records[-1]["train_loss"] < 1e-6 and len(calls) > 3
    assert torch.allclose(model.weight.detach(), torch.tensor([[1.0, -2.0, 0.5]]), atol=1e-3)


def test_at_least_k_of():
    from gradkit.harness.claims import AtLeastKOf

    c = AtLeastKOf(2, (Gain("acc", "ours", "base", 10.0), Gain("acc", "ours", "base", 12.0),
                       Drop("gs", "base", "ours", 0.0)))
    ok, (check,) = c.evaluate(SEEDS)
    assert ok and check.detail.startswith("2/3 hold")
    assert not AtLeastKOf(3, c.criteria).evaluate(SEEDS)[0]


def test_runner_seeds_every_arm_times_it_and_stores_the_protocol():
    from dataclasses import dataclass

    from gradkit.harness.claims import ArmResult, Claim, Primary, Protocol, RunContext, Variant, scaled

    @dataclass(frozen=True)
    class P(Protocol):
        n: int = scaled(smoke=2, quick=3)
        lr: float = 0.1

    seen = []

    def arm(ctx):
        # the runner re-seeds before every arm: each draws the same numbers
        draw = torch.rand(2).tolist() + torch.rand(1, generator=ctx.generator).tolist()
        seen.append((ctx.arm, draw, ctx.p.n, ctx.data))
        return ArmResult({"acc": 50.0 + len(ctx.arm)}, {"loss": [1.0] * ctx.p.n})

    def finish(ctx, out):
        out.metrics["b"]["extra"] = 1.0

    c = Claim(slug="t", title="t", arxiv="0", statement="s", paper_figure="f",
              criterion=Gain("acc", "bb", "a", 0.5), primary=Primary("acc", "bb", "a"), protocol=P,
              arms={"a": arm, "bb": arm, "b": arm}, data="toy", setup=lambda ctx: ctx.p.n * 10, finish=finish,
              variants=(Variant("real-toy", "toy/ folder", scales=("quick",), overrides={"n": 7}),))
    out = c.run(RunContext(scale="smoke", seed=3))
    assert [s[0] for s in seen] == ["a", "bb", "b"] and seen[0][1] == seen[1][1] == seen[2][1]
    assert all(s[2] == 2 and s[3] == 20 for s in seen)
    assert out.data == "toy" and out.metrics["b"]["extra"] == 1.0 and out.curves["loss"]["a"] == [1.0, 1.0]
    assert out.info["protocol"] == {"n": 2, "lr": 0.1} and out.info["overrides"] == {}
    assert set(out.info["seconds_per_arm"]) == {"a", "bb", "b"}
    out = c.run(RunContext(scale="quick", seed=0, data_root=Path("."), overrides={"lr": 1}))
    assert out.data == "real-toy" and out.info["protocol"] == {"n": 7, "lr": 1.0}
    assert out.info["overrides"] == {"lr": 1.0}
    assert c.variant_for("smoke", Path(".")) is None  # the variant lists only quick
    with pytest.raises(ValueError, match="unknown protocol field 'nope'"):
        c.run(RunContext(scale="smoke", seed=0, overrides={"nope": 1}))


def test_protocol_types_and_overrides():
    from dataclasses import dataclass

    from gradkit.harness.protocol import ProtocolError, parse_overrides, protocol_table

    from gradkit.harness.claims import Protocol, scaled

    @dataclass(frozen=True)
    class P(Protocol):
        epochs: int = scaled(smoke=1, quick=10, full=100)
        lr: float = 0.1
        lrs: tuple[float, ...] = (0.1, 0.3)
        mode: str = "a"
        cap: int | None = None
        on: bool = True

    assert P.at("full").epochs == 100 and P.at("quick").epochs == 10
    got = parse_overrides(P, ["lr=1", "lrs=0.5,1", "mode=b", "cap=None", "on=false", "epochs=3"])
    assert got == {"lr": 1.0, "lrs": (0.5, 1.0), "mode": "b", "cap": None, "on": False, "epochs": 3}
    assert parse_overrides(P, ["lrs=0.2"]) == {"lrs": (0.2,)} and parse_overrides(P, ["cap=4"]) == {"cap": 4}
    for bad, msg in (("epochs=1.5", "expects int"), ("lr=x", "expects float"), ("on=2", "expects bool"),
                     ("lr=nan", "finite"), ("zz=1", "unknown protocol field"), ("lr", "field=value")):
        with pytest.raises(ProtocolError, match=msg):
            parse_overrides(P, [bad])
    with pytest.raises(ValueError, match="scale must be one of"):
        P.at("huge")
    assert protocol_table(P)[0] == ("epochs", "int", "1", "10", "100")


def test_compare_steps_uses_the_chosen_clock(monkeypatch):
    from gradkit.harness import bench

    ticks = iter(range(1000))
    monkeypatch.setitem(bench.CLOCKS, "cpu", lambda: float(next(ticks)))  # each reading advances by 1
    calls = []
    r = bench.compare_steps(lambda: calls.append("a"), lambda: calls.append("b"), repeats=3, warmup=1,
                            clock="cpu")
    assert r.baseline_s == r.candidate_s == 1.0 and len(calls) == 8
    old = bench.set_clock("cpu")
    try:
        assert bench.compare_steps(lambda: None, lambda: None, repeats=2, warmup=0).baseline_s == 1.0
    finally:
        bench.set_clock(old)
    with pytest.raises(ValueError, match="clock must be one of"):
        bench.compare_steps(lambda: None, lambda: None, clock="sundial")
    with pytest.raises(ValueError, match="clock must be one of"):
        bench.set_clock("sundial")


def test_store_opens_a_schema_1_database_and_adds_the_new_columns(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, slug TEXT NOT NULL, claim_version INTEGER NOT NULL, "
        "scale TEXT NOT NULL, seed INTEGER NOT NULL, data_mode TEXT NOT NULL, data TEXT NOT NULL, metrics TEXT NOT NULL, "
        "curves TEXT NOT NULL, info TEXT NOT NULL, seed_passed INTEGER NOT NULL, duration_s REAL NOT NULL, "
        "device TEXT NOT NULL, versions TEXT NOT NULL, git_rev TEXT, created_at REAL NOT NULL);"
        "INSERT INTO runs (slug, claim_version, scale, seed, data_mode, data, metrics, curves, info, seed_passed, "
        "duration_s, device, versions, git_rev, created_at) VALUES ('x', 1, 'quick', 0, 'bundled', 'd', "
        "'{\"a\": {\"m\": 1.0}}', '{}', '{}', 1, 0.1, 'cpu', '{}', NULL, 0.0);")
    con.close()
    s = ResultStore(db)
    (r,) = s.runs()
    assert r.overrides == "" and r.verdict == "" and r.metrics == {"a": {"m": 1.0}}
    s.add_run(RunRecord(slug="x", claim_version=1, scale="quick", seed=1, data_mode="bundled", data="d",
                        metrics={"a": {"m": 2.0}}, overrides="lr=0.5", verdict="PASS"))
    assert [g[-1] for g in s.groups()] == ["", "lr=0.5"]
    assert list(s.latest_per_seed("x", 1, "quick", "bundled")) == [0]
    assert s.latest_per_seed("x", 1, "quick", "bundled", overrides="lr=0.5")[1].verdict == "PASS"
