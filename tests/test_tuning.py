"""The shared grid search of the claims: equal budgets, validation split apart from the test set."""
import math

import pytest
import torch

from gradkit.data import Split
from gradkit.harness.claims import holdout, tune


def test_tune_picks_best_and_records_every_trial():
    calls = []
    t = tune([0.1, 0.01, 1.0], lambda lr: calls.append(lr) or -abs(lr - 0.05))
    assert calls == [0.1, 0.01, 1.0]
    assert t.value == 0.01
    assert [v for v, _ in t.scores] == [0.1, 0.01, 1.0]
    assert t.as_info()["grid"] == [0.1, 0.01, 1.0]
    assert tune([3, 1, 2], float, mode="min").value == 1


def test_tune_never_picks_a_diverged_trial_and_ties_keep_grid_order():
    assert tune([1.0, 2.0, 3.0], lambda v: math.nan if v == 3.0 else v).value == 2.0
    assert tune([1.0, 2.0], lambda v: 5.0).value == 1.0
    all_nan = tune([1.0, 2.0], lambda v: math.nan)
    assert all_nan.value == 1.0 and math.isnan(all_nan.score)


def test_tune_bad_input():
    with pytest.raises(ValueError, match="mode"):
        tune([1], float, mode="best")
    with pytest.raises(ValueError, match="empty grid"):
        tune([], float)


def test_holdout_keeps_test_set_and_is_disjoint():
    x = torch.arange(20.0).unsqueeze(1)
    y = torch.arange(20)
    split = Split(x, y, x[:3] + 100, y[:3], name="toy")
    fit, val = holdout(split, fraction=0.25, seed=1)
    assert fit.x_train.shape[0] == 15 and val.x_test.shape[0] == 5
    assert torch.equal(fit.x_test, split.x_test)
    assert torch.equal(val.x_train, fit.x_train)
    seen = set(fit.x_train.flatten().tolist()) | set(val.x_test.flatten().tolist())
    assert seen == set(range(20))
    assert not set(fit.x_train.flatten().tolist()) & set(val.x_test.flatten().tolist())
    again, _ = holdout(split, fraction=0.25, seed=1)
    assert torch.equal(again.x_train, fit.x_train)
    with pytest.raises(ValueError, match="fraction"):
        holdout(split, fraction=1.0)
    with pytest.raises(ValueError, match="leaves no"):
        holdout(split, fraction=0.01)
