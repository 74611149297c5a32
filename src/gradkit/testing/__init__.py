"""Public oracles for checking gradient components (yours or gradkit's).

- :func:`param_grads` / :func:`assert_same_grads`: gradients of two models or two losses agree.
- :class:`SavedBytesMeter`: exact bytes autograd saves for backward (via saved-tensor hooks).
- :func:`count_hooks` / :func:`assert_no_hooks_left`: a probe removed every hook it installed.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable

import torch
from torch import nn


def param_grads(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of ``loss_fn(model)`` w.r.t. every trainable parameter (the model's .grad is untouched)."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss_fn(model), params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, grads)}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, rtol: float = 1e-6,
                      atol: float = 1e-8) -> None:
    """Raise AssertionError naming the first parameter whose gradients differ."""
    if set(a) != set(b):
        raise AssertionError(f"different parameter sets: {sorted(set(a) ^ set(b))}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise AssertionError(f"{k}: shapes differ {tuple(a[k].shape)} vs {tuple(b[k].shape)}")
        if not torch.allclose(a[k], b[k], rtol=rtol, atol=atol):
            err = (a[k] - b[k]).abs().max().item()
            raise AssertionError(f"{k}: gradients differ (max abs diff {err:.3g}, rtol={rtol}, atol={atol})")


class SavedBytesMeter:
    """Counts the bytes of tensors autograd saves for backward inside the ``with`` block.

    Parameters (leaf tensors that require grad) are not counted: they are stored anyway.
    Storage shared by several saved tensors is counted once.

    >>> with SavedBytesMeter() as m:
    ...     y = (torch.randn(10, requires_grad=True) * 2).sin().sum()
    >>> m.bytes > 0
    True
    """

    def __init__(self, count_parameters: bool = False) -> None:
        self.count_parameters = count_parameters
        self.bytes = 0
        self.tensors = 0
        self._seen: set[int] = set()
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        if self.count_parameters or not (t.is_leaf and t.requires_grad):
            try:
                key = t.untyped_storage().data_ptr()
                size = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                key, size = id(t), t.numel() * t.element_size()
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += size
            self.tensors += 1
        return t

    def __enter__(self) -> "SavedBytesMeter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def count_hooks(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Number of forward/backward hooks registered on a module tree (and its parameters' tensor hooks)."""
    mods = list(modules.modules()) if isinstance(modules, nn.Module) else list(modules)
    n = 0
    for m in mods:
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            n += len(getattr(m, attr, {}) or {})
        for p in m.parameters(recurse=False):
            n += len(getattr(p, "_backward_hooks", None) or {})
            n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def assert_no_hooks_left(model: nn.Module, before: int = 0) -> None:
    """Raise AssertionError if ``model`` holds more hooks than ``before``."""
    now = count_hooks(model)
    if now != before:
        raise AssertionError(f"{now - before} hook(s) left on the model (had {before}, now {now})")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (the profiler prints start/stop lines there) for the enclosed call."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (captured): nothing to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


class RetainedBytesMeter:
    """Net bytes allocated inside the ``with`` block and still held when it ends (CPU and CUDA).

    Saved-tensor hooks (:class:`SavedBytesMeter`) see only what autograd saves through them; state that a
    custom Function keeps on ``ctx`` (RNG states, Python lists of tensors) or that modules keep escapes
    them. This meter reads PyTorch's profiler memory records instead: every allocation minus every free in
    the block, so outputs, saved tensors and any other kept state all count. Run the forward (and keep its
    output) inside the block; compare two models by the difference or the ratio.

    >>> with RetainedBytesMeter() as m:
    ...     y = (torch.randn(1000, requires_grad=True) * 2).sin()
    >>> m.bytes >= 4000
    True
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._prof = None

    def __enter__(self) -> "RetainedBytesMeter":
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts, profile_memory=True)
        with _quiet_stderr():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        with _quiet_stderr():
            self._prof.__exit__(*exc)
        stats = self._prof.key_averages()
        self.bytes = int(sum(e.self_cpu_memory_usage for e in stats)
                         + sum(getattr(e, "self_device_memory_usage", 0) or 0 for e in stats))


__all__ = ["param_grads", "assert_same_grads", "SavedBytesMeter", "RetainedBytesMeter", "count_hooks",
           "assert_no_hooks_left"]
