"""Directional convergence of attention weights to the attention SVM (paper slug: transformers-svm).

Gradient descent on the attention matrix ``W`` of a softmax attention layer (scores ``x_it^T W z_i``) does
not converge to a finite point: its norm grows without bound while its direction approaches that of the
attention SVM ``W^mm`` for the tokens the attention ends up selecting (:mod:`gradkit.solvers.attention_svm`).
The paper measures this with the correlation coefficient of two matrices::

    corr(W(t), W^mm) = <W(t), W^mm>_F / (||W(t)||_F ||W^mm||_F)          in [-1, 1], sign-sensitive

:class:`AttentionSVMTracker` records ``W(t)`` during training through a forward hook (every ``every``-th
training forward), then solves the SVM for the tokens selected at the end and returns the correlation
curve; the hook is removed on exit, exceptions included.

Example::

    with AttentionSVMTracker(model, X, z, every=10) as tracker:
        for _ in range(1000):
            opt.zero_grad(); F.softplus(-Y * model(X, z)).mean().backward(); opt.step()
    trace = tracker.trace()            # trace.steps, trace.correlation (-> 1), trace.selected, trace.solution
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import _validate as V
from ..solvers.attention_svm import AttentionSVMSolution, InfeasibleSVMError, solve_attention_svm
from ._hooks import HookProbe

__all__ = ["direction_correlation", "selected_tokens", "SVMTrace", "AttentionSVMTracker"]


def direction_correlation(A: torch.Tensor, B: torch.Tensor) -> float:
    """``<A, B> / (||A|| ||B||)`` over all entries, clamped to [-1, 1] (paper slug: transformers-svm).

    Raises ValueError for different shapes, non-finite entries or a zero matrix (its direction is undefined).
    """
    V.tensor("A", A, floating=True, finite=True)
    V.tensor("B", B, floating=True, finite=True)
    if A.shape != B.shape:
        raise V.ArgumentError(f"A and B must have the same shape, got {tuple(A.shape)} and {tuple(B.shape)}")
    a, b = A.detach().double().flatten(), B.detach().to(device=A.device, dtype=torch.float64).flatten()
    na, nb = float(a.norm()), float(b.norm())
    for name, nv in (("A", na), ("B", nb)):
        if nv == 0.0:
            raise V.ArgumentError(f"{name} is the zero matrix: its direction is undefined")
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def _attention_of(module: nn.Module, what: str) -> torch.Tensor:
    att = getattr(module, "attention_weights", None)
    if not isinstance(att, torch.Tensor) or att.dim() != 2:
        raise ValueError(f"{what} must expose attention_weights, an (n, T) tensor set by its forward (as "
                         f"gradkit.nn.single_attention.SingleLayerAttention does), got {type(att).__name__}")
    if not bool(torch.isfinite(att).all()):
        raise ValueError(f"{what}.attention_weights holds non-finite values (NaN/inf): the scores overflowed")
    return att


def selected_tokens(model: nn.Module, X: torch.Tensor, z: torch.Tensor | None = None, *,
                    layer: nn.Module | None = None) -> torch.Tensor:
    """The token each sequence attends to most: ``argmax_t softmax(s_i)_t`` after ``model(X, z)`` (no grad).

    ``layer`` (default ``model``) must set ``attention_weights`` ((n, T)) in its forward, as
    :class:`gradkit.nn.single_attention.SingleLayerAttention` does. Returns an (n,) long tensor.
    """
    if not isinstance(model, nn.Module):
        raise V.ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    with torch.no_grad():
        model(X) if z is None else model(X, z)
    return _attention_of(model if layer is None else layer, "layer" if layer is not None else "model").argmax(dim=1)


@dataclass(frozen=True)
class SVMTrace:
    """What :meth:`AttentionSVMTracker.trace` returns.

    steps: the training-forward counts at which W was recorded (0 = before the first update); correlation:
    ``corr(W(t), W^mm)`` at those steps (NaN where W(t) = 0); norms: ``||W(t)||_F``; selected: the (n,) tokens
    selected at the end; attention_on_selected: the final softmax weight on them, (n,); solution: the SVM
    for ``selected`` (None when it is infeasible).
    """

    steps: list[int]
    correlation: list[float]
    norms: list[float]
    selected: torch.Tensor
    attention_on_selected: torch.Tensor
    solution: AttentionSVMSolution | None

    @property
    def final_correlation(self) -> float:
        return self.correlation[-1] if self.correlation else float("nan")


class AttentionSVMTracker(HookProbe):
    """Record an attention matrix during training and compare its direction with the attention SVM.

    model: the network, run as ``model(X, z)`` (``model(X)`` when ``z`` is None, self-attention);
    X, z: the training sequences (n, T, d) and queries (n, d_z) the SVM is solved on (self-attention:
    ``z=None`` and the SVM's queries are ``X[:, query_index]``); layer: the attention module (an
    ``nn.Module`` or a submodule name; default ``model``) that sets ``attention_weights`` in its forward;
    weight: a callable returning the d x d_z matrix W of the scores ``x^T W z`` (default
    ``layer.combined_weight``); every: record every ``every``-th training forward (a forward in training
    mode with grad enabled: one per optimisation step in full-batch training); norm: ``"fro"`` (W trained
    directly) or ``"nuc"`` (W = K Q^T); query_index: as above (default ``layer.query_index`` or -1).
    """

    def __init__(self, model: nn.Module, X: torch.Tensor, z: torch.Tensor | None = None, *,
                 layer: nn.Module | str | None = None, weight: Callable[[], torch.Tensor] | None = None,
                 every: int = 1, norm: str = "fro", query_index: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise V.ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n]
                raise V.ArgumentError(f"layer {layer!r} is not a submodule of the model (submodules: "
                                      f"{names[:10]})") from None
        elif layer is None:
            layer = model
        elif not isinstance(layer, nn.Module):
            raise V.ArgumentError(f"layer must be an nn.Module, a submodule name or None, got {type(layer).__name__}")
        if weight is None:
            weight = getattr(layer, "combined_weight", None)
            if not callable(weight):
                raise V.ArgumentError("weight is needed: the layer has no combined_weight(); pass weight=, a "
                                      "callable returning the attention matrix W of the scores x^T W z")
        elif not callable(weight):
            raise V.ArgumentError(f"weight must be a callable returning W, got {type(weight).__name__}")
        V.tensor("X", X, floating=True, finite=True)
        if X.dim() != 3:
            raise V.ArgumentError(f"X must have shape (n, T, d), got shape {tuple(X.shape)}")
        if z is not None:
            V.tensor("z", z, floating=True, finite=True)
        self.every = V.positive_int("every", every)
        self.norm = V.choice("norm", norm, ("fro", "nuc"))
        qi = getattr(layer, "query_index", -1) if query_index is None else V.integer("query_index", query_index)
        self.model, self.layer, self.weight, self.X, self.z = model, layer, weight, X, z
        self.svm_z = X[:, qi] if z is None else z
        self.steps: list[int] = []
        self.weights: list[torch.Tensor] = []
        self._forwards = 0
        self._handles = []

    # ---- recording ----------------------------------------------------------------------------
    def _hooks(self):
        return [(self.layer, self._on_forward)]

    def _on_forward(self, module, inputs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if self._forwards % self.every == 0:
            self.record(self._forwards)
        self._forwards += 1

    def record(self, step: int) -> None:
        """Store the current W (detached float64 copy on the CPU) as the value at ``step``."""
        with torch.no_grad():
            W = self.weight().detach()
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"the attention matrix W is non-finite at step {step} (NaN/inf): training diverged")
        self.steps.append(int(step))
        self.weights.append(W.to(device="cpu", dtype=torch.float64).clone())

    # ---- analysis -----------------------------------------------------------------------------
    def correlations(self, reference: torch.Tensor) -> list[float]:
        """``corr(W(t), reference)`` for every recorded W (NaN where W(t) = 0)."""
        V.tensor("reference", reference, floating=True, finite=True)
        ref = reference.detach().to("cpu", torch.float64)
        return [direction_correlation(W, ref) if bool(W.any()) else float("nan") for W in self.weights]

    def trace(self, selected: torch.Tensor | None = None) -> SVMTrace:
        """Solve the SVM for ``selected`` (default: the tokens the model selects now) and return the curve."""
        if not self.weights:
            raise RuntimeError("nothing recorded: train inside the `with` block (training-mode forwards) or call "
                               "record(step)")
        was_training = self.model.training
        self.model.eval()
        try:
            chosen = selected_tokens(self.model, self.X, self.z, layer=self.layer)
            att = _attention_of(self.layer, "layer")
        finally:
            self.model.train(was_training)
        sel = chosen if selected is None else selected
        on_sel = att[torch.arange(att.shape[0], device=att.device), sel.to(att.device)]
        try:
            sol = solve_attention_svm(self.X, self.svm_z, sel, self.norm)
        except InfeasibleSVMError:
            sol = None
        corr = self.correlations(sol.W) if sol is not None else [math.nan] * len(self.weights)
        norms = [float(W.norm()) for W in self.weights]
        return SVMTrace(list(self.steps), corr, norms, sel.detach().cpu(), on_sel.detach().cpu(), sol)
