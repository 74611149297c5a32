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

from .. import _native
from .._validate import integer, optional_generator, positive_int, real_scalar

EPS = 1e-8


# ------------------------------------------------------------------------------------------ math helpers
def _layout(shape: Sequence[int], groups: int, group_dim: int) -> tuple[int, int, int]:
    """Check ``groups`` against ``shape`` and return (d, A, R): the group axis, the size of the dims before it
    and the size of one group's contiguous rest (a contiguous tensor is then A x groups x R)."""
    if len(shape) == 0:
        raise ValueError("cannot quantise a 0-dim tensor by groups; give a tensor with >= 1 dim")
    d = group_dim % len(shape) if -len(shape) <= group_dim < len(shape) else None
    if d is None:
        raise ValueError(f"group_dim={group_dim} is out of range for a tensor of shape {tuple(shape)}")
    size = shape[d]
    if size % groups != 0:
        raise ValueError(f"groups={groups} must divide the size {size} of dim {group_dim} "
                         f"(tensor of shape {tuple(shape)})")
    return d, math.prod(shape[:d]), size // groups * math.prod(shape[d + 1:])


def _grouped(x: torch.Tensor, groups: int, group_dim: int) -> tuple[torch.Tensor, int]:
    """View ``x`` as ``shape[:d] + (groups, size // groups) + shape[d+1:]``; return it and the group axis."""
    d, _, _ = _layout(x.shape, groups, group_dim)
    return x.reshape(*x.shape[:d], groups, x.shape[d] // groups, *x.shape[d + 1:]), d


def _bcast(v: torch.Tensor, xg: torch.Tensor, d: int) -> torch.Tensor:
    """Per-group vector ``v`` (G,) shaped to broadcast against the grouped view (group axis ``d``)."""
    return v.reshape((1,) * d + (v.numel(),) + (1,) * (xg.dim() - d - 1))


def _native_ok(x: torch.Tensor, dtype: torch.dtype, *per_group: torch.Tensor, groups: int) -> bool:
    """Whether the native kernels (:mod:`gradkit._native`) take this call: ``x`` of ``dtype`` on the CPU and
    not empty, each per-group tensor float32 on the CPU with ``groups`` entries, and the kernels available.
    Callers pass contiguous copies where needed: one copy is cheaper than the PyTorch path's passes."""
    return (x.dtype == dtype and x.device.type == "cpu" and x.numel() > 0
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() == groups for t in per_group)
            and _native.native() is not None)


def _native_seed(generator: torch.Generator | None) -> int:
    """One 64-bit key for the native kernels' counter-based uniform draws, taken from ``generator`` (or the
    global RNG): a seeded generator still fixes the codes."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=generator))


def group_range(x: torch.Tensor, groups: int = 1, group_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (max - min, min) of ``x``, each of shape (groups,)."""
    xg, d = _grouped(x.detach(), groups, group_dim)
    if _native_ok(xg, torch.float32, groups=groups):  # one pass for both extremes (the reductions' values)
        _, a, r = _layout(x.shape, groups, group_dim)
        xc = xg.contiguous()
        lo, hi = torch.empty(groups, dtype=torch.float32), torch.empty(groups, dtype=torch.float32)
        _native.native().gk_group_minmax(xc.data_ptr(), a, groups, r, lo.data_ptr(), hi.data_ptr())
        return hi - lo, lo
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

    On the CPU with float32 input and bits <= 8, one native pass computes the codes: its uniform draws come
    from a counter-based hash keyed by one 64-bit number taken from ``generator`` (so a seeded generator
    still fixes the codes, though not the same codes as the PyTorch path), and it rounds halves up where the
    PyTorch path rounds them to even. ``GRADKIT_NATIVE=0`` selects the PyTorch path.
    """
    bits = integer("bits", bits, low=1, high=16)
    levels = 2 ** bits - 1
    cdt = torch.promote_types(x.dtype, torch.float32)
    xg, d = _grouped(x.detach().to(cdt), groups, group_dim)
    if (bits <= 8 and _native_ok(xg, torch.float32, alpha, beta, groups=groups)
            and (generator is None or generator.device.type == "cpu")):
        _, a, r = _layout(x.shape, groups, group_dim)
        xc, ac, bc = xg.contiguous(), alpha.detach().contiguous(), beta.detach().contiguous()
        codes = torch.empty(x.shape, dtype=torch.uint8)
        _native.native().gk_quantize_u8(xc.data_ptr(), codes.data_ptr(), a, groups, r, ac.data_ptr(), bc.data_ptr(),
                                        float(levels), EPS, _native_seed(generator) if stochastic else 0,
                                        int(stochastic))
        return codes
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
    if cdt == torch.float32 and _native_ok(codes, torch.uint8, alpha, beta, groups=groups):
        _, a, r = _layout(codes.shape, groups, group_dim)
        qc, ac, bc = codes.contiguous(), alpha.detach().contiguous(), beta.detach().contiguous()
        out = torch.empty(codes.shape, dtype=torch.float32)
        _native.native().gk_dequantize_u8(qc.data_ptr(), out.data_ptr(), a, groups, r, ac.data_ptr(), bc.data_ptr(),
                                          float(levels), EPS)
        return out.to(dtype)
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
        update = self.training if update is None else bool(update)
        if self._native_pack_ok(x):
            self.last_dtype = x.dtype
            return self._native_pack(x, update)
        if update:
            self.update(x)
        elif not bool(self.initialized):
            self.update(x)  # never calibrated: use this tensor's own range
        self.last_dtype = x.dtype
        alpha, beta = self.alpha.detach().clone(), self.beta.detach().clone()
        codes = quantize(x, alpha, beta, bits=self.bits, groups=self.groups, group_dim=self.group_dim,
                         stochastic=self.stochastic, generator=self.generator)
        return codes, alpha, beta

    def _native_pack_ok(self, x: torch.Tensor) -> bool:
        return (self.bits <= 8 and self.initialized.device.type == "cpu"
                and (self.generator is None or self.generator.device.type == "cpu")
                and self.alpha.is_contiguous() and self.beta.is_contiguous()
                and _native_ok(x, torch.float32, self.alpha, self.beta, groups=self.groups))

    def _native_pack(self, x: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`pack` in one native call: range, EMA step, snapshot and codes (see :func:`quantize` for how
        its draws and halves differ from the PyTorch path)."""
        _, a, r = _layout(x.shape, self.groups, self.group_dim)
        xc = x.detach().contiguous()
        codes = torch.empty(x.shape, dtype=torch.uint8)
        alpha, beta = torch.empty(self.groups, dtype=torch.float32), torch.empty(self.groups, dtype=torch.float32)
        _native.native().gk_pack_u8(
            xc.data_ptr(), codes.data_ptr(), a, self.groups, r, self.alpha.data_ptr(), self.beta.data_ptr(),
            self.initialized.data_ptr(), int(update), self.ema_decay, alpha.data_ptr(), beta.data_ptr(),
            float(2 ** self.bits - 1), EPS, _native_seed(self.generator) if self.stochastic else 0,
            int(self.stochastic))
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
