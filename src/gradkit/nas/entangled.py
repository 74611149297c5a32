"""Weight-entangled supernet ops searched by gradient: weight superposition vs the DARTS output mixture
(paper slug: tanglenas).

Every candidate of an entangled op is a sub-tensor of one largest weight ``W``: the first ``C_c`` output
channels and the centred ``K_c x K_c`` window of a conv, the first ``O_c x I_c`` block of a linear map.
With architecture weights ``a_c`` (one per candidate, e.g. from :class:`gradkit.nas.arch.ArchParams`)::

    mixture   (DARTS, weight sharing):     y = sum_c a_c * P_c(op(x; S_c(W), S_c(b)))     n op calls
    superpose (TangleNAS):                 W_mix = sum_c a_c * P_c(S_c(W)),  b_mix = sum_c a_c * P_c(S_c(b))
                                           y = op(x; W_mix, b_mix)                         one op call

``P_c`` zero-pads back to ``W``'s shape (missing output channels/features are zeros). The op is linear in
its weights and the padding keeps the geometry (kernels centred, the conv padded for the largest kernel),
so both forms give the same ``y`` and the same gradients w.r.t. ``W``, ``b`` and ``a``. Superposition is
computed as ``W_mix = W * M`` with the mask mix ``M = sum_ij a_ij * r_i (x) s_j`` (each candidate's mask is
the outer product of a row mask ``r_i`` over output units and a mask ``s_j`` over the rest): autograd keeps
``M`` (the size of one weight) and the small masks instead of n padded sub-weights, and the op runs once,
so saved activations and time are those of a single candidate.

Two independent choice dimensions give ``n1 x n2`` candidates; ``arch_weights`` is that matrix, or the pair
of vectors whose outer product it is (``ArchParams.combine``).

Example::

    conv = EntangledConv2d(1, out_choices=(8, 16, 32), kernel_choices=(1, 3, 5))
    a = torch.softmax(torch.randn(9), 0).view(3, 3)                   # (out choice, kernel choice)
    y = conv(torch.randn(4, 1, 8, 8), a)                              # (4, 32, 8, 8); == mode="mixture"
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import ArgumentError, boolean, choice, is_int, positive_int

MODES = ("superpose", "mixture", "argmax")


def _choices(name: str, values: Sequence[int] | int, *, odd: bool = False) -> tuple[int, ...]:
    """Distinct positive ints (odd ones for kernels), in the order given."""
    vals = (values,) if is_int(values) else values
    try:
        vals = tuple(vals)
    except TypeError:
        raise ArgumentError(f"{name} must be a positive int or a sequence of them, got "
                            f"{type(values).__name__} {values!r}") from None
    if not vals or not all(is_int(v, low=1) for v in vals):
        raise ArgumentError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    if odd and not all(v % 2 == 1 for v in vals):
        raise ArgumentError(f"{name} must hold odd kernel sizes (centred 'same' padding), got {values!r}")
    if len(set(vals)) != len(vals):
        raise ArgumentError(f"{name} must not repeat a value, got {values!r}")
    return tuple(int(v) for v in vals)


class _EntangledOp(nn.Module):
    """Shared bookkeeping of an entangled op: candidate grid, masks, weights checks and the three modes."""

    def _setup_choices(self, dims: tuple[tuple[int, ...], tuple[int, ...]], dim_names: tuple[str, str]) -> None:
        self.grid = (len(dims[0]), len(dims[1]))
        self._dim_names = dim_names
        rows = torch.stack([(torch.arange(self.weight.shape[0]) < c).float() for c in self.out_choices])
        self.register_buffer("row_masks", rows, persistent=False)                       # (n1, C_max): r_i
        cols = torch.stack([self._col_mask(j) for j in range(self.grid[1])])
        self.register_buffer("col_masks", cols, persistent=False)                       # (n2, *rest): s_j

    def mask_mix(self, a: torch.Tensor) -> torch.Tensor:
        """M = sum_ij a_ij r_i (x) s_j, broadcastable to the weight's shape."""
        cols = self.col_masks.to(a.dtype)
        m = torch.einsum("ij,ia,jb->ab", a, self.row_masks.to(a.dtype), cols.flatten(1))
        return m.reshape(self.weight.shape[0], *cols.shape[1:])

    @property
    def num_candidates(self) -> int:
        """n1 * n2: the number of sub-networks this op chooses between."""
        return self.grid[0] * self.grid[1]

    def combined_weights(self, arch_weights: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The (n1, n2) candidate weights from a matrix or from a pair of vectors (outer product)."""
        n1, n2 = self.grid
        if isinstance(arch_weights, (tuple, list)):
            if len(arch_weights) != 2 or not all(isinstance(t, torch.Tensor) for t in arch_weights):
                raise ArgumentError(f"arch_weights as a sequence must be two tensors ({self._dim_names[0]}, "
                                    f"{self._dim_names[1]}), got {len(arch_weights)} item(s)")
            a1, a2 = arch_weights
            if a1.shape != (n1,) or a2.shape != (n2,):
                raise ArgumentError(f"arch_weights must be vectors of lengths ({n1}, {n2}) for "
                                    f"{self._dim_names}, got shapes {tuple(a1.shape)} and {tuple(a2.shape)}")
            return a1[:, None] * a2[None, :]
        if not isinstance(arch_weights, torch.Tensor):
            raise ArgumentError(f"arch_weights must be a tensor of shape ({n1}, {n2}) or a pair of vectors, got "
                                f"{type(arch_weights).__name__}")
        if arch_weights.shape != (n1, n2):
            raise ArgumentError(f"arch_weights must have shape ({n1}, {n2}) ({self._dim_names[0]} x "
                                f"{self._dim_names[1]} choices), got {tuple(arch_weights.shape)}")
        if not arch_weights.is_floating_point():
            raise ArgumentError(f"arch_weights must be a floating-point tensor, got dtype {arch_weights.dtype}")
        return arch_weights

    def check_index(self, i: int, j: int) -> tuple[int, int]:
        """Validate a candidate index pair (i into the first choice list, j into the second)."""
        for name, v, n in ((self._dim_names[0], i, self.grid[0]), (self._dim_names[1], j, self.grid[1])):
            if not is_int(v, low=0, high=n - 1):
                raise ArgumentError(f"{name} index must be an int in [0, {n - 1}] ({n} candidates), got {v!r}")
        return int(i), int(j)

    def forward(self, x: torch.Tensor, arch_weights: torch.Tensor | Sequence[torch.Tensor],
                mode: str = "superpose", scale_argmax: bool = False) -> torch.Tensor:
        """Run the op with candidate weights ``arch_weights`` ((n1, n2) or a pair of vectors).

        mode: ``"superpose"`` (TangleNAS: one call on the mixed weight), ``"mixture"`` (DARTS: one call
        per candidate, outputs mixed) or ``"argmax"`` (only the heaviest candidate; ``scale_argmax``
        multiplies its output by its weight, as during search, else the raw sub-network runs).
        """
        choice("mode", mode, MODES)
        boolean("scale_argmax", scale_argmax)
        a = self.combined_weights(arch_weights).to(self.weight.dtype)
        if mode == "superpose":
            b = None if self.bias is None else self.bias * (a.sum(1) @ self.row_masks.to(a.dtype))
            return self._call(x, self.weight * self.mask_mix(a), b)
        if mode == "mixture":
            out = None
            for i in range(self.grid[0]):
                for j in range(self.grid[1]):
                    y = a[i, j] * self.candidate(x, i, j)
                    out = y if out is None else out + y
            return out
        flat = int(torch.argmax(a.detach()).item())
        i, j = divmod(flat, self.grid[1])
        y = self.candidate(x, i, j)
        return a[i, j] * y if scale_argmax else y

    def candidate(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Output of candidate (i, j) alone, zero-padded to the largest output size."""
        i, j = self.check_index(i, j)
        return self._candidate(x, i, j)


class EntangledConv2d(_EntangledOp):
    """A conv whose output-channel and kernel-size choices are sub-tensors of one largest weight (tanglenas).

    Weight ``W`` of shape (max(out_choices), in_channels, K_max, K_max), ``K_max = max(kernel_choices)``.
    Candidate (i, j) uses ``W[:out_choices[i], :, centred kernel_choices[j] window]`` and the first
    ``out_choices[i]`` bias entries; its output is zero beyond ``out_choices[i]`` channels, so the next
    layer sees ``max(out_choices)`` channels in every mode. Padding is 'same' (``k // 2``), odd kernels only.

    Superposition: ``y = conv(x, W * sum_ij a_ij 1[S_ij], b * sum_ij a_ij 1[b_i], padding=K_max // 2)``.

    >>> conv = EntangledConv2d(1, (8, 16), (1, 3))
    >>> conv(torch.randn(2, 1, 6, 6), torch.full((2, 2), 0.25)).shape
    torch.Size([2, 16, 6, 6])
    """

    def __init__(self, in_channels: int, out_choices: Sequence[int] | int, kernel_choices: Sequence[int] | int,
                 stride: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_choices = _choices("out_choices", out_choices)
        self.kernel_choices = _choices("kernel_choices", kernel_choices, odd=True)
        self.stride = positive_int("stride", stride)
        boolean("bias", bias)
        c, k = max(self.out_choices), max(self.kernel_choices)
        self.weight = nn.Parameter(torch.empty(c, self.in_channels, k, k))
        self.bias = nn.Parameter(torch.empty(c)) if bias else None
        self.reset_parameters()
        self._setup_choices((self.out_choices, self.kernel_choices), ("out_choices", "kernel_choices"))

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init on the largest weight."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def _col_mask(self, j: int) -> torch.Tensor:
        k_max, k = self.weight.shape[-1], self.kernel_choices[j]
        o = (k_max - k) // 2
        m = torch.zeros(1, k_max, k_max)   # broadcast over input channels
        m[:, o:o + k, o:o + k] = 1.0
        return m

    def sub_weight(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sub-tensors S_ij(W), S_i(b) of candidate (i, j) (views of the shared parameters)."""
        i, j = self.check_index(i, j)
        k_max, k = self.weight.shape[-1], self.kernel_choices[j]
        o = (k_max - k) // 2
        w = self.weight[:self.out_choices[i], :, o:o + k, o:o + k]
        return w, None if self.bias is None else self.bias[:self.out_choices[i]]

    def _call(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, stride=self.stride, padding=w.shape[-1] // 2)

    def _candidate(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        w, b = self.sub_weight(i, j)
        y = self._call(x, w, b)
        return F.pad(y, (0, 0, 0, 0, 0, self.weight.shape[0] - w.shape[0]))

    def extract(self, i: int, j: int) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding a copy of candidate (i, j)'s weights (the discretised layer)."""
        w, b = self.sub_weight(i, j)
        conv = nn.Conv2d(self.in_channels, w.shape[0], w.shape[-1], stride=self.stride, padding=w.shape[-1] // 2,
                         bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, out_choices={self.out_choices}, kernel_choices={self.kernel_choices}, "
                f"stride={self.stride}, bias={self.bias is not None}")


class EntangledLinear(_EntangledOp):
    """A linear map whose input- and output-width choices are sub-blocks of one largest weight (tanglenas).

    Weight ``W`` of shape (max(out_choices), max(in_choices)). Candidate (i, j) reads the first
    ``in_choices[j]`` input features and writes the first ``out_choices[i]`` outputs (zeros beyond);
    inputs always have ``max(in_choices)`` features.

    Superposition: ``y = x @ (W * sum_ij a_ij 1[o < O_i, f < I_j]).T + b * sum_ij a_ij 1[o < O_i]``.

    >>> lin = EntangledLinear((16, 32), (4, 8))
    >>> lin(torch.randn(5, 32), (torch.tensor([0.5, 0.5]), torch.tensor([0.3, 0.7]))).shape
    torch.Size([5, 8])
    """

    def __init__(self, in_choices: Sequence[int] | int, out_choices: Sequence[int] | int, bias: bool = True) -> None:
        super().__init__()
        self.in_choices = _choices("in_choices", in_choices)
        self.out_choices = _choices("out_choices", out_choices)
        boolean("bias", bias)
        self.weight = nn.Parameter(torch.empty(max(self.out_choices), max(self.in_choices)))
        self.bias = nn.Parameter(torch.empty(max(self.out_choices))) if bias else None
        self.reset_parameters()
        self._setup_choices((self.out_choices, self.in_choices), ("out_choices", "in_choices"))

    def reset_parameters(self) -> None:
        """nn.Linear's default init on the largest weight."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def _col_mask(self, j: int) -> torch.Tensor:
        return (torch.arange(self.weight.shape[1]) < self.in_choices[j]).float()

    def sub_weight(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sub-tensors S_ij(W), S_i(b) of candidate (i, j) (views of the shared parameters)."""
        i, j = self.check_index(i, j)
        o, f = self.out_choices[i], self.in_choices[j]
        return self.weight[:o, :f], None if self.bias is None else self.bias[:o]

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.weight.shape[1]:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ArgumentError(f"x must have {self.weight.shape[1]} features (max(in_choices)) in its last dim, "
                                f"got {got}")

    def _call(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        self._check_input(x)
        return F.linear(x, w, b)

    def _candidate(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        self._check_input(x)
        w, b = self.sub_weight(i, j)
        y = F.linear(x[..., :w.shape[1]], w, b)
        return F.pad(y, (0, self.weight.shape[0] - w.shape[0]))

    def extract(self, i: int, j: int) -> nn.Linear:
        """A plain ``nn.Linear(in_choices[j], out_choices[i])`` holding a copy of candidate (i, j)'s weights."""
        w, b = self.sub_weight(i, j)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    def extra_repr(self) -> str:
        return f"in_choices={self.in_choices}, out_choices={self.out_choices}, bias={self.bias is not None}"


__all__ = ["EntangledConv2d", "EntangledLinear", "MODES"]
