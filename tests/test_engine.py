"""History: what a run reached before it diverged."""
import math

import pytest

from gradkit.engine import History


def test_best_before_divergence_keeps_what_a_run_reached():
    h = History([{"train_loss": 1.0, "test_acc": 50.0}, {"train_loss": 0.5, "test_acc": 80.0},
                 {"train_loss": float("nan"), "test_acc": 10.0}])
    assert h.diverged() and math.isnan(h.best("train_loss"))
    assert h.best_before_divergence("test_acc") == 80.0
    assert h.best_before_divergence("train_loss", mode="min") == 0.5


def test_best_before_divergence_of_a_run_that_never_diverged_is_its_best():
    h = History([{"train_loss": 1.0, "test_acc": 50.0}, {"train_loss": 0.9, "test_acc": 40.0}])
    assert not h.diverged() and h.best_before_divergence("test_acc") == h.best("test_acc") == 50.0


def test_divergence_in_the_first_epoch_leaves_nothing():
    h = History([{"train_loss": float("inf"), "test_acc": 10.0}])
    assert math.isnan(h.best_before_divergence("test_acc"))
    with pytest.raises(ValueError, match="mode"):
        h.best_before_divergence("test_acc", mode="median")
