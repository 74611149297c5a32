"""TrAct: the first layer's weight gradient as a ridge fit of a step on its pre-activations (paper slug: tract).

Petersen, Borgelt, Ermon, "TrAct: Making First-layer Pre-Activations Trainable" (NeurIPS 2024,
arXiv 2410.23970). For a first layer ``Z = X W^T`` with input rows ``X`` (b x n; for a convolution the
b = N * H_out * W_out unfolded patches), weight ``W`` (m x n) and upstream gradient ``G = dL/dZ``
(b x m), TrAct proposes the pre-activations ``Z* = Z - eta' G`` and fits the weights to them::

    W' = argmin_V (1/b)||X V^T - Z*||_F^2 + lambda ||V - W||_F^2 = W - (eta'/b) * grad_tract
    grad_tract = G^T X (X^T X / b + lambda I_n)^-1            (n x n system, used when b >= n)
               = G^T (X X^T / b + lambda I_b)^-1 X            (b x b system, used when b <  n)

Only the weight gradient changes: the input gradient ``G W`` and the bias gradient ``sum_rows G`` are
the ordinary ones, and the bias is not appended to ``X``. ``lambda -> inf`` gives ``G^T X / lambda``
(the ordinary gradient rescaled); ``lambda -> 0`` a whitened (least-squares) update. ``lambda`` is
relative to the input's second moments: the paper's default 0.1 assumes unit-variance inputs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .._validate import choice, is_int, real_scalar

__all__ = ["tract_weight_grad", "tract_linear", "tract_conv2d", "TrActLinearFn", "TrActConv2dFn", "SOLVERS",
           "FORMS", "conv2d_patches", "conv2d_second_moment", "check_solver"]

SOLVERS = ("solve", "cholesky", "inverse")
FORMS = ("auto", "features", "batch")


def check_solver(solver: Any) -> str:
    """Validate the linear-system method: 'solve' (LU), 'cholesky' (SPD) or 'inverse' (official code)."""
    choice("solver", solver, SOLVERS)
    return solver


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float16/bfloat16 systems are solved in float32 (linalg has no half kernels); else the inputs' dtype."""
    dt = dtypes[0]
    for d in dtypes[1:]:
        dt = torch.promote_types(dt, d)
    return torch.promote_types(dt, torch.float32)


def _solve_spd(mat: Tensor, rhs: Tensor, lam: float, solver: str) -> Tensor:
    """``mat^-1 @ rhs`` for ``mat = S + lam I`` (S symmetric PSD); clear errors when it is singular."""
    # (skipped while torch.compile traces: a data-dependent branch would break the graph)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(mat).all()):
        raise ValueError("TrAct: the layer input contains non-finite values (inf or nan); the TrAct weight "
                         "gradient needs a finite input batch")
    if solver == "cholesky":
        chol, info = torch.linalg.cholesky_ex(mat)
        if int(info) != 0:
            raise ValueError(f"TrAct: (second-moment matrix + lambda_ I) is not positive definite with "
                             f"lambda_={lam!r}; the inputs are rank-deficient: use lambda_ > 0")
        return torch.cholesky_solve(rhs, chol)
    if solver == "inverse":
        if lam == 0.0:
            inv, info = torch.linalg.inv_ex(mat)
            if int(info) != 0:
                raise ValueError("TrAct: the second-moment matrix is singular with lambda_=0; use lambda_ > 0")
            return inv @ rhs
        return torch.inverse(mat) @ rhs
    if lam == 0.0:
        out, info = torch.linalg.solve_ex(mat, rhs)
        if int(info) != 0:
            raise ValueError("TrAct: the second-moment matrix is singular with lambda_=0; use lambda_ > 0")
        return out
    return torch.linalg.solve(mat, rhs)


def _second_moment_system(x: Tensor, lam: float) -> Tensor:
    """``x^T x / b + lam I`` (n x n) for x of shape (b, n)."""
    mat = x.T @ x / x.shape[0]
    mat.diagonal().add_(lam)
    return mat


def _right_solve(x: Tensor, gtx: Tensor, lam: float, solver: str) -> Tensor:
    """``gtx (x^T x / b + lam I)^-1`` in the working dtype: the n x n ("features") form, b = len(x) >= 1."""
    dt = _work_dtype(x.dtype, gtx.dtype)
    x, gtx = x.to(dt), gtx.to(dt)
    # G^T X M^-1 = (M^-1 X^T G)^T since M is symmetric
    return _solve_spd(_second_moment_system(x, lam), gtx.T, lam, solver).T


def _weight_grad(x: Tensor, g: Tensor, lam: float, solver: str = "solve", form: str = "auto") -> Tensor:
    """Unchecked core of :func:`tract_weight_grad` (x: b x n, g: b x m) -> (m x n), in x's working dtype."""
    b, n = x.shape
    m = g.shape[1]
    dt = _work_dtype(x.dtype, g.dtype)
    if b == 0:
        return torch.zeros(m, n, dtype=dt, device=x.device)
    x = x.to(dt)
    g = g.to(dt)
    if form == "auto":
        form = "features" if b >= n else "batch"
    if form == "features":
        return _right_solve(x, g.T @ x, lam, solver)
    mat = x @ x.T / b
    mat.diagonal().add_(lam)
    return _solve_spd(mat, g, lam, solver).T @ x


def tract_weight_grad(X: Tensor, G: Tensor, lambda_: float = 0.1, *, solver: str = "solve",
                      form: str = "auto") -> Tensor:
    """TrAct weight gradient ``G^T X (X^T X / b + lambda_ I)^-1`` of a layer ``Z = X W^T`` (paper slug: tract).

    ``X``: (b, n) input rows, ``G``: (b, m) gradient w.r.t. the pre-activations; returns (m, n), the
    replacement of the ordinary ``G^T X``. ``form``: "features" solves the n x n system, "batch" the
    equivalent b x b (Woodbury) one ``G^T (X X^T / b + lambda_ I)^-1 X``, "auto" the smaller. ``solver``:
    "solve" (LU, default), "cholesky" (SPD), "inverse" (explicit inverse, as the official code).
    Half-precision inputs are solved in float32 and returned in float32.

    Example::

        X, G = torch.randn(32, 9), torch.randn(32, 4)
        gw = tract_weight_grad(X, G, lambda_=0.1)          # (4, 9)
        W_next = W - lr * gw                                # = ridge fit of Z - lr*b*G
    """
    for name, t in (("X", X), ("G", G)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got a tensor with inf or nan entries")
    if X.shape[0] != G.shape[0]:
        raise ValueError(f"X and G must have the same number of rows b, got X {tuple(X.shape)} and G "
                         f"{tuple(G.shape)}")
    if X.device != G.device:
        raise ValueError(f"X and G must be on the same device, got {X.device} and {G.device}")
    lam = real_scalar("lambda_", lambda_, nonneg=True)
    check_solver(solver)
    choice("form", form, FORMS)
    return _weight_grad(X, G, lam, solver, form)


# ------------------------------------------------------------------------------------------ linear
class TrActLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with the TrAct weight gradient (paper slug: tract); input/bias gradients standard.

    ``TrActLinearFn.apply(x, weight, bias, lambda_, solver)``; ``x`` (..., n): all leading dimensions
    are rows of ``X`` (b = their product). Prefer :func:`tract_linear`, which validates its arguments.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lambda_: float, solver: str) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, lambda_, solver = inputs
        ctx.save_for_backward(x, weight)
        ctx.lambda_, ctx.solver = lambda_, solver
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        n, m = weight.shape[1], weight.shape[0]
        g2 = grad.reshape(-1, m)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (grad @ weight.to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(x.reshape(-1, n), g2, ctx.lambda_, ctx.solver).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None, None


def _check_layer_args(x: Any, weight: Any, bias: Any, wdim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    if not isinstance(weight, Tensor) or weight.dim() != wdim:
        raise ValueError(f"weight must be a {wdim}-D tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")


def tract_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, lambda_: float = 0.1,
                 solver: str = "solve") -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is TrAct's (paper slug: tract).

    Equation: grad_W = G^T X (X^T X / b + lambda_ I)^-1 (rows of X: every leading index of ``x``).

    Example::

        w = torch.randn(5, 8, requires_grad=True)
        tract_linear(torch.randn(16, 8), w, lambda_=0.1).square().sum().backward()
        w.grad.shape                                        # torch.Size([5, 8])
    """
    _check_layer_args(x, weight, bias, 2)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input must have shape (..., {weight.shape[1]}) to match weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    lam = real_scalar("lambda_", lambda_, nonneg=True)
    check_solver(solver)
    return TrActLinearFn.apply(x, weight, bias, lam, solver)


# ------------------------------------------------------------------------------------------ conv2d
def _strided_windows(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int]) -> Tensor:
    """View (N, C, H_out, W_out, kh, kw) of the zero-padded input's convolution windows."""
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    return x.unfold(2, kernel_size[0], stride[0]).unfold(3, kernel_size[1], stride[1])


def conv2d_patches(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int]) -> Tensor:
    """Unfolded input rows ``X`` of a convolution: (N * H_out * W_out, C * kh * kw).

    Column order (C, kh, kw) as ``weight.reshape(m, -1)``, row order (N, H_out, W_out); equal to
    ``F.unfold(x, kernel_size, padding=padding, stride=stride).transpose(1, 2).reshape(-1, C*kh*kw)``
    but built from one strided view and one copy (several times faster than ``F.unfold`` on CPU).
    """
    view = _strided_windows(x, kernel_size, stride, padding)
    return view.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kernel_size[0] * kernel_size[1])


def conv2d_second_moment(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                         padding: tuple[int, int]) -> Tensor:
    """``X^T X`` (n x n, n = C*kh*kw) of a convolution's unfolded patches ``X``, without forming ``X``.

    The patch columns, laid out as an (N, n, H_out, W_out) "output gradient", go through the convolution's
    own weight-gradient kernel: sum over (N, H_out, W_out) of column (c', i', j') times patch entry (c, i, j).
    Several times faster on CPU than ``conv2d_patches(x, ...).T @ conv2d_patches(x, ...)``; symmetrised.
    """
    n_in = x.shape[1]
    n = n_in * kernel_size[0] * kernel_size[1]
    view = _strided_windows(x, kernel_size, stride, padding)
    cols = view.permute(0, 1, 4, 5, 2, 3).reshape(x.shape[0], n, view.shape[2], view.shape[3])
    mom = torch.nn.grad.conv2d_weight(x, (n, n_in, kernel_size[0], kernel_size[1]), cols, stride, padding)
    mom = mom.reshape(n, n)
    return (mom + mom.T) / 2


class TrActConv2dFn(torch.autograd.Function):
    """2-D convolution (groups 1, dilation 1, zero padding) with the TrAct weight gradient (paper slug: tract).

    ``TrActConv2dFn.apply(x, weight, bias, stride, padding, lambda_, solver)`` with a 4-D ``x`` and
    ``stride``/``padding`` int pairs; ``X`` = the unfolded patches. Prefer :func:`tract_conv2d`.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], lambda_: float, solver: str) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, stride, padding, lambda_, solver = inputs
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.lambda_, ctx.solver = stride, padding, lambda_, solver
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        m = weight.shape[0]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, weight.to(grad.dtype), grad, ctx.stride,
                                            ctx.padding).to(x.dtype)
        if ctx.needs_input_grad[1]:
            kernel = tuple(weight.shape[2:])
            n = weight[0].numel()
            b = grad.shape[0] * grad.shape[2] * grad.shape[3]
            if b >= n:  # the official route: the ordinary weight gradient, right-multiplied by M^-1
                dt = _work_dtype(x.dtype, grad.dtype)
                plain = torch.nn.grad.conv2d_weight(x.to(grad.dtype), weight.shape, grad, ctx.stride, ctx.padding)
                mat = conv2d_second_moment(x.to(dt), kernel, ctx.stride, ctx.padding) / b
                mat.diagonal().add_(ctx.lambda_)
                gw = _solve_spd(mat, plain.reshape(m, n).to(dt).T, ctx.lambda_, ctx.solver).T
            else:  # fewer patches than patch entries: the b x b system
                patches = conv2d_patches(x, kernel, ctx.stride, ctx.padding)
                g2 = grad.flatten(2).transpose(1, 2).reshape(-1, m)  # rows (N, H_out, W_out), as the patches
                gw = _weight_grad(patches, g2, ctx.lambda_, ctx.solver, "batch")
            gw = gw.reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
        return gx, gw, gb, None, None, None, None


def _pair(name: str, v: Any, minimum: int) -> tuple[int, int]:
    vals = (v, v) if is_int(v) else tuple(v) if isinstance(v, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(is_int(a, low=minimum) for a in vals):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return (int(vals[0]), int(vals[1]))


def tract_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                 lambda_: float = 0.1, solver: str = "solve") -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` whose weight gradient is TrAct's (paper slug: tract).

    Equation: grad_W = G^T X (X^T X / b + lambda_ I)^-1 with X = unfold(x) (b = N*H_out*W_out rows of
    C*kh*kw), reshaped to the weight's shape. Groups and dilation are not supported (as in the official code).

    Example::

        w = torch.randn(8, 3, 3, 3, requires_grad=True)
        tract_conv2d(torch.randn(2, 3, 16, 16), w, padding=1).square().sum().backward()
        w.grad.shape                                        # torch.Size([8, 3, 3, 3])
    """
    _check_layer_args(x, weight, bias, 4)
    unbatched = x.dim() == 3
    if x.dim() not in (3, 4) or x.shape[-3] != weight.shape[1]:
        raise ValueError(f"input must have shape (N, {weight.shape[1]}, H, W) or ({weight.shape[1]}, H, W) to "
                         f"match weight {tuple(weight.shape)}, got {tuple(x.shape)}")
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    for i, (h, k, p) in enumerate(zip(x.shape[-2:], weight.shape[2:], padding)):
        if h + 2 * p < k:
            raise ValueError(f"input spatial size {tuple(x.shape[-2:])} with padding {padding} is smaller than the "
                             f"kernel {tuple(weight.shape[2:])}")
    lam = real_scalar("lambda_", lambda_, nonneg=True)
    check_solver(solver)
    out = TrActConv2dFn.apply(x.unsqueeze(0) if unbatched else x, weight, bias, stride, padding, lam, solver)
    return out.squeeze(0) if unbatched else out
