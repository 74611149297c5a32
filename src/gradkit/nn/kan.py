"""Kolmogorov-Arnold layers with a learned choice of activation space (paper slug: s-kan).

A KAN layer puts a learned univariate function on every edge and sums at the output nodes. The
single-family layer (the baselines)::

    z_j = sum_i [ w_b[j,i] * silu(u_i) + sum_r c[j,i,r] B_r(u_i) ] + bias_j

The selectable layer (S-KAN) gives every output node a pool of M families, each with its own
coefficients, mixed by selection weights learned with the rest::

    z_j = sum_i [ w_b[j,i] * silu(u_i) + sum_m a[j,m] sum_r c^(m)[j,i,r] B^(m)_r(u_i) ] + bias_j
    a[j,:] = softmax(s[j,:] / tau)                 (granularity "node"; "edge": a[j,i,m]; "layer": a[m])

Training runs in three phases (:class:`ThreePhaseSchedule`): all families jointly; then
``select_topk(k)`` keeps the k largest weights of every node and renormalises (a mask on the logits);
then ``prune()`` folds the renormalised weights into the kept coefficients and returns a
:class:`PrunedKANLayer` that stores only the kept edges' coefficients and bases (same outputs, fewer
parameters, faster inference). Softmax weights start at 1/M, so the coefficients' initial standard
deviation is multiplied by sqrt(M): the mixed output starts at the scale of a single-family layer.

Example::

    layer = SelectableKANLayer(2, 5)                       # bspline, chebyshev, fourier, rbf, wavelet
    y = layer(torch.rand(16, 2) * 2 - 1)                   # (16, 5)
    small = layer.select_topk(1).prune()                   # same outputs, one family per node
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import ArgumentError, choice, integer, positive, positive_int
from .kan_bases import KANBasis, basis_families, make_basis

__all__ = ["KANLayer", "SelectableKANLayer", "PrunedKANLayer", "ThreePhaseSchedule", "three_phase_schedule", "prune_model",
           "DEFAULT_FAMILIES", "kan_coefficient_count"]

DEFAULT_FAMILIES = ("bspline", "chebyshev", "fourier", "rbf", "wavelet")
GRANULARITIES = ("node", "edge", "layer")
NORMALIZATIONS = ("softmax", "none")
_ACTIVATIONS: dict[str | None, Callable[[torch.Tensor], torch.Tensor] | None] = {"silu": F.silu, None: None}


def _base_branch(module: nn.Module, d_in: int, d_out: int, base_activation: str | None, bias: bool) -> None:
    """The residual ``w_b * act(u)`` branch (Linear-style init) and the output bias of a KAN layer."""
    module.base_activation = choice("base_activation", base_activation, tuple(_ACTIVATIONS))
    module.base_weight = None
    if base_activation is not None:
        bound = 1.0 / math.sqrt(d_in)
        module.base_weight = nn.Parameter(torch.empty(d_out, d_in).uniform_(-bound, bound))
    module.bias = nn.Parameter(torch.zeros(d_out)) if bias else None


def _base_out(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    out = None
    if module.base_weight is not None:
        out = F.linear(_ACTIVATIONS[module.base_activation](x), module.base_weight)
    if module.bias is not None:
        out = module.bias if out is None else out + module.bias
    return out


def _check_x(x: torch.Tensor, d_in: int, owner: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != d_in:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ArgumentError(f"input of {owner} must be a tensor of shape (..., {d_in}), got {shape}")


def _basis_options(families: Sequence[str], basis_options: Mapping[str, Mapping[str, Any]] | None
                   ) -> dict[str, dict[str, Any]]:
    opts = dict(basis_options or {})
    unknown = [k for k in opts if k not in families]
    if unknown:
        raise ArgumentError(f"basis_options must be keyed by the layer's families {tuple(families)}, "
                            f"got keys {tuple(unknown)}")
    return {f: dict(opts.get(f, {})) for f in families}


class KANLayer(nn.Module):
    """A KAN layer over one basis family (``gradkit.nn.kan_bases``): the single-activation-space baseline.

    Args: d_in, d_out; family: a registered family name; base_activation: "silu" or None (no base
    branch); bias: an output bias; basis_options: the family's keyword arguments (e.g. ``{"grid": 8}``);
    coef_std: the coefficients' initial std (default 1 / sqrt(d_in * R)).
    """

    def __init__(self, d_in: int, d_out: int, family: str = "bspline", *, base_activation: str | None = "silu",
                 bias: bool = True, basis_options: Mapping[str, Any] | None = None,
                 coef_std: float | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out = positive_int("d_in", d_in), positive_int("d_out", d_out)
        self.family = family
        self.basis = make_basis(family, self.d_in, **dict(basis_options or {}))
        std = 1.0 / math.sqrt(self.d_in * self.basis.size) if coef_std is None else positive("coef_std", coef_std)
        self.coef = nn.Parameter(torch.randn(self.d_out, self.d_in, self.basis.size) * std)
        _base_branch(self, self.d_in, self.d_out, base_activation, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.d_in, "KANLayer")
        out = torch.einsum("...ir,jir->...j", self.basis(x), self.coef)
        base = _base_out(self, x)
        return out if base is None else out + base

    def coefficient_count(self) -> int:
        """Number of basis coefficients (the family-specific parameters, bases' own ones excluded)."""
        return self.coef.numel()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, family={self.family!r}"


class SelectableKANLayer(nn.Module):
    """A KAN layer whose nodes learn which basis families to use (S-KAN); see the module docstring.

    Args: d_in, d_out; families: registered family names (M >= 1, no repeats); granularity: "node"
    (one weight vector per output node), "edge" (per edge) or "layer" (one for the layer);
    normalize: "softmax" (a = softmax(s / tau)) or "none" (a = s, raw weights starting at 1/M);
    tau: softmax temperature; base_activation, bias: as :class:`KANLayer`; basis_options: per-family
    keyword arguments, ``{"bspline": {"grid": 8}}``; coef_std: the coefficients' initial std before the
    sqrt(M) factor (default 1 / sqrt(d_in * R_m)).
    """

    def __init__(self, d_in: int, d_out: int, families: Sequence[str] = DEFAULT_FAMILIES, *,
                 granularity: str = "node", normalize: str = "softmax", tau: float = 1.0,
                 base_activation: str | None = "silu", bias: bool = True,
                 basis_options: Mapping[str, Mapping[str, Any]] | None = None,
                 coef_std: float | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out = positive_int("d_in", d_in), positive_int("d_out", d_out)
        if isinstance(families, str) or not isinstance(families, Sequence) or len(families) == 0:
            raise ArgumentError(f"families must be a non-empty sequence of family names from "
                                f"{tuple(basis_families())}, got {families!r}")
        if len(set(families)) != len(families):
            raise ArgumentError(f"families must not repeat a family, got {tuple(families)}")
        self.families = tuple(families)
        self.granularity = choice("granularity", granularity, GRANULARITIES)
        self.normalize = choice("normalize", normalize, NORMALIZATIONS)
        self.tau = positive("tau", tau)
        opts = _basis_options(self.families, basis_options)
        self.bases = nn.ModuleList([make_basis(f, self.d_in, **opts[f]) for f in self.families])
        m = len(self.families)
        gain = math.sqrt(m) if self.normalize == "softmax" else 1.0
        coefs = []
        for basis in self.bases:
            std = 1.0 / math.sqrt(self.d_in * basis.size) if coef_std is None else positive("coef_std", coef_std)
            coefs.append(nn.Parameter(torch.randn(self.d_out, self.d_in, basis.size) * std * gain))
        self.coefs = nn.ParameterList(coefs)
        shape = {"node": (self.d_out, m), "edge": (self.d_out, self.d_in, m), "layer": (m,)}[self.granularity]
        init = 0.0 if self.normalize == "softmax" else 1.0 / m
        self.logits = nn.Parameter(torch.full(shape, init))
        self.register_buffer("mask", torch.ones(shape))
        _base_branch(self, self.d_in, self.d_out, base_activation, bias)

    @property
    def num_families(self) -> int:
        return len(self.families)

    def selection_weights(self) -> torch.Tensor:
        """The weights a, shape (d_out, M) / (d_out, d_in, M) / (M,) by granularity; masked families get 0."""
        if self.normalize == "softmax":
            s = (self.logits / self.tau).masked_fill(self.mask == 0, float("-inf"))
            return torch.softmax(s, dim=-1)
        return self.logits * self.mask

    def _edge_weights(self) -> torch.Tensor:
        a = self.selection_weights()
        if self.granularity == "node":
            return a.unsqueeze(1).expand(self.d_out, self.d_in, -1)
        if self.granularity == "layer":
            return a.expand(self.d_out, self.d_in, -1)
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.d_in, "SelectableKANLayer")
        a = self._edge_weights()
        phi = torch.cat([basis(x) for basis in self.bases], dim=-1)
        coef = torch.cat([a[..., m:m + 1] * c for m, c in enumerate(self.coefs)], dim=-1)
        out = torch.einsum("...ir,jir->...j", phi, coef)
        base = _base_out(self, x)
        return out if base is None else out + base

    def entropy(self) -> torch.Tensor:
        """Sum over selection groups (nodes, edges or the layer) of H(a) = -sum_m a_m log a_m (differentiable).

        With ``normalize="none"`` the weights are normalised as |a| / sum |a| first.
        """
        a = self.selection_weights()
        if self.normalize == "none":
            a = a.abs() / a.abs().sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        return -torch.xlogy(a, a).sum()

    @torch.no_grad()
    def select_topk(self, k: int = 1) -> "SelectableKANLayer":
        """Phase 2: keep the k largest weights of every selection group, mask the rest (softmax renormalises
        over the kept ones). Returns ``self``."""
        k = integer("k", k, low=1, high=self.num_families)
        idx = self.selection_weights().abs().topk(k, dim=-1).indices
        self.mask.zero_().scatter_(-1, idx, 1.0)
        return self

    def selected_families(self) -> list:
        """The family with the largest weight in every selection group (nested like the weights without M)."""
        best = self.selection_weights().detach().argmax(dim=-1)
        if best.dim() == 0:
            return self.families[int(best)]
        return _names(best.tolist(), self.families)

    def family_usage(self) -> dict[str, int]:
        """How many selection groups have each family among their kept (unmasked) families."""
        kept = self.mask.reshape(-1, self.num_families).sum(dim=0)
        return {f: int(n) for f, n in zip(self.families, kept.tolist())}

    def coefficient_count(self) -> int:
        """Number of basis coefficients over all families (bases' own parameters excluded)."""
        return sum(c.numel() for c in self.coefs)

    @torch.no_grad()
    def prune(self) -> "PrunedKANLayer":
        """Phase 3: a :class:`PrunedKANLayer` holding only the kept edges' coefficients, with the selection
        weights folded in; its outputs equal this layer's (up to rounding)."""
        a = self._edge_weights()
        keep = (self.mask.unsqueeze(1) if self.granularity == "node" else self.mask).expand_as(a) > 0
        parts = []
        for m, (family, basis, coef) in enumerate(zip(self.families, self.bases, self.coefs)):
            if self.granularity != "edge":  # whole nodes are kept: dense rows (n_rows, d_in, R)
                rows = keep[:, 0, m].nonzero(as_tuple=True)[0]
                cols = None
                folded = a[rows, :, m].unsqueeze(-1) * coef[rows]
            else:
                rows, cols = keep[..., m].nonzero(as_tuple=True)
                folded = a[rows, cols, m].unsqueeze(-1) * coef[rows, cols]
            if rows.numel() == 0:
                continue
            parts.append((family, copy.deepcopy(basis), rows, cols, folded))
        return PrunedKANLayer(self.d_in, self.d_out, parts, base_activation=self.base_activation,
                              base_weight=self.base_weight, bias=self.bias)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, families={self.families}, granularity={self.granularity!r}, "
                f"normalize={self.normalize!r}, tau={self.tau}")


def _names(indices: Any, families: Sequence[str]) -> Any:
    if isinstance(indices, list):
        return [_names(i, families) for i in indices]
    return families[indices]


class PrunedKANLayer(nn.Module):
    """The pruned form of a :class:`SelectableKANLayer` (made by its ``prune()``): for every family that any
    edge kept, its basis and the kept edges' folded coefficients c' (the selection weight times c);
    z_j = base + bias + sum over kept edges e = (j, i) of sum_r c'[e, r] B_r(u_i).

    ``parts``: ``(family, basis, rows, cols, coef)`` per family; ``cols=None`` keeps whole rows (node or layer
    selection: ``coef`` of shape (len(rows), d_in, R)), else single edges (``coef`` of shape (len(rows), R)).
    """

    def __init__(self, d_in: int, d_out: int,
                 parts: Sequence[tuple[str, KANBasis, torch.Tensor, torch.Tensor, torch.Tensor]], *,
                 base_activation: str | None, base_weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.d_in, self.d_out = positive_int("d_in", d_in), positive_int("d_out", d_out)
        self.families = tuple(p[0] for p in parts)
        self.bases = nn.ModuleList([p[1] for p in parts])
        self.coefs = nn.ParameterList([nn.Parameter(p[4].detach().clone()) for p in parts])
        for m, p in enumerate(parts):
            self.register_buffer(f"rows_{m}", p[2].detach().clone())
            self.register_buffer(f"cols_{m}", None if p[3] is None else p[3].detach().clone())
        self.base_activation = base_activation
        self.base_weight = None if base_weight is None else nn.Parameter(base_weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.d_in, "PrunedKANLayer")
        out = _base_out(self, x)
        if out is None:
            out = x.new_zeros(())
        out = out.expand(*x.shape[:-1], self.d_out)
        for m, (basis, coef) in enumerate(zip(self.bases, self.coefs)):
            rows, cols = getattr(self, f"rows_{m}"), getattr(self, f"cols_{m}")
            if cols is None:  # whole rows: coef (n_rows, d_in, R)
                vals = torch.einsum("...ir,jir->...j", basis(x), coef)
            else:  # single edges: coef (E_m, R)
                vals = (basis(x)[..., cols, :] * coef).sum(dim=-1)
            out = out.index_add(out.dim() - 1, rows, vals)
        return out

    def coefficient_count(self) -> int:
        """Number of kept basis coefficients."""
        return sum(c.numel() for c in self.coefs)

    def extra_repr(self) -> str:
        edges = {f: int(c.shape[:-1].numel()) for f, c in zip(self.families, self.coefs)}
        return f"d_in={self.d_in}, d_out={self.d_out}, kept_edges={edges}"


def kan_coefficient_count(model: nn.Module) -> int:
    """Total basis coefficients of every KAN layer in ``model`` (selectable, pruned or single-family)."""
    return sum(m.coefficient_count() for m in model.modules()
               if isinstance(m, (KANLayer, SelectableKANLayer, PrunedKANLayer)))


class ThreePhaseSchedule:
    """S-KAN's training schedule as a per-step callback: ``event = schedule(step)`` before step ``step``.

    Phase 1 (steps [0, n1)): all families; at step n1 every :class:`SelectableKANLayer` in ``model`` is
    masked to its top-k families (event ``"select"``); at step n1 + n2 every one is replaced in its parent
    by its :class:`PrunedKANLayer` (event ``"prune"``: rebuild the optimizer, the parameters changed), or
    left masked with ``physical_prune=False`` (event ``"prune"`` still reported). Other steps return None.
    ``n1, n2 = round(fractions[0] * total_steps), round(fractions[1] * total_steps)``.
    """

    def __init__(self, model: nn.Module, total_steps: int, fractions: Sequence[float] = (0.5, 0.3, 0.2),
                 k: int = 1, physical_prune: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        self.total_steps = positive_int("total_steps", total_steps)
        try:
            fr = tuple(float(f) for f in fractions)
        except (TypeError, ValueError):
            raise ArgumentError(f"fractions must be three numbers >= 0 summing to 1, got {fractions!r}") from None
        if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ArgumentError(f"fractions must be three numbers >= 0 summing to 1, got {fractions!r}")
        layers = [m for m in model.modules() if isinstance(m, SelectableKANLayer)]
        if not layers:
            raise ArgumentError("model must contain at least one SelectableKANLayer, got none")
        self.k = integer("k", k, low=1, high=min(layer.num_families for layer in layers))
        self.model, self.fractions, self.physical_prune = model, fr, bool(physical_prune)
        self.select_step = int(round(fr[0] * self.total_steps))
        self.prune_step = int(round((fr[0] + fr[1]) * self.total_steps))

    def phase(self, step: int) -> int:
        """1, 2 or 3: the phase that step ``step`` trains in."""
        return 1 if step < self.select_step else (2 if step < self.prune_step else 3)

    def __call__(self, step: int) -> str | None:
        event = None
        if step == self.select_step:
            for m in self.model.modules():
                if isinstance(m, SelectableKANLayer):
                    m.select_topk(self.k)
            event = "select"
        if step == self.prune_step:
            if self.physical_prune:
                prune_model(self.model)
            event = "prune"
        return event


def prune_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`SelectableKANLayer` inside ``model`` by its pruned layer (in place; a bare
    selectable layer passed as ``model`` is returned pruned)."""
    if isinstance(model, SelectableKANLayer):
        return model.prune()
    for name, child in list(model.named_children()):
        if isinstance(child, SelectableKANLayer):
            setattr(model, name, child.prune())
        else:
            prune_model(child)
    return model


def three_phase_schedule(model: nn.Module, total_steps: int, fractions: Sequence[float] = (0.5, 0.3, 0.2),
                         k: int = 1, physical_prune: bool = True) -> ThreePhaseSchedule:
    """The :class:`ThreePhaseSchedule` callback for ``model`` (see there)."""
    return ThreePhaseSchedule(model, total_steps, fractions, k, physical_prune)
