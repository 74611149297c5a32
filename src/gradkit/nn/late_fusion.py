"""Late fusion of frozen per-stream feature extractors with one linear layer (paper slug: contextual-fusion).

Each stream s maps the same input to features f_s(x) in R^{d_s}; the classifier is one linear layer on the
concatenation,

    logits = W [f_1(x); ...; f_S(x)] + b = sum_s W_s f_s(x) + b,      W = [W_1 | ... | W_S]

and the known-adversary penalty of a stream is alpha * ||W_s||^2 (the squared Frobenius norm of that
stream's column block), added to the cross-entropy to shift the decision onto the other streams. A model
with one stream is the single-stream baseline (same API).

>>> model = LateFusionClassifier({"fg": fg_cnn, "bg": bg_cnn}, {"fg": 32, "bg": 32}, n_classes=10)
>>> loss = F.cross_entropy(model(x), y) + 1e-2 * model.stream_weight_penalty("fg")
>>> model.stream_logits(x, "bg")      # W_bg f_bg(x) + b: the fusion layer restricted to one stream
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .._validate import boolean, positive_int

__all__ = ["LateFusionClassifier"]


class LateFusionClassifier(nn.Module):
    """A linear classifier on the concatenated features of named streams (contextual-fusion).

    extractors: name -> module mapping an input batch to features (N, feat_dims[name]); the order of the
    mapping is the order of the column blocks of the fusion layer. freeze: the extractors' parameters get
    ``requires_grad=False`` and the extractors stay in eval mode (BatchNorm/Dropout frozen) whatever
    ``train()`` is called with, so only the fusion layer learns and attacks see the deployed extractors.

    >>> model = LateFusionClassifier({"fg": fg_cnn}, {"fg": 32}, n_classes=10)    # single-stream head
    >>> logits = model(x)                                                          # (N, 10)
    """

    def __init__(self, extractors: Mapping[str, nn.Module], feat_dims: Mapping[str, int], n_classes: int,
                 freeze: bool = True) -> None:
        super().__init__()
        if not isinstance(extractors, Mapping) or not extractors:
            raise ValueError(f"extractors must be a non-empty mapping name -> nn.Module, got {extractors!r}")
        for name, m in extractors.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"extractor names must be non-empty strings without '.', got {name!r}")
            if not isinstance(m, nn.Module):
                raise TypeError(f"extractors[{name!r}] must be an nn.Module, got {type(m).__name__}")
        if not isinstance(feat_dims, Mapping) or set(feat_dims) != set(extractors):
            raise ValueError(f"feat_dims must give one feature size per extractor {sorted(extractors)}, got "
                             f"{dict(feat_dims) if isinstance(feat_dims, Mapping) else feat_dims!r}")
        self.names: tuple[str, ...] = tuple(extractors)
        self.feat_dims = {n: positive_int(f"feat_dims[{n!r}]", feat_dims[n]) for n in self.names}
        self.n_classes = positive_int("n_classes", n_classes)
        self.freeze = boolean("freeze", freeze)
        self.extractors = nn.ModuleDict({n: extractors[n] for n in self.names})
        self.head = nn.Linear(sum(self.feat_dims.values()), self.n_classes)
        offsets, start = {}, 0
        for n in self.names:
            offsets[n] = (start, start + self.feat_dims[n])
            start += self.feat_dims[n]
        self._blocks = offsets
        if self.freeze:
            for p in self.extractors.parameters():
                p.requires_grad_(False)
            self.extractors.eval()

    def train(self, mode: bool = True) -> "LateFusionClassifier":
        super().train(mode)
        if self.freeze:
            self.extractors.eval()
        return self

    def _check_name(self, name: str) -> str:
        if name not in self._blocks:
            raise ValueError(f"name must be one of the streams {self.names}, got {name!r}")
        return name

    def block(self, name: str) -> slice:
        """The columns of the fusion layer's weight that read stream ``name``."""
        lo, hi = self._blocks[self._check_name(name)]
        return slice(lo, hi)

    def stream_features(self, x: Tensor, name: str) -> Tensor:
        """f_name(x), checked to be (N, feat_dims[name])."""
        f = self.extractors[self._check_name(name)](x)
        d = self.feat_dims[name]
        if f.dim() != 2 or f.shape[1] != d:
            raise ValueError(f"extractor {name!r} must return features of shape (N, {d}), got {tuple(f.shape)}")
        return f

    def features(self, x: Tensor) -> Tensor:
        """[f_1(x); ...; f_S(x)], shape (N, sum of feat_dims): the fusion layer's input."""
        return torch.cat([self.stream_features(x, n) for n in self.names], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def stream_logits(self, x: Tensor, name: str) -> Tensor:
        """W_name f_name(x) + b: the fusion layer with every other stream's block set to zero."""
        sl = self.block(name)
        return nn.functional.linear(self.stream_features(x, name), self.head.weight[:, sl], self.head.bias)

    def stream_weight_penalty(self, name: str) -> Tensor:
        """||W_name||^2: the sum of squares of the fusion weights that read stream ``name`` (bias excluded)."""
        return self.head.weight[:, self.block(name)].pow(2).sum()

    def extra_repr(self) -> str:
        dims = ", ".join(f"{n}={d}" for n, d in self.feat_dims.items())
        return f"streams=({dims}), n_classes={self.n_classes}, freeze={self.freeze}"
