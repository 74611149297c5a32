"""Shared lifetime of forward-hook probes: install on ``with``, always remove (exceptions included)."""
from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from .._validate import ArgumentError


def resolve_layers(model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module]) -> dict[str, nn.Module]:
    """``{name: module}`` for layers given by name or as submodules of ``model``, in the order given.

    Clear errors for a model that is not a module, an empty list, a name the model does not have (the
    error lists its modules), a module that is not part of the model, and a layer named twice.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise ArgumentError(f"layers must be a module name, a module or a list of them, got "
                            f"{type(layers).__name__}") from None
    if not layers:
        raise ArgumentError("layers must name at least one module, got an empty list")
    named = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, str):
            if layer not in named:
                shown = ", ".join(repr(n) for n in list(named)[:16])
                raise ArgumentError(f"layer {layer!r} not found in the model; its modules are: {shown}"
                                    f"{' ...' if len(named) > 16 else ''}")
            key = layer
        elif isinstance(layer, nn.Module):
            key = next((n for n, m in named.items() if m is layer), None)
            if key is None:
                raise ArgumentError(f"layers[{i}] ({type(layer).__name__}) is not a submodule of the model")
        else:
            raise ArgumentError(f"layers[{i}] must be a module name (str) or an nn.Module, got {type(layer).__name__}")
        if key in out:
            raise ArgumentError(f"layer {key!r} is named twice")
        out[key] = named[key]
    return out


class HookProbe:
    """Base of probes that read modules through forward hooks.

    Subclasses set ``self._handles = []`` and implement :meth:`_hooks`, the ``(module, hook)`` pairs to
    install. Entering installs them (a partial install is undone if one fails); leaving, or
    :meth:`remove`, removes every one of them.
    """

    _handles: list

    def _hooks(self) -> Iterable[tuple[nn.Module, object]]:
        raise NotImplementedError

    def __enter__(self):
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already active")
        try:
            for module, hook in self._hooks():
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this probe installed (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
