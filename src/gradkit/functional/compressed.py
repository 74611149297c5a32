"""8-bit saved activations: group-wise quantiser and autograd Functions that save codes (paper slug: mesa).

The forward pass is exact; only the tensor each op keeps for its backward is stored as an integer code
and dequantised in backward (Mesa, arXiv 2111.11124). Per group g (a contiguous chunk of channels or of
heads) with running range alpha_g and offset beta_g (EMA of max-min and of min, decay lambda):

    s_g   = (L - 1) / max(|alpha_g|, eps)          L = 2**bits levels
    q     = clamp(floor((x - beta_g) * s_g + u), 0, L - 1),   u ~ U(0, 1)   (stochastic rounding)
    x_hat = q / s_g + beta_g

Deviation from the official code: codes are clamped to L - 1 as well (the official CUDA kernel only
clamps at 0, so values above beta + alpha wrap around when cast to uint8).

>>> q = ActQuantizer(groups=2, group_dim=-1)
>>> codes, alpha, beta = q.pack(torch.randn(4, 8))
>>> x_hat = q.unpack(codes, alpha, beta)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import integer, optional_generator, positive_int, real_scalar

EPS = 1e-8


# ------------------------------------------------------------------------------------------ math helpers
def _grouped(x: torch.Tensor, groups: int, group_dim: int) -> tuple[torch.Tensor, int]:
    """View ``x`` as ``shape[:d] + (groups, size // groups) + shape[d+1:]``; return it and the group axis."""
    if x.dim() == 0:
        raise ValueError("cannot quantise a 0-dim tensor by groups; give a tensor with >= 1 dim")
    d = group_dim % x.dim() if -x.dim() <= group_dim < x.dim() else None
    if d is None:
        raise ValueError(f"group_dim={group_dim} is out of range for a tensor of shape {tuple(x.shape)}")
    size = x.shape[d]
    if size % groups != 0:
        raise ValueError(f"groups={groups} must divide the size {size} of dim {group_dim} "
                         f"(tensor of shape {tuple(x.shape)})")
    return x.reshape(*x.shape[:d], groups, size // groups, *x.shape[d + 1:]), d


def _bcast(v: torch.Tensor, xg: torch.Tensor, d: int) -> torch.Tensor:
    """Per-group vector ``v`` (G,) shaped to broadcast against the grouped view (group axis ``d``)."""
    return v.reshape((1,) * d + (v.numel(),) + (1,) * (xg.dim() - d - 1))


def group_range(x: torch.Tensor, groups: int = 1, group_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (max - min, min) of ``x``, each of shape (groups,)."""
    xg, d = _grouped(x.detach(), groups, group_dim)
    # (A, G, R): leading dims, groups, the rest; reduce the larger contiguous side first (fast on CPU)
    x3 = xg.reshape(math.prod(xg.shape[:d]), groups, -1)
    # separate amin/amax: on CPU torch.aminmax over a dim is about 10x slower than the two reductions
    if x3.shape[2] >= x3.shape[0]:
        lo, hi = x3.amin(2).amin(0), x3.amax(2).amax(0)
    else:
        lo, hi = x3.amin(0).amin(1), x3.amax(0).amax(1)
    return hi - lo, lo


def _code_dtype(bits: int) -> tuple[torch.dtype, int]:
    """Storage dtype and offset: uint8 for <= 8 bits, int16 (codes shifted by 2**15) up to 16 bits."""
    return (torch.uint8, 0) if bits <= 8 else (torch.int16, 2 ** 15)


def quantize(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, *, bits: int = 8, groups: int = 1,
             group_dim: int = -1, stochastic: bool = True, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """Integer codes of ``x`` with per-group range ``alpha`` and offset ``beta`` (paper slug: mesa).

    q = clamp(floor((x - beta) * s + u), 0, L-1), s = (L-1)/max(|alpha|, eps), u ~ U(0,1) (or u = 1/2
    when ``stochastic=False``: round to nearest). Stored as uint8 (bits <= 8) or int16 minus 2**15.
    """
    bits = integer("bits", bits, low=1, high=16)
    levels = 2 ** bits - 1
    cdt = torch.promote_types(x.dtype, torch.float32)
    xg, d = _grouped(x.detach().to(cdt), groups, group_dim)
    s = _bcast(levels / alpha.detach().to(cdt).abs().clamp_min(EPS), xg, d)
    b = _bcast(beta.detach().to(cdt), xg, d)
    if stochastic:  # floor((x - beta) * s + u)
        u = torch.rand(xg.shape, dtype=cdt, device=xg.device, generator=generator)
        v = torch.addcmul(u, xg - b, s).floor_()
    else:
        v = torch.round((xg - b) * s)
    v = v.clamp_(0, levels)
    dtype, offset = _code_dtype(bits)
    if offset:
        v = v - offset
    return v.to(dtype).reshape(x.shape)


def dequantize(codes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, *, bits: int = 8, groups: int = 1,
               group_dim: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = q / s + beta with s = (L-1)/max(|alpha|, eps), per group; returned in ``dtype``."""
    bits = integer("bits", bits, low=1, high=16)
    levels = 2 ** bits - 1
    cdt = torch.promote_types(dtype, torch.float32)
    _, offset = _code_dtype(bits)
    qg, d = _grouped(codes.to(cdt) + offset if offset else codes.to(cdt), groups, group_dim)
    scale = _bcast(alpha.to(cdt).abs().clamp_min(EPS) / levels, qg, d)
    out = qg * scale + _bcast(beta.to(cdt), qg, d)
    return out.reshape(codes.shape).to(dtype)


# ------------------------------------------------------------------------------------------ quantiser
class ActQuantizer(nn.Module):
    """Group-wise activation quantiser with running (EMA) range estimates (paper slug: mesa).

    Buffers ``alpha`` (range) and ``beta`` (offset), shape (groups,), are updated in every training
    ``pack``: alpha <- lambda alpha + (1 - lambda)(max - min), beta <- lambda beta + (1 - lambda) min
    (first call: copied). ``pack(x) -> (codes, alpha, beta)`` snapshots the ranges used;
    ``unpack(codes, alpha, beta) -> x_hat``. Stochastic rounding draws from ``generator`` (an attribute,
    settable later) or, when it is None, from the global RNG: then every random draw after a Mesa layer
    (dropout masks, noise) differs from the same model in float32 with the same seed.

    >>> q = ActQuantizer(bits=8, groups=4, group_dim=1)      # (B, H, N, D): groups of heads
    >>> codes, a, b = q.pack(torch.randn(2, 4, 5, 3))
    >>> q.unpack(codes, a, b).shape
    torch.Size([2, 4, 5, 3])
    """

    def __init__(self, bits: int = 8, groups: int = 1, group_dim: int = -1, ema_decay: float = 0.9,
                 stochastic: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = optional_generator(generator)
        self.bits = integer("bits", bits, low=1, high=16)
        self.groups = positive_int("groups", groups)
        self.group_dim = integer("group_dim", group_dim)
        ema_decay = real_scalar("ema_decay", ema_decay, tensor_ok=False)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.ema_decay = ema_decay
        self.stochastic = bool(stochastic)
        self.register_buffer("alpha", torch.ones(groups))
        self.register_buffer("beta", torch.zeros(groups))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.last_dtype = torch.float32  # dtype of the last packed tensor (unpack returns it)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """One EMA step of (alpha, beta) from ``x`` (no gradient)."""
        r, m = group_range(x, self.groups, self.group_dim)
        r, m = r.to(self.alpha), m.to(self.beta)
        if not bool(self.initialized):
            self.alpha.copy_(r)
            self.beta.copy_(m)
            self.initialized.fill_(True)
        else:
            lam = self.ema_decay
            self.alpha.mul_(lam).add_(r, alpha=1 - lam)
            self.beta.mul_(lam).add_(m, alpha=1 - lam)

    def pack(self, x: torch.Tensor, update: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes of ``x`` and the (alpha, beta) snapshot used; EMA updated first when training."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                            + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if self.training if update is None else update:
            self.update(x)
        elif not bool(self.initialized):
            self.update(x)  # never calibrated: use this tensor's own range
        self.last_dtype = x.dtype
        alpha, beta = self.alpha.detach().clone(), self.beta.detach().clone()
        codes = quantize(x, alpha, beta, bits=self.bits, groups=self.groups, group_dim=self.group_dim,
                         stochastic=self.stochastic, generator=self.generator)
        return codes, alpha, beta

    def unpack(self, codes: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(codes, alpha, beta, bits=self.bits, groups=self.groups, group_dim=self.group_dim,
                          dtype=self.last_dtype if dtype is None else dtype)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, groups={self.groups}, group_dim={self.group_dim}, "
                f"ema_decay={self.ema_decay}, stochastic={self.stochastic}")


# ------------------------------------------------------------------------------------------ save/restore
def _save(quantizer: ActQuantizer | None, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors to ``save_for_backward`` for ``x``: (codes, alpha, beta), or (x,) with no quantiser."""
    if quantizer is None:
        return (x,)
    return quantizer.pack(x)


def _load(quantizer: ActQuantizer | None, saved: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if quantizer is None:
        return saved[0]
    return quantizer.unpack(saved[0], saved[1], saved[2], dtype=dtype)


def _n(quantizer: ActQuantizer | None) -> int:
    return 1 if quantizer is None else 3


# ------------------------------------------------------------------------------------------ Functions
class QLinearFn(torch.autograd.Function):
    """y = x W^T + b, saving x as codes: dW = g^T x_hat, dx = g W, db = sum of g over all leading dims."""

    @staticmethod
    def forward(ctx, x, weight, bias, quantizer):
        y = F.linear(x, weight, bias)
        ctx.quantizer, ctx.xdtype, ctx.has_bias = quantizer, x.dtype, bias is not None
        ctx.save_for_backward(weight, *_save(quantizer, x))
        return y

    @staticmethod
    def backward(ctx, g):
        weight, *saved = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.matmul(weight.to(g.dtype))
        if ctx.needs_input_grad[1]:
            x = _load(ctx.quantizer, saved, ctx.xdtype).to(g.dtype)
            gw = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return gx, gw, gb, None


class QGELUFn(torch.autograd.Function):
    """y = GELU(x), saving x as codes: dx = g * GELU'(x_hat)."""

    @staticmethod
    def forward(ctx, x, quantizer, approximate):
        ctx.quantizer, ctx.xdtype, ctx.approximate = quantizer, x.dtype, approximate
        ctx.save_for_backward(*_save(quantizer, x))
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, g):
        x = _load(ctx.quantizer, ctx.saved_tensors, ctx.xdtype).to(g.dtype)
        return torch.ops.aten.gelu_backward(g, x, approximate=ctx.approximate), None, None


class QSoftmaxFn(torch.autograd.Function):
    """y = softmax(x, dim), saving y as codes: dx = y_hat * (g - sum(g * y_hat, dim))."""

    @staticmethod
    def forward(ctx, x, dim, quantizer):
        y = torch.softmax(x, dim)
        ctx.quantizer, ctx.ydtype, ctx.dim = quantizer, y.dtype, dim
        ctx.save_for_backward(*_save(quantizer, y))
        return y

    @staticmethod
    def backward(ctx, g):
        y = _load(ctx.quantizer, ctx.saved_tensors, ctx.ydtype).to(g.dtype)
        return y * (g - (g * y).sum(ctx.dim, keepdim=True)), None, None


class QMatMulFn(torch.autograd.Function):
    """y = a @ b, saving both operands as codes: da = g b_hat^T, db = a_hat^T g (broadcast dims summed)."""

    @staticmethod
    def forward(ctx, a, b, qa, qb):
        if a.dim() < 2 or b.dim() < 2:
            raise ValueError(f"QMatMulFn needs operands with >= 2 dims, got shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        ctx.qa, ctx.qb, ctx.adtype, ctx.bdtype = qa, qb, a.dtype, b.dtype
        ctx.ashape, ctx.bshape = a.shape, b.shape
        ctx.save_for_backward(*_save(qa, a), *_save(qb, b))
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        na = _n(ctx.qa)
        ga = gb = None
        if ctx.needs_input_grad[0]:
            b = _load(ctx.qb, saved[na:], ctx.bdtype).to(g.dtype)
            ga = g.matmul(b.transpose(-2, -1)).sum_to_size(ctx.ashape)
        if ctx.needs_input_grad[1]:
            a = _load(ctx.qa, saved[:na], ctx.adtype).to(g.dtype)
            gb = a.transpose(-2, -1).matmul(g).sum_to_size(ctx.bshape)
        return ga, gb, None, None


class QLayerNormFn(torch.autograd.Function):
    """LayerNorm saving x as codes (mean and rstd kept exact); backward is LayerNorm's at x_hat."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, quantizer):
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.quantizer, ctx.xdtype, ctx.shape = quantizer, x.dtype, tuple(normalized_shape)
        ctx.has_w, ctx.has_b = weight is not None, bias is not None
        ctx.save_for_backward(mean, rstd, weight, bias, *_save(quantizer, x))
        return y

    @staticmethod
    def backward(ctx, g):
        mean, rstd, weight, bias, *saved = ctx.saved_tensors
        x = _load(ctx.quantizer, saved, ctx.xdtype).to(g.dtype)
        mask = [ctx.needs_input_grad[0], ctx.has_w and ctx.needs_input_grad[2],
                ctx.has_b and ctx.needs_input_grad[3]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(g, x, list(ctx.shape), mean, rstd, weight, bias,
                                                                mask)
        return gx, None, gw, gb, None, None


# ------------------------------------------------------------------------------------------ function forms
def _q(quantizer) -> ActQuantizer | None:
    if quantizer is not None and not isinstance(quantizer, ActQuantizer):
        raise TypeError(f"quantizer must be an ActQuantizer or None, got {type(quantizer).__name__}")
    return quantizer


def q_linear(x, weight, bias=None, quantizer: ActQuantizer | None = None) -> torch.Tensor:
    """``F.linear`` whose saved input is quantised by ``quantizer`` (None: saved exactly)."""
    return QLinearFn.apply(x, weight, bias, _q(quantizer))


def q_gelu(x, quantizer: ActQuantizer | None = None, approximate: str = "none") -> torch.Tensor:
    """``F.gelu`` whose saved input is quantised by ``quantizer``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return QGELUFn.apply(x, _q(quantizer), approximate)


def q_softmax(x, dim: int = -1, quantizer: ActQuantizer | None = None) -> torch.Tensor:
    """``torch.softmax`` whose saved output is quantised by ``quantizer``."""
    dim = integer("dim", dim)
    return QSoftmaxFn.apply(x, dim, _q(quantizer))


def q_matmul(a, b, qa: ActQuantizer | None = None, qb: ActQuantizer | None = None) -> torch.Tensor:
    """``a @ b`` with both saved operands quantised (by ``qa`` and ``qb``)."""
    return QMatMulFn.apply(a, b, _q(qa), _q(qb))


def q_layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5,
                 quantizer: ActQuantizer | None = None) -> torch.Tensor:
    """``F.layer_norm`` whose saved input is quantised by ``quantizer`` (mean/rstd exact)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    eps = real_scalar("eps", eps, tensor_ok=False)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    return QLayerNormFn.apply(x, tuple(normalized_shape), weight, bias, eps, _q(quantizer))


__all__ = ["ActQuantizer", "quantize", "dequantize", "group_range", "QLinearFn", "QGELUFn", "QSoftmaxFn",
           "QMatMulFn", "QLayerNormFn", "q_linear", "q_gelu", "q_softmax", "q_matmul", "q_layer_norm"]
