"""Transfer evaluation: accuracy of every target model on every source model's adversarial examples
(boundary-tilting).

    acc[s][t] = 100 * mean_i 1[argmax f_t(A(f_s, x_i, y_i)) = y_i]          (A: an attack, e.g. PGD/FGSM)

The diagonal is the white-box robust accuracy; off-diagonal entries measure how far adversarial examples
transfer. Examples are crafted once per source (eval mode, restored afterwards), in batches.

>>> res = transfer_matrix({"a": model_a, "b": model_b}, x, y, FGSM(eps=0.1))
>>> res.accuracy["a"]["b"]                         # b's accuracy on examples crafted on a, in %
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from .._validate import optional_generator, positive_int
from .pgd import PGD


@dataclass(frozen=True)
class TransferResult:
    """clean[t]: accuracy (%) on x; accuracy[s][t]: accuracy (%) of target t on examples crafted on source s."""

    clean: dict[str, float]
    accuracy: dict[str, dict[str, float]]

    def transfer_rate(self, source: str, target: str) -> float:
        """Fraction of the examples target classifies correctly that the source's attack flips (0..1)."""
        c = self.clean[target]
        return 0.0 if c <= 0 else max(0.0, (c - self.accuracy[source][target]) / c)


@contextlib.contextmanager
def _eval(models: Mapping[str, nn.Module]) -> Iterator[None]:
    modes = {k: m.training for k, m in models.items()}
    try:
        for m in models.values():
            m.eval()
        yield
    finally:
        for k, m in models.items():
            m.train(modes[k])


def transfer_matrix(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, attack: PGD,
                    targets: Mapping[str, nn.Module] | None = None, batch_size: int = 1024,
                    generator: torch.Generator | None = None) -> TransferResult:
    """Accuracy of each target on each source's adversarial examples (see the module docstring).

    models: the sources (name -> model); targets: the models evaluated (default: the sources).

    >>> transfer_matrix({"mlp": mlp, "linear": lin}, x_test, y_test, PGD(eps=0.1, steps=10)).accuracy
    """
    if not isinstance(models, Mapping) or not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise TypeError(f"models must be a non-empty mapping name -> nn.Module, got {type(models).__name__}")
    targets = models if targets is None else targets
    if not isinstance(targets, Mapping) or not targets or not all(isinstance(m, nn.Module) for m in targets.values()):
        raise TypeError(f"targets must be None or a non-empty mapping name -> nn.Module, got {type(targets).__name__}")
    if not isinstance(attack, PGD):
        raise TypeError(f"attack must be a PGD preset (PGD(...) or FGSM(...)), got {type(attack).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.shape[:1] != y.shape[:1]:
        raise ValueError(f"x and y must be tensors with the same number of rows, got "
                         f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}")
    batch_size = positive_int("batch_size", batch_size)
    optional_generator(generator)
    n = max(len(x), 1)
    with _eval({**{f"s:{k}": m for k, m in models.items()}, **{f"t:{k}": m for k, m in targets.items()}}):
        clean = {t: 0 for t in targets}
        acc = {s: {t: 0 for t in targets} for s in models}
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                for t, mt in targets.items():
                    clean[t] += int((mt(xb).argmax(-1) == yb).sum())
            for s, ms in models.items():
                xa = attack(ms, xb, yb, generator=generator)
                with torch.no_grad():
                    for t, mt in targets.items():
                        acc[s][t] += int((mt(xa).argmax(-1) == yb).sum())
    return TransferResult({t: 100.0 * c / n for t, c in clean.items()},
                          {s: {t: 100.0 * c / n for t, c in row.items()} for s, row in acc.items()})


__all__ = ["TransferResult", "transfer_matrix"]
