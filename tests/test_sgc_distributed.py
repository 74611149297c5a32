"""Coded gradient descent on real gloo processes with simulated stragglers (paper slug: sgc)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradkit.data import load_digits_split
from gradkit.distributed.coded_run import coded_gradient_descent, coded_worker, logistic_chunk_grad
from gradkit.distributed.coding_schemes import GCScheme, MSGCScheme, SRSGCScheme
from gradkit.distributed.launch import WorkerError
from gradkit.distributed.straggler_models import gilbert_elliott_delays, pattern_delays
from gradkit.distributed.stragglers import simulate_runtime

pytestmark = pytest.mark.slow
N_WORKERS = 4


def _data(n: int = 400):
    sp = load_digits_split()
    return sp.x_train[:n].double(), sp.y_train[:n]


def _config(schemes, x, y, fault=None):
    return {"schemes": schemes, "x": x, "y": y, "num_classes": 10, "fault": fault, "mu": 1.0, "load_cost": 2.0,
            "lr": 0.5, "delays": [np.ones((s.n, s.rounds)) for s in schemes]}


def test_every_decoded_gradient_equals_the_full_batch_gradient():
    x, y = _data()
    J = 10
    schemes = [GCScheme(N_WORKERS, 1, jobs=J), SRSGCScheme(N_WORKERS, 1, 3, 2, jobs=J),
               MSGCScheme(N_WORKERS, 2, 3, 2, jobs=J), MSGCScheme(N_WORKERS, 1, 2, N_WORKERS, jobs=J)]
    # a seeded Markov-chain schedule with frequent bursts, so that stragglers and full waits both occur
    delays = [gilbert_elliott_delays(N_WORKERS, s.rounds, p_gb=0.15, p_bg=0.5, rng=k) for k, s in enumerate(schemes)]
    results = coded_gradient_descent(schemes, x, y, delays=delays, num_classes=10, lr=0.5, timeout=90)
    assert len(results) == len(schemes)
    total_stragglers = 0
    for s, d, res in zip(schemes, delays, results):
        assert res.decoded == J, res.scheme
        assert res.max_abs_err < 1e-10, (res.scheme, res.max_abs_err)
        assert res.final_loss < res.initial_loss
        sim = simulate_runtime(s, d, mu=1.0, load_cost=2.0)      # the real run follows the simulator exactly
        np.testing.assert_array_equal(res.stragglers, sim.stragglers)
        assert res.sim_runtime == pytest.approx(sim.total_time, rel=1e-12)
        assert res.full_waits == sim.full_waits
        total_stragglers += int(res.stragglers.sum())
    assert total_stragglers > 0


def test_a_worker_sending_nan_makes_the_run_fail_loudly():
    x, y = _data(200)
    sch = MSGCScheme(N_WORKERS, 1, 2, 1, jobs=3)
    with pytest.raises(WorkerError, match="non-finite"):
        coded_gradient_descent([sch], x, y, delays=[pattern_delays(np.zeros((N_WORKERS, sch.rounds), bool))],
                               num_classes=10, fault={"rank": 2, "round": 1, "kind": "nan"}, timeout=60)


def test_a_dying_worker_makes_the_run_fail_loudly():
    x, y = _data(200)
    sch = GCScheme(N_WORKERS, 1, jobs=4)
    with pytest.raises(WorkerError) as info:
        coded_gradient_descent([sch], x, y, delays=[np.ones((N_WORKERS, sch.rounds))], num_classes=10,
                               fault={"rank": 3, "round": 1, "kind": "die"}, timeout=60)
    assert "3" in str(info.value)


def test_mismatched_world_sizes_and_bad_inputs_are_refused():
    x, y = _data(50)
    with pytest.raises(ValueError, match="same number of workers"):
        coded_gradient_descent([GCScheme(4, 1, jobs=2), GCScheme(3, 1, jobs=2)], x, y,
                               delays=[np.ones((4, 2)), np.ones((3, 2))], num_classes=10)
    with pytest.raises(ValueError, match=r"delays for .* shape \(4, >= 2\)"):
        coded_gradient_descent([GCScheme(4, 1, jobs=2)], x, y, delays=[np.ones((3, 2))], num_classes=10)
    with pytest.raises(ValueError, match="one trace per scheme"):
        coded_gradient_descent([GCScheme(4, 1, jobs=2)], x, y, delays=[], num_classes=10)
    with pytest.raises(ValueError, match="labels must be in"):
        coded_gradient_descent([GCScheme(4, 1, jobs=2)], x, y, delays=[np.ones((4, 2))], num_classes=5)
    # inside a process group of the wrong size the worker refuses before any communication
    with pytest.raises(ValueError, match="n=4 workers but the process group has world_size=3"):
        coded_worker(0, 3, _config([GCScheme(4, 1, jobs=2)], x, y))


def test_logistic_chunk_gradients_sum_to_the_full_batch_gradient():
    x, y = _data(97)
    theta = torch.randn(650, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    parts = [logistic_chunk_grad(theta, x[a:b], y[a:b], 10) for a, b in [(0, 30), (30, 31), (31, 31), (31, 97)]]
    full = logistic_chunk_grad(theta, x, y, 10, reduction="mean")
    torch.testing.assert_close(sum(parts) / 97, full, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        lambda t: torch.nn.functional.cross_entropy(x[:5] @ t[:640].view(10, 64).T + t[640:], y[:5], reduction="sum"),
        (theta.clone().requires_grad_(),))
