"""Mesa layers: drop-in Linear/GELU/Softmax/MatMul/LayerNorm that save 8-bit activations (paper slug: mesa).

Forward is exact; the tensor kept for backward is stored as a group-wise integer code with running
(EMA) range estimates and stochastic rounding (see :mod:`gradkit.functional.compressed`):
x_hat = q / s + beta, s = (2**bits - 1) / alpha. In eval mode, under ``torch.no_grad()`` or with
``enabled=False`` every layer calls the plain PyTorch op.

>>> model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
>>> mesa_convert(model, groups=4)                    # swaps modules in place, keeps the weights
>>> model(torch.randn(8, 16)).sum().backward()       # saved activations are uint8 codes
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import integer, is_int, positive_int
from ..functional.compressed import ActQuantizer, q_gelu, q_layer_norm, q_linear, q_matmul, q_softmax

POLICY_KEYS = ("linear", "gelu", "softmax", "matmul", "layernorm")


def _divides(groups: int, size: int, what: str) -> None:
    if size % groups != 0:
        raise ValueError(f"groups={groups} must divide {what}={size}")


class MesaModule(nn.Module):
    """Base: ``enabled`` switch; compressed path only in training with gradients enabled."""

    enabled: bool

    def _active(self) -> bool:
        return self.enabled and self.training and torch.is_grad_enabled()


class MesaLinear(nn.Linear, MesaModule):
    """nn.Linear saving its input as codes grouped over ``groups`` chunks of in_features (paper slug: mesa).

    dW = g^T x_hat, dx = g W, db = sum(g). Example:
    >>> layer = MesaLinear(64, 10, groups=4)
    >>> layer(torch.randn(2, 17, 64)).sum().backward()
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8, groups: int = 1,
                 ema_decay: float = 0.9, stochastic: bool = True, enabled: bool = True, device=None,
                 dtype=None) -> None:
        positive_int("groups", groups)
        _divides(groups, in_features, "in_features")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.quantizer = ActQuantizer(bits, groups, -1, ema_decay, stochastic)
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._active():
            return q_linear(x, self.weight, self.bias, self.quantizer)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", enabled={self.enabled}"


class MesaGELU(MesaModule):
    """GELU saving its input as codes (groups over the last dim); dx = g * GELU'(x_hat) (paper slug: mesa).

    >>> act = MesaGELU(groups=4)
    >>> act(torch.randn(2, 5, 64, requires_grad=True)).sum().backward()
    """

    def __init__(self, approximate: str = "none", *, bits: int = 8, groups: int = 1, ema_decay: float = 0.9,
                 stochastic: bool = True, enabled: bool = True) -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.quantizer = ActQuantizer(bits, groups, -1, ema_decay, stochastic)
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._active():
            return q_gelu(x, self.quantizer, self.approximate)
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, enabled={self.enabled}"


class MesaSoftmax(MesaModule):
    """Softmax saving its output as codes grouped over ``group_dim`` (heads of (B, H, N, N)) (paper slug: mesa).

    dx = y_hat * (g - sum(g * y_hat, dim)). Example:
    >>> sm = MesaSoftmax(dim=-1, groups=4, group_dim=1)
    >>> sm(torch.randn(2, 4, 5, 5, requires_grad=True)).sum().backward()
    """

    def __init__(self, dim: int = -1, *, bits: int = 8, groups: int = 1, group_dim: int = 1,
                 ema_decay: float = 0.9, stochastic: bool = True, enabled: bool = True) -> None:
        super().__init__()
        self.dim = integer("dim", dim)
        self.quantizer = ActQuantizer(bits, groups, group_dim, ema_decay, stochastic)
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._active():
            return q_softmax(x, self.dim, self.quantizer)
        return torch.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, enabled={self.enabled}"


class MesaMatMul(MesaModule):
    """``a @ b`` saving both operands as codes grouped over ``group_dim`` (heads) (paper slug: mesa).

    da = g b_hat^T, db = a_hat^T g. Example:
    >>> mm = MesaMatMul(groups=4, group_dim=1)
    >>> mm(torch.randn(2, 4, 5, 8, requires_grad=True), torch.randn(2, 4, 8, 5)).sum().backward()
    """

    def __init__(self, *, bits: int = 8, groups: int = 1, group_dim: int = 1, ema_decay: float = 0.9,
                 stochastic: bool = True, enabled: bool = True) -> None:
        super().__init__()
        self.quantizer_a = ActQuantizer(bits, groups, group_dim, ema_decay, stochastic)
        self.quantizer_b = ActQuantizer(bits, groups, group_dim, ema_decay, stochastic)
        self.enabled = enabled

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._active():
            return q_matmul(a, b, self.quantizer_a, self.quantizer_b)
        return torch.matmul(a, b)

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}"


class MesaLayerNorm(nn.LayerNorm, MesaModule):
    """nn.LayerNorm saving its input as codes (mean, rstd exact); backward at x_hat (paper slug: mesa).

    >>> ln = MesaLayerNorm(64, groups=4)
    >>> ln(torch.randn(2, 5, 64)).sum().backward()
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True, *,
                 bits: int = 8, groups: int = 1, ema_decay: float = 0.9, stochastic: bool = True,
                 enabled: bool = True, device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        positive_int("groups", groups)
        _divides(groups, self.normalized_shape[-1], "normalized_shape[-1]")
        self.quantizer = ActQuantizer(bits, groups, -1, ema_decay, stochastic)
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._active():
            return q_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.quantizer)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", enabled={self.enabled}"


class MesaAttention(MesaModule):
    """Multi-head self-attention with explicit q k^T, softmax and A v, all Mesa layers (paper slug: mesa).

    softmax(q k^T / sqrt(d)) v; q, k, v, the attention map and the qkv/proj inputs are saved as codes,
    grouped per head (``groups`` must divide ``heads``). ``enabled=False`` gives the exact baseline with
    the same explicit ops. Example:
    >>> attn = MesaAttention(64, heads=4, groups=4)
    >>> attn(torch.randn(2, 17, 64)).sum().backward()
    """

    def __init__(self, dim: int, heads: int, *, groups: int | None = None, bits: int = 8, ema_decay: float = 0.9,
                 stochastic: bool = True, enabled: bool = True, qkv_bias: bool = True) -> None:
        super().__init__()
        heads = positive_int("heads", heads)
        if not is_int(dim, low=1) or dim % heads:
            raise ValueError(f"dim must be a positive int divisible by heads={heads}, got {dim!r}")
        groups = heads if groups is None else positive_int("groups", groups)
        _divides(groups, heads, "heads")
        kw = dict(bits=bits, groups=groups, ema_decay=ema_decay, stochastic=stochastic, enabled=enabled)
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = MesaLinear(dim, 3 * dim, bias=qkv_bias, **kw)
        self.matmul_qk = MesaMatMul(group_dim=1, **kw)
        self.softmax = MesaSoftmax(-1, group_dim=1, **kw)
        self.matmul_av = MesaMatMul(group_dim=1, **kw)
        self.proj = MesaLinear(dim, dim, **kw)
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.softmax(self.matmul_qk(q * self.scale, k.transpose(-2, -1)))
        out = self.matmul_av(attn, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class MesaViT(nn.Module):
    """Tiny pre-LN Vision Transformer built from Mesa layers (the mesa claim's model; paper slug: mesa).

    Patches of a (B, C, H, W) image (or a flat (B, C*H*W) vector with ``in_chans`` and ``image_size``)
    -> Linear embedding + cls token + learned positions -> ``depth`` blocks x = x + attn(LN(x)),
    x = x + MLP(LN(x)) -> LN -> head on the cls token; DeiT init (trunc-normal 0.02). ``enabled=False``
    is the exact fp32 baseline with identical ops and initialisation.
    >>> vit = MesaViT(image_size=8, patch=2, num_classes=10, dim=64, depth=2, heads=4)
    >>> vit(torch.randn(3, 64)).shape
    torch.Size([3, 10])
    """

    def __init__(self, image_size: int = 8, patch: int = 2, in_chans: int = 1, num_classes: int = 10,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 4, *, groups: int | None = None,
                 bits: int = 8, ema_decay: float = 0.9, stochastic: bool = True, enabled: bool = True) -> None:
        super().__init__()
        for name, v in (("image_size", image_size), ("patch", patch), ("in_chans", in_chans),
                        ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("mlp_ratio", mlp_ratio)):
            positive_int(name, v)
        if image_size % patch:
            raise ValueError(f"patch={patch} must divide image_size={image_size}")
        groups = heads if groups is None else groups
        kw = dict(bits=bits, groups=groups, ema_decay=ema_decay, stochastic=stochastic, enabled=enabled)
        self.image_size, self.patch, self.in_chans = image_size, patch, in_chans
        n_tokens = (image_size // patch) ** 2
        patch_dim = in_chans * patch * patch
        self.embed = MesaLinear(patch_dim, dim, **{**kw, "groups": groups if patch_dim % groups == 0 else 1})
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "ln1": MesaLayerNorm(dim, **kw),
                "attn": MesaAttention(dim, heads, **kw),
                "ln2": MesaLayerNorm(dim, **kw),
                "fc1": MesaLinear(dim, dim * mlp_ratio, **kw),
                "act": MesaGELU(**kw),
                "fc2": MesaLinear(dim * mlp_ratio, dim, **kw),
            }))
        self.norm = MesaLayerNorm(dim, **kw)
        self.head = MesaLinear(dim, num_classes, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DeiT/timm ViT init: Linear weights, cls and positions ~ trunc_normal(std 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        s, p, c = self.image_size, self.patch, self.in_chans
        x = x.reshape(x.shape[0], c, s // p, p, s // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], (s // p) ** 2, c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(self.patchify(x))
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for blk in self.blocks:
            t = t + blk["attn"](blk["ln1"](t))
            t = t + blk["fc2"](blk["act"](blk["fc1"](blk["ln2"](t))))
        return self.head(self.norm(t)[:, 0])


def set_mesa_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every Mesa layer of ``model`` on or off; return how many were switched."""
    n = 0
    for m in model.modules():
        if isinstance(m, MesaModule):
            m.enabled = bool(enabled)
            n += 1
    return n


def mesa_convert(model: nn.Module, groups: int = 1, *, bits: int = 8, ema_decay: float = 0.9,
                 stochastic: bool = True, policy: Mapping[str, bool] | None = None) -> nn.Module:
    """Swap nn.Linear/GELU/Softmax/LayerNorm of ``model`` in place for Mesa layers (paper slug: mesa).

    The new layers share the old Parameter objects (an existing optimizer keeps working). ``groups``
    must divide each converted layer's channel count (Linear in_features, LayerNorm size, the last dim
    of a GELU's input, the head dim of a Softmax's (B, H, N, N) input); a mismatch raises ValueError.
    Functional ``q @ k.transpose(-2, -1)`` / ``F.softmax`` calls are not modules and must be replaced by
    hand (use :class:`MesaAttention`). ``policy`` maps "linear", "gelu", "softmax", "layernorm" to
    False to skip a type. Returns ``model`` (a bare convertible module is returned converted).
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    >>> model = mesa_convert(model, groups=2)
    >>> type(model[0]).__name__
    'MesaLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    positive_int("groups", groups)
    integer("bits", bits, low=1, high=16)
    pol = {k: True for k in POLICY_KEYS}
    if policy is not None:
        unknown = set(policy) - set(POLICY_KEYS)
        if unknown:
            raise ValueError(f"policy has unknown keys {sorted(unknown)}; expected a subset of {POLICY_KEYS}")
        pol.update({k: bool(v) for k, v in policy.items()})
    kw = dict(bits=bits, groups=groups, ema_decay=ema_decay, stochastic=stochastic)

    def swap(name: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, MesaModule):
            return None
        if type(m) is nn.Linear and pol["linear"]:
            if m.in_features % groups:
                raise ValueError(f"groups={groups} must divide in_features={m.in_features} of layer {name!r}")
            new = MesaLinear(m.in_features, m.out_features, m.bias is not None, device="meta", **kw)
            new.weight, new.bias = m.weight, m.bias
        elif type(m) is nn.GELU and pol["gelu"]:
            new = MesaGELU(m.approximate, **kw)
        elif type(m) is nn.Softmax and pol["softmax"]:
            new = MesaSoftmax(m.dim if m.dim is not None else -1, group_dim=1, **kw)
        elif type(m) is nn.LayerNorm and pol["layernorm"]:
            if m.normalized_shape[-1] % groups:
                raise ValueError(f"groups={groups} must divide normalized_shape[-1]={m.normalized_shape[-1]} "
                                 f"of layer {name!r}")
            new = MesaLayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, m.bias is not None,
                                device="meta", **kw)
            new.weight, new.bias = m.weight, m.bias
        else:
            return None
        ref = next(iter(list(m.parameters()) + list(m.buffers())), None)
        if ref is not None:
            for q in new.modules():
                if isinstance(q, ActQuantizer):
                    q.to(ref.device)
        new.train(m.training)
        return new

    top = swap("", model)
    if top is not None:
        return top
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            new = swap(f"{name}.{child_name}" if name else child_name, child)
            if new is not None:
                setattr(parent, child_name, new)
    return model


__all__ = ["MesaModule", "MesaLinear", "MesaGELU", "MesaSoftmax", "MesaMatMul", "MesaLayerNorm", "MesaAttention",
           "MesaViT", "mesa_convert", "set_mesa_enabled", "POLICY_KEYS"]
