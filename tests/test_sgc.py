"""Tests of Sequential Gradient Coding (paper slug: sgc): codes, schemes, straggler models, simulator, claim."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gradkit.distributed.coding_schemes import GCScheme, MSGCScheme, SRSGCScheme, make_scheme
from gradkit.distributed.gradient_codes import (
    CodingError, DecodeError, GradientCode, Task, compute_task, cyclic_repetition_code, fractional_repetition_code,
    partition,
)
from gradkit.distributed.straggler_models import (
    BurstyStragglerModel, PerRoundStragglerModel, gilbert_elliott_delays, iid_delays, markov_straggler_states,
    pattern_delays, sample_admissible_pattern,
)
from gradkit.distributed.stragglers import grid_search, round_outcome, simulate_runtime


# ------------------------------------------------------------------------------------------ helpers
def naive_bursty_admissible(pattern: np.ndarray, B: int, W: int, lam: int) -> bool:
    """The model's definition, window by window: <= lam distinct stragglers, one burst of <= B each."""
    n, R = pattern.shape
    for start in range(-W + 1, R):
        lo, hi = max(0, start), min(R, start + W)
        win = pattern[:, lo:hi]
        if win.any(1).sum() > lam:
            return False
        for i in range(n):
            idx = np.flatnonzero(win[i])
            if idx.size and (idx[-1] - idx[0] + 1 != idx.size or idx.size > B):
                return False
    return True


def drive(scheme, pattern, chunk_grads=None):
    """Run ``scheme`` through ``pattern`` (n, rounds; True = straggler); with chunk gradients (jobs, C, P)
    the workers send real payloads and every job is decoded at t + T. Returns the decoded sums."""
    scheme.reset()
    out = {}
    for r in range(scheme.rounds):
        returned = ~pattern[:, r]
        results = None
        if chunk_grads is not None:
            tasks = scheme.assign(r)
            results = {i: [compute_task(t, lambda c, t=t: chunk_grads[t.job, c]) for t in tasks[i]]
                       for i in range(scheme.n) if returned[i]}
        scheme.complete_round(r, returned, results)
        job = r - scheme.T
        if 0 <= job < scheme.jobs:
            assert scheme.decodable(job), (scheme, job, scheme.missing(job))
            if chunk_grads is not None:
                out[job] = scheme.decode(job)
    return out


# ---------------------------------------------------------------------------------------------- codes
@pytest.mark.parametrize("n,s", [(4, 0), (4, 1), (6, 1), (6, 2), (6, 5), (8, 3)])
def test_frc_structure_and_any_n_minus_s_decode_exactly(n, s):
    B = fractional_repetition_code(n, s)
    assert B.shape == (n, n) and ((B == 0) | (B == 1)).all() and (B.sum(1) == s + 1).all()
    code = GradientCode(n, s)
    assert code.kind == "frc"
    g = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(n + s))
    coded = code.encode(g)
    for F in itertools.combinations(range(n), n - s):
        dec = code.decode({i: coded[i] for i in F})
        torch.testing.assert_close(dec, g.sum(0), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n,s", [(5, 2), (7, 3), (5, 4), (7, 1)])
def test_cyclic_code_support_and_any_n_minus_s_decode_exactly(n, s):
    B = cyclic_repetition_code(n, s)
    for i in range(n):
        assert set(np.flatnonzero(B[i])) == {(i + k) % n for k in range(s + 1)}
        assert B[i, i] == 1.0
    assert np.array_equal(B, cyclic_repetition_code(n, s))   # deterministic: every rank builds the same code
    code = GradientCode(n, s, kind="cyclic")
    assert GradientCode(n, s).kind == ("frc" if n % (s + 1) == 0 else "cyclic")
    g = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coded = code.encode(g)
    for k in (n - s, n - s + 1, n):
        for F in itertools.combinations(range(n), k):
            torch.testing.assert_close(code.decode({i: coded[i] for i in F}), g.sum(0), atol=1e-10, rtol=0)


def test_code_encode_matches_naive_support_sums():
    code = GradientCode(5, 2)
    g = torch.randn(5, 3, dtype=torch.float64)
    coded = code.encode(g)
    for i in range(5):
        task = Task(0, "coded", 0, code.support(i), code.coefficients(i))
        naive = sum(c * g[j] for j, c in zip(task.chunks, task.coeffs))
        torch.testing.assert_close(compute_task(task, lambda j: g[j]), naive, atol=1e-12, rtol=0)
        torch.testing.assert_close(coded[i], naive, atol=1e-12, rtol=0)


def test_code_decoder_fails_loudly():
    code = GradientCode(4, 1)
    g = torch.randn(4, 3, dtype=torch.float64)
    c = code.encode(g)
    with pytest.raises(DecodeError, match="at least n - s = 3"):
        code.decode({0: c[0], 1: c[1]})
    bad = c[2].clone()
    bad[0] = float("nan")
    with pytest.raises(CodingError, match="non-finite"):
        code.decode({0: c[0], 1: c[1], 2: bad})
    with pytest.raises(CodingError, match="shape"):
        code.decode({0: c[0], 1: c[1], 2: c[2][:2]})
    with pytest.raises(CodingError, match="tensor"):
        code.decode({0: c[0], 1: c[1], 2: [1.0, 2.0, 3.0]})
    with pytest.raises(CodingError, match="floating"):
        code.decode({0: c[0], 1: c[1], 2: torch.ones(3, dtype=torch.int64)})
    with pytest.raises(CodingError, match="worker ids"):
        code.decode({0: c[0], 1: c[1], 7: c[2]})
    with pytest.raises(CodingError, match="4 rows"):
        code.encode(torch.zeros(3, 2))


def test_code_argument_errors():
    with pytest.raises(ValueError, match=r"\(s\+1\) to divide n"):
        fractional_repetition_code(5, 1)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        GradientCode(0, 0)
    with pytest.raises(ValueError, match=r"s must be an int in \[0, 3\], got 4"):
        GradientCode(4, 4)
    with pytest.raises(ValueError, match="kind"):
        GradientCode(4, 1, kind="mds")
    with pytest.raises(ValueError, match="s must be an int"):
        GradientCode(4, 1.5)


def test_partition_covers_every_sample_in_proportion():
    sl = partition(100, [0.5, 0.25, 0.125, 0.125])
    assert [s.stop - s.start for s in sl] == [50, 25, 12, 13] or [s.stop - s.start for s in sl] == [50, 25, 13, 12]
    assert sl[0].start == 0 and sl[-1].stop == 100
    assert all(a.stop == b.start for a, b in zip(sl, sl[1:]))
    assert sum(s.stop - s.start for s in partition(7, np.full(16, 1 / 16))) == 7   # empty chunks allowed
    with pytest.raises(ValueError, match="summing to 1"):
        partition(10, [0.5, 0.6])
    with pytest.raises(ValueError, match="summing to 1"):
        partition(10, [1.5, -0.5])


# ----------------------------------------------------------------------------------- scheme: loads
@pytest.mark.parametrize("n,B,W,lam", [(8, 2, 3, 2), (6, 1, 2, 1), (8, 3, 5, 4), (5, 2, 4, 4)])
def test_msgc_load_formula_equals_minitask_accounting(n, B, W, lam):
    sch = MSGCScheme(n, B, W, lam, jobs=12)
    denom = B + (W - 1) * (lam + 1)
    assert sch.load == pytest.approx((lam + 1) * (W - 1 + B) / (n * denom), rel=1e-12)
    assert sch.chunk_fractions.sum() == pytest.approx(1.0, abs=1e-12)
    # D1 piece and D2 task (lam+1 chunks of one group) have the same size: equal mini-tasks
    d2_task = (lam + 1) * sch.d2_share / (B * n)
    assert sch.minitask == pytest.approx(d2_task, rel=1e-12)
    pattern = np.zeros((n, sch.rounds), bool)
    sch.reset()
    for r in range(sch.rounds):
        tasks = sch.assign(r)
        work = np.array([sum(sch.chunk_fractions[list(t.chunks)].sum() for t in ts) for ts in tasks])
        np.testing.assert_allclose(work, sch.work(r), rtol=1e-12)
        if sch.T <= r < sch.jobs:                      # steady state: every slot busy
            np.testing.assert_allclose(work, sch.load, rtol=1e-12)
        assert (work <= sch.load + 1e-12).all()
        sch.complete_round(r, ~pattern[:, r])


def test_msgc_lambda_equals_n_branch():
    n, B, W = 4, 2, 3
    sch = MSGCScheme(n, B, W, n, jobs=10)
    assert sch.load == pytest.approx((W - 1 + B) / (n * (W - 1)))
    assert sch.d2_share == 0.0 and len(sch.chunk_fractions) == n * (W - 1)
    # below the lam = n limit the formula is continuous from below and smaller
    assert MSGCScheme(n, B, W, n - 1, jobs=10).load < sch.load
    rng = np.random.default_rng(3)
    for _ in range(5):
        pat = sample_admissible_pattern(sch.straggler_model, n, sch.rounds, p=0.3, rng=rng)
        drive(sch, pat)


@pytest.mark.parametrize("cls,kw,load", [(GCScheme, {"s": 2}, 3 / 8), (SRSGCScheme, {"B": 2, "W": 5, "lam": 4}, 3 / 8)])
def test_gc_and_srsgc_loads(cls, kw, load):
    sch = cls(n=8, jobs=6, **kw)
    assert sch.load == pytest.approx(load)
    sch.reset()
    w = sch.work(0)
    np.testing.assert_allclose(w, load)
    tasks = sch.assign(0)
    assert all(len(ts) == 1 and len(ts[0].chunks) == sch.s + 1 for ts in tasks)


def test_srsgc_s_formula_and_argument_errors():
    assert SRSGCScheme(8, 2, 5, 4, jobs=3).s == math.ceil(2 * 4 / 6)
    assert SRSGCScheme(32, 3, 4, 32, jobs=3).s == math.ceil(3 * 32 / 6)
    with pytest.raises(ValueError, match="B to divide W-1"):
        SRSGCScheme(8, 2, 4, 2, jobs=3)
    with pytest.raises(ValueError, match=r"lam must be an int in \[1, 8\], got 9"):
        SRSGCScheme(8, 1, 3, 9, jobs=3)
    with pytest.raises(ValueError, match="W must be an int >= 3, got 2"):
        MSGCScheme(8, 2, 2, 1, jobs=3)
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        MSGCScheme(8, 1, 2, 1, jobs=0)
    with pytest.raises(ValueError, match="scheme must be one of"):
        make_scheme("mds", 4, 3)
    assert isinstance(make_scheme("m_sgc", 4, 3, B=1, W=2, lam=1), MSGCScheme)


# ------------------------------------------------------------------------------ straggler models
def test_bursty_model_unit_cases():
    m = BurstyStragglerModel(B=2, W=4, lam=2)
    P = lambda rows: np.array(rows, dtype=bool)   # noqa: E731
    assert m.admissible_pattern(P([[1, 1, 0, 0, 0, 1]]))          # burst of 2, next one W rounds later
    assert not m.admissible_pattern(P([[1, 1, 1, 0]]))            # burst longer than B
    assert not m.admissible_pattern(P([[1, 0, 1, 0]]))            # two bursts in one window (a gap)
    assert not m.admissible_pattern(P([[1, 1, 0, 0, 1]]))         # second burst inside the window
    assert not m.admissible_pattern(P([[1, 0, 0], [0, 1, 0], [0, 0, 1]]))   # 3 distinct > lam in a window
    assert m.admissible_pattern(P([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]))  # windows disjoint
    assert m.admissible_pattern(P([[0, 1], [1, 1]]))              # first rounds: short window
    pr = PerRoundStragglerModel(2)
    assert pr.admissible(np.zeros((4, 0), bool), np.array([1, 1, 0, 0], bool))       # <= s, not < s
    assert not pr.admissible(np.zeros((4, 0), bool), np.array([1, 1, 1, 0], bool))


@pytest.mark.parametrize("B,W,lam", [(1, 2, 1), (2, 3, 2), (2, 5, 3), (3, 4, 2), (1, 4, 3)])
def test_bursty_model_matches_the_definition_on_random_patterns(B, W, lam):
    m = BurstyStragglerModel(B, W, lam)
    rng = np.random.default_rng(B * 100 + W * 10 + lam)
    agree = {True: 0, False: 0}
    for _ in range(150):
        pat = rng.random((4, 9)) < rng.uniform(0.05, 0.35)
        want = naive_bursty_admissible(pat, B, W, lam)
        assert m.admissible_pattern(pat) == want, pat.astype(int)
        agree[want] += 1
    assert agree[True] > 5 and agree[False] > 5
    # batched form equals the single form
    hist = rng.random((6, 4, 7)) < 0.2
    cur = rng.random((6, 4)) < 0.3
    np.testing.assert_array_equal(m.admissible(hist, cur), [m.admissible(h, c) for h, c in zip(hist, cur)])


def test_model_argument_errors():
    with pytest.raises(ValueError, match="W must be an int >= 3, got 2"):
        BurstyStragglerModel(2, 2, 1)
    with pytest.raises(ValueError, match="B must be an int >= 1"):
        BurstyStragglerModel(0, 2, 1)
    with pytest.raises(ValueError, match="boolean array"):
        BurstyStragglerModel(1, 2, 1).admissible_pattern(np.zeros((2, 3)))


# ------------------------------------------------------------------- decodability and exact decode
@pytest.mark.parametrize("cls,kw", [
    (MSGCScheme, {"B": 1, "W": 2, "lam": 1}), (MSGCScheme, {"B": 2, "W": 3, "lam": 2}),
    (MSGCScheme, {"B": 2, "W": 4, "lam": 3}), (MSGCScheme, {"B": 3, "W": 4, "lam": 1}),
    (SRSGCScheme, {"B": 1, "W": 3, "lam": 2}), (SRSGCScheme, {"B": 2, "W": 3, "lam": 3}),
    (SRSGCScheme, {"B": 1, "W": 2, "lam": 4}),
])
def test_every_job_decodes_by_t_plus_T_under_admissible_patterns(cls, kw):
    n = 6
    sch = cls(n=n, jobs=16, **kw)
    rng = np.random.default_rng(11)
    for _ in range(25):
        pat = sample_admissible_pattern(sch.straggler_model, n, sch.rounds, p=rng.uniform(0.05, 0.4), rng=rng)
        assert naive_bursty_admissible(pat, kw["B"], kw["W"], kw["lam"])
        drive(sch, pat)


def test_gc_decodes_with_at_most_s_stragglers_and_not_more():
    n, s = 6, 2
    sch = GCScheme(n, s, jobs=20)
    rng = np.random.default_rng(0)
    pat = np.zeros((n, 20), bool)
    for r in range(20):
        pat[rng.choice(n, size=rng.integers(0, s + 1), replace=False), r] = True
    pat[:s, 5] = True                            # exactly s stragglers: still decodable (<= s, not < s)
    drive(sch, pat)
    sch.reset()
    bad = np.zeros(n, bool)
    bad[: s + 1] = True
    sch.complete_round(0, ~bad)
    assert not sch.decodable(0)
    assert "3 of the 4" in sch.missing(0)


@pytest.mark.parametrize("cls,kw", [
    (GCScheme, {"s": 1}), (GCScheme, {"s": 2}), (SRSGCScheme, {"B": 1, "W": 3, "lam": 2}),
    (MSGCScheme, {"B": 2, "W": 3, "lam": 2}), (MSGCScheme, {"B": 1, "W": 2, "lam": 5}),
    (MSGCScheme, {"B": 2, "W": 3, "lam": 3}),
])
def test_decoded_gradient_equals_sum_of_chunk_gradients(cls, kw):
    n, jobs = 5, 9
    sch = cls(n=n, jobs=jobs, **kw)
    C = len(sch.chunk_fractions)
    g = torch.randn(jobs, C, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(2)
    for _ in range(4):
        pat = sample_admissible_pattern(sch.straggler_model, n, sch.rounds, p=0.25, rng=rng)
        dec = drive(sch, pat, g)
        assert sorted(dec) == list(range(jobs))
        for j, v in dec.items():
            torch.testing.assert_close(v, g[j].sum(0), atol=1e-10, rtol=0)


def test_decode_float32_payloads_within_1e5():
    sch = MSGCScheme(5, 2, 3, 3, jobs=4)           # (5, 3) cyclic code for D2: real-valued coefficients
    g = torch.randn(4, len(sch.chunk_fractions), 6, generator=torch.Generator().manual_seed(1))
    pat = np.zeros((5, sch.rounds), bool)
    pat[1, 2] = pat[3, 4] = True
    for j, v in drive(sch, pat, g).items():
        torch.testing.assert_close(v, g[j].sum(0), atol=1e-5, rtol=0)


def test_malformed_results_fail_loudly_and_leave_the_scheme_unchanged():
    sch = MSGCScheme(4, 1, 2, 1, jobs=3)
    g = torch.randn(3, len(sch.chunk_fractions), 2, dtype=torch.float64)
    tasks = sch.assign(0)
    good = {i: [compute_task(t, lambda c, t=t: g[t.job, c]) for t in tasks[i]] for i in range(4)}
    ok = np.ones(4, bool)
    with pytest.raises(CodingError, match="worker 2 sent 0 result"):
        sch.complete_round(0, ok, {**good, 2: []})
    with pytest.raises(CodingError, match="worker 1 is marked returned but sent no results"):
        sch.complete_round(0, ok, {i: v for i, v in good.items() if i != 1})
    nan = [good[3][0].clone()]
    nan[0][1] = float("inf")
    with pytest.raises(CodingError, match="worker 3.*non-finite"):
        sch.complete_round(0, ok, {**good, 3: nan})
    with pytest.raises(CodingError, match="shape"):
        sch.complete_round(0, ok, {**good, 0: [torch.zeros(3, dtype=torch.float64)]})
    with pytest.raises(CodingError, match="4 booleans"):
        sch.complete_round(0, np.ones(3, bool), good)
    with pytest.raises(CodingError, match="out of order"):
        sch.complete_round(1, ok)
    # a straggler's (late) garbage is ignored; the good round still goes through
    late = np.array([True, True, True, False])
    sch.complete_round(0, late, {**good, 3: nan})
    assert sch._d1[0, 0].tolist() == [1, 1, 1, 0]


def test_decode_errors():
    sch = GCScheme(4, 1, jobs=2)
    sch.complete_round(0, np.array([True, False, False, True]))
    with pytest.raises(DecodeError, match="not decodable: 2 of the 3"):
        sch.decode(0)
    sch2 = GCScheme(4, 1, jobs=2)
    sch2.complete_round(0, np.ones(4, bool))
    with pytest.raises(DecodeError, match="no payloads"):
        sch2.decode(0)
    with pytest.raises(ValueError, match=r"job must be an int in \[0, 1\], got 5"):
        sch2.decode(5)


def test_msgc_adaptive_multiplexing_redoes_missing_d1_piece():
    sch = MSGCScheme(3, 2, 3, 1, jobs=3)           # W-1 = 2 D1 slots, B = 2 D2 slots
    strag = np.array([True, False, False])
    sch.complete_round(0, ~strag)                   # worker 0 misses piece 0 of job 0
    sch.complete_round(1, np.ones(3, bool))         # ... does piece 0 of job 0 in slot 1
    tasks = sch.assign(2)                           # slot 2 of round 2 = job 0, D2 group 0 for the others
    kinds = {i: [(t.job, t.kind, t.index) for t in ts if t.job == 0] for i, ts in enumerate(tasks)}
    assert kinds[0] == [(0, "d1", 1)]               # worker 0 still owes piece 1: redo instead of D2
    assert kinds[1] == [(0, "d2", 0)] and kinds[2] == [(0, "d2", 0)]


def test_srsgc_repeats_only_the_excess_missing_tasks():
    sch = SRSGCScheme(6, 1, 3, 3, jobs=4)           # s = ceil(3/3) = 1
    sch.complete_round(0, np.array([False, False, True, False, True, True]))   # 3 missing for job 0
    tasks = sch.assign(1)
    jobs = [ts[0].job for ts in tasks]
    assert jobs == [0, 0, 1, 1, 1, 1]              # v - s = 2 of the missing workers redo job 0


# ----------------------------------------------------------------------------------------- simulator
def test_simulator_waits_for_all_on_an_inadmissible_pattern_and_still_decodes():
    n = 4
    sch = MSGCScheme(n, 1, 2, 1, jobs=6)
    pat = np.zeros((n, sch.rounds), bool)
    pat[0, 2] = pat[0, 3] = True                     # a burst of 2 > B = 1: round 3 must wait for all
    res = simulate_runtime(sch, pattern_delays(pat), mu=1.0, load_cost=2.0)
    assert res.full_waits == 1
    assert res.stragglers[0, 2] and not res.stragglers[:, 3].any()
    assert res.durations[3] == pytest.approx(4.0 + 2 * sch.load)
    assert (res.decoded_at == np.arange(6) + sch.T).all()


def test_round_outcome_rule():
    m = PerRoundStragglerModel(1)
    out = round_outcome(m, np.zeros((3, 0), bool), np.array([1.0, 1.5, 2.5]), mu=1.0)
    assert out.stragglers.tolist() == [False, False, True] and out.duration == 2.0 and not out.waited_for_all
    out = round_outcome(m, np.zeros((3, 0), bool), np.array([1.0, 1.5, 1.8]), mu=1.0)
    assert not out.stragglers.any() and out.duration == 1.8          # min(t_wait, max delay)
    out = round_outcome(m, np.zeros((3, 0), bool), np.array([1.0, 2.5, 2.5]), mu=1.0)
    assert out.waited_for_all and out.duration == 2.5 and not out.stragglers.any()


def test_msgc_beats_gc_on_a_fixed_bursty_trace():
    n, J = 8, 30
    gc, ms = GCScheme(n, 2, jobs=J), MSGCScheme(n, 2, 3, 2, jobs=J)
    pat = np.zeros((n, J + ms.T), bool)
    for r0, w in [(1, 0), (5, 3), (9, 6), (12, 1), (16, 4), (20, 7), (24, 2), (28, 5)]:
        pat[w, r0:r0 + 2] = True                     # bursts of 2 rounds, one worker at a time
    assert ms.straggler_model.admissible_pattern(pat) and gc.straggler_model.admissible_pattern(pat)
    d = pattern_delays(pat)
    r_gc, r_ms = simulate_runtime(gc, d), simulate_runtime(ms, d)
    assert r_gc.full_waits == 0 and r_ms.full_waits == 0
    assert r_ms.total_time < r_gc.total_time


def test_batched_simulation_equals_per_trace_and_grid_search_picks_the_minimum():
    n, J = 6, 15
    tr = gilbert_elliott_delays(n, J + 3, p_gb=0.1, rng=4, traces=3)
    sch = MSGCScheme(n, 2, 3, 2, jobs=J)
    batched = simulate_runtime(sch, tr)
    for k in range(3):
        one = simulate_runtime(sch, tr[k])
        assert one.total_time == pytest.approx(batched[k].total_time, rel=1e-12)
        assert one.full_waits == batched[k].full_waits
        np.testing.assert_array_equal(one.stragglers, batched[k].stragglers)
    best = grid_search(MSGCScheme, n, J, tr, max_T=3, lambdas=[1, 2, 6])
    brute = {}
    for p in MSGCScheme.param_grid(n, 3, [1, 2, 6]):
        s = MSGCScheme(n=n, jobs=J, **p)
        brute[tuple(p.values())] = np.mean([r.total_time for r in simulate_runtime(s, tr)])
    assert best.runtime == pytest.approx(min(brute.values()), rel=1e-12)
    assert all(row["T"] <= 3 for row in best.table) and len(best.table) == len(brute)


def test_srsgc_skips_idle_tail_rounds():
    n, J = 4, 5
    sch = SRSGCScheme(n, 2, 3, 2, jobs=J)            # s = 1, T = 2
    res = simulate_runtime(sch, pattern_delays(np.zeros((n, sch.rounds), bool)))
    assert res.durations[J:].tolist() == [0.0, 0.0]  # nothing to redo after the last job
    assert (res.durations[:J] > 0).all()


def test_simulator_argument_errors():
    sch = GCScheme(4, 1, jobs=3)
    with pytest.raises(ValueError, match=r"delays must have shape \(4, >= 3\)"):
        simulate_runtime(sch, np.ones((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        simulate_runtime(sch, np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="mu must be finite and >= 0"):
        simulate_runtime(sch, np.ones((4, 3)), mu=-1.0)
    with pytest.raises(TypeError, match="CodingScheme"):
        simulate_runtime("gc", np.ones((4, 3)))
    with pytest.raises(ValueError, match="no parameters"):
        grid_search(MSGCScheme, 4, 3, np.ones((1, 4, 10)), max_T=0)
    with pytest.raises(CodingError, match="single copy"):
        sch.reset(batch=2)
        sch.assign(0)


def test_traces_statistics_and_errors():
    bad = markov_straggler_states(200, 400, 0.02, 0.5, rng=0)
    assert bad.mean() == pytest.approx(0.02 / 0.52, abs=0.006)
    starts = (bad[:, 1:] & ~bad[:, :-1]).sum()
    assert bad[:, 1:].sum() / max(starts, 1) == pytest.approx(2.0, rel=0.15)   # mean burst ~ 1/p_bg
    d = gilbert_elliott_delays(5, 7, rng=1, traces=3)
    assert d.shape == (3, 5, 7) and (d >= 1.0).all()
    assert iid_delays(4, 6, p=0.0, rng=0).max() < 2.0
    np.testing.assert_array_equal(gilbert_elliott_delays(4, 9, rng=3), gilbert_elliott_delays(4, 9, rng=3))
    with pytest.raises(ValueError, match=r"p_gb must be in \[0, 1\], got 1.5"):
        markov_straggler_states(3, 4, 1.5, 0.5)
    with pytest.raises(ValueError, match="p must be finite"):
        iid_delays(3, 4, p=float("nan"))
    with pytest.raises(TypeError, match="rng"):
        gilbert_elliott_delays(3, 4, rng="x")


# --------------------------------------------------------------------------------------------- claim
def test_claim_smoke_runs_and_is_in_range(smoke_run):
    from gradkit.harness.claims import RunContext, get_claim

    claim = get_claim("sgc")
    out = smoke_run("sgc")
    for arm, m in out.metrics.items():
        assert m["load"] > 0 and m["runtime"] > 0 and m["rel_runtime"] > 0
        assert m["decoded_frac"] == 1.0                  # every job decodes under an admissible pattern
    assert out.metrics["gc"]["rel_runtime"] == 1.0
    assert out.metrics["m_sgc"]["load"] < out.metrics["sr_sgc"]["load"] < out.metrics["gc"]["load"]
    assert out.metrics["m_sgc"]["T"] == 3.0 and out.metrics["sr_sgc"]["T"] == 2.0
    assert out.info["arms"]["m_sgc"]["best_params"] == {"B": 2, "W": 3, "lam": 2}  # smoke: the fixed parameters
    again = claim.run(RunContext(scale="smoke", seed=0))
    assert again.metrics == out.metrics
    ok, checks = claim.criterion_for(out.data).evaluate([out.metrics])
    assert len(checks) == 2
