"""Annealed Gaussian gradient noise as a stateful gradient transform (gradient-noise, arXiv 1511.06807)."""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping

import torch

from .._validate import nonneg_int, optional_generator, param_list
from ..functional.noise import add_gradient_noise, dense_grads
from ..schedules.noise import annealed_noise_std
from .transform import GradientTransform, check_state_mapping

__all__ = ["GradientNoise"]

ORDERS = ("after_clip", "before_clip")


class GradientNoise(GradientTransform):
    """Add annealed Gaussian noise to gradients between ``backward()`` and ``optimizer.step()``.

    Paper: gradient-noise (Neelakantan et al., 2015). At update ``t = 0, 1, 2, ...``::

        g <- g + N(0, sigma_t^2 I),   sigma_t^2 = eta / (1 + t)^gamma

    i.i.d. per entry, one ``sigma_t`` for all parameters; the noisy gradient then feeds the
    optimizer (so with Adam the noise enters its moment estimates, as in the paper).

    A gradient transform (:mod:`gradkit.optim.transform`): ``gn(params)`` noises those gradients
    (``gn()`` / ``gn.apply()``: the params given at construction, which may be left out). Use it by
    hand after ``backward`` (after gradient accumulation), before ``step``; as
    ``wrap(optimizer, gn)``; as hooks, ``gn.attach(params)`` (runs at the end of each backward
    pass); or as ``optimizer.register_step_pre_hook(gn.hook)``. ``step_count`` (= ``t``) increases
    by one per call, i.e. once per optimizer update however many backward passes were accumulated
    (hooks: once per backward pass). ``state_dict()`` / ``load_state_dict()`` save and restore it
    and the generator's state: with a ``generator`` a reload continues bit-identically (with the
    global RNG, save ``torch.get_rng_state()`` yourself).

    ``clip_norm`` / ``order`` - the paper's order of clipping and noise is unconfirmed, so it is
    explicit: with ``clip_norm=c`` the transform also clips the total gradient 2-norm to ``c``,
    ``order="after_clip"`` (default) clips then adds noise (the noise is not clipped, as when a
    noise hook runs last), ``order="before_clip"`` adds noise then clips (the noisy gradient's
    norm is bounded by ``c``). Without ``clip_norm``, "after_clip" just means the noise is added
    to whatever gradient is there (clip yourself before ``apply()``), and "before_clip" raises.

    ``eta = 0`` draws no noise and leaves the gradients bit-identical. Noise is drawn in each
    gradient's dtype and on its device. A ``generator`` makes the noise reproducible; a generator
    on another device than the gradients (a CPU generator with CUDA gradients) still works - the
    noise is drawn on the generator's device and copied (device-independent, but slower); pass
    ``torch.Generator(device="cuda")`` for speed on GPU. Without a generator the global RNG of
    the gradient's device is used. With ``torch.amp.GradScaler`` call ``scaler.unscale_(opt)``
    before ``apply()`` (the step pre-hook form would see scaled gradients; ``wrap`` is unscaled).

    Example::

        gn = GradientNoise(eta=0.01, generator=torch.Generator().manual_seed(0))
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), gn)    # or: gn.attach(model.parameters())
        loss.backward(); opt.step()                                       # or by hand: gn(model.parameters())
    """

    def __init__(
        self,
        params: Any = None,
        eta: float = 0.01,
        gamma: float = 0.55,
        generator: torch.Generator | None = None,
        order: str = "after_clip",
        clip_norm: float | None = None,
    ) -> None:
        self.params = None if params is None else param_list(params, "GradientNoise")
        annealed_noise_std(0, eta, gamma)  # validates eta and gamma (names them in the error)
        self.eta = float(eta)
        self.gamma = float(gamma)
        optional_generator(generator)
        self.generator = generator
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if clip_norm is not None:
            if isinstance(clip_norm, bool) or not isinstance(clip_norm, Real):
                raise TypeError(f"clip_norm must be a positive number or None, got {clip_norm!r}")
            if not math.isfinite(float(clip_norm)) or float(clip_norm) <= 0:
                raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm!r}")
            clip_norm = float(clip_norm)
        elif order == "before_clip":
            raise ValueError(
                "order='before_clip' needs clip_norm (noise then clip is only defined when this "
                "transform clips); got clip_norm=None"
            )
        self.order = order
        self.clip_norm = clip_norm
        self._step_count = 0

    @property
    def step_count(self) -> int:
        """Number of ``apply()`` calls so far: the ``t`` of the next noise draw."""
        return self._step_count

    def std(self, t: int | None = None) -> float:
        """``sigma_t = sqrt(eta / (1 + t)^gamma)`` at ``t`` (default: the next step)."""
        return annealed_noise_std(self._step_count if t is None else t, self.eta, self.gamma)

    def _clip(self, params: list[torch.Tensor]) -> None:
        if self.clip_norm is not None:
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, self.clip_norm)

    def _noise(self, params: list[torch.Tensor], std: float) -> None:
        add_gradient_noise(params, std, self.generator)

    def __call__(self, params: Any = None) -> float:
        """Clip/noise the gradients of ``params`` in place (per ``order``), advance ``t``; return ``sigma_t``.

        ``params=None``: the params given at construction.
        """
        plist = self._resolve_params(params)
        dense_grads(plist)  # reject sparse gradients before touching anything
        std = self.std()
        if self.order == "after_clip":
            self._clip(plist)
            self._noise(plist, std)
        else:
            self._noise(plist, std)
            self._clip(plist)
        self._step_count += 1
        return std

    def apply(self) -> float:
        """Clip/noise the construction-time params' gradients in place, advance ``t``; return ``sigma_t``."""
        return self(None)

    def hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """``optimizer.register_step_pre_hook(gn.hook)``: runs :meth:`apply` before each step."""
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        """``{"step_count": t}`` plus ``"generator_state"`` (a CPU uint8 tensor) when a generator was given."""
        sd: dict[str, Any] = {"step_count": self._step_count}
        if self.generator is not None:
            sd["generator_state"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``step_count`` and, if saved, the generator's state (which then needs a generator)."""
        check_state_mapping(state_dict, "GradientNoise")
        if "step_count" not in state_dict:
            raise ValueError(f"state_dict must be a mapping with a 'step_count' key, got {state_dict!r}")
        n = state_dict["step_count"]
        n = nonneg_int("state_dict['step_count']", n)
        gs = state_dict.get("generator_state")
        if gs is not None:
            if self.generator is None:
                raise ValueError("state_dict has a 'generator_state' but this GradientNoise has no generator "
                                 "(pass generator=torch.Generator(...) to resume its noise stream)")
            if not isinstance(gs, torch.Tensor) or gs.dtype != torch.uint8:
                raise TypeError(f"state_dict['generator_state'] must be a uint8 tensor, got {type(gs).__name__}")
            self.generator.set_state(gs.cpu())
        self._step_count = n

    def __repr__(self) -> str:
        clip = f", clip_norm={self.clip_norm:g}, order={self.order!r}" if self.clip_norm is not None else ""
        return (f"GradientNoise(eta={self.eta:g}, gamma={self.gamma:g}, step_count={self._step_count}"
                f", params={'None' if self.params is None else len(self.params)}{clip})")
