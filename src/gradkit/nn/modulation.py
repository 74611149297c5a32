"""Adaptive gradient modulation for multimodal fusion models (paper slug: ``agm``).

Li et al., "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV 2023
(arXiv 2308.07686). Any fusion model ``f(x_1, ..., x_M)`` gets a per-modality output by Shapley
attribution over zero-padded modalities (convention ``f(empty) := 0``, so ``sum_m phi_m = f(all)``)::

    phi_m = sum_{S not containing m} |S|! (M-|S|-1)! / M! * (f(S + {m}) - f(S))
    M = 2:  phi_a = 1/2 [f(a,v) - f(v) + f(a)],   phi_v = 1/2 [f(a,v) - f(a) + f(v)]

Each step measures each modality's batch-mean cross-entropy ``s_m`` (p clamped at 1e-8) and rescales
the gradient reaching ``phi_m`` by::

    r_m  = exp(M/(M-1) * (mean_j s_j - s_m))           (M = 2: exp(s_other - s_m))
    rb_m = the same with the running (cumulative) means of the scores
    k_m  = exp(alpha * min(rb_m - r_m, clamp))          (running means updated after k)

Pieces (usable alone): :func:`grad_scale` / :class:`GradScale` (identity forward, ``k * grad``
backward), :func:`shapley_outputs` (the ``2^M - 1`` padded passes and the attribution),
:func:`modality_scores`, :class:`AGMController` (the coefficients and running means),
:func:`modulated_fusion` (forward ``f(all)``, backward ``k_m * grad`` into each ``phi_m``), and
:class:`AGM`, a wrapper that applies all of it to any ``M``-input fusion model. The toy fusion
MLPs of the claim (:class:`FusionMLP`) are here too. The autograd Functions (:class:`GradScale`,
:class:`ModulatedFusion`) and their function forms live in :mod:`gradkit.functional.scale` and are
re-exported here.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .._validate import boolean, integer, is_int, nonneg_int, positive_int, real_scalar, tensor
from ..functional.reversal import check_lambda
from ..functional.scale import GradScale, ModulatedFusion, grad_scale, modulated_fusion

__all__ = ["GradScale", "grad_scale", "GradientScale", "shapley_outputs", "subset_outputs",
           "shapley_weights", "modality_scores", "AGMController", "ModulatedFusion", "modulated_fusion",
           "AGM", "FusionMLP", "MAX_MODALITIES", "MIN_PROB"]

MAX_MODALITIES = 8  # 2^8 - 1 = 255 forward passes per step: beyond that the attribution is impractical
MIN_PROB = 1e-8     # the official code clamps p_y at 1e-8 inside the log


# ------------------------------------------------------------------------------ module form
class GradientScale(nn.Module):
    """Module form of :func:`grad_scale` (paper slug: ``agm``): ``y = x``, ``dL/dx = k dL/dy``.

    ``k`` is a mutable attribute, validated on assignment (set it each step).

    Example::

        >>> gs = GradientScale(1.0)
        >>> gs.k = 0.5
        >>> y = head(gs(features))
    """

    def __init__(self, k: float | Tensor = 1.0) -> None:
        super().__init__()
        self.k = k

    @property
    def k(self) -> float | Tensor:
        return self._k

    @k.setter
    def k(self, value: float | Tensor) -> None:
        self._k = check_lambda(value, name="k")

    def forward(self, x: Tensor) -> Tensor:
        return grad_scale(x, self._k)

    def extra_repr(self) -> str:
        k = self._k
        return f"k={k.item() if isinstance(k, Tensor) else k:g}"


# ------------------------------------------------------------------------------ Shapley outputs
def _check_num_modalities(m: Any, low: int = 1) -> int:
    return integer("num_modalities", m, low=low, high=MAX_MODALITIES)


def shapley_weights(num_modalities: int) -> Tensor:
    """Float64 matrix ``W`` (M, 2^M - 1) with ``phi_m = sum_S W[m, S-1] f(S)`` (paper slug: ``agm``).

    Subset ``S`` is the bitmask ``S`` (bit ``m`` set = modality ``m`` kept), ``f(empty) := 0``:
    ``W[m, S] = (|S|-1)!(M-|S|)!/M!`` if ``m`` in ``S`` else ``-|S|!(M-|S|-1)!/M!``. Columns of
    ``W`` sum to 0 except the full set's (sum 1): ``sum_m phi_m = f(all)``.

    Example::

        >>> shapley_weights(2)          # columns: f(a), f(v), f(a,v)
        tensor([[ 0.5000, -0.5000,  0.5000],
                [-0.5000,  0.5000,  0.5000]], dtype=torch.float64)
    """
    m_ = _check_num_modalities(num_modalities)
    w = torch.zeros(m_, 2**m_ - 1, dtype=torch.float64)
    fact = math.factorial
    for mask in range(1, 2**m_):
        size = bin(mask).count("1")
        for m in range(m_):
            if mask >> m & 1:
                w[m, mask - 1] = fact(size - 1) * fact(m_ - size) / fact(m_)
            else:
                w[m, mask - 1] = -fact(size) * fact(m_ - size - 1) / fact(m_)
    return w


_WEIGHTS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _weights(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (m, dtype, device)
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS[key] = shapley_weights(m).to(dtype=dtype, device=device)
    return w


def _check_inputs(inputs: Any, num_modalities: int | None = None) -> list[Tensor]:
    if isinstance(inputs, Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list or tuple of tensors (one per modality), got "
                        f"{type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError("inputs is an empty modality list: need at least one tensor")
    if num_modalities is not None and len(inputs) != num_modalities:
        raise ValueError(f"expected {num_modalities} modality inputs, got {len(inputs)}")
    if len(inputs) > MAX_MODALITIES:
        raise ValueError(f"at most {MAX_MODALITIES} modalities are supported (2^M - 1 forward passes), "
                         f"got {len(inputs)}")
    for i, x in enumerate(inputs):
        tensor(f"inputs[{i}]", x)
        if x.dim() == 0:
            raise ValueError(f"inputs[{i}] must have a batch dimension, got a 0-dim tensor")
    n = inputs[0].shape[0]
    for i, x in enumerate(inputs):
        if x.shape[0] != n:
            raise ValueError(f"inputs[{i}] has batch size {x.shape[0]}, expected {n} like inputs[0]")
    return list(inputs)


def _zeros(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _padded(inputs: list[Tensor], mask: int, pad: Callable[[Tensor], Tensor]) -> list[Tensor]:
    out = []
    for m, x in enumerate(inputs):
        if mask >> m & 1:
            out.append(x)
        else:
            p = pad(x)
            if not isinstance(p, Tensor) or p.shape != x.shape:
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"pad must return a tensor shaped like its input {tuple(x.shape)}, got {got}")
            out.append(p)
    return out


def _check_output(out: Any, n: int, ref: Tensor | None, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a tensor of outputs, got {type(out).__name__} ({what})")
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"model output must have shape (N, ...) with N={n}, got {tuple(out.shape)} ({what})")
    if not out.is_floating_point():
        raise TypeError(f"model output must be floating point, got dtype {out.dtype} ({what})")
    if ref is not None and out.shape != ref.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} ({what}) differs from the full pass "
                         f"{tuple(ref.shape)}")
    return out


class _EvalMode:
    """Switch a model to eval mode inside the block and restore every submodule's own flag."""

    def __init__(self, model: nn.Module, active: bool) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()] if active and model.training else None

    def __enter__(self) -> None:
        if self.modes is not None:
            self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        if self.modes is not None:
            for m, flag in self.modes:
                m.training = flag


def subset_outputs(model: Callable[..., Tensor], inputs: Sequence[Tensor], *,
                   pad: Callable[[Tensor], Tensor] | None = None, eval_padded: bool = True,
                   batch_padded: bool = False) -> list[Tensor]:
    """Outputs ``f(S)`` for every non-empty subset ``S`` of modalities, index ``S - 1`` (bitmask).

    Paper slug: ``agm``. Modalities outside ``S`` are replaced by ``pad(x)`` (default zeros). The
    full pass runs first, in the model's current mode; with ``eval_padded`` (the official code's
    choice) the padded passes run with the model in ``eval()`` mode (BatchNorm running statistics
    untouched, no dropout), gradients enabled, and every submodule's mode is restored afterwards.
    ``batch_padded=True`` runs all padded passes as one concatenated batch (faster; only valid
    for a model whose outputs do not mix samples in that mode).

    Example::

        >>> outs = subset_outputs(model, [a, v])   # [f(a), f(v), f(a, v)]
    """
    xs = _check_inputs(inputs)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    pad = _zeros if pad is None else pad
    if not callable(pad):
        raise TypeError(f"pad must be a callable x -> tensor like x, or None, got {type(pad).__name__}")
    boolean("eval_padded", eval_padded)
    boolean("batch_padded", batch_padded)
    m_ = len(xs)
    n = xs[0].shape[0]
    full_mask = 2**m_ - 1
    full = _check_output(model(*xs), n, None, "full pass")
    outs: list[Tensor | None] = [None] * full_mask
    outs[full_mask - 1] = full
    masks = list(range(1, full_mask))
    if masks:
        module = model if isinstance(model, nn.Module) else None
        with _EvalMode(module, eval_padded) if module is not None else contextlib.nullcontext():
            if batch_padded:
                cols = [torch.cat(c) for c in zip(*(_padded(xs, s, pad) for s in masks))]
                big = _check_output(model(*cols), n * len(masks), None, "batched padded passes")
                for s, o in zip(masks, big.split(n)):
                    outs[s - 1] = _check_output(o, n, full, f"subset mask {s}")
            else:
                for s in masks:
                    outs[s - 1] = _check_output(model(*_padded(xs, s, pad)), n, full, f"subset mask {s}")
    return outs  # type: ignore[return-value]


def _combine(outs: Sequence[Tensor]) -> list[Tensor]:
    m_ = (len(outs) + 1).bit_length() - 1
    full = outs[-1]
    w = _weights(m_, full.dtype, full.device)
    stacked = torch.stack(list(outs))  # (2^M - 1, N, ...)
    return list(torch.tensordot(w, stacked, dims=1).unbind(0))


def shapley_outputs(model: Callable[..., Tensor], inputs: Sequence[Tensor], *,
                    pad: Callable[[Tensor], Tensor] | None = None, eval_padded: bool = True,
                    batch_padded: bool = False) -> list[Tensor]:
    """Per-modality outputs ``phi_m`` of a fusion model by Shapley attribution (paper slug: ``agm``).

    ``phi_m = sum_{S not containing m} |S|!(M-|S|-1)!/M! (f(S + {m}) - f(S))`` with ``f(empty) := 0``,
    so ``sum_m phi_m = f(all)``; ``f(S)`` pads the modalities outside ``S`` (see
    :func:`subset_outputs`: ``2^M - 1`` forward passes, padded ones in eval mode by default).
    Gradients flow through every pass.

    Example::

        >>> phi_a, phi_v = shapley_outputs(model, [a, v])
        >>> torch.allclose(phi_a + phi_v, model(a, v), atol=1e-6)
        True
    """
    return _combine(subset_outputs(model, inputs, pad=pad, eval_padded=eval_padded, batch_padded=batch_padded))


# ------------------------------------------------------------------------------------- scores
def _check_target(target: Any, n: int) -> Tensor:
    tensor("target", target)
    if n < 1:
        raise ValueError("the batch is empty: need at least one sample to score")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"target must be a 1-D tensor of {n} class indices, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    return target.long()


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _scores_tensor(phis: Sequence[Tensor], target: Tensor, min_prob: float) -> Tensor:
    """(M + 2,) tensor: the M scores, then target min and max (one host sync reads them all)."""
    y = target.unsqueeze(1)
    c = phis[0].shape[1]
    safe_y = y.clamp(0, c - 1)  # range checked by the caller from the last two entries
    # half-precision logits are scored in float32; float32/float64 as they are
    logp = torch.stack([torch.log_softmax(_at_least_float32(p.detach()), dim=1).gather(1, safe_y).squeeze(1)
                        for p in phis])  # (M, N)
    scores = -logp.clamp(min=math.log(min_prob)).mean(1)
    return torch.cat([scores, target.min().view(1).to(scores), target.max().view(1).to(scores)])


def modality_scores(phis: Sequence[Tensor], target: Tensor, min_prob: float = MIN_PROB, *,
                    check_finite: Sequence[Tensor] = ()) -> list[float]:
    """Batch-mean cross-entropy of each per-modality output: ``s_m = mean_i -log max(p_m(y_i|x_i), min_prob)``.

    Paper slug: ``agm`` (the official code's scores; ``min_prob = 1e-8``). Detached: the scores
    carry no gradient. Raises ``ValueError`` for non-finite outputs, labels out of range, or
    non-finite values in the floating-point tensors of ``check_finite`` (e.g. the model inputs;
    checked in the same host sync as the scores).

    Example::

        >>> s_a, s_v = modality_scores([phi_a, phi_v], y)
    """
    if isinstance(phis, Tensor) or not isinstance(phis, (list, tuple)) or len(phis) == 0:
        raise ValueError("phis must be a non-empty list of (N, C) tensors, one per modality")
    mp = real_scalar("min_prob", min_prob)
    if not 0 < mp < 1:
        raise ValueError(f"min_prob must be in (0, 1), got {min_prob!r}")
    ref = tensor("phis[0]", phis[0])
    if ref.dim() != 2 or ref.shape[1] < 1:
        raise ValueError(f"phis must be (N, C) logits, got shape {tuple(ref.shape)}")
    for i, p in enumerate(phis):
        tensor(f"phis[{i}]", p)
        if p.shape != ref.shape:
            raise ValueError(f"phis[{i}] has shape {tuple(p.shape)}, expected {tuple(ref.shape)} like phis[0]")
    y = _check_target(target, ref.shape[0])
    checked = [(i, x) for i, x in enumerate(check_finite) if isinstance(x, Tensor) and x.is_floating_point()]
    t = _scores_tensor(phis, y, mp)
    if checked:
        t = torch.cat([t, torch.stack([torch.isfinite(x).all() for _, x in checked]).to(t)])
    vals = t.tolist()
    flags = vals[len(phis) + 2:]
    for (i, _), ok in zip(checked, flags):
        if not ok:
            raise ValueError(f"inputs[{i}] holds non-finite values (nan or inf)")
    scores, lo, hi = vals[:len(phis)], vals[len(phis)], vals[len(phis) + 1]
    if lo < 0 or hi >= ref.shape[1]:
        raise ValueError(f"target holds class indices in [{lo:g}, {hi:g}], expected [0, {ref.shape[1] - 1}]")
    for i, s in enumerate(scores):
        if not math.isfinite(s):
            raise ValueError(f"the output of modality {i} is not finite (score {s}): non-finite inputs, "
                             f"weights or a diverged model")
    return scores


# ---------------------------------------------------------------------------------- controller
class AGMController:
    """AGM's modulation coefficients from per-modality scores, with cumulative running means.

    Paper slug: ``agm``. For scores ``s`` (lower = better) of ``M >= 2`` modalities::

        r_m  = exp(M/(M-1) * (mean_j s_j - s_m))        rb_m = same with running means sb
        k_m  = exp(alpha * min(rb_m - r_m, clamp))     (clamp=None: no clamp)
        sb  <- sb * t/(t+1) + s/(t+1);  t <- t + 1     (after k, as in the official code)

    Running means start at 0 (so ``rb = 1`` at the first step) and are carried across epochs.
    ``clamp`` bounds ``rb - r`` from above (CREMA-D code: 10, UR-Funny: 7, AV-MNIST: none).

    Example::

        >>> ctrl = AGMController(2, alpha=1.0)
        >>> k_a, k_v = ctrl.coefficients([0.4, 1.3])   # a modality ahead of its average is slowed
    """

    def __init__(self, num_modalities: int, alpha: float = 1.0, clamp: float | None = 10.0) -> None:
        self.num_modalities = _check_num_modalities(num_modalities, low=2)
        self.alpha = alpha
        self.clamp = clamp
        self.reset()

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = real_scalar("alpha", value, nonneg=True, tensor_ok=False)

    @property
    def clamp(self) -> float | None:
        return self._clamp

    @clamp.setter
    def clamp(self, value: float | None) -> None:
        self._clamp = None if value is None else real_scalar("clamp", value, tensor_ok=False)

    def reset(self) -> None:
        """Forget the running means (``sb = 0``, ``t = 0``)."""
        self.running_means = [0.0] * self.num_modalities
        self.steps = 0
        self.last_ratios: list[float] | None = None
        self.last_coefficients: list[float] | None = None

    def _check_scores(self, scores: Any) -> list[float]:
        if isinstance(scores, (Tensor, str)) or not isinstance(scores, Sequence):
            raise TypeError(f"scores must be a list of {self.num_modalities} floats, got {type(scores).__name__}")
        if len(scores) != self.num_modalities:
            raise ValueError(f"scores must hold {self.num_modalities} values (one per modality), got {len(scores)}")
        return [real_scalar(f"scores[{i}]", s) for i, s in enumerate(scores)]

    def ratios(self, scores: Sequence[float]) -> list[float]:
        """``r_m = exp(M/(M-1) (mean_j s_j - s_m))`` of the given scores."""
        return self._ratios(self._check_scores(scores))

    def _ratios(self, s: list[float]) -> list[float]:
        m_ = self.num_modalities
        mean = sum(s) / m_
        f = m_ / (m_ - 1)
        out = []
        for v in s:
            z = f * (mean - v)
            if z > 700.0:
                raise ValueError(f"scores {s} differ too much: exp({z:.4g}) overflows (scores are "
                                 f"cross-entropies, expected within ~{-math.log(MIN_PROB):.1f} of each other)")
            out.append(math.exp(z))
        return out

    def coefficients(self, scores: Sequence[float], update: bool = True) -> list[float]:
        """The coefficients ``k_m`` for this step's scores; then (``update``) fold them into the running means."""
        s = self._check_scores(scores)
        r = self._ratios(s)
        rb = self._ratios(self.running_means)
        k = []
        for i, (a, b) in enumerate(zip(rb, r)):
            d = a - b
            if self._clamp is not None:
                d = min(d, self._clamp)
            z = self._alpha * d
            if z > 700.0:
                raise ValueError(f"coefficient of modality {i} overflows: exp(alpha * (rb - r)) = exp({z:.4g}); "
                                 f"set clamp (e.g. 10) to bound it")
            k.append(math.exp(z))
        if update:
            t = self.steps
            self.running_means = [mu * t / (t + 1) + v / (t + 1) for mu, v in zip(self.running_means, s)]
            self.steps = t + 1
        self.last_ratios, self.last_coefficients = r, k
        return k

    def state_dict(self) -> dict[str, Any]:
        return {"running_means": list(self.running_means), "steps": self.steps, "alpha": self._alpha,
                "clamp": self._clamp, "num_modalities": self.num_modalities}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_modalities") != self.num_modalities:
            raise ValueError(f"state is for {state.get('num_modalities')} modalities, this controller has "
                             f"{self.num_modalities}")
        means = [real_scalar("running_means", v) for v in state["running_means"]]
        steps = nonneg_int("steps", state["steps"])
        self.alpha, self.clamp = state["alpha"], state["clamp"]
        self.running_means, self.steps = means, steps

    def __repr__(self) -> str:
        return (f"AGMController(num_modalities={self.num_modalities}, alpha={self._alpha:g}, "
                f"clamp={self._clamp}, steps={self.steps})")


# ------------------------------------------------------------------------------------ wrapper
class AGM(nn.Module):
    """Adaptive gradient modulation around any ``M``-input fusion model (paper slug: ``agm``).

    ``AGM(model, M)(x_1, ..., x_M, target=y)`` in training (grad enabled): runs the ``2^M - 1``
    padded passes, attributes ``phi_m`` (Shapley, ``f(empty) := 0``), scores each with its batch-mean
    cross-entropy, gets ``k_m = exp(alpha min(rb_m - r_m, clamp))`` from :class:`AGMController`
    and returns the fused logits ``f(all)`` whose backward sends ``k_m * grad`` into ``phi_m``.
    Without ``target``, in eval mode or under ``no_grad`` it returns ``model(*inputs)`` (one pass).
    ``enabled = False`` keeps scoring (running means still update, as in the official code) but
    uses ``k_m = 1``: plain joint training, bit-identical. After a step, ``last_scores``,
    ``last_coefficients`` and ``last_phis`` (detached) hold its values. The controller's state is
    part of ``state_dict()``.

    Example::

        >>> agm = AGM(fusion_net, num_modalities=2, alpha=1.0)
        >>> loss = F.cross_entropy(agm(audio, image, target=y), y)
        >>> loss.backward(); opt.step()
    """

    def __init__(self, model: nn.Module, num_modalities: int, alpha: float = 1.0, clamp: float | None = 10.0,
                 *, pad: Callable[[Tensor], Tensor] | None = None, eval_padded: bool = True,
                 batch_padded: bool = False, enabled: bool = True, min_prob: float = MIN_PROB) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.controller = AGMController(num_modalities, alpha=alpha, clamp=clamp)
        if pad is not None and not callable(pad):
            raise TypeError(f"pad must be a callable x -> tensor like x, or None, got {type(pad).__name__}")
        for name, v in (("eval_padded", eval_padded), ("batch_padded", batch_padded), ("enabled", enabled)):
            boolean(name, v)
        mp = real_scalar("min_prob", min_prob, tensor_ok=False)
        if not 0 < mp < 1:
            raise ValueError(f"min_prob must be in (0, 1), got {min_prob!r}")
        self.pad, self.eval_padded, self.batch_padded, self.enabled, self.min_prob = (
            pad, eval_padded, batch_padded, enabled, mp)
        self.last_scores: list[float] | None = None
        self.last_coefficients: list[float] | None = None
        self.last_phis: list[Tensor] | None = None

    @property
    def num_modalities(self) -> int:
        return self.controller.num_modalities

    def attribute(self, *inputs: Tensor) -> list[Tensor]:
        """The per-modality outputs ``phi_m`` (Shapley, ``2^M - 1`` passes) of ``inputs``."""
        xs = _check_inputs(list(inputs), self.num_modalities)
        return shapley_outputs(self.model, xs, pad=self.pad, eval_padded=self.eval_padded,
                               batch_padded=self.batch_padded)

    def forward(self, *inputs: Tensor, target: Tensor | None = None) -> Tensor:
        xs = _check_inputs(list(inputs), self.num_modalities)
        if target is None or not self.training or not torch.is_grad_enabled():
            return self.model(*xs)
        outs = subset_outputs(self.model, xs, pad=self.pad, eval_padded=self.eval_padded,
                              batch_padded=self.batch_padded)
        full = outs[-1]
        if full.dim() != 2:
            raise ValueError(f"model output must be (N, C) logits for AGM's scores, got shape {tuple(full.shape)}")
        phis = _combine(outs)
        scores = modality_scores(phis, target, self.min_prob, check_finite=xs)
        k = self.controller.coefficients(scores)
        used = k if self.enabled else [1.0] * len(k)
        self.last_scores, self.last_coefficients = scores, used
        self.last_phis = [p.detach() for p in phis]
        return ModulatedFusion.apply(full, tuple(used), *phis)

    def get_extra_state(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)

    def extra_repr(self) -> str:
        c = self.controller
        return (f"num_modalities={c.num_modalities}, alpha={c.alpha:g}, clamp={c.clamp}, "
                f"enabled={self.enabled}, eval_padded={self.eval_padded}")


# --------------------------------------------------------------------------------- toy models
class FusionMLP(nn.Module):
    """Small multi-input MLP: one encoder per modality, then early (concat) or late (sum) fusion.

    Paper slug: ``agm`` (the claim's laptop-scale models). ``fusion="concat"``:
    ``head(cat_m relu(E_m x_m))`` with ``head = Linear-ReLU-Linear``; ``fusion="sum"``:
    ``sum_m H_m(relu(E_m x_m))`` (per-modality linear heads, late fusion).

    Example::

        >>> net = FusionMLP([10, 64], [16, 64], num_classes=10, fusion="concat")
        >>> logits = net(a, v)                                   # (N, 10)
    """

    def __init__(self, in_dims: Sequence[int], enc_dims: Sequence[int], num_classes: int,
                 fusion: str = "concat", head_hidden: int = 64) -> None:
        super().__init__()
        for name, dims in (("in_dims", in_dims), ("enc_dims", enc_dims)):
            if not isinstance(dims, (list, tuple)) or not dims or any(
                    not is_int(d, low=1) for d in dims):
                raise ValueError(f"{name} must be a non-empty list of positive ints, got {dims!r}")
        if len(in_dims) != len(enc_dims):
            raise ValueError(f"in_dims and enc_dims must have one entry per modality, got {len(in_dims)} "
                             f"and {len(enc_dims)}")
        for name, v in (("num_classes", num_classes), ("head_hidden", head_hidden)):
            positive_int(name, v)
        if fusion not in ("concat", "sum"):
            raise ValueError(f"fusion must be 'concat' or 'sum', got {fusion!r}")
        self.in_dims, self.fusion = tuple(in_dims), fusion
        self.encoders = nn.ModuleList(nn.Linear(i, e) for i, e in zip(in_dims, enc_dims))
        if fusion == "concat":
            self.head = nn.Sequential(nn.Linear(sum(enc_dims), head_hidden), nn.ReLU(),
                                      nn.Linear(head_hidden, num_classes))
        else:
            self.heads = nn.ModuleList(nn.Linear(e, num_classes) for e in enc_dims)

    def final_weights(self) -> list[Tensor]:
        """The output layer weight(s): the official code's gradient-clipping trigger looks at them."""
        return [self.head[-1].weight] if self.fusion == "concat" else [h.weight for h in self.heads]

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.encoders):
            raise ValueError(f"expected {len(self.encoders)} modality inputs, got {len(inputs)}")
        feats = [torch.relu(enc(x)) for enc, x in zip(self.encoders, inputs)]
        if self.fusion == "concat":
            return self.head(torch.cat(feats, dim=1))
        out = self.heads[0](feats[0])
        for h, f in zip(self.heads[1:], feats[1:]):
            out = out + h(f)
        return out

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, fusion={self.fusion!r}"
