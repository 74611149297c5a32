"""EvoNorm normalisation-activation layers, B0 and S0 (paper slug: ``evonorm``).

Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", NeurIPS 2020 (arXiv 2004.02967).
Each layer replaces the *pair* ``BatchNorm2d -> ReLU`` on an ``(N, C, H, W)`` input::

    B0: y = x / max( sqrt(s2_batch(x) + eps), v * x + sqrt(s2_inst(x) + eps) ) * gamma + beta
    S0: y = x * sigmoid(v * x) / sqrt(s2_group(x) + eps) * gamma + beta

All variances are biased and taken of the layer *input* x: ``s2_batch`` over (N, H, W) per channel,
``s2_inst`` over (H, W) per sample and channel, ``s2_group`` over (H, W, channels of the group) per
sample. B0 keeps a moving variance for eval (used in the left term only; the right term stays
per-sample); S0 has no batch statistics and is identical in train and eval. With
``apply_act=False`` (where the network has a BN without ReLU) both apply only ``x * gamma + beta``,
as the official TF ResNet does. Statistics of float16/bfloat16 inputs are computed in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, choice, positive_int, real_scalar

__all__ = ["EvoNormB0", "EvoNormS0", "evonorm_b0", "evonorm_s0", "group_std", "instance_std", "batch_var",
           "resolve_groups", "replace_bn_relu"]

_LOW = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ checks
def _check_input(x: Tensor, num_features: int | None, who: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point input, got dtype {x.dtype}")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(f"{who} expects {num_features} channels (dim 1), got shape {tuple(x.shape)}")


def _eps(value: object) -> float:
    eps = real_scalar("eps", value, tensor_ok=False)
    if eps <= 0:
        raise ArgumentError(f"eps must be finite and > 0, got {value!r}")
    return eps


def _momentum(value: object) -> float:
    m = real_scalar("momentum", value, tensor_ok=False)
    if not 0.0 <= m <= 1.0:
        raise ArgumentError(f"momentum must be finite and in [0, 1], got {value!r}")
    return m


def _stat_input(x: Tensor) -> Tensor:
    """Statistics are computed in float32 for half-precision inputs (variance overflows in fp16)."""
    return x.float() if x.dtype in _LOW else x


def _per_channel(p: Tensor) -> Tensor:
    return p.reshape(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------ moments
def batch_var(x: Tensor) -> Tensor:
    """Biased per-channel variance over (N, H, W) of a 4-D input, shape ``(C,)`` (float32 for half inputs)."""
    return _stat_input(x).var(dim=(0, 2, 3), unbiased=False)


def instance_std(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``sqrt(Var over (H, W) + eps)`` per sample and channel, shape ``(N, C, 1, 1)``, in x's dtype."""
    xs = _stat_input(x)
    return (xs.var(dim=(2, 3), unbiased=False, keepdim=True) + eps).sqrt().to(x.dtype)


def group_std(x: Tensor, groups: int, eps: float = 1e-5) -> Tensor:
    """``sqrt(Var over (H, W, channels of group g) + eps)`` broadcast to each channel: ``(N, C, 1, 1)``.

    Groups are runs of ``C // groups`` consecutive channels (as in GroupNorm and the official code).
    """
    n, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"groups={groups} does not divide the {c} channels of the input")
    xs = _stat_input(x).reshape(n, groups, -1)
    std = (xs.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()  # (N, G, 1)
    return std.expand(n, groups, c // groups).reshape(n, c, 1, 1).to(x.dtype)


def resolve_groups(num_channels: int, groups: int = 32, group_size: int | None = None,
                   fallback: bool = True) -> int:
    """Number of groups for ``num_channels``: from ``group_size`` if given, else ``groups``.

    ``fallback=True`` follows the official TF code (decrement ``groups`` until it divides the channel
    count: 48 channels with 32 groups -> 24); ``fallback=False`` follows timm and raises instead.
    """
    num_channels = positive_int("num_channels", num_channels)
    if group_size is not None:
        group_size = positive_int("group_size", group_size)
        if num_channels % group_size:
            raise ValueError(f"group_size={group_size} must divide num_features={num_channels}")
        return num_channels // group_size
    groups = positive_int("groups", groups)
    if num_channels % groups == 0:
        return groups
    if not fallback:
        raise ValueError(f"groups={groups} must divide num_features={num_channels} "
                         "(or pass group_fallback=True to use the largest divisor below it)")
    g = min(groups, num_channels)
    while num_channels % g:
        g -= 1
    return g


# ------------------------------------------------------------------------------------------ functional
def evonorm_b0(x: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, running_var: Tensor | None = None,
               training: bool = True, eps: float = 1e-5, momentum: float = 0.1, apply_act: bool = True) -> Tensor:
    """EvoNorm-B0 on a 4-D input (paper slug: ``evonorm``).

    ``y = x / max(sqrt(s2_batch + eps), v * x + sqrt(s2_inst + eps)) * gamma + beta``. In training the
    current batch variance is used and ``running_var`` (if given) is updated in place,
    ``running_var <- (1 - momentum) * running_var + momentum * s2_batch`` (biased, as the official
    code); in eval the left term uses ``running_var``. ``apply_act=False``: ``x * gamma + beta``.

    Example::

        >>> c = 8; v, g, b, rv = torch.ones(c), torch.ones(c), torch.zeros(c), torch.ones(c)
        >>> y = evonorm_b0(torch.randn(4, c, 5, 5), v, g, b, rv, training=True)
        >>> y.shape
        torch.Size([4, 8, 5, 5])
    """
    _check_input(x, None, "evonorm_b0")
    eps = _eps(eps)
    if not apply_act:
        return x * _per_channel(gamma) + _per_channel(beta)
    if training:
        var = batch_var(x)
        if running_var is not None:
            momentum = _momentum(momentum)
            with torch.no_grad():
                running_var.lerp_(var.detach().to(running_var.dtype), momentum)
    else:
        if running_var is None:
            raise ValueError("evonorm_b0 in eval mode (training=False) needs running_var")
        var = running_var
    left = _per_channel((var + eps).sqrt().to(x.dtype))
    right = _per_channel(v) * x + instance_std(x, eps)
    return x / torch.maximum(left, right) * _per_channel(gamma) + _per_channel(beta)


def evonorm_s0(x: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, groups: int = 32, eps: float = 1e-5,
               apply_act: bool = True) -> Tensor:
    """EvoNorm-S0 on a 4-D input (paper slug: ``evonorm``): no batch statistics, same in train and eval.

    ``y = x * sigmoid(v * x) / sqrt(s2_group(x) + eps) * gamma + beta``; ``apply_act=False``:
    ``x * gamma + beta``. ``groups`` must divide the channel count (see :func:`resolve_groups`).

    Example::

        >>> c = 8; v, g, b = torch.ones(c), torch.ones(c), torch.zeros(c)
        >>> evonorm_s0(torch.randn(2, c, 5, 5), v, g, b, groups=4).shape
        torch.Size([2, 8, 5, 5])
    """
    _check_input(x, None, "evonorm_s0")
    eps = _eps(eps)
    if not apply_act:
        return x * _per_channel(gamma) + _per_channel(beta)
    groups = positive_int("groups", groups)
    return x * torch.sigmoid(_per_channel(v) * x) / group_std(x, groups, eps) * _per_channel(gamma) \
        + _per_channel(beta)


# ------------------------------------------------------------------------------------------ modules
class _EvoNormBase(nn.Module):
    def __init__(self, num_features: int, eps: float, apply_act: bool) -> None:
        super().__init__()
        self.num_features = positive_int("num_features", num_features)
        self.eps = _eps(eps)
        self.apply_act = boolean("apply_act", apply_act)
        self.weight = nn.Parameter(torch.ones(num_features))   # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))    # beta
        # v exists only where the layer has its non-linearity (the official code creates it there)
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None


class EvoNormB0(_EvoNormBase):
    """EvoNorm-B0, a drop-in for ``BatchNorm2d + ReLU`` (paper slug: ``evonorm``).

    ``y = x / max(sqrt(s2_batch(x) + eps), v * x + sqrt(s2_inst(x) + eps)) * gamma + beta``, biased
    variances of the input. Training uses the batch variance and updates ``running_var`` (init 1)
    with PyTorch-style ``momentum`` (0.1 = the official TF decay 0.9; biased, no n/(n-1)); eval uses
    ``running_var`` in the left term and still the per-sample instance variance on the right.
    Parameters: ``weight`` (gamma, init 1), ``bias`` (beta, 0), ``v`` (1). ``eps=1e-5`` as the
    official TF code (timm uses 1e-3).

    Example::

        >>> layer = EvoNormB0(16)
        >>> y = layer(torch.randn(8, 16, 10, 10))      # train: batch variance, updates running_var
        >>> layer.eval(); y = layer(torch.randn(1, 16, 10, 10))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, apply_act: bool = True) -> None:
        super().__init__(num_features, eps, apply_act)
        self.momentum = _momentum(momentum)
        if apply_act:
            self.register_buffer("running_var", torch.ones(num_features))
        else:
            self.register_buffer("running_var", None)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features, type(self).__name__)
        return evonorm_b0(x, self.v, self.weight, self.bias, self.running_var, self.training, self.eps,
                          self.momentum, self.apply_act)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum:g}, apply_act={self.apply_act}"


class EvoNormS0(_EvoNormBase):
    """EvoNorm-S0, a batch-independent drop-in for ``BatchNorm2d + ReLU`` (paper slug: ``evonorm``).

    ``y = x * sigmoid(v * x) / sqrt(s2_group(x) + eps) * gamma + beta`` with the group variance of
    the input over (H, W, channels of the group); identical in train and eval. ``groups`` (default
    32) or ``group_size`` sets the grouping; when ``groups`` does not divide ``num_features``,
    ``group_fallback=True`` decrements it until it does (official TF), ``False`` raises (timm).

    Example::

        >>> layer = EvoNormS0(48)                     # 32 does not divide 48 -> 24 groups
        >>> layer.groups
        24
        >>> y = layer(torch.randn(2, 48, 8, 8))
    """

    def __init__(self, num_features: int, groups: int = 32, group_size: int | None = None, eps: float = 1e-5,
                 apply_act: bool = True, group_fallback: bool = True) -> None:
        super().__init__(num_features, eps, apply_act)
        self.group_fallback = boolean("group_fallback", group_fallback)
        self.groups = resolve_groups(self.num_features, groups, group_size, self.group_fallback)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.num_features, type(self).__name__)
        return evonorm_s0(x, self.v, self.weight, self.bias, self.groups, self.eps, self.apply_act)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps:g}, apply_act={self.apply_act}"


_KINDS = {"B0": EvoNormB0, "S0": EvoNormS0}


def replace_bn_relu(model: nn.Module, kind: str = "S0", **kw) -> int:
    """Replace ``BatchNorm2d -> ReLU`` pairs inside ``nn.Sequential`` containers by EvoNorm, in place.

    A pair becomes ``EvoNorm(apply_act=True)`` followed by ``nn.Identity()`` (the ReLU's slot); a
    ``BatchNorm2d`` in a Sequential that is not followed by a ReLU becomes ``EvoNorm(apply_act=False)``
    (affine only, as the official ResNet's last norm of a residual branch and projection shortcut).
    BatchNorm2d modules outside a Sequential are left unchanged (their pairing with an activation
    cannot be read from the module tree). ``kw`` goes to the EvoNorm constructor (e.g. ``groups=8``);
    the BatchNorm's own eps/momentum/statistics are not carried over (EvoNorm defaults apply).
    Returns the number of BatchNorm2d modules replaced. (paper slug: ``evonorm``)

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        >>> replace_bn_relu(net, "S0", groups=8)
        1
    """
    choice("kind", kind, sorted(_KINDS))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if "apply_act" in kw:
        raise ValueError("apply_act is chosen per layer by replace_bn_relu; do not pass it")
    cls = _KINDS[kind]
    count = 0
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for i, name in enumerate(names):
            bn = module._modules[name]
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            nxt = module._modules[names[i + 1]] if i + 1 < len(names) else None
            paired = isinstance(nxt, nn.ReLU)
            new = cls(bn.num_features, apply_act=paired, **kw)
            if bn.weight is not None:
                new.to(device=bn.weight.device, dtype=bn.weight.dtype)
            module._modules[name] = new
            if paired:
                module._modules[names[i + 1]] = nn.Identity()
            count += 1
    return count
