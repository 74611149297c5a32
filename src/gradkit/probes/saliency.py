"""Backprop saliency: the two-phase framework, NormGrad, Grad-CAM and meta-saliency (backprop-saliency).

Rebuffi, Fong, Ji, Vedaldi, "There and Back Again: Revisiting Backpropagation Saliency Methods", CVPR 2020.
At a layer with output x (N, C, H, W) and g = d y_c / d x (the class *logit*), phase 1 forms the gradient
of a virtual identity layer's parameters at every location u, phase 2 reduces it over channels:

    bias: phi_u = g_u          scaling: phi_u = x_u * g_u          conv1x1: phi_u = x_u g_u^T
    conv3x3: phi_u = patch3x3(x)_u g_u^T     conv3x3_depthwise: phi_u = patch3x3(x)_u * g_u (per channel)
    norm: ||phi_u||_F   filter_norm: ||max(phi_u, 0)||_F   sum: sum(phi_u)   max: max(phi_u)

NormGrad = conv1x1 + norm = ||x_u|| * ||g_u|| (factorised, the outer product is never built);
Grad-CAM = ReLU(sum_c x_cu * mean_v g_cv); meta-saliency takes one SGD step on CE(f(x), c) first.

>>> ng = NormGrad(model, "conv3")                      # model: any nn.Module, layer by name
>>> maps = ng.attribute(images, target=labels, internal_batch_size=64)   # (N, 1, H, W), in [0, 1]
>>> pointing_game(maps, boxes, tolerance=3)            # hit rate in percent
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import choice, is_int, real_scalar, tensor
from ._hooks import HookProbe

PHASE1 = ("bias", "scaling", "conv1x1", "conv3x3", "conv3x3_depthwise", "avg_bias_scaling")
PHASE2 = ("norm", "filter_norm", "sum", "max")
COMBINE = ("product", "sum", "mean")
EPS = 1e-12


# ------------------------------------------------------------------------------------ argument checks
def _targets(target, n: int, device: torch.device) -> Tensor | None:
    """``target`` as an int64 tensor of shape (n,), or None (explain the top class)."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError(f"target must be an int, a sequence of ints or an int tensor, got {target!r}")
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.int64, device=device)
    t = torch.as_tensor(target, device=device) if not isinstance(target, Tensor) else target.to(device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"target must hold integers, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target must have one class per input ({n}), got {t.numel()}")
    return t


def _batch_size(internal_batch_size, n: int) -> int:
    if internal_batch_size is None:
        return max(n, 1)
    if not is_int(internal_batch_size, low=1):
        raise ValueError(f"internal_batch_size must be a positive int or None, got {internal_batch_size!r}")
    return int(internal_batch_size)


def _scores(out: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sum over the batch of the explained logits (each example's gradient is its own) and the targets."""
    if out.dim() != 2:
        raise ValueError(f"the model must return logits of shape (N, classes), got {tuple(out.shape)}")
    if target is None:
        target = out.detach().argmax(1)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= out.shape[1]):
        raise ValueError(f"target classes must be in [0, {out.shape[1]}), got {target.tolist()[:8]}")
    return out.gather(1, target[:, None]).sum(), target


# ------------------------------------------------------------------------------------ the math
def _unfold3x3(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 9, H, W): the 3x3 zero-padded patch around every location."""
    n, c, h, w = x.shape
    return F.unfold(x, kernel_size=3, padding=1).reshape(n, c, 9, h, w)


def _outer_reduce(a: Tensor, g: Tensor, phase2: str) -> Tensor:
    """Phase 2 of the outer product a_u g_u^T per location without building it; a: (N,A,H,W), g: (N,C,H,W)."""
    if phase2 == "norm":  # ||a g^T||_F = ||a|| ||g||
        return a.norm(dim=1) * g.norm(dim=1)
    if phase2 == "filter_norm":  # positive entries: a_i g_j > 0 iff same sign
        ap, an, gp, gn = a.clamp(min=0), (-a).clamp(min=0), g.clamp(min=0), (-g).clamp(min=0)
        sq = ap.square().sum(1) * gp.square().sum(1) + an.square().sum(1) * gn.square().sum(1)
        return sq.sqrt()
    if phase2 == "sum":
        return a.sum(1) * g.sum(1)
    # max of a_i g_j over i, j: attained at extreme pairs
    amax, amin, gmax, gmin = a.amax(1), a.amin(1), g.amax(1), g.amin(1)
    return torch.stack([amax * gmax, amax * gmin, amin * gmax, amin * gmin]).amax(0)


def _reduce(phi: Tensor, phase2: str) -> Tensor:
    """Phase 2 over dim 1 of an explicit per-location tensor phi (N, K, H, W)."""
    if phase2 == "norm":
        return phi.norm(dim=1)
    if phase2 == "filter_norm":
        return phi.clamp(min=0).norm(dim=1)
    if phase2 == "sum":
        return phi.sum(1)
    return phi.amax(1)


def two_phase_map(x: Tensor, g: Tensor, phase1: str = "conv1x1", phase2: str = "norm") -> Tensor:
    """Saliency map (N, H, W) of a layer from its output x and gradient g, both (N, C, H, W) (backprop-saliency).

    phase1 picks the virtual identity layer, phase2 the reduction over its per-location gradient phi_u:
    conv1x1 + norm = NormGrad = ||x_u|| * ||g_u||; scaling + sum = linear approximation sum_c x_cu g_cu;
    avg_bias_scaling + sum = sum_c x_cu * mean_v g_cv (Grad-CAM before its ReLU).

    >>> x, g = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    >>> m = two_phase_map(x, g, "conv1x1", "norm")             # (2, 5, 5)
    >>> torch.allclose(m, x.norm(dim=1) * g.norm(dim=1))
    True
    """
    choice("phase1", phase1, PHASE1)
    choice("phase2", phase2, PHASE2)
    if not isinstance(x, Tensor) or not isinstance(g, Tensor) or x.shape != g.shape or x.dim() != 4:
        raise ValueError("x and g must be tensors of the same shape (N, C, H, W), got "
                         f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(g, 'shape', ()))}")
    if phase1 == "bias":
        return _reduce(g, phase2)
    if phase1 == "scaling":
        return _reduce(x * g, phase2)
    if phase1 == "avg_bias_scaling":
        return _reduce(x * g.mean((2, 3), keepdim=True), phase2)
    if phase1 == "conv1x1":
        return _outer_reduce(x, g, phase2)
    patches = _unfold3x3(x)  # (N, C, 9, H, W)
    if phase1 == "conv3x3":
        return _outer_reduce(patches.flatten(1, 2), g, phase2)
    return _reduce((patches * g[:, :, None]).flatten(1, 2), phase2)  # depthwise: 9C values


def normalize_maps(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-example min-max normalisation to [0, 1] over all but the batch dim; a constant map becomes 0."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).reshape(maps.shape)


def upsample_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(N, H, W) or (N, 1, H, W) -> (N, 1, *size), bilinear (align_corners=False, as the official code)."""
    if maps.dim() == 3:
        maps = maps[:, None]
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------ layer capture
class LayerCapture(HookProbe):
    """Context manager capturing a module's output (every call) behind a virtual identity layer (backprop-saliency).

    The forward hook returns ``output.clone()``: the model continues on the copy, so an in-place op
    after the layer (``ReLU(inplace=True)``) never edits the captured tensor, and the gradient w.r.t.
    the captured tensor is the gradient at the virtual identity. Hooks are removed on exit, exceptions
    included; a module run k times per forward gives k captures.

    >>> with LayerCapture(model, ["conv3"]) as cap:
    ...     y = model(x)[:, 3].sum()
    >>> g, = torch.autograd.grad(y, cap.outputs["conv3"])
    """

    def __init__(self, model: nn.Module, layers: Sequence[str | nn.Module]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one module, got an empty list")
        names = dict(model.named_modules())
        self.modules: dict[str, nn.Module] = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Module):
                key = next((n for n, m in names.items() if m is layer), None)
                if key is None:
                    raise ValueError(f"layers[{i}] is not a submodule of the model")
            elif isinstance(layer, str):
                if layer not in names:
                    raise ValueError(f"layer {layer!r} not found in the model (modules: {sorted(names)[:12]}...)")
                key = layer
            else:
                raise TypeError(f"layers[{i}] must be a module name or an nn.Module, got {type(layer).__name__}")
            self.modules[key] = names[key]
        self.outputs: dict[str, list[Tensor]] = {k: [] for k in self.modules}
        self._handles: list = []

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {key!r} returned {type(output).__name__}; saliency needs a tensor output")
            self.outputs[key].append(output)
            return output.clone()  # the virtual identity layer
        return hook

    def _hooks(self):
        return [(m, self._hook(key)) for key, m in self.modules.items()]

    def single(self, key: str, call: int | None = None) -> Tensor:
        """The captured output of ``key``; a layer run several times needs ``call`` (an index) to choose."""
        outs = self.outputs[key]
        if not outs:
            raise RuntimeError(f"layer {key!r} did not run in the forward pass")
        if call is None:
            if len(outs) > 1:
                raise RuntimeError(f"layer {key!r} ran {len(outs)} times in one forward; pass call=<index> "
                                   "to choose which call to explain")
            return outs[0]
        if not -len(outs) <= call < len(outs):
            raise IndexError(f"call={call} but layer {key!r} ran {len(outs)} times")
        return outs[call]


# ------------------------------------------------------------------------------------ attributions
class Saliency:
    """Plain gradient saliency d y_c / d input (absolute value by default), captum's ``Saliency`` (backprop-saliency).

    attribution = |d f(x)[c] / dx|, input-shaped. The model is used as is (call ``model.eval()`` first
    when it has BatchNorm/dropout). ``internal_batch_size`` bounds how many inputs are in flight.

    >>> sal = Saliency(model)
    >>> a = sal.attribute(x, target=3)       # same shape as x
    >>> a.shape == x.shape
    True
    """

    def __init__(self, forward_func: Callable[[Tensor], Tensor]) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    def attribute(self, inputs: Tensor, target=None, abs: bool = True,
                  internal_batch_size: int | None = None) -> Tensor:
        inputs = tensor("inputs", inputs, floating=True, min_dim=2)
        n = inputs.shape[0]
        tgt = _targets(target, n, inputs.device)
        bs = _batch_size(internal_batch_size, n)
        out = []
        for i in range(0, n, bs):
            x = inputs[i:i + bs].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.forward_func(x)
                score, c = _scores(logits, None if tgt is None else tgt[i:i + bs])
                (g,) = torch.autograd.grad(self._objective(logits, c, score), x)
            out.append(g.abs() if abs else g)
        return torch.cat(out) if out else torch.empty_like(inputs)

    def _objective(self, logits: Tensor, target: Tensor, score: Tensor) -> Tensor:
        """What is differentiated w.r.t. the inputs: the summed explained logits (subclasses change it)."""
        return score


def input_gradient_saliency(model: Callable[[Tensor], Tensor], inputs: Tensor, target=None,
                            internal_batch_size: int | None = None) -> Tensor:
    """Simonyan et al.'s gradient map: max over colour channels of |d y_c / d x|, shape (N, 1, H, W) (backprop-saliency).

    >>> m = input_gradient_saliency(model, images, target=labels)   # (N, 1, H, W)
    """
    g = Saliency(model).attribute(inputs, target=target, abs=True, internal_batch_size=internal_batch_size)
    if g.dim() != 4:
        raise ValueError(f"inputs must be images (N, C, H, W), got shape {tuple(inputs.shape)}")
    return g.amax(1, keepdim=True)


class LayerSaliency:
    """Two-phase backprop saliency at one or several layers, combined into one input-sized map (backprop-saliency).

    For each layer: map_u = phase2(phi_u) with phi_u the per-location gradient of a virtual identity layer
    of type ``phase1`` (see :func:`two_phase_map`); then (optionally) ReLU, bilinear upsampling to the
    input size and min-max normalisation; several layers combine by product (official code) of the
    normalised maps. Returns (N, 1, H, W) (or the layer resolution when ``upsample=False``).

    >>> ng = LayerSaliency(model, ["conv2", "conv3"], phase1="conv1x1", phase2="norm")
    >>> m = ng.attribute(images, target=labels, internal_batch_size=32)   # (N, 1, H, W)
    >>> float(m.min()) >= 0.0
    True
    """

    def __init__(self, model: nn.Module, layers: Sequence[str | nn.Module] | str | nn.Module,
                 phase1: str = "conv1x1", phase2: str = "norm", combine: str = "product",
                 upsample: bool = True, normalize: bool = True, relu: bool = False,
                 call: int | None = None) -> None:
        self.capture_spec = LayerCapture(model, layers)  # validates model and layers
        self.model = model
        self.layers = list(self.capture_spec.modules)
        self.phase1 = choice("phase1", phase1, PHASE1)
        self.phase2 = choice("phase2", phase2, PHASE2)
        self.combine = choice("combine", combine, COMBINE)
        if len(self.layers) > 1 and not (upsample and normalize):
            raise ValueError("combining several layers needs upsample=True and normalize=True")
        self.upsample, self.normalize, self.relu, self.call = bool(upsample), bool(normalize), bool(relu), call

    @property
    def forward_func(self) -> nn.Module:
        return self.model

    def layer_maps(self, inputs: Tensor, target=None) -> dict[str, Tensor]:
        """Raw (N, h, w) maps at each layer's resolution for one batch (no upsampling, no normalisation)."""
        inputs = tensor("inputs", inputs, floating=True, min_dim=2)
        tgt = _targets(target, inputs.shape[0], inputs.device)
        with LayerCapture(self.model, self.layers) as cap, torch.enable_grad():
            score, _ = _scores(self.model(inputs), tgt)
            acts = [cap.single(k, self.call) for k in self.layers]
            grads = torch.autograd.grad(score, acts)
        maps = {}
        for k, x, g in zip(self.layers, acts, grads):
            m = two_phase_map(x.detach(), g, self.phase1, self.phase2)
            maps[k] = m.clamp(min=0) if self.relu else m
        return maps

    def _post(self, maps: dict[str, Tensor], size) -> Tensor:
        out = None
        for m in maps.values():
            m = upsample_maps(m, size) if self.upsample else m[:, None]
            if self.normalize:
                m = normalize_maps(m)
            if out is None:
                out = m
            elif self.combine == "product":
                out = out * m
            else:
                out = out + m
        if self.combine == "mean" and len(maps) > 1:
            out = out / len(maps)
        return out

    def attribute(self, inputs: Tensor, target=None, internal_batch_size: int | None = None) -> Tensor:
        inputs = tensor("inputs", inputs, floating=True, min_dim=2)
        n = inputs.shape[0]
        tgt = _targets(target, n, inputs.device)
        bs = _batch_size(internal_batch_size, n)
        size = inputs.shape[-2:]
        out = [self._post(self.layer_maps(inputs[i:i + bs], None if tgt is None else tgt[i:i + bs]), size)
               for i in range(0, n, bs)]
        return torch.cat(out)


class NormGrad(LayerSaliency):
    """NormGrad: ||x_u|| * ||g_u||, the Frobenius norm of a virtual 1x1 conv's gradient (backprop-saliency).

    ``selective=True``: scaling + filter_norm = ||max(x_u * g_u, 0)||. Several layers combine by product.

    >>> m = NormGrad(model, "conv3").attribute(images, target=labels)   # (N, 1, H, W) in [0, 1]
    """

    def __init__(self, model: nn.Module, layers, selective: bool = False, **kwargs) -> None:
        p1, p2 = ("scaling", "filter_norm") if selective else ("conv1x1", "norm")
        super().__init__(model, layers, phase1=p1, phase2=p2, **kwargs)


class LinearApprox(LayerSaliency):
    """Linear approximation (gradient x activation): sum_c x_cu g_cu, scaling + sum (backprop-saliency).

    >>> m = LinearApprox(model, "conv3").attribute(images, target=labels)
    """

    def __init__(self, model: nn.Module, layers, **kwargs) -> None:
        super().__init__(model, layers, phase1="scaling", phase2="sum", **kwargs)


class GradCAM(LayerSaliency):
    """Grad-CAM: ReLU(sum_c alpha_c x_cu), alpha_c = mean_v g_cv (Selvaraju et al.; backprop-saliency).

    Computed the classic way (channel weights, weighted sum); in the framework it is the spatially
    averaged "bias" gradient (``avg_bias_scaling`` + ``sum`` + ReLU), which at a layer followed only by
    global average pooling equals ReLU(linear approximation) because g is spatially constant there.

    >>> m = GradCAM(model, "conv3").attribute(images, target=labels)
    """

    def __init__(self, model: nn.Module, layers, **kwargs) -> None:
        super().__init__(model, layers, phase1="avg_bias_scaling", phase2="sum", relu=True, **kwargs)

    def layer_maps(self, inputs: Tensor, target=None) -> dict[str, Tensor]:
        inputs = tensor("inputs", inputs, floating=True, min_dim=2)
        tgt = _targets(target, inputs.shape[0], inputs.device)
        with LayerCapture(self.model, self.layers) as cap, torch.enable_grad():
            score, _ = _scores(self.model(inputs), tgt)
            acts = [cap.single(k, self.call) for k in self.layers]
            grads = torch.autograd.grad(score, acts)
        out = {}
        for k, x, g in zip(self.layers, acts, grads):
            if x.dim() != 4:
                raise ValueError(f"Grad-CAM needs a (N, C, H, W) layer output, {k!r} gave {tuple(x.shape)}")
            alpha = g.mean((2, 3))
            out[k] = torch.relu(torch.einsum("nc,nchw->nhw", alpha, x.detach()))
        return out


class MetaSaliency:
    """Meta-saliency: one SGD step on CE(f(x), c) per example, then any saliency, weights restored (backprop-saliency).

    theta' = theta - lr * d CE(f_theta(x), c) / d theta  (``negate=True``: theta + lr * ...); the wrapped
    attribution runs on f_theta' in eval mode. The step is per example (each image its own update); the
    model's parameters are restored bit-exactly after each example, exceptions included, and its
    ``.grad`` and training mode are left untouched.

    >>> meta = MetaSaliency(NormGrad(model, "conv3"), lr=1e-3)
    >>> m = meta.attribute(images, target=labels)          # same shape as the wrapped attribution's
    """

    def __init__(self, attribution, lr: float = 1e-4, negate: bool = False,
                 model: nn.Module | None = None) -> None:
        if not hasattr(attribution, "attribute"):
            raise TypeError(f"attribution must have an .attribute method, got {type(attribution).__name__}")
        model = model if model is not None else getattr(attribution, "forward_func", None)
        if not isinstance(model, nn.Module):
            raise TypeError("MetaSaliency needs the attribution's model as an nn.Module (pass model=...)")
        self.lr = real_scalar("lr", lr, nonneg=True)
        self.attribution, self.model, self.negate = attribution, model, bool(negate)

    @property
    def forward_func(self) -> nn.Module:
        return self.model

    def attribute(self, inputs: Tensor, target=None, internal_batch_size: int | None = None, **kwargs) -> Tensor:
        inputs = tensor("inputs", inputs, floating=True, min_dim=2)
        n = inputs.shape[0]
        tgt = _targets(target, n, inputs.device)
        _batch_size(internal_batch_size, n)  # validated; the step is per example, one at a time
        params = [p for p in self.model.parameters() if p.requires_grad]
        backup = [p.detach().clone() for p in params]
        was_training = self.model.training
        step = self.lr if self.negate else -self.lr
        out = []
        self.model.eval()
        try:
            for i in range(n):
                x = inputs[i:i + 1]
                with torch.enable_grad():
                    logits = self.model(x)
                    c = logits.detach().argmax(1) if tgt is None else tgt[i:i + 1]
                    grads = torch.autograd.grad(F.cross_entropy(logits, c), params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.add_(g, alpha=step)
                try:
                    out.append(self.attribution.attribute(x, target=c, **kwargs))
                finally:
                    with torch.no_grad():
                        for p, b in zip(params, backup):
                            p.copy_(b)
        finally:
            self.model.train(was_training)
        return torch.cat(out)


# ------------------------------------------------------------------------------------ metrics
def pointing_hits(maps: Tensor, boxes: Tensor, tolerance: float = 0.0) -> Tensor:
    """Per-example pointing-game hits: the map's argmax within ``tolerance`` px of the box (backprop-saliency).

    maps: (N, H, W) or (N, 1, H, W); boxes: (N, 4) inclusive pixel boxes (x0, y0, x1, y1). A hit when the
    Euclidean distance from the max point (first maximum in row-major order) to the box is <= tolerance.
    """
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4) or (maps.dim() == 4 and maps.shape[1] != 1):
        raise ValueError(f"maps must be (N, H, W) or (N, 1, H, W), got {tuple(getattr(maps, 'shape', ()))}")
    maps = maps.reshape(maps.shape[0], maps.shape[-2], maps.shape[-1])
    boxes = torch.as_tensor(boxes, device=maps.device)
    if boxes.shape != (maps.shape[0], 4):
        raise ValueError(f"boxes must have shape ({maps.shape[0]}, 4), got {tuple(boxes.shape)}")
    tol = real_scalar("tolerance", tolerance, nonneg=True)
    w = maps.shape[-1]
    idx = maps.flatten(1).argmax(1)
    py, px = (idx // w).double(), (idx % w).double()
    b = boxes.double()
    dx = torch.clamp(torch.maximum(b[:, 0] - px, px - b[:, 2]), min=0)
    dy = torch.clamp(torch.maximum(b[:, 1] - py, py - b[:, 3]), min=0)
    return (dx.square() + dy.square()).sqrt() <= tol + 1e-9


def pointing_game(maps: Tensor, boxes: Tensor, tolerance: float = 0.0) -> float:
    """Pointing-game accuracy in percent (see :func:`pointing_hits`) (backprop-saliency).

    >>> pointing_game(torch.eye(4)[None], torch.tensor([[2, 2, 3, 3]]), tolerance=0)
    100.0
    """
    hits = pointing_hits(maps, boxes, tolerance)
    return 100.0 * float(hits.double().mean()) if hits.numel() else float("nan")


def center_maps(n: int, size: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """The center baseline: maps (n, 1, H, W) peaking at the image center (backprop-saliency)."""
    h, w = int(size[0]), int(size[1])
    ys = torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2
    xs = torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2
    m = -(ys[:, None].square() + xs[None, :].square())
    return m.expand(n, 1, h, w).clone()


def pearson_per_example(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Pearson correlation of two batches of maps, per example (a constant map gives 0)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    # a correlation lies in [-1, 1] by definition; rounding can step just past the bound
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).clamp(-1.0, 1.0)


def class_sensitivity(attribution, model: nn.Module, inputs: Tensor, internal_batch_size: int | None = None,
                      batch_size: int = 256) -> float:
    """Mean Pearson correlation between the maps of each input's most and least probable class (backprop-saliency).

    Lower = more class-sensitive. ``attribution`` has ``.attribute(inputs, target=...)``.

    >>> class_sensitivity(NormGrad(model, "conv3"), model, images)
    """
    inputs = tensor("inputs", inputs, floating=True, min_dim=2)
    with torch.no_grad():
        logits = torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    hi, lo = logits.argmax(1), logits.argmin(1)
    a = attribution.attribute(inputs, target=hi, internal_batch_size=internal_batch_size)
    b = attribution.attribute(inputs, target=lo, internal_batch_size=internal_batch_size)
    return float(pearson_per_example(a, b).mean())


__all__ = ["PHASE1", "PHASE2", "two_phase_map", "normalize_maps", "upsample_maps", "LayerCapture", "Saliency",
           "input_gradient_saliency", "LayerSaliency", "NormGrad", "LinearApprox", "GradCAM", "MetaSaliency",
           "pointing_hits", "pointing_game", "center_maps", "pearson_per_example", "class_sensitivity"]
