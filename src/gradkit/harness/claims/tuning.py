"""Equal tuning budgets for the arms of a claim.

Every arm of a claim gets the same number of hyperparameter trials, scored on a validation split that is
cut from the training data, never on the test set::

    fit_split, val_split = holdout(split, fraction=0.2, seed=ctx.seed)
    tuned = tune(p.lr_grid, lambda lr: train_and_score(fit_split, val_split, lr))
    result = train_and_score(split, test_split, tuned.value)      # retrain on all training data
    return ArmResult({...}, info={"tuned": tuned.as_info()})

``tune`` records every trial's score so the report can show that the grid was the same for each arm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch

from ...data import Split

T = TypeVar("T")


@dataclass(frozen=True)
class Tuned(Generic[T]):
    """The outcome of a grid search: the chosen value, its validation score and every trial's score."""

    value: T
    score: float
    scores: tuple[tuple[T, float], ...]

    def as_info(self) -> dict[str, Any]:
        """A JSON-friendly record for ``ArmResult.info``."""
        return {"chosen": self.value, "val_score": self.score,
                "grid": [v for v, _ in self.scores], "val_scores": [s for _, s in self.scores]}


def tune(grid: Sequence[T], trial: Callable[[T], float], *, mode: str = "max") -> Tuned[T]:
    """Run ``trial(value)`` for every value of ``grid`` and keep the best validation score.

    mode: ``"max"`` (accuracy) or ``"min"`` (loss, error). A non-finite score (a diverged trial) never
    wins; when every trial diverged, the first value is returned with its non-finite score. Ties keep
    the earlier value, so the grid's order is the tie-break.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    values = list(grid)
    if not values:
        raise ValueError("grid must hold at least one value, got an empty grid")
    scores = tuple((v, float(trial(v))) for v in values)
    sign = 1.0 if mode == "max" else -1.0
    finite = [(v, s) for v, s in scores if math.isfinite(s)]
    if not finite:
        return Tuned(scores[0][0], scores[0][1], scores)
    best_v, best_s = finite[0]
    for v, s in finite[1:]:
        if sign * s > sign * best_s:
            best_v, best_s = v, s
    return Tuned(best_v, best_s, scores)


def holdout(split: Split, fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """Cut a validation set out of ``split``'s training data.

    Returns ``(fit, val)``: ``fit`` trains on the remaining training examples and keeps the original
    test set; ``val`` has the held-out examples as its *test* set (``val.x_test``), so a function that
    trains on ``x_train`` and scores on ``x_test`` serves both the trial and the final run.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    n = split.x_train.shape[0]
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"fraction={fraction} of {n} training examples leaves no validation or no training set")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).to(split.x_train.device)
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    x_fit, y_fit = split.x_train[fit_idx], split.y_train[fit_idx]
    fit = Split(x_fit, y_fit, split.x_test, split.y_test, split.name)
    val = Split(x_fit, y_fit, split.x_train[val_idx], split.y_train[val_idx], f"{split.name}-val")
    return fit, val
