"""Residual-stream probes: hidden-state RMS/std/max-abs per layer and gradient-norm spikes (peri-ln).

The paper's measurements: with Pre-LN the hidden state h_l grows fast during training ("massive
activations") and gradient norms spike; Peri-LN keeps both steady. RMS(h) = sqrt(mean(h^2)) over all
entries of a layer's output; a spike is a value > factor x a running reference of the earlier values.

>>> with ResidualStreamProbe(model) as probe:        # model.blocks, or a list of modules
...     model(x).sum().backward(); probe.record_grads()
>>> probe.rms(), probe.grad_norms()                  # arrays (calls, layers), (steps, layers)
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .._validate import choice, real_in
from ._hooks import HookProbe


def _layers_of(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(model, nn.Module):
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return list(blocks)
        raise ValueError("model has no non-empty .blocks ModuleList; pass the list of layer modules instead")
    layers = list(model)
    if not layers:
        raise ValueError("layers must be a non-empty sequence of nn.Module, got an empty sequence")
    for i, m in enumerate(layers):
        if not isinstance(m, nn.Module):
            raise TypeError(f"layers[{i}] must be an nn.Module, got {type(m).__name__}")
    return layers


class ResidualStreamProbe(HookProbe):
    """Context manager recording each layer's output statistics and, on request, its gradient norms (peri-ln).

    Forward hooks on every layer (default ``model.blocks``) append, per call, RMS, std and max|h| of
    the output (detached, as CPU floats; no graph is kept). A module called several times per forward
    gets one record per call. ``record_grads()`` (after ``backward``) appends each layer's parameter
    gradient 2-norm, plus the total over ``model`` when a model was given. Hooks are removed on exit,
    exceptions included. Arrays come back with shape (records, layers).

    >>> with ResidualStreamProbe(lm) as p:
    ...     lm(tokens)
    >>> p.rms()[-1]      # RMS of h_1..h_L in the last forward
    """

    STATS = ("rms", "std", "max_abs")

    def __init__(self, model: nn.Module | Sequence[nn.Module], record_forward: bool = True) -> None:
        self.layers = _layers_of(model)
        self.model = model if isinstance(model, nn.Module) else None
        self.record_forward = bool(record_forward)
        self._records: list[dict[str, list[float]]] = [{s: [] for s in self.STATS} for _ in self.layers]
        self._grads: list[list[float]] = []
        self._total_grads: list[float] = []
        self._handles: list = []

    def _hook(self, i: int):
        def hook(module, inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(h, torch.Tensor):
                return
            with torch.no_grad():
                h = h.detach().float()
                st = torch.stack([h.square().mean().sqrt(), h.std() if h.numel() > 1 else h.new_zeros(()),
                                  h.abs().max()]).cpu().tolist()
            rec = self._records[i]
            for name, v in zip(self.STATS, st):
                rec[name].append(float(v))
        return hook

    def _hooks(self):
        if self.record_forward:
            return [(m, self._hook(i)) for i, m in enumerate(self.layers)]
        return []

    @torch.no_grad()
    def record_grads(self) -> list[float]:
        """Append the per-layer gradient 2-norms (parameters with ``.grad``); return them."""
        norms = [_grad_norm(m.parameters()) for m in self.layers]
        self._grads.append(norms)
        if self.model is not None:
            self._total_grads.append(_grad_norm(self.model.parameters()))
        return norms

    def _array(self, name: str) -> np.ndarray:
        cols = [r[name] for r in self._records]
        n = {len(c) for c in cols}
        if len(n) != 1:
            raise RuntimeError(f"layers were called different numbers of times ({sorted(len(c) for c in cols)}); "
                               f"read layer_series({name!r}, i) per layer instead")
        return np.asarray(cols, dtype=np.float64).T.reshape(n.pop(), len(cols))

    def rms(self) -> np.ndarray:
        """RMS of each layer's output per recorded call: shape (calls, layers)."""
        return self._array("rms")

    def std(self) -> np.ndarray:
        return self._array("std")

    def max_abs(self) -> np.ndarray:
        return self._array("max_abs")

    def layer_series(self, name: str, i: int) -> list[float]:
        if name not in self.STATS:
            raise ValueError(f"name must be one of {self.STATS}, got {name!r}")
        return list(self._records[i][name])

    def grad_norms(self) -> np.ndarray:
        """Per-layer gradient norms per ``record_grads`` call: shape (steps, layers)."""
        return np.asarray(self._grads, dtype=np.float64).reshape(len(self._grads), len(self.layers))

    def total_grad_norms(self) -> np.ndarray:
        """Gradient norm over all of ``model``'s parameters per ``record_grads`` call: shape (steps,)."""
        return np.asarray(self._total_grads, dtype=np.float64)

    def reset(self) -> None:
        self._records = [{s: [] for s in self.STATS} for _ in self.layers]
        self._grads, self._total_grads = [], []


def _grad_norm(params: Iterable[torch.Tensor]) -> float:
    sq = [p.grad.detach().double().square().sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt().cpu()) if sq else 0.0


@torch.no_grad()
def hidden_state_stats(model: nn.Module, inputs: torch.Tensor,
                       layers: Sequence[nn.Module] | None = None) -> dict[str, np.ndarray]:
    """RMS, std and max|h| of each layer's output in one forward of ``inputs`` (eval mode, restored) (peri-ln).

    Returns ``{"rms": (layers,), "std": (layers,), "max_abs": (layers,)}`` from the last call of each layer.
    """
    was = model.training
    model.eval()
    try:
        with ResidualStreamProbe(layers if layers is not None else model) as p:
            model(inputs)
    finally:
        model.train(was)
    return {s: np.asarray([p.layer_series(s, i)[-1] for i in range(len(p.layers))]) for s in p.STATS}


def count_spikes(values: Sequence[float], factor: float, reference: str = "min") -> int:
    """How many values exceed ``factor`` x a running reference of all EARLIER values (peri-ln).

    reference="min": loss spikes (value > factor * min(earlier)); "median": gradient-norm spikes
    (value > factor * median(earlier)). The first value has no reference and never counts; a
    non-finite value counts as a spike (a divergence is the largest spike of all).

    >>> count_spikes([3.0, 2.0, 1.0, 2.5, 1.0], factor=2.0)   # 2.5 > 2 * 1.0
    1
    """
    factor = real_in("factor", factor, 0.0, low_open=True, tensor_ok=False)
    choice("reference", reference, ("min", "median"))
    xs = [float(v) for v in values]
    n, seen = 0, []
    for v in xs:
        if not math.isfinite(v):
            n += 1
            continue
        if seen:
            ref = min(seen) if reference == "min" else float(np.median(seen))
            if v > factor * ref:
                n += 1
        seen.append(v)
    return n


__all__ = ["ResidualStreamProbe", "hidden_state_stats", "count_spikes"]
