"""Gradient-conflict probe: cosine between the gradients of several losses w.r.t. chosen tensors (sd-viton).

For losses L_a, L_b and the tensors W = (w_1, ..., w_k) (parameters or intermediate activations, such as the
last flow of a warping cascade), with g_a = dL_a/dW flattened and concatenated::

    cos(a, b) = <g_a, g_b> / (||g_a|| ||g_b||)          in [-1, 1]; < 0: the losses pull W apart

A negative cosine is the "misaligned gradients" of SD-VITON (total variation vs the adversarial loss on the
final flow). Gradients come from ``torch.autograd.grad`` with ``retain_graph=True``: nothing accumulates
into ``.grad`` and the caller's ``backward()`` still works afterwards. A loss that does not reach W has a
zero gradient; its cosine is NaN (undefined), never a silent 0.

:class:`GradientConflictProbe` logs the cosines during training. With ``module=...`` it is a context manager
that captures that module's output on every forward (hooks removed on exit, exceptions included), so the
cosine can be taken w.r.t. an activation of a model you do not edit::

    probe = GradientConflictProbe(pairs=[("tv", "adv")])
    for step in range(steps):
        out = model(x); losses = {"tv": total_variation(out["flow"]), "adv": adv_loss(out)}
        probe.record(losses, out["flow"], step=step)      # before backward
        sum(losses.values()).backward(); opt.step()
    probe.mean(("tv", "adv"))
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, nonneg_int, positive_int
from ._hooks import HookProbe

__all__ = ["gradient_cosine", "GradientConflictProbe"]


def _check_losses(losses) -> dict[str, Tensor]:
    if not isinstance(losses, Mapping) or len(losses) < 2:
        got = f"{len(losses)} loss(es)" if isinstance(losses, Mapping) else type(losses).__name__
        raise ArgumentError(f"losses must be a dict of at least two named scalar losses, got {got}")
    for name, loss in losses.items():
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ArgumentError(f"losses[{name!r}] must be a scalar tensor, got {shape}")
        if not loss.requires_grad:
            raise ArgumentError(f"losses[{name!r}] does not require grad: it is not connected to a graph")
    return dict(losses)


def _check_wrt(wrt) -> list[Tensor]:
    items = [wrt] if isinstance(wrt, Tensor) else list(wrt) if isinstance(wrt, Iterable) else None
    if not items:
        raise ArgumentError(f"wrt must be a tensor or a non-empty list of tensors, got "
                            f"{'an empty list' if items == [] else type(wrt).__name__}")
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise ArgumentError(f"wrt[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.requires_grad:
            raise ArgumentError(f"wrt[{i}] (shape {tuple(t.shape)}) does not require grad")
    return items


def _check_pairs(pairs, names: Sequence[str]) -> list[tuple[str, str]]:
    if pairs is None:
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    out = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ArgumentError(f"pairs must hold (name, name) tuples, got {pair!r}")
        for name in pair:
            if name not in names:
                raise ArgumentError(f"pair {tuple(pair)!r} names loss {name!r}, which is not among the losses "
                                    f"{list(names)}")
        out.append((pair[0], pair[1]))
    return out


def _flat_grad(loss: Tensor, wrt: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss.reshape(()), wrt, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(w) if g is None else g).detach().reshape(-1).double()
                      for g, w in zip(grads, wrt)])


def gradient_cosine(losses: Mapping[str, Tensor], wrt: Tensor | Sequence[Tensor],
                    pairs: Sequence[tuple[str, str]] | None = None) -> dict[tuple[str, str], float]:
    """Cosine between the gradients of named losses w.r.t. ``wrt``, for every pair (or the ``pairs`` given).

    losses: ``{name: scalar tensor}`` (at least two); wrt: a tensor or list of tensors the losses depend on.
    Returns ``{(a, b): cos}`` in [-1, 1], NaN where a gradient is zero. The graph is kept and ``.grad`` is
    untouched. Example: ``gradient_cosine({"tv": tv, "adv": adv}, flow)[("tv", "adv")]``.
    """
    losses = _check_losses(losses)
    wrt = _check_wrt(wrt)
    pairs = _check_pairs(pairs, list(losses))
    grads = {name: _flat_grad(losses[name], wrt) for name in {n for p in pairs for n in p}}
    out = {}
    for a, b in pairs:
        na, nb = grads[a].norm(), grads[b].norm()
        if float(na) == 0.0 or float(nb) == 0.0:
            out[(a, b)] = math.nan
        else:
            out[(a, b)] = float((grads[a] @ grads[b] / (na * nb)).clamp(-1.0, 1.0))
    return out


class GradientConflictProbe(HookProbe):
    """Log :func:`gradient_cosine` over training; optionally capture a module's output to take it against.

    pairs: the loss pairs to log (None: every pair of the losses recorded first). module: when given, use
    the probe as a context manager; :attr:`captured` is that module's latest output (a tensor, or the
    ``output_key`` entry of a dict/tuple output) and ``record(losses)`` uses it when ``wrt`` is omitted.
    every: record only every ``every``-th call of :meth:`record` (the others return None).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]] | None = None, *, module: nn.Module | None = None,
                 output_key=None, every: int = 1):
        if module is not None and not isinstance(module, nn.Module):
            raise ArgumentError(f"module must be an nn.Module or None, got {type(module).__name__}")
        self.pairs = None if pairs is None else [tuple(p) for p in pairs]
        self.module = module
        self.output_key = output_key
        self.every = positive_int("every", every)
        self.history: dict[tuple[str, str], list[float]] = {}
        self.steps: list[int] = []
        self.captured: Tensor | None = None
        self._calls = 0
        self._handles = []

    def _hooks(self):
        if self.module is None:
            raise RuntimeError("GradientConflictProbe was created without module=, there is nothing to capture")

        def hook(_mod, _inp, out):
            value = out if self.output_key is None else out[self.output_key]
            if not isinstance(value, Tensor):
                raise ArgumentError(f"the captured output must be a tensor, got {type(value).__name__} "
                                    f"(set output_key to pick one entry of a dict or tuple output)")
            self.captured = value

        return [(self.module, hook)]

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.captured = None

    def record(self, losses: Mapping[str, Tensor], wrt: Tensor | Sequence[Tensor] | None = None, *,
               step: int | None = None) -> dict[tuple[str, str], float] | None:
        """Compute and store the cosines for this step (call before ``backward()``)."""
        self._calls += 1
        if (self._calls - 1) % self.every:
            return None
        if wrt is None:
            if self.captured is None:
                raise ArgumentError("wrt is required unless the probe is active with module= and has captured "
                                    "an output")
            wrt = self.captured
        if self.pairs is None:
            self.pairs = _check_pairs(None, list(_check_losses(losses)))
        cos = gradient_cosine(losses, wrt, self.pairs)
        self.steps.append(len(self.steps) if step is None else nonneg_int("step", step))
        for pair, value in cos.items():
            self.history.setdefault(pair, []).append(value)
        return cos

    def series(self, pair: tuple[str, str]) -> list[float]:
        """The logged cosines of one pair, in recording order."""
        if tuple(pair) not in self.history:
            raise ArgumentError(f"pair {tuple(pair)!r} was not recorded; recorded pairs: {list(self.history)}")
        return list(self.history[tuple(pair)])

    def mean(self, pair: tuple[str, str], last: int | None = None) -> float:
        """Mean logged cosine of ``pair`` (NaN steps skipped), over the ``last`` records when given."""
        xs = self.series(pair)
        if last is not None:
            xs = xs[-positive_int("last", last):]
        xs = [x for x in xs if math.isfinite(x)]
        return sum(xs) / len(xs) if xs else math.nan
