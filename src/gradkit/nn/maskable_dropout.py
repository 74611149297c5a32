"""Dropout whose masks can be recorded, replayed or optimised (paper slug: dia).

``MaskableDropout`` is a drop-in ``nn.Dropout`` (inverted dropout) with four modes:

- ``"normal"``: exactly ``nn.Dropout`` (random mask in train mode, identity in eval mode);
- ``"record"``: like ``"normal"`` and the mask used is kept in ``.mask``; with the same RNG state the
  output is bit-identical to ``nn.Dropout``. Without dropout (eval mode) the recorded mask is the constant
  ``1 - p``: replaying it gives the identity, i.e. eval mode (a mask of ONES replays as ``h / (1 - p)``);
- ``"replay"``: ``h * M / (1 - p)`` with a given mask ``M`` (``.mask``), in train AND eval mode;
- ``"optimise"``: the same forward as replay, for a continuous mask in [0, 1] that an attacker optimises
  (the gradient w.r.t. ``M`` flows through the double backward of a gradient-matching loss).

Masks are per sample: ``M`` has the shape of the layer's input (e.g. ``(N, units)`` or ``(N, tokens, dim)``).

>>> layer, x = MaskableDropout(0.5, mode="record").train(), torch.randn(2, 8)
>>> y = layer(x); m = layer.mask                            # the Bernoulli(1 - p) keep-mask used
>>> torch.equal(layer.replay(m).eval()(x), y)               # replayed, also in eval mode
True
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .._validate import real_scalar

MODES = ("normal", "record", "replay", "optimise")


def _check_p(p) -> float:
    v = real_scalar("p", p)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"p must be in [0, 1) for MaskableDropout (the scale 1/(1-p) is undefined at 1), got {p!r}")
    return v


class MaskableDropout(nn.Dropout):
    """nn.Dropout with record / replay / optimise modes for its keep-mask (paper slug: dia).

    out = h * M / (1 - p), M ~ Bernoulli(1 - p) per element (normal, record) or given (replay, optimise).
    Example:
    >>> d, x = MaskableDropout(0.25, mode="record").train(), torch.randn(4, 16)
    >>> y = d(x)                              # records d.mask
    >>> torch.equal(d.replay(d.mask).eval()(x), y)
    True
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, mode: str = "normal",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(_check_p(p), inplace)
        self._mode = "normal"
        self.mode = mode
        self.mask: torch.Tensor | None = None
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    # ------------------------------------------------------------------ state
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    @property
    def keep_prob(self) -> float:
        return 1.0 - float(self.p)

    def replay(self, mask: torch.Tensor) -> "MaskableDropout":
        """Use ``mask`` (shape of this layer's input, values in [0, 1]) from now on; returns self."""
        self.mask = _check_mask(mask, "mask")
        self.mode = "replay"
        return self

    def optimise(self, mask: torch.Tensor) -> "MaskableDropout":
        """Use a continuous ``mask`` that an optimiser updates (keep its autograd link); returns self."""
        self.mask = _check_mask(mask, "mask")
        self.mode = "optimise"
        return self

    def record(self) -> "MaskableDropout":
        """Record the next masks drawn (one per forward; the last one is kept); returns self."""
        self.mask = None
        self.mode = "record"
        return self

    def normal(self) -> "MaskableDropout":
        self.mask = None
        self.mode = "normal"
        return self

    # ------------------------------------------------------------------ forward
    def _scaled(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * (mask / (1.0 - float(self.p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "normal":
            return super().forward(x)
        if self._mode == "record":
            if self.training and self.p > 0:
                mask = torch.empty_like(x).bernoulli_(1.0 - float(self.p), generator=self.generator)
                self.mask = mask
                return self._scaled(x, mask)
            # no dropout drawn (eval mode or p = 0): record the constant mask 1 - p, whose replay
            # (h * (1 - p) / (1 - p)) is this identity
            self.mask = torch.full_like(x, 1.0 - float(self.p))
            return x
        mask = self.mask
        if mask is None:
            raise RuntimeError(f"MaskableDropout in {self._mode!r} mode has no mask; call .replay(mask) or "
                               ".optimise(mask) first")
        if tuple(mask.shape) != tuple(x.shape):
            raise ValueError(f"MaskableDropout mask has shape {tuple(mask.shape)} but the layer's input has shape "
                             f"{tuple(x.shape)}; masks are per sample and must match the activation (victim batch)")
        if mask.dtype != x.dtype:
            mask = mask.to(x.dtype)
        return self._scaled(x, mask)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self._mode!r}"


def _check_mask(mask, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"{name} must be a floating-point or bool tensor, got dtype {mask.dtype}")
    return mask


# ---------------------------------------------------------------------- model-level helpers
def maskable_dropouts(model: nn.Module) -> list[MaskableDropout]:
    """The MaskableDropout layers of ``model`` in ``model.modules()`` order (paper slug: dia)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, MaskableDropout)]


def convert_dropout(model: nn.Module) -> nn.Module:
    """Swap every plain ``nn.Dropout`` of ``model`` in place for a MaskableDropout with the same p (paper slug: dia).

    Returns ``model`` (a bare ``nn.Dropout`` is returned converted).
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3))
    >>> type(convert_dropout(model)[1]).__name__
    'MaskableDropout'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Dropout:
        return MaskableDropout(model.p, model.inplace).train(model.training)
    for name, child in list(model.named_children()):
        if type(child) is nn.Dropout:
            setattr(model, name, MaskableDropout(child.p, child.inplace).train(child.training))
        else:
            convert_dropout(child)
    return model


def dropout_masks(model: nn.Module) -> list[torch.Tensor | None]:
    """The current ``.mask`` of each MaskableDropout of ``model`` (recorded, replayed or optimised)."""
    return [m.mask for m in maskable_dropouts(model)]


@contextlib.contextmanager
def dropout_mode(model: nn.Module, mode: str, masks: Sequence[torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> Iterator[list[MaskableDropout]]:
    """Put every MaskableDropout of ``model`` in ``mode`` (with ``masks`` for replay/optimise); restore on exit.

    ``masks`` has one tensor per layer (``maskable_dropouts`` order). In record mode ``generator`` (optional)
    draws the masks. Yields the layers.
    >>> model = nn.Sequential(nn.Linear(4, 4), MaskableDropout(0.5)).train()
    >>> with dropout_mode(model, "record"):
    ...     y = model(torch.randn(2, 4)); masks = dropout_masks(model)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = maskable_dropouts(model)
    if mode in ("replay", "optimise"):
        if masks is None:
            raise ValueError(f"mode {mode!r} needs masks (one per MaskableDropout layer, {len(layers)} here)")
        masks = list(masks)
        if len(masks) != len(layers):
            raise ValueError(f"masks has {len(masks)} tensors but the model has {len(layers)} MaskableDropout layers")
        for i, m in enumerate(masks):
            _check_mask(m, f"masks[{i}]")
    elif masks is not None:
        raise ValueError(f"masks are only used in 'replay' or 'optimise' mode, not {mode!r}")
    saved = [(l._mode, l.mask, l.generator) for l in layers]
    try:
        for i, layer in enumerate(layers):
            layer.mode = mode
            if masks is not None:
                layer.mask = masks[i]
            elif mode == "record":
                layer.mask = None
                if generator is not None:
                    layer.generator = generator
        yield layers
    finally:
        for layer, (mo, ma, ge) in zip(layers, saved):
            layer._mode, layer.mask, layer.generator = mo, ma, ge


def activation_shapes(model: nn.Module, input_shape: Sequence[int], *, device=None,
                      dtype=None) -> list[torch.Size]:
    """Input shapes of each MaskableDropout of ``model`` for a batch of ``input_shape`` (one eval forward, no grad)."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty shape of positive sizes, got {tuple(input_shape)!r}")
    p0 = next(model.parameters(), None)
    device = device if device is not None else (p0.device if p0 is not None else None)
    dtype = dtype if dtype is not None else (p0.dtype if p0 is not None and p0.is_floating_point() else None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), dropout_mode(model, "record") as layers:
            model(torch.zeros(shape, device=device, dtype=dtype))
            return [l.mask.shape if l.mask is not None else None for l in layers]
    finally:
        model.train(was_training)


__all__ = ["MaskableDropout", "MODES", "maskable_dropouts", "convert_dropout", "dropout_masks", "dropout_mode",
           "activation_shapes"]
