"""Per-example gradients of any ``nn.Module``: one gradient per training example (paper slug: generalization-mystery).

For a batch of b examples z_i = (x_i, y_i) and a loss ``loss_fn(model(x_i), y_i)`` evaluated on each example
alone, :func:`per_example_grads` returns, for every selected parameter w of shape S, a tensor of shape (b, *S)
whose row i is

    g_i = d loss_fn(f(x_i; w), y_i) / d w            so that   sum_i g_i = d (sum_i loss_i) / d w.

Three ways to compute it, with the same result up to rounding:

- ``method="vmap"`` (default): ``torch.func.vmap(torch.func.grad(loss of one example))`` over the batch,
  with :func:`torch.func.functional_call`; works for any model that does not mix examples (``chunk_size``
  bounds the memory of the vectorised call).
- ``method="linear"``: the outer-product rule for ``nn.Linear`` layers (as opacus does): one ordinary
  forward, the gradient of sum_i loss_i with respect to each layer's output, then
  dW_i = sum_t dout_{i,t} x_{i,t}^T and db_i = sum_t dout_{i,t} over any middle (sequence) dims. Much
  cheaper for MLPs; every selected parameter must belong to an ``nn.Linear`` whose input has the example
  index first.
- ``method="loop"``: one ``torch.autograd.grad`` per example on the real module, the naive reference.

A model that mixes the examples of a batch (``BatchNorm`` in training mode) has no per-example gradients:
it is refused; put it in eval mode or use ``GroupNorm``/``LayerNorm``. Example::

    grads = per_example_grads(model, nn.functional.cross_entropy, x, y)      # {name: (b, *param.shape)}
    total = {n: g.sum(0) for n, g in grads.items()}                          # = grad of the summed loss
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .._validate import ArgumentError, choice, positive_int, tensor
from ._hooks import HookProbe

__all__ = ["per_example_grads", "check_per_example_model", "METHODS"]

METHODS = ("vmap", "linear", "loop")
LossFn = Callable[[Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------ checks
def check_per_example_model(model: nn.Module) -> nn.Module:
    """``model`` must be an ``nn.Module`` none of whose BatchNorm layers is in training mode."""
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"model.{name or '<root>'} is a {type(m).__name__} in training mode: it mixes the "
                             "examples of a batch, so per-example gradients do not exist; call model.eval() "
                             "(or that layer's .eval()) or use GroupNorm/LayerNorm")
    return model


def _check_batch(x: Tensor, y: Tensor) -> int:
    tensor("x", x, min_dim=1)
    tensor("y", y, min_dim=1)
    b = x.shape[0]
    if b < 1:
        raise ArgumentError(f"x must hold at least one example, got shape {tuple(x.shape)}")
    if y.shape[0] != b:
        raise ArgumentError(f"y must have one row per example of x ({b}), got shape {tuple(y.shape)}")
    return b


def _selected(model: nn.Module, params: Iterable[str] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        sel = {n: p for n, p in named.items() if p.requires_grad}
        if not sel:
            raise ValueError("model has no parameter that requires grad: nothing to differentiate")
        return sel
    if isinstance(params, str):
        raise ArgumentError(f"params must be None or an iterable of parameter names, got the string {params!r} "
                            f"(use [{params!r}])")
    names = list(params)
    if not names:
        raise ArgumentError("params must name at least one parameter, got an empty list")
    for n in names:
        if not isinstance(n, str) or n not in named:
            raise ArgumentError(f"params: {n!r} is not a parameter of the model (parameters: {sorted(named)})")
    return {n: named[n] for n in dict.fromkeys(names)}


def _check_losses(losses: Tensor, b: int) -> None:
    if losses.shape != (b,):
        raise ValueError(f"loss_fn must return a scalar per example, got per-example losses of shape "
                         f"{tuple(losses.shape)} for {b} examples")
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"loss_fn gave a non-finite loss ({losses[i].item()}) for example {i} "
                         f"({int(bad.sum())} of {b} non-finite): its per-example gradient is not defined; "
                         "check the inputs and the model for NaN/inf")


def _one_example(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    """loss_fn applied to one example as a batch of one."""
    def one(out: Tensor, target: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), target.unsqueeze(0))
    return one


def _batched_losses(loss_fn: LossFn, output: Tensor, y: Tensor) -> Tensor:
    """Per-example losses ``[loss_fn(output[i:i+1], y[i:i+1]) for i]`` as one vectorised, differentiable call."""
    return vmap(_one_example(loss_fn))(output, y)


# ------------------------------------------------------------------------------------------ methods
def _vmap_grads(model, loss_fn, x, y, sel, chunk_size, randomness):
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in sel}
    buffers = dict(model.named_buffers())

    def loss_of(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (params, frozen, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    fn = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0), chunk_size=chunk_size, randomness=randomness)
    with torch.enable_grad():
        grads, losses = fn({n: p.detach() for n, p in sel.items()}, x, y)
    return grads, losses


def _loop_grads(model, loss_fn, x, y, sel):
    names, params = list(sel), list(sel.values())
    rows: dict[str, list[Tensor]] = {n: [] for n in names}
    losses = []
    with torch.enable_grad():
        for i in range(x.shape[0]):
            loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar per example, got shape {tuple(loss.shape)}")
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            for n, p, g in zip(names, params, gs):
                rows[n].append(torch.zeros_like(p) if g is None else g.detach())
            losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


class _LinearCapture(HookProbe):
    """Forward hooks recording every call's (input, output) of the given Linear modules."""

    def __init__(self, modules: Mapping[str, nn.Linear]) -> None:
        self.modules = dict(modules)
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in self.modules}
        self._handles: list = []

    def _hooks(self):
        def make(name: str):
            def hook(module, inputs, output):
                self.calls[name].append((inputs[0], output))
            return hook
        return [(m, make(n)) for n, m in self.modules.items()]


def _linear_owners(model: nn.Module, sel: Mapping[str, Tensor]) -> tuple[dict[str, nn.Linear], dict[str, tuple]]:
    owners: dict[str, nn.Linear] = {}
    where: dict[str, tuple[str, str]] = {}
    for n in sel:
        mod_name, _, attr = n.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if not isinstance(mod, nn.Linear) or attr not in ("weight", "bias"):
            raise ValueError(f"method='linear' needs every parameter to be an nn.Linear weight or bias; {n!r} "
                             f"belongs to a {type(mod).__name__}: use method='vmap' (or select params)")
        if not sel[n].requires_grad:
            raise ValueError(f"method='linear' needs the parameters to require grad; {n!r} does not "
                             "(use method='vmap')")
        owners[mod_name] = mod
        where[n] = (mod_name, attr)
    return owners, where


def _linear_grads(model, loss_fn, x, y, sel):
    owners, where = _linear_owners(model, sel)
    b = x.shape[0]
    with torch.enable_grad(), _LinearCapture(owners) as cap:
        out = model(x)
        losses = _batched_losses(loss_fn, out, y)
        _check_losses(losses, b)
        calls = [(mn, i, o) for mn, cs in cap.calls.items() for i, o in cs]
        missing = [mn for mn, cs in cap.calls.items() if not cs]
        if missing:
            raise ValueError(f"method='linear': the modules {missing} were not called in the forward pass "
                             "(or were called through F.linear): use method='vmap'")
        for mn, inp, _ in calls:
            if inp.dim() < 2 or inp.shape[0] != b:
                raise ValueError(f"method='linear': model.{mn} got an input of shape {tuple(inp.shape)} whose "
                                 f"first dim is not the {b} examples: use method='vmap'")
        douts = torch.autograd.grad(losses.sum(), [o for _, _, o in calls], allow_unused=True)
    acc: dict[str, dict[str, Tensor]] = {mn: {} for mn in owners}
    for (mn, inp, o), d in zip(calls, douts):
        if d is None:
            continue
        d3, x3 = d.reshape(b, -1, d.shape[-1]), inp.detach().reshape(b, -1, inp.shape[-1])
        parts = {"weight": torch.bmm(d3.transpose(1, 2), x3), "bias": d3.sum(1)}
        for attr, v in parts.items():
            acc[mn][attr] = acc[mn][attr] + v if attr in acc[mn] else v
    grads = {}
    for n, (mn, attr) in where.items():
        g = acc[mn].get(attr)
        grads[n] = (g if g is not None else sel[n].new_zeros((b, *sel[n].shape))).to(sel[n].dtype)
    return grads, losses.detach()


# ------------------------------------------------------------------------------------------ public
def per_example_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Iterable[str] | None = None,
                      *, method: str = "vmap", chunk_size: int | None = None, randomness: str = "different",
                      return_losses: bool = False) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients ``{name: Tensor[b, *param.shape]}`` of ``loss_fn(model(x_i), y_i)`` (generalization-mystery).

    loss_fn(output, target) -> scalar is called on each example as a batch of one (shapes (1, ...)), so a
    mean-reduced loss such as ``F.cross_entropy`` is the per-example loss; sum_i g_i is the gradient of the
    summed loss. params: names of the parameters to differentiate (default: every one that requires grad);
    the others and the buffers are held fixed. method: ``"vmap"`` (torch.func, any model), ``"linear"``
    (outer-product rule, nn.Linear parameters only, fastest for MLPs) or ``"loop"`` (one backward per
    example, the reference). chunk_size: examples per vectorised call (vmap only; None: all at once).
    randomness: vmap's treatment of random ops such as dropout (``"different"`` per example, like a batch
    forward; ``"same"``; ``"error"``). return_losses: also return the per-example losses (b,).
    The model's ``.grad`` fields are not touched. Raises ValueError for a BatchNorm in training mode
    and for a non-finite per-example loss (naming the example).

    Example::

        g = per_example_grads(model, F.cross_entropy, x, y)          # g["0.weight"].shape == (b, out, in)
        g = per_example_grads(mlp, F.cross_entropy, x, y, method="linear")
    """
    check_per_example_model(model)
    if not callable(loss_fn):
        raise ArgumentError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
    b = _check_batch(x, y)
    choice("method", method, METHODS)
    choice("randomness", randomness, ("different", "same", "error"))
    if chunk_size is not None:
        positive_int("chunk_size", chunk_size)
    sel = _selected(model, params)
    if method == "vmap":
        grads, losses = _vmap_grads(model, loss_fn, x, y, sel, chunk_size, randomness)
    elif method == "linear":
        grads, losses = _linear_grads(model, loss_fn, x, y, sel)
    else:
        grads, losses = _loop_grads(model, loss_fn, x, y, sel)
    _check_losses(losses, b)
    grads = {n: g.detach() for n, g in grads.items()}
    return (grads, losses.detach()) if return_losses else grads
