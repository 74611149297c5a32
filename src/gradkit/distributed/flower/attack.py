"""The honest-but-curious server: invert each accepted client update with gradkit's GradientInversion.

Paper slug: hyperfl (threat model: the server sees what a client shares). A FedAvg client that ran
``steps`` plain SGD steps with learning rate ``lr`` from the global weights ``w`` sends ``w'``; the
server's estimate of the client's gradient is

    g = (w - w') / (lr * steps)        exact for one step of SGD without momentum or weight decay

and the attack searches inputs x whose gradient at ``w`` matches g (cosine distance, TV prior,
signed Adam: the Inverting Gradients preset ``"ig"``), with labels read off the last linear layer
(iDLG). Plug it into :class:`GradkitFedAvg` as ``on_update``.

Example::

    spy = InversionObserver(make_model("fedavg"), input_shape=(1, 8, 8), lr=0.05, iters=200)
    strategy = GradkitFedAvg(on_update=spy)
    ...; spy.results[0].x        # the reconstruction of the first accepted update
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..._validate import is_int, positive_int, real_in
from ..federated import FedAvgClient
from ...privacy import PRESETS, GradientInversion, InversionPreset, PixelSpace, infer_labels

__all__ = ["InversionObserver", "ObservedReconstruction", "update_to_gradients"]


@dataclass
class ObservedReconstruction:
    """One attack on one client update: round, client, reconstruction ``x``, inferred labels, match loss."""

    server_round: int
    client_id: int
    x: torch.Tensor
    labels: torch.Tensor
    match_loss: float


def update_to_gradients(model: nn.Module, arrays: Mapping[str, torch.Tensor],
                        global_arrays: Mapping[str, torch.Tensor], lr: float, steps: int = 1
                        ) -> list[torch.Tensor]:
    """``(w - w') / (lr * steps)`` for every trainable parameter of ``model``, in ``model.parameters()`` order."""
    lr = real_in("lr", lr, 0.0, low_open=True)
    steps = positive_int("steps", steps)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name not in arrays or name not in global_arrays:
            raise KeyError(f"parameter {name!r} is not in the shared update: the server cannot estimate its "
                           "gradient (this attack needs every weight on the wire, i.e. FedAvg)")
        d = (global_arrays[name].to(p) - arrays[name].to(p)) / (lr * steps)
        out.append(d)
    return out


def _last_linear_index(model: nn.Module) -> int:
    """Index, in the trainable-parameter list, of the weight of the last ``nn.Linear`` module."""
    ids = [id(p) for p in model.parameters() if p.requires_grad]
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.requires_grad:
            last = m.weight
    if last is None:
        raise ValueError("model has no trainable nn.Linear layer to infer labels from; pass labels explicitly")
    return ids.index(id(last))


class InversionObserver:
    """An ``on_update`` observer that runs a gradient inversion on every (or every selected) client update.

    ``model``: the architecture the clients train, e.g. a ``FedAvgClient`` (a private copy gets each
    round's global arrays; array keys are its ``state_dict`` keys, a FedAvgClient's wrapped model's). ``input_shape``: one input's shape, e.g. ``(1, 8, 8)``. ``lr``, ``steps``:
    the clients' local SGD learning rate and step count (to turn an update into a gradient).
    ``num_images``: the victim batch size the attacker assumes. ``preset``: an inversion preset or its
    name (default ``"ig"``); ``iters`` overrides its iteration count. ``labels``: fixed labels instead of
    the iDLG read-out. ``select(server_round, client_id) -> bool``: which updates to attack (default all).
    ``clamp``: the valid input range. Results accumulate in ``results``.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, lr: float, steps: int = 1,
                 num_images: int = 1, preset: str | InversionPreset = "ig", iters: int | None = None,
                 labels: torch.Tensor | None = None, select=None, clamp: tuple[float, float] | None = (0.0, 1.0),
                 seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
        if not shape or not all(is_int(s, low=1) for s in shape):
            raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
        num_images = positive_int("num_images", num_images)
        if select is not None and not callable(select):
            raise TypeError(f"select must be callable or None, got {type(select).__name__}")
        p = PRESETS.get(preset) if isinstance(preset, str) else preset
        if not isinstance(p, InversionPreset):
            raise TypeError(f"preset must be an InversionPreset or a registered name, got {type(preset).__name__}")
        if iters is not None:
            p = dataclasses.replace(p, iters=iters)  # validated by InversionPreset
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dim() != 1
                                   or labels.numel() != num_images or labels.is_floating_point()):
            raise ValueError(f"labels must be a 1-D integer tensor of num_images={num_images} classes, got {labels!r}")
        real_in("lr", lr, 0.0, low_open=True)
        steps = positive_int("steps", steps)
        if isinstance(model, FedAvgClient):  # its shared state is the wrapped model's state_dict
            model = model.model
        self.model = copy.deepcopy(model)
        self.input_shape, self.lr, self.steps, self.num_images = shape, float(lr), steps, num_images
        self.preset, self.labels, self.select, self.clamp, self.seed = p, labels, select, clamp, seed
        self._label_index = None if labels is not None else _last_linear_index(self.model)
        self.results: list[ObservedReconstruction] = []

    def __call__(self, server_round: int, client_id: int, arrays: Mapping[str, torch.Tensor],
                 global_arrays: Mapping[str, torch.Tensor]) -> ObservedReconstruction | None:
        if self.select is not None and not self.select(server_round, client_id):
            return None
        model = self.model
        ref = next(model.parameters())
        with torch.no_grad():
            state = model.state_dict()
            for k, v in global_arrays.items():
                if k in state:
                    state[k].copy_(v.to(state[k]))
        grads = update_to_gradients(model, arrays, global_arrays, self.lr, self.steps)
        labels = self.labels if self.labels is not None else infer_labels(grads[self._label_index], self.num_images)
        gen = torch.Generator(device=ref.device).manual_seed(self.seed + 1000 * server_round + client_id % 1000)
        space = PixelSpace((self.num_images, *self.input_shape), init="rand", clamp=self.clamp, generator=gen,
                           device=ref.device, dtype=ref.dtype)
        res = GradientInversion(model, self.preset).run(grads, labels.to(ref.device), space)
        out = ObservedReconstruction(server_round, client_id, res.x.detach().cpu(), labels.detach().cpu(),
                                     float(res.match_loss))
        self.results.append(out)
        return out
