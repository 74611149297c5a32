"""Shared lifetime of forward-hook probes: install on ``with``, always remove (exceptions included)."""
from __future__ import annotations

from typing import Iterable

from torch import nn


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
