"""One generic gradient-inversion attacker, its search spaces and per-paper presets.

An honest-but-curious server holds a client's shared gradient G* = dL(f_w(x*), y*)/dw and the model f_w.
The attacker searches inputs x whose gradient matches it:

    min_x  D(dL(f_w(x), y)/dw, G*) + tv * TV(x) + image_norm * ||x||_2 / numel(x_i) + R(space)

with D the cosine or squared-L2 distance (``matching.gradient_distance``), Adam on the search variables,
the sign of the data gradient (Inverting Gradients), and the best-matching iterate kept. What is searched is
a :class:`SearchSpace`: pixels (:class:`PixelSpace`), a generator's latent (:class:`LatentSpace`) or, in
papers that need it, a generator's features or the client's dropout masks (subclasses in their modules).
Every paper freezes its settings as an :class:`InversionPreset` (``PRESETS``).

>>> attack = GradientInversion(model, preset="ig")
>>> result = attack.run(shared_grads, labels, PixelSpace((1, 1, 8, 8)))
>>> reconstruction_metrics(x_true, result.x)["psnr"]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .._validate import choice, integer, is_int, positive_int, real_in, real_scalar
from ..registry import Registry
from .matching import COSTS, check_gradients, gradient_distance, model_gradients, total_variation

__all__ = ["InversionPreset", "PRESETS", "register_preset", "SearchSpace", "PixelSpace", "LatentSpace",
           "GradientInversion", "InversionResult", "SCHEDULES", "MODEL_MODES"]

SCHEDULES = ("none", "multistep", "cosine_warmup", "plateau")
MODEL_MODES = ("eval", "train", "as_is")


@dataclass(frozen=True)
class InversionPreset:
    """Every setting of a gradient-inversion attack, frozen (one per paper).

    cost: ``"cosine"`` or ``"l2"`` gradient distance. tv / image_norm: prior weights. lr, iters: Adam.
    signed: replace the data gradient by its sign. keep_best: return the iterate with the lowest
    matching loss (else the last). model_mode: the victim model's mode during the attack (``"eval"``,
    ``"train"`` or ``"as_is"``), restored afterwards. schedule: ``"none"``, ``"multistep"`` (x0.1 at 3/8,
    5/8, 7/8 of the iterations, Inverting Gradients), ``"cosine_warmup"`` (GIFD's warm-up + cosine
    decay) or ``"plateau"`` (lr x0.1 after ``plateau_patience`` iterations without a lower matching loss,
    as ReduceLROnPlateau). early_stop: stop once the matching loss is below it (0 = never). patience:
    stop after that many iterations without a new best matching loss (0 = never). max_batch: the
    largest victim batch the preset is meant for (None = any).
    """

    name: str
    cost: str = "cosine"
    tv: float = 1e-4
    image_norm: float = 0.0
    lr: float = 0.1
    iters: int = 400
    signed: bool = True
    keep_best: bool = True
    model_mode: str = "eval"
    schedule: str = "none"
    early_stop: float = 0.0
    max_batch: int | None = None
    plateau_patience: int = 800
    patience: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        choice("cost", self.cost, COSTS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("model_mode", self.model_mode, MODEL_MODES)
        for k in ("tv", "image_norm", "early_stop"):
            real_scalar(k, getattr(self, k), nonneg=True)
        real_in("lr", self.lr, 0.0, low_open=True)
        positive_int("iters", self.iters)
        for k in ("plateau_patience", "patience"):
            integer(k, getattr(self, k), low=0)
        if self.max_batch is not None and not is_int(self.max_batch, low=1):
            raise ValueError(f"max_batch must be a positive int or None, got {self.max_batch!r}")


PRESETS: Registry[InversionPreset] = Registry("inversion preset")


def register_preset(preset: InversionPreset) -> InversionPreset:
    """Add a paper's frozen preset under its name (duplicates raise)."""
    if not isinstance(preset, InversionPreset):
        raise TypeError(f"preset must be an InversionPreset, got {type(preset).__name__}")
    return PRESETS.add(preset.name, preset)


# Inverting Gradients (Geiping et al. 2020): cosine over all layers, TV prior, signed Adam, step decay.
register_preset(InversionPreset(name="ig", cost="cosine", tv=1e-4, lr=0.1, iters=400, signed=True,
                                schedule="multistep"))


# ------------------------------------------------------------------------------------------ search spaces
class SearchSpace:
    """What an attack optimises. Subclasses set the leaf tensors and how they become an input batch."""

    def parameters(self) -> list[Tensor]:
        raise NotImplementedError

    def signed_parameters(self) -> list[Tensor]:
        """The tensors whose gradient is replaced by its sign when the preset is ``signed`` (data only)."""
        return []

    def render(self) -> Tensor:
        """The candidate input batch, differentiable in :meth:`parameters`."""
        raise NotImplementedError

    def project(self) -> None:
        """Called under ``no_grad`` after every optimiser step (clamps, norm balls)."""

    def regularizer(self) -> Tensor | float:
        """An extra loss term of this space (default none)."""
        return 0.0

    def snapshot(self) -> dict[str, Tensor]:
        """Detached copies of the state worth keeping for the best iterate."""
        return {f"p{i}": p.detach().clone() for i, p in enumerate(self.parameters())}


def _init_tensor(shape, init, generator, device, dtype) -> Tensor:
    if isinstance(init, Tensor):
        if tuple(init.shape) != tuple(shape):
            raise ValueError(f"init has shape {tuple(init.shape)}, expected {tuple(shape)}")
        return init.detach().clone().to(device=device or init.device, dtype=dtype or init.dtype)
    if init not in ("randn", "rand"):
        raise ValueError(f"init must be 'randn', 'rand' or a tensor, got {init!r}")
    # drawn where the generator lives (a CPU generator can seed a CUDA search), then moved
    draw_on = generator.device if generator is not None else device
    x = (torch.randn if init == "randn" else torch.rand)(shape, generator=generator, device=draw_on,
                                                         dtype=dtype or torch.get_default_dtype())
    return x.to(device) if device is not None else x


class PixelSpace(SearchSpace):
    """Search the input itself (Inverting Gradients). ``clamp=(lo, hi)`` keeps it in the valid range."""

    def __init__(self, shape: Sequence[int], init: str | Tensor = "randn", clamp: tuple[float, float] | None = (0.0, 1.0),
                 generator: torch.Generator | None = None, device=None, dtype=None):
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (N, ...) with positive sizes, got {shape}")
        if clamp is not None:
            lo, hi = (real_scalar("clamp[0]", clamp[0]), real_scalar("clamp[1]", clamp[1]))
            if not lo < hi:
                raise ValueError(f"clamp must be (lo, hi) with lo < hi, got {clamp!r}")
            clamp = (lo, hi)
        self.clamp = clamp
        self.x = _init_tensor(shape, init, generator, device, dtype).requires_grad_(True)

    def parameters(self) -> list[Tensor]:
        return [self.x]

    def signed_parameters(self) -> list[Tensor]:
        return [self.x]

    def render(self) -> Tensor:
        return self.x

    def snapshot(self) -> dict[str, Tensor]:
        return {"x": self.x.detach().clone()}

    def project(self) -> None:
        if self.clamp is not None:
            self.x.clamp_(*self.clamp)


class LatentSpace(SearchSpace):
    """Search a generator's latent: x = decode(z). ``spherical`` keeps each sample's ||z|| at its start value."""

    def __init__(self, decode: Callable[[Tensor], Tensor], z0: Tensor, spherical: bool = True,
                 clamp: tuple[float, float] | None = None):
        if not callable(decode):
            raise TypeError(f"decode must be callable, got {type(decode).__name__}")
        if not isinstance(z0, Tensor) or z0.dim() < 2 or not z0.is_floating_point():
            raise ValueError(f"z0 must be a floating tensor of shape (N, ...), got "
                             f"{getattr(z0, 'shape', type(z0).__name__)}")
        self.decode = decode
        self.spherical = bool(spherical)
        self.clamp = clamp
        self.z = z0.detach().clone().requires_grad_(True)
        self._norm = self.z.detach().flatten(1).norm(dim=1)

    def parameters(self) -> list[Tensor]:
        return [self.z]

    def render(self) -> Tensor:
        x = self.decode(self.z)
        return x.clamp(*self.clamp) if self.clamp is not None else x

    def snapshot(self) -> dict[str, Tensor]:
        return {"z": self.z.detach().clone()}

    def project(self) -> None:
        if self.spherical:
            n = self.z.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.z.mul_((self._norm / n).view(-1, *([1] * (self.z.dim() - 1))))


# ------------------------------------------------------------------------------------------ the attacker
@dataclass
class InversionResult:
    """Outcome of :meth:`GradientInversion.run`: the best input, its matching loss and the history."""

    x: Tensor
    match_loss: float
    history: list[float] = field(default_factory=list)
    best_iter: int = 0
    iterations: int = 0
    snapshots: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


class GradientInversion:
    """The generic gradient-matching attacker (see the module docstring).

    ``model``: the victim (its parameters are never modified; their ``.grad`` is not touched).
    ``preset``: an :class:`InversionPreset` or a registered name. ``loss_fn(logits, y)``: the client's loss
    (default cross-entropy). ``params``: which parameters' gradients are shared (default: all that require
    grad, in ``model.parameters()`` order).
    """

    def __init__(self, model: nn.Module, preset: str | InversionPreset = "ig", loss_fn: Callable | None = None,
                 params: Sequence[Tensor] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.preset = PRESETS.get(preset) if isinstance(preset, str) else preset
        if not isinstance(self.preset, InversionPreset):
            raise TypeError(f"preset must be an InversionPreset or a registered name, got {type(preset).__name__}")
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        if not self.params:
            raise ValueError("the model has no parameters that require grad: there is no gradient to match")

    def _scheduler(self, opt: torch.optim.Optimizer):
        p = self.preset
        if p.schedule == "multistep":
            miles = sorted({max(1, int(p.iters * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
            return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=miles, gamma=0.1)
        if p.schedule == "cosine_warmup":
            def factor(step: int) -> float:
                t = step / p.iters
                return min(1.0, t / 0.05) * (0.5 - 0.5 * math.cos(math.pi * min(1.0, (1 - t) / 0.75)))
            return torch.optim.lr_scheduler.LambdaLR(opt, factor)
        if p.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                              patience=p.plateau_patience)
        return None

    def matching_loss(self, x: Tensor, labels: Tensor, target: Sequence[Tensor]) -> Tensor:
        """The gradient distance of candidate ``x`` to ``target`` (differentiable in ``x``)."""
        g = model_gradients(self.model, x, labels, self.loss_fn, self.params, create_graph=True)
        return gradient_distance(g, target, self.preset.cost)

    def run(self, target_grads: Sequence[Tensor], labels: Tensor, space: SearchSpace,
            extra: Sequence[SearchSpace] = (), progress: Callable[[int, float], None] | None = None
            ) -> InversionResult:
        """Search ``space`` (and the ``extra`` unknowns, jointly) for an input matching ``target_grads``."""
        p = self.preset
        target = check_gradients(target_grads, self.params)
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"labels must be a 1-D integer tensor (one class per victim input), got "
                             f"{getattr(labels, 'shape', type(labels).__name__)}")
        if p.max_batch is not None and labels.numel() > p.max_batch:
            raise ValueError(f"preset {p.name!r} handles victim batches of at most {p.max_batch}, got "
                             f"{labels.numel()} labels")
        if not isinstance(space, SearchSpace) or not all(isinstance(e, SearchSpace) for e in extra):
            raise TypeError("space and every entry of extra must be SearchSpace instances")
        variables = list(space.parameters()) + [t for e in extra for t in e.parameters()]
        if not variables or not all(t.is_leaf and t.requires_grad for t in variables):
            raise ValueError("a search space must expose leaf tensors that require grad")
        signed = {id(t) for t in space.signed_parameters()} if p.signed else set()
        for e in extra if p.signed else ():
            signed |= {id(t) for t in e.signed_parameters()}
        spaces = {"space": space, **{f"extra{i}": e for i, e in enumerate(extra)}}

        saved = _modes(self.model)
        if p.model_mode != "as_is":
            self.model.train(p.model_mode == "train")
        try:
            x0 = space.render()
            if x0.shape[0] != labels.numel():
                raise ValueError(f"the search space renders a batch of {x0.shape[0]} inputs, but {labels.numel()} "
                                 f"labels were given")
            labels = labels.to(x0.device)
            opt = torch.optim.Adam(variables, lr=p.lr)
            sched = self._scheduler(opt)
            best, best_iter, history = math.inf, 0, []
            best_x, snaps = x0.detach().clone(), {k: s.snapshot() for k, s in spaces.items()}
            it = 0
            for it in range(p.iters + 1):  # the last pass only scores the final iterate
                x = x0 if it == 0 else space.render()
                match = self.matching_loss(x, labels, target)
                m = float(match.detach())
                if not math.isfinite(m):
                    break
                history.append(m)
                if m < best or not p.keep_best:
                    best, best_iter = m, it
                    best_x, snaps = x.detach().clone(), {k: s.snapshot() for k, s in spaces.items()}
                if progress is not None:
                    progress(it, m)
                if it == p.iters or (p.early_stop > 0 and m < p.early_stop) or \
                        (p.patience > 0 and it - best_iter >= p.patience):
                    break
                loss = match
                if p.tv > 0:
                    loss = loss + p.tv * total_variation(x)
                if p.image_norm > 0:
                    loss = loss + p.image_norm * x.flatten(1).norm(dim=1).sum() / x[0].numel()
                for s in spaces.values():
                    loss = loss + s.regularizer()
                grads = torch.autograd.grad(loss, variables, allow_unused=True)
                for t, g in zip(variables, grads):
                    g = torch.zeros_like(t) if g is None else g
                    t.grad = g.sign() if id(t) in signed else g
                opt.step()
                if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    sched.step(m)
                elif sched is not None:
                    sched.step()
                with torch.no_grad():
                    for s in spaces.values():
                        s.project()
        finally:
            for m_, mode in saved:
                m_.training = mode
        return InversionResult(x=best_x, match_loss=best, history=history, best_iter=best_iter,
                               iterations=it, snapshots=snaps)
