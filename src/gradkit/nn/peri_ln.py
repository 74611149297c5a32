"""Layer-norm placement in residual Transformer blocks: Post-LN, Pre-LN, Peri-LN, output-only (peri-ln).

Paper slug ``peri-ln`` (Kim et al., "Peri-LN: Revisiting Layer Normalization in the Transformer
Architecture", arXiv 2502.02732). For a residual stream ``h`` and a sublayer ``F``:

    post        : h' = Norm(h + F(h))
    pre         : h' = h + F(Norm_in(h))
    peri        : h' = h + Norm_out(F(Norm_in(h)))      (the paper's placement)
    output_only : h' = h + Norm_out(F(h))                (OLMo-2 style)

Norm_out normalises the sublayer's output over the feature (last) dimension, per token, BEFORE the
residual addition; it is not a norm after the add (that is Post-LN).

>>> blk = ResidualNormBlock(nn.Linear(16, 16), 16, placement="peri", norm="rmsnorm")
>>> blk(torch.randn(2, 5, 16)).shape
torch.Size([2, 5, 16])
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F

from .._validate import positive_int, real_scalar

PLACEMENTS = ("post", "pre", "peri", "output_only")
NORMS = ("layernorm", "rmsnorm")


def _check_placement(placement: object) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return placement  # type: ignore[return-value]


def make_norm(norm: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """A LayerNorm (scale and bias) or RMSNorm (scale) over the last dimension of size ``dim`` (peri-ln).

    LayerNorm: y = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta; RMSNorm: y = gamma * x / sqrt(mean(x^2) + eps).

    >>> make_norm("rmsnorm", 8)(torch.zeros(3, 8))   # all-zero input -> 0, not NaN (eps > 0)
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    dim = positive_int("dim", dim)
    eps = real_scalar("eps", eps, tensor_ok=False)
    if eps <= 0:
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    if norm == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    return nn.RMSNorm(dim, eps=eps)


class ResidualNormBlock(nn.Module):
    """One residual sublayer with the normalisation placed as Post-, Pre-, Peri-LN or output-only (peri-ln).

    peri: h + Norm_out(F(Norm_in(h))); pre: h + F(Norm_in(h)); post: Norm(h + F(h));
    output_only: h + Norm_out(F(h)). ``sublayer`` maps (..., dim) -> (..., dim). Unused norms are
    ``nn.Identity`` (attributes ``norm_in``, ``norm_out``, ``norm_post``), so swapping ``norm_out``
    for ``nn.Identity()`` turns a peri block into a pre block exactly.

    >>> blk = ResidualNormBlock(nn.Linear(16, 16), 16, placement="peri")
    >>> y = blk(torch.randn(2, 5, 16))
    >>> y.shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, sublayer: nn.Module, dim: int, placement: str = "peri", norm: str = "layernorm",
                 eps: float = 1e-5) -> None:
        super().__init__()
        if not isinstance(sublayer, nn.Module):
            raise TypeError(f"sublayer must be an nn.Module, got {type(sublayer).__name__}")
        self.placement = _check_placement(placement)
        self.dim = positive_int("dim", dim)
        self.norm_kind = norm
        make_norm(norm, dim, eps)  # validates norm and eps even for placements that use none here
        self.eps = float(eps)
        self.sublayer = sublayer
        use_in = placement in ("pre", "peri")
        use_out = placement in ("peri", "output_only")
        self.norm_in = make_norm(norm, dim, eps) if use_in else nn.Identity()
        self.norm_out = make_norm(norm, dim, eps) if use_out else nn.Identity()
        self.norm_post = make_norm(norm, dim, eps) if placement == "post" else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.dim:
            raise ValueError(f"input's last dimension must be dim={self.dim}, got shape {tuple(h.shape)}")
        return self.norm_post(h + self.norm_out(self.sublayer(self.norm_in(h))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, placement={self.placement!r}, norm={self.norm_kind!r}, eps={self.eps:g}"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (B, T, D) -> (B, T, D), fused QKV projection, no dropout."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        dim, heads = positive_int("dim", dim), positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(dim, ratio*dim) -> GELU -> Linear(ratio*dim, dim)."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        hidden = positive_int("dim", dim) * positive_int("mlp_ratio", ratio)
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    """Attention then MLP, each a :class:`ResidualNormBlock` with the same placement (peri-ln)."""

    def __init__(self, dim: int, heads: int, placement: str = "peri", norm: str = "rmsnorm",
                 eps: float = 1e-5, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.attn = ResidualNormBlock(CausalSelfAttention(dim, heads), dim, placement, norm, eps)
        self.mlp = ResidualNormBlock(MLP(dim, mlp_ratio), dim, placement, norm, eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(h))


def is_norm_param(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm))


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer param groups: decay on matrices/embeddings, none on norm scales/shifts and biases (peri-ln).

    Norm_out's scale gamma sets the size of each Peri-LN increment, so it must not be decayed.

    >>> opt = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-3)
    """
    weight_decay = real_scalar("weight_decay", weight_decay, nonneg=True, tensor_ok=False)
    decay, no_decay, seen = [], [], set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if is_norm_param(mod) or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["PLACEMENTS", "NORMS", "make_norm", "ResidualNormBlock", "CausalSelfAttention", "MLP",
           "TransformerBlock", "weight_decay_groups"]
