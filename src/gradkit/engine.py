"""The one training/evaluation loop that claims and examples share.

``fit`` runs epochs over a batch source, calls an optional hook between ``backward`` and
``optimizer.step`` (where gradient transforms act), evaluates after every epoch, and returns a
:class:`History`. Seeding (:func:`seed_everything`) makes CPU reruns bit-identical.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ._validate import choice

Batch = Any


class NullProgress:
    """A progress bar that shows nothing (the default when no bar is wanted)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def null_progress(total: int | None = None, desc: str = "") -> NullProgress:
    return NullProgress()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh CPU ``torch.Generator`` seeded with ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_cpu() -> None:
    """Flush denormal floats to zero on CPU: deep, badly initialised nets otherwise crawl."""
    torch.set_flush_denormal(True)


@contextlib.contextmanager
def cpu_threads(n: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """On CPU: run a block with ``n`` intra-op threads and denormals flushed; restored afterwards.

    Small models (a 2-15-2 net, width-50 layers at batch 32) gain nothing from intra-op threads,
    and on a shared machine a worker thread waiting for a core can cost milliseconds per matmul.
    One thread also makes the numbers independent of the machine's core count. ``n=None`` only
    flushes denormals. On other devices this does nothing.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    old_threads = torch.get_num_threads()
    configure_cpu()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(old_threads)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise validate the given device."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return dev


@dataclass
class History:
    """Per-epoch records: ``records[i]`` is a dict of the metrics logged after epoch ``i``."""

    records: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0

    def log(self, **metrics: float) -> None:
        self.records.append({k: float(v) for k, v in metrics.items()})

    def series(self, name: str) -> list[float]:
        return [r[name] for r in self.records if name in r]

    def last(self, name: str) -> float:
        s = self.series(name)
        if not s:
            raise KeyError(f"no metric {name!r} logged")
        return s[-1]

    def best_before_divergence(self, name: str, mode: str = "max", loss: str = "train_loss") -> float:
        """Best value of ``name`` over the epochs before ``loss`` first turned non-finite.

        What a run reached before it diverged is kept (NaN only if it diverged in its first epoch);
        :meth:`diverged` says whether it did.
        """
        choice("mode", mode, ("max", "min"))
        kept = []
        for r in self.records:
            if not math.isfinite(r.get(loss, 0.0)):
                break
            if name in r and math.isfinite(r[name]):
                kept.append(r[name])
        if not kept:
            return float("nan")
        return max(kept) if mode == "max" else min(kept)

    def diverged(self, loss: str = "train_loss") -> bool:
        """True when ``loss`` was non-finite in some epoch (training stopped there)."""
        return any(not math.isfinite(v) for v in self.series(loss))

    def best(self, name: str, mode: str = "max") -> float:
        """Best value of ``name`` over epochs; NaN if any logged value was NaN."""
        s = self.series(name)
        if not s:
            raise KeyError(f"no metric {name!r} logged")
        if any(not math.isfinite(v) for v in s):
            return float("nan")
        return max(s) if mode == "max" else min(s)


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Classification loss of an ``(x, y)`` batch."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Top-1 accuracy in percent; the model is put in eval mode and restored afterwards."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        correct += (out.argmax(-1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(len(x), 1)


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Mean cross-entropy over a data set (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        total += nn.functional.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="sum").item()
    model.train(was_training)
    return total / max(len(x), 1)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
    *,
    epochs: int,
    compute_loss: Callable[[nn.Module, Batch], torch.Tensor] = default_loss,
    before_step: Callable[[int], None] | None = None,
    on_step_start: Callable[[int], None] | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    on_epoch_end: Callable[[int, History], None] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    scheduler: Any = None,
    scheduler_every: str = "epoch",
    stop_on_nonfinite: bool = True,
    progress: Callable[..., Any] = null_progress,
    desc: str = "train",
) -> History:
    """Train ``model`` for ``epochs`` epochs and return its :class:`History`.

    batches: an iterable re-iterated every epoch, or ``f(epoch) -> iterable``.
    compute_loss: ``f(model, batch) -> scalar loss`` (default: cross-entropy of ``(x, y)``).
    on_step_start(step): before the forward (schedules such as DANN's lambda read the step here).
    before_step(step): after ``backward``, before ``optimizer.step`` (gradient transforms).
    evaluate(model): metrics logged after each epoch, together with the mean training loss.
    scheduler: stepped once per epoch (``scheduler_every="epoch"``) or per step (``"step"``).
    A non-finite training loss stops training (the epoch is logged with ``train_loss = nan``).
    Closure-driven optimizers (``torch.optim.LBFGS``) get a closure that recomputes the loss and
    gradients (``before_step`` runs inside it); the logged loss is the one at the step's start.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if scheduler_every not in ("epoch", "step"):
        raise ValueError(f"scheduler_every must be 'epoch' or 'step', got {scheduler_every!r}")
    hist = History()
    step = 0
    needs_closure = isinstance(optimizer, torch.optim.LBFGS)
    bar = progress(total=epochs, desc=desc)
    try:
        model.train()
        for epoch in range(epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            total, count, finite = 0.0, 0, True
            for batch in batches(epoch) if callable(batches) else batches:
                if on_step_start is not None:
                    on_step_start(step)
                if needs_closure:
                    def closure(batch=batch, step=step):
                        optimizer.zero_grad(set_to_none=True)
                        value = compute_loss(model, batch)
                        value.backward()
                        if before_step is not None:
                            before_step(step)
                        return value

                    loss = optimizer.step(closure)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = compute_loss(model, batch)
                    loss.backward()
                    if before_step is not None:
                        before_step(step)
                    optimizer.step()
                if scheduler is not None and scheduler_every == "step":
                    scheduler.step()
                step += 1
                lv = loss.detach()
                total += float(lv)
                count += 1
                if not torch.isfinite(lv):
                    finite = False
                    if stop_on_nonfinite:
                        break
            if scheduler is not None and scheduler_every == "epoch":
                scheduler.step()
            metrics = {"train_loss": total / max(count, 1) if finite else float("nan")}
            if evaluate is not None:
                metrics.update(evaluate(model))
            hist.log(**metrics)
            hist.steps = step
            if on_epoch_end is not None:
                on_epoch_end(epoch, hist)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train_loss']:.3g}")
            if not finite and stop_on_nonfinite:
                break
    finally:
        bar.close()
    return hist
