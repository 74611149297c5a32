"""Projection heads and an encoder+head wrapper with access to pre- and post-projection features
(paper slug: projection-head).

Training uses h = g(f(x)) (encoder f, head g); downstream tasks use the pre-projection representation
z = f(x) and discard g. Head kinds:

- ``"mlp"``:   Linear -> ReLU -> ... -> Linear (``depth`` linear layers)
- ``"linear"``: ``depth`` bias-free linear layers, no non-linearity (the deep linear head of the analysis)
- ``"fixed_reweight"``: g(z) = diag(w) z, not trained, w_i = kappa^i (i = 0 .. dim-1) or given weights;
  kappa = 1 is no head. A fixed, interpretable alternative to a learned head.

>>> model = WithProjectionHead(nn.Sequential(nn.Linear(64, 128), nn.ReLU()), ProjectionHead(128, out_dim=32))
>>> model(torch.randn(5, 64)).shape, model.features(torch.randn(5, 64), layer="pre").shape
(torch.Size([5, 32]), torch.Size([5, 128]))
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, choice, positive_int, real_in, tensor

__all__ = ["ProjectionHead", "WithProjectionHead", "KINDS"]

KINDS = ("mlp", "linear", "fixed_reweight")
LAYERS = ("pre", "post")


class ProjectionHead(nn.Module):
    """A projection head g applied to a representation of width ``dim`` (projection-head).

    dim: input width; hidden: width of the hidden layers (default ``dim``); out_dim: output width (default
    ``dim``; must equal ``dim`` for ``"fixed_reweight"``); depth: number of linear layers (>= 1) for
    ``"mlp"``/``"linear"``; kind: one of ``KINDS``; kappa in (0, 1]: the fixed head's geometric ratio,
    w_i = kappa^i; weights: an explicit positive weight vector of length ``dim`` for the fixed head
    (replaces kappa). The fixed head's weights are a buffer, never trained.

    >>> ProjectionHead(8, kind="fixed_reweight", kappa=0.5)(torch.ones(1, 8))[0, :3]
    tensor([1.0000, 0.5000, 0.2500])
    """

    def __init__(self, dim: int, hidden: int | None = None, out_dim: int | None = None, depth: int = 2,
                 kind: str = "mlp", kappa: float = 0.9, weights: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        self.in_features = positive_int("dim", dim)
        self.kind = choice("kind", kind, KINDS)
        self.hidden = dim if hidden is None else positive_int("hidden", hidden)
        self.out_features = dim if out_dim is None else positive_int("out_dim", out_dim)
        self.depth = positive_int("depth", depth)
        self.kappa = real_in("kappa", kappa, 0.0, 1.0, low_open=True)
        self.net: nn.Module
        if kind == "fixed_reweight":
            if self.out_features != dim:
                raise ArgumentError(f"out_dim must equal dim ({dim}) for kind='fixed_reweight', got {out_dim}")
            if weights is None:
                w = self.kappa ** torch.arange(dim, dtype=torch.float64)
            else:
                w = torch.as_tensor(weights, dtype=torch.float64).detach().clone()
                if w.shape != (dim,) or not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
                    raise ArgumentError(f"weights must be {dim} finite positive numbers (one per input coordinate), "
                                        f"got shape {tuple(w.shape)}")
            self.register_buffer("weights", w.to(torch.get_default_dtype()))
            self.net = nn.Identity()
            return
        widths = [dim] + [self.hidden] * (self.depth - 1) + [self.out_features]
        layers: list[nn.Module] = []
        for i in range(self.depth):
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=(kind == "mlp")))
            if kind == "mlp" and i < self.depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.in_features:
            raise ArgumentError(f"the projection head expects inputs of width {self.in_features}, got shape "
                                f"{tuple(z.shape)}")
        if self.kind == "fixed_reweight":
            return z * self.weights.to(z.dtype)
        return self.net(z)

    def extra_repr(self) -> str:
        extra = f", kappa={self.kappa:g}" if self.kind == "fixed_reweight" else f", depth={self.depth}"
        return f"kind={self.kind!r}, dim={self.in_features}, out_dim={self.out_features}{extra}"


def _out_width(module: nn.Module) -> int | None:
    """The output width of a module when it can be read off its last ``out_features`` (else None)."""
    width = getattr(module, "out_features", None)
    if isinstance(width, int):
        return width
    last = None
    for m in module.modules():
        if m is not module and isinstance(getattr(m, "out_features", None), int):
            last = m.out_features
    return last


class WithProjectionHead(nn.Module):
    """An encoder f followed by a projection head g: ``forward(x) = g(f(x))`` for training (projection-head).

    ``features(x, layer="pre")`` is f(x), the representation kept for downstream tasks; ``layer="post"`` is
    g(f(x)). ``discard()`` returns the encoder alone. When the encoder's output width can be read off its
    last layer with ``out_features`` and the head has ``in_features``, a mismatch is a clear error at
    construction (else at the first forward).

    >>> m = WithProjectionHead(nn.Linear(20, 8, bias=False), ProjectionHead(8, kind="linear"))
    >>> m.discard() is m.encoder
    True
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        for name, mod in (("encoder", encoder), ("head", head)):
            if not isinstance(mod, nn.Module):
                raise ArgumentError(f"{name} must be an nn.Module, got {type(mod).__name__}")
        enc_w, head_w = _out_width(encoder), getattr(head, "in_features", None)
        if isinstance(enc_w, int) and isinstance(head_w, int) and enc_w != head_w:
            raise ArgumentError(f"head expects input width {head_w} but the encoder outputs width {enc_w}; "
                                f"build the head with dim={enc_w}")
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def features(self, x: Tensor, layer: str = "pre") -> Tensor:
        """The pre-projection representation f(x) (``"pre"``) or the head's output g(f(x)) (``"post"``)."""
        choice("layer", layer, LAYERS)
        tensor("x", x)
        z = self.encoder(x)
        return z if layer == "pre" else self.head(z)

    def discard(self) -> nn.Module:
        """The encoder without its head (what downstream tasks use)."""
        return self.encoder
