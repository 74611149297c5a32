"""How strongly each layer's representation responds to known feature directions (paper slug: projection-head).

For feature directions mu_j (rows of ``directions``) and layers l, the weight of feature j at layer l is

    w[l, j] = || f_l(x0 + mu_j) - f_l(x0) ||

with f_l the output of layer l and x0 a base input (zeros by default). For a bias-free linear network this is
exactly || W_l ... W_1 mu_j ||, the feature weighting of the analysis: balanced two-layer training makes the
first layer weight feature j by the square root of the end-to-end weight (w_pre_j = sqrt(w_post_j)).

>>> net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
>>> feature_weights(net, torch.eye(4), layers=["0", "1"]).shape
torch.Size([2, 4])
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, tensor
from ._hooks import HookProbe, resolve_layers

__all__ = ["feature_weights", "LayerOutputs"]


class LayerOutputs(HookProbe):
    """Record the outputs of named layers during a forward pass; hooks removed on exit, exceptions included.

    A layer that runs several times in one forward keeps its last output.

    >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    >>> with LayerOutputs(net, ["0"]) as rec:
    ...     _ = net(torch.randn(1, 3))
    >>> rec.outputs["0"].shape
    torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module]) -> None:
        self.layers = resolve_layers(model, layers)
        self.outputs: dict[str, Tensor] = {}
        self._handles = []

    def _hooks(self):
        for name, module in self.layers.items():
            def hook(_m, _inp, out, name=name):
                self.outputs[name] = out.detach()
            yield module, hook


@torch.no_grad()
def feature_weights(model: nn.Module, directions: Tensor, layers: str | nn.Module | Sequence[str | nn.Module],
                    base: Tensor | None = None) -> Tensor:
    """``w[l, j] = ||f_l(base + directions[j]) - f_l(base)||`` for every layer l (rows, in the order given).

    model: any module taking (N, d) inputs; directions: (k, d) feature directions; layers: module names or
    submodules of ``model`` whose outputs are read; base: a (d,) base input (zeros by default).
    Returns a (len(layers), k) tensor.

    >>> net = nn.Sequential(nn.Linear(3, 3, bias=False))
    >>> with torch.no_grad(): _ = net[0].weight.copy_(torch.diag(torch.tensor([3.0, -2.0, 0.5])))
    >>> feature_weights(net, torch.eye(3), layers="0")
    tensor([[3.0000, 2.0000, 0.5000]])
    """
    tensor("directions", directions, floating=True, finite=True)
    if directions.dim() != 2 or directions.shape[0] < 1:
        raise ArgumentError(f"directions must be a (k, d) matrix with k >= 1, got shape {tuple(directions.shape)}")
    if base is None:
        base = torch.zeros(directions.shape[1], dtype=directions.dtype, device=directions.device)
    tensor("base", base, floating=True, finite=True)
    if base.shape != directions.shape[1:]:
        raise ArgumentError(f"base must have shape ({directions.shape[1]},) like one direction, got "
                            f"{tuple(base.shape)}")
    x = torch.cat([base[None], base[None] + directions])
    probe = LayerOutputs(model, layers)
    was_training = model.training
    model.eval()
    try:
        with probe:
            model(x)
    finally:
        model.train(was_training)
    rows = []
    for name in probe.layers:
        if name not in probe.outputs:
            raise ArgumentError(f"layer {name!r} did not run in the model's forward pass")
        out = probe.outputs[name].flatten(1)
        rows.append((out[1:] - out[:1]).norm(dim=1))
    return torch.stack(rows)
