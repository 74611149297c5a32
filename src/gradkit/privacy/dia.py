"""Dropout Inversion Attack: the client's dropout masks optimised jointly with the data (paper slug: dia).

Scheliga, Mäder, Seeland, "Dropout is NOT All You Need to Prevent Gradient Leakage", AAAI 2023
(arXiv 2208.06163). A client trains with dropout and shares G* = grad_w CE(f_w(x*; M*), y) with random
keep-masks M* ~ Bernoulli(1 - p). Plain gradient inversion runs a deterministic model and cannot match
G*; DIA adds one continuous mask M_l in [0, 1] per dropout layer (shape of that layer's activation, per
sample) to the unknowns:

    min_{x, M}  1 - <G(x, M), G*> / (||G(x, M)|| ||G*|| + 1e-8) + tv * TV(x) + mask_reg * sum_l |(1 - mean(M_l)) - p_l|

with G(x, M) = grad_w CE(f_w(x; M), y), dropout layers computing h * M_l / (1 - p) in any mode, Adam on
(x, M) with the sign of the data gradient only, x clamped to the pixel range and M_l clipped to [0, 1]
after every step (not re-binarised). It is built on the generic attacker
:class:`gradkit.privacy.GradientInversion`: the masks are an extra :class:`SearchSpace`
(:class:`DropoutMaskSpace`) passed with ``extra=[masks]``; the model's dropout layers must be
:class:`gradkit.nn.maskable_dropout.MaskableDropout` (``convert_dropout(model)`` swaps ``nn.Dropout``).

>>> grads, true_masks = client_gradients(model, x, y)               # the client, train mode + dropout
>>> attack = DropoutInversionAttack(model, preset=replace(PRESETS.get("dia"), iters=400))
>>> result = attack.run(grads, y, PixelSpace(x.shape))              # result.snapshots["extra0"]: the masks
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .._validate import choice, real_scalar
from ..nn.maskable_dropout import MaskableDropout, activation_shapes, dropout_mode, maskable_dropouts
from .inversion import GradientInversion, InversionPreset, InversionResult, SearchSpace, register_preset
from .matching import model_gradients

__all__ = ["DIAPreset", "DropoutMaskSpace", "DropoutInversionAttack", "client_gradients", "MASK_INITS"]

MASK_INITS = ("bernoulli", "keep_prob", "ones")


@dataclass(frozen=True)
class DIAPreset(InversionPreset):
    """An :class:`InversionPreset` plus DIA's mask settings (paper slug: dia).

    mask_reg: weight of sum_l |(1 - mean(M_l)) - p_l| (keeps each mask's drop rate near p).
    mask_init: ``"bernoulli"`` (M ~ Bernoulli(1 - p), the paper's code), ``"keep_prob"`` (M = 1 - p) or
    ``"ones"``.
    """

    mask_reg: float = 1e-4
    mask_init: str = "bernoulli"

    def __post_init__(self) -> None:
        super().__post_init__()
        real_scalar("mask_reg", self.mask_reg, nonneg=True)
        choice("mask_init", self.mask_init, MASK_INITS)


# The official configs (example_configs/attacks/{DIA,IG}.yaml): cosine distance over all parameters, TV 1e-5,
# Adam lr 0.1, signed data gradient, pixels clipped, attacker model in eval mode, best-loss iterate, stop
# below 1e-5, at most 20k iterations, ReduceLROnPlateau(0.1, patience 800), stop after 4000 iterations
# without improvement (neither acts within 800 iterations).
_OFFICIAL = dict(cost="cosine", tv=1e-5, image_norm=0.0, lr=0.1, iters=20000, signed=True, keep_best=True,
                 model_mode="eval", schedule="plateau", plateau_patience=800, patience=4000, early_stop=1e-5)
DIA_PRESET = register_preset(DIAPreset(name="dia", mask_reg=1e-4, mask_init="bernoulli", **_OFFICIAL))
# IG as configured in the DIA paper's code (attacker_train_mode: false -> deterministic model, no dropout).
DIA_IG_PRESET = register_preset(InversionPreset(name="dia-ig", **_OFFICIAL))
# The second IG variant of the paper: the attacker's model in train mode (a fresh random mask every iteration).
DIA_IG_TRAIN_PRESET = register_preset(InversionPreset(name="dia-ig-train", **{**_OFFICIAL, "model_mode": "train"}))


def _layer_list(layers) -> list[MaskableDropout]:
    out = list(layers)
    for i, l in enumerate(out):
        if not isinstance(l, MaskableDropout):
            raise TypeError(f"layers[{i}] must be a MaskableDropout, got {type(l).__name__}")
    return out


class DropoutMaskSpace(SearchSpace):
    """The client's dropout masks as unknowns of a gradient-inversion attack (paper slug: dia).

    One continuous mask per layer, shape = that layer's activation for the victim batch; clipped to [0, 1]
    after each step; regularizer mask_reg * sum_l |(1 - mean(M_l)) - p_l|; raw (unsigned) gradients.
    Use it as ``GradientInversion.run(..., extra=[space])`` inside ``with space.attach():``. Example:
    >>> masks = DropoutMaskSpace.for_model(model, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    >>> with masks.attach():
    ...     result = GradientInversion(model, "dia").run(grads, y, PixelSpace((1, 1, 8, 8)), extra=[masks])
    """

    def __init__(self, layers: Sequence[MaskableDropout], shapes: Sequence[Sequence[int]],
                 init: str | Sequence[Tensor] = "bernoulli", mask_reg: float = 1e-4,
                 generator: torch.Generator | None = None, device=None, dtype=None) -> None:
        self.layers = _layer_list(layers)
        shapes = [tuple(int(s) for s in sh) for sh in shapes]
        if len(shapes) != len(self.layers):
            raise ValueError(f"shapes has {len(shapes)} entries but {len(self.layers)} layers were given")
        if not self.layers:
            raise ValueError("layers is empty: a mask space needs at least one MaskableDropout with p > 0")
        for i, sh in enumerate(shapes):
            if len(sh) < 2 or min(sh) < 1:
                raise ValueError(f"shapes[{i}] must be (N, ...) with positive sizes, got {sh}")
        if len({sh[0] for sh in shapes}) != 1:
            raise ValueError(f"every mask must have the same batch size, got shapes {shapes}")
        self.mask_reg = real_scalar("mask_reg", mask_reg, nonneg=True)
        if isinstance(init, str):
            dtype = dtype or torch.get_default_dtype()
            if init not in MASK_INITS:
                raise ValueError(f"init must be one of {MASK_INITS} or a list of tensors, got {init!r}")
            masks = []
            for layer, sh in zip(self.layers, shapes):
                keep = 1.0 - float(layer.p)
                if init == "bernoulli":
                    probs = torch.full(sh, keep, dtype=dtype)
                    m = torch.bernoulli(probs, generator=generator).to(device)
                elif init == "keep_prob":
                    m = torch.full(sh, keep, dtype=dtype, device=device)
                else:
                    m = torch.ones(sh, dtype=dtype, device=device)
                masks.append(m)
        else:
            masks = list(init)
            if len(masks) != len(self.layers):
                raise ValueError(f"init has {len(masks)} tensors but {len(self.layers)} layers were given")
            for i, (m, sh) in enumerate(zip(masks, shapes)):
                if not isinstance(m, Tensor) or tuple(m.shape) != sh:
                    raise ValueError(f"init[{i}] must be a tensor of shape {sh}, got "
                                     f"{getattr(m, 'shape', type(m).__name__)}")
            masks = [m.detach().to(device=device or m.device, dtype=dtype if dtype is not None else m.dtype)
                     .clamp(0, 1) for m in masks]
        self.masks = [m.clone().requires_grad_(True) for m in masks]

    @classmethod
    def for_model(cls, model: nn.Module, input_shape: Sequence[int], init: str | Sequence[Tensor] = "bernoulli",
                  mask_reg: float = 1e-4, generator: torch.Generator | None = None) -> "DropoutMaskSpace":
        """Masks for every MaskableDropout of ``model`` with p > 0, shaped by one probe forward of ``input_shape``."""
        layers = maskable_dropouts(model)
        shapes = activation_shapes(model, input_shape)
        keep = [(l, s) for l, s in zip(layers, shapes) if l.p > 0 and s is not None]
        if not keep:
            raise ValueError("model has no MaskableDropout layer with p > 0 (nothing to invert; use plain IG)")
        p0 = next(model.parameters(), None)
        return cls([l for l, _ in keep], [s for _, s in keep], init=init, mask_reg=mask_reg, generator=generator,
                   device=p0.device if p0 is not None else None,
                   dtype=p0.dtype if p0 is not None and p0.is_floating_point() else None)

    @property
    def batch_size(self) -> int:
        return int(self.masks[0].shape[0])

    # ------------------------------------------------------------------ SearchSpace
    def parameters(self) -> list[Tensor]:
        return list(self.masks)

    def signed_parameters(self) -> list[Tensor]:
        return []  # the paper signs the data gradient only

    def render(self) -> Tensor:
        raise NotImplementedError("DropoutMaskSpace holds extra unknowns (masks); it renders no input batch")

    def project(self) -> None:
        for m in self.masks:
            m.clamp_(0.0, 1.0)

    def regularizer(self) -> Tensor | float:
        if self.mask_reg == 0:
            return 0.0
        terms = [((1.0 - m.mean()) - float(l.p)).abs() for l, m in zip(self.layers, self.masks)]
        return self.mask_reg * torch.stack(terms).sum()

    def snapshot(self) -> dict[str, Tensor]:
        return {f"mask{i}": m.detach().clone() for i, m in enumerate(self.masks)}

    @contextlib.contextmanager
    def attach(self) -> Iterator["DropoutMaskSpace"]:
        """Route each layer through its mask (``"optimise"`` mode) inside the block; restore the layers on exit."""
        saved = [(l.mode, l.mask) for l in self.layers]
        try:
            for l, m in zip(self.layers, self.masks):
                l.optimise(m)
            yield self
        finally:
            for l, (mo, ma) in zip(self.layers, saved):
                l.mode, l.mask = mo, ma


def client_gradients(model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable | None = None,
                     params: Sequence[Tensor] | None = None, generator: torch.Generator | None = None
                     ) -> tuple[list[Tensor], list[Tensor | None]]:
    """What a client training with dropout shares, and the masks it drew (paper slug: dia).

    G* = grad_w loss_fn(f_w(x; M*), y) in train mode, M* ~ Bernoulli(1 - p) per MaskableDropout (drawn from
    ``generator`` if given, else the global RNG); returns ``(G*, [M*_l])``. The model's modes are restored;
    BatchNorm running statistics, if any, are updated as in a real client step.
    Example:
    >>> model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), MaskableDropout(0.5), nn.Linear(32, 10))
    >>> grads, masks = client_gradients(model, torch.rand(1, 64), torch.tensor([3]))
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        with dropout_mode(model, "record", generator=generator) as layers:
            grads = model_gradients(model, x, y, loss_fn, params)
            masks = [l.mask for l in layers]
    finally:
        for m, t in saved:
            m.training = t
    return [g.detach() for g in grads], masks


class DropoutInversionAttack:
    """DIA: gradient inversion with the client's dropout masks as joint unknowns (paper slug: dia).

    min_{x,M} 1 - cos(G(x, M), G*) + tv TV(x) + mask_reg sum_l |(1 - mean M_l) - p_l| (see module docstring).
    Runs :class:`GradientInversion` with a :class:`DropoutMaskSpace` as ``extra``; falls back to plain IG
    when every dropout layer has p = 0. Example:
    >>> attack = DropoutInversionAttack(model, preset="dia")
    >>> result = attack.run(grads, labels, PixelSpace((1, 1, 8, 8)))   # result.snapshots["extra0"]: masks
    """

    def __init__(self, model: nn.Module, preset: str | InversionPreset = "dia", loss_fn: Callable | None = None,
                 params: Sequence[Tensor] | None = None) -> None:
        self.inversion = GradientInversion(model, preset, loss_fn, params)
        self.model = model
        self.preset = self.inversion.preset
        self.layers = maskable_dropouts(model)
        if not self.layers:
            raise ValueError("model has no MaskableDropout layers: build it with gradkit.nn.maskable_dropout."
                             "MaskableDropout or call convert_dropout(model) so DIA can model the dropout masks")
        self.mask_reg = float(getattr(self.preset, "mask_reg", DIA_PRESET.mask_reg))
        self.mask_init = getattr(self.preset, "mask_init", DIA_PRESET.mask_init)

    @property
    def fallback(self) -> bool:
        """True when no dropout is active (every p = 0): the attack is plain IG, as in the paper's code."""
        return all(float(l.p) == 0.0 for l in self.layers)

    def masks_for(self, input_shape: Sequence[int], generator: torch.Generator | None = None) -> DropoutMaskSpace:
        """A fresh mask space for a victim batch of ``input_shape`` with this preset's init and weight."""
        return DropoutMaskSpace.for_model(self.model, input_shape, init=self.mask_init, mask_reg=self.mask_reg,
                                          generator=generator)

    def run(self, target_grads: Sequence[Tensor], labels: Tensor, space: SearchSpace,
            masks: DropoutMaskSpace | None = None, generator: torch.Generator | None = None,
            progress: Callable[[int, float], None] | None = None) -> InversionResult:
        """Invert ``target_grads`` over ``space`` and the masks (built from ``generator`` unless given)."""
        if not isinstance(space, SearchSpace):
            raise TypeError(f"space must be a SearchSpace, got {type(space).__name__}")
        if self.fallback:
            return self.inversion.run(target_grads, labels, space, progress=progress)
        with torch.no_grad():
            shape = tuple(space.render().shape)
        if masks is None:
            masks = self.masks_for(shape, generator)
        elif not isinstance(masks, DropoutMaskSpace):
            raise TypeError(f"masks must be a DropoutMaskSpace or None, got {type(masks).__name__}")
        n = labels.numel() if isinstance(labels, Tensor) else None
        if masks.batch_size != shape[0] or (n is not None and n != masks.batch_size):
            raise ValueError(f"the dropout masks are built for a victim batch of {masks.batch_size}, but the search "
                             f"space renders {shape[0]} inputs and {n} labels were given")
        with masks.attach():
            return self.inversion.run(target_grads, labels, space, extra=[masks], progress=progress)

    def run_white_box(self, target_grads: Sequence[Tensor], labels: Tensor, space: SearchSpace,
                      true_masks: Sequence[Tensor], progress: Callable[[int, float], None] | None = None
                      ) -> InversionResult:
        """The upper bound: the same attack with the client's true masks replayed (fixed, not optimised)."""
        with dropout_mode(self.model, "replay", masks=true_masks):
            return self.inversion.run(target_grads, labels, space, progress=progress)
