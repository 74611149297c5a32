"""Programmable gradient information: a training-only auxiliary reversible branch (paper slug: ``pgi``).

Wang, Yeh, Liao, "YOLOv9: Learning What You Want to Learn Using Programmable Gradient Information",
ECCV 2024 (arXiv 2402.13616). A deep (especially thin) main network loses input information layer by
layer, so the gradients its final loss sends to early stages are unreliable. PGI adds, for training
only, an auxiliary branch that sees the *raw input* and is coupled to the main network by learnable
1x1 links from main features (``CBLinear``), fused into the auxiliary stages by nearest resize + sum
(``CBFuse``). The auxiliary task loss reaches the main backbone through those links; nothing flows from
the auxiliary branch into the main forward pass, and the branch is dropped at inference::

    pieces of main stage j:  (u_{j->k})_k = split(Conv1x1_j(m_j))          (one piece per aux stage k <= j)
    aux stage k input:       a_k_in = a_{k-1} + sum_{j routed to k} resize_nearest(u_{j->k}, size(a_k_in))
    loss:                    L = L_main(main_head(m_L)) + aux_weight * L_aux(aux_head(a_L)),  aux_weight = 0.25

:class:`PGIWrapper` wires a main network given as stages + head to an auxiliary branch; in training mode
``forward`` returns ``(main_out, aux_out)``, in eval mode only ``main_out`` (the auxiliary branch is not run),
and :meth:`PGIWrapper.deploy` returns a plain ``nn.Sequential`` of the main path. :class:`DeepSupervision`
is the baseline the paper compares with (auxiliary heads on intermediate main features).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import integer, is_int, real_scalar

__all__ = ["CBLinear", "CBFuse", "PGIWrapper", "DeepSupervision", "make_aux_copy", "conv_stages", "pool_head"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


# ------------------------------------------------------------------------------------ argument checks
def _dims(name: str, value) -> int:
    if not is_int(value, low=0, high=3):
        raise ValueError(f"{name} must be 0 (vectors, nn.Linear), 1, 2 or 3 (spatial dims of a 1x1 conv), "
                         f"got {value!r}")
    return int(value)


def _module_list(name: str, value) -> nn.ModuleList:
    if isinstance(value, nn.ModuleList):
        mods = value
    elif isinstance(value, (list, tuple, nn.Sequential)) and all(isinstance(m, nn.Module) for m in value):
        mods = nn.ModuleList(list(value))
    else:
        raise TypeError(f"{name} must be an nn.ModuleList (or a list of nn.Module), got {type(value).__name__}")
    if len(mods) == 0:
        raise ValueError(f"{name} must hold at least one stage, got none")
    return mods


def _module(name: str, value) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")
    return value


def _resize_nearest(x: Tensor, size: torch.Size) -> Tensor:
    if x.shape[2:] == size:
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest")


# ------------------------------------------------------------------------------------ CBLinear / CBFuse
class CBLinear(nn.Module):
    """1x1 convolution (with bias) whose output channels are split into one piece per target (paper slug: ``pgi``).

    ``(u_1, ..., u_n) = split(W m + b, out_channels)`` along the channel dim; ``dims`` picks the layer:
    0 = ``nn.Linear`` on ``(N, C)`` vectors, 1/2/3 = ``nn.Conv{dims}d`` with kernel 1 on ``(N, C, *spatial)``.
    Mirrors ``CBLinear`` of the official YOLOv9 code (``self.conv`` holds the weights).

    Example::

        >>> cb = CBLinear(64, [16, 32], dims=2)
        >>> u0, u1 = cb(torch.randn(2, 64, 8, 8))     # shapes (2, 16, 8, 8), (2, 32, 8, 8)
    """

    def __init__(self, in_channels: int, out_channels: Sequence[int], dims: int = 2) -> None:
        super().__init__()
        self.in_channels = integer("in_channels", in_channels, low=1)
        if isinstance(out_channels, (str, bytes)) or not isinstance(out_channels, Sequence) or not out_channels:
            raise ValueError(f"out_channels must be a non-empty list of ints >= 1, got {out_channels!r}")
        self.out_channels = tuple(integer(f"out_channels[{i}]", c, low=1) for i, c in enumerate(out_channels))
        self.dims = _dims("dims", dims)
        total = sum(self.out_channels)
        self.conv = (nn.Linear(in_channels, total) if self.dims == 0
                     else _CONV[self.dims](in_channels, total, kernel_size=1, bias=True))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        want = self.dims + 2 if self.dims else 2
        if x.dim() != want or x.shape[1] != self.in_channels:
            layout = "(N, C)" if self.dims == 0 else "(N, C" + ", L" * self.dims + ")"
            raise ValueError(f"CBLinear expects input of layout {layout} with C = {self.in_channels}, got shape "
                             f"{tuple(x.shape)}")
        return self.conv(x).split(self.out_channels, dim=1)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={list(self.out_channels)}, dims={self.dims}"


class CBFuse(nn.Module):
    """Sum a target feature with chosen pieces of ``CBLinear`` outputs, resized (nearest) to it (paper slug: ``pgi``).

    ``forward([pieces_1, ..., pieces_n, target]) = target + sum_i resize_nearest(pieces_i[indices[i]],
    size(target))``: the resize is to the *target's* spatial size. Mirrors ``CBFuse`` of the official code.
    Vectors ``(N, C)`` are summed as they are (no resize).

    Example::

        >>> fuse = CBFuse([0, 1])              # piece 0 of the first CBLinear output, piece 1 of the second
        >>> out = fuse([cb_a(m_a), cb_b(m_b), a_k])   # same shape as a_k
    """

    def __init__(self, indices: Sequence[int]) -> None:
        super().__init__()
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
            raise ValueError(f"indices must be a non-empty list of ints >= 0, got {indices!r}")
        self.indices = tuple(integer(f"indices[{n}]", i, low=0) for n, i in enumerate(indices))

    def forward(self, xs: Sequence) -> Tensor:
        if not isinstance(xs, (list, tuple)) or len(xs) != len(self.indices) + 1:
            raise ValueError(f"CBFuse expects a list of {len(self.indices)} CBLinear outputs followed by the target "
                             f"tensor, got {type(xs).__name__} of length {len(xs) if hasattr(xs, '__len__') else '?'}")
        target = xs[-1]
        if not isinstance(target, Tensor) or target.dim() < 2:
            raise ValueError(f"CBFuse target (last element) must be a tensor (N, C, ...), got "
                             f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}")
        out = target
        for i, (pieces, idx) in enumerate(zip(xs[:-1], self.indices)):
            if isinstance(pieces, Tensor):
                pieces = (pieces,)
            if idx >= len(pieces):
                raise ValueError(f"CBFuse indices[{i}] = {idx} but input {i} has only {len(pieces)} piece(s)")
            p = pieces[idx]
            if p.dim() != target.dim() or p.shape[:2] != target.shape[:2]:
                raise ValueError(f"CBFuse input {i} piece {idx} has shape {tuple(p.shape)}; expected the target's "
                                 f"batch and channels {tuple(target.shape[:2])} and rank {target.dim()}")
            out = out + _resize_nearest(p, target.shape[2:])
        return out

    def extra_repr(self) -> str:
        return f"indices={list(self.indices)}"


# ------------------------------------------------------------------------------------ channel inference
def _find_channels(module: nn.Module, which: str) -> int | None:
    mods = list(module.modules())
    if which == "out":
        for m in reversed(mods):
            for attr in ("out_channels", "out_features", "num_features", "num_channels"):
                v = getattr(m, attr, None)
                if is_int(v):
                    return v
    else:
        for m in mods:
            for attr in ("in_channels", "in_features", "num_features", "num_channels"):
                v = getattr(m, attr, None)
                if is_int(v):
                    return v
    return None


def _find_dims(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            return 1
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            return 2
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            return 3
        if isinstance(m, nn.Linear):
            return 0
    return None


def _channel_list(name: str, given, n: int, what: str) -> list[int | None]:
    if given is None:
        return [None] * n  # filled lazily per routed stage
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or len(given) != n:
        raise ValueError(f"{name} must be a list of {n} ints ({what}), got {given!r}")
    return [integer(f"{name}[{i}]", c, low=1) for i, c in enumerate(given)]


# ------------------------------------------------------------------------------------ main path / deploy
def _main_forward(stages: nn.ModuleList, head: nn.Module, x: Tensor) -> Tensor:
    for s in stages:
        x = s(x)
    return head(x)


def _deploy(stages: nn.ModuleList, head: nn.Module, copy_: bool) -> nn.Sequential:
    mods = [*stages, head]
    if copy_:
        mods = [copy.deepcopy(m) for m in mods]
    return nn.Sequential(*mods).eval()


class PGIWrapper(nn.Module):
    """A main network plus a training-only auxiliary reversible branch coupled by CBLinear/CBFuse (slug ``pgi``).

    ``routes = {j: [k, ...]}`` sends main stage ``j``'s output ``m_j`` through ``CBLinear_j`` (one piece per
    listed aux stage ``k <= j``, split in the listed order) and adds each piece, resized to size, to the input of
    aux stage ``k``; the aux branch starts from the raw input. Indices are 0-based.
    ``L = criterion(main_out, y) + aux_weight * criterion(aux_out, y_aux)``. Training ``forward`` returns
    ``(main_out, aux_out)``; eval ``forward`` runs only the main path and returns ``main_out``.

    Example::

        >>> pgi = PGIWrapper(main, make_aux_copy(main), head, aux_head, routes={1: [1], 3: [1, 3]})
        >>> loss = pgi.loss(pgi(x), y)            # training: main + 0.25 * aux
        >>> model = pgi.deploy()                   # plain nn.Sequential(*main, head), same outputs as pgi.eval()
    """

    def __init__(
        self,
        main_stages: Sequence[nn.Module],
        aux_stages: Sequence[nn.Module],
        main_head: nn.Module,
        aux_head: nn.Module,
        routes: Mapping[int, Sequence[int]],
        aux_weight: float = 0.25,
        *,
        main_channels: Sequence[int] | None = None,
        aux_channels: Sequence[int] | None = None,
        dims: int | None = None,
    ) -> None:
        super().__init__()
        self.main_stages = _module_list("main_stages", main_stages)
        self.aux_stages = _module_list("aux_stages", aux_stages)
        self.main_head = _module("main_head", main_head)
        self.aux_head = _module("aux_head", aux_head)
        self.aux_weight = aux_weight
        n_main, n_aux = len(self.main_stages), len(self.aux_stages)
        self.routes = self._check_routes(routes, n_main, n_aux)
        main_ch = _channel_list("main_channels", main_channels, n_main, "output channels of each main stage")
        aux_ch = _channel_list("aux_channels", aux_channels, n_aux, "input channels of each aux stage")
        if dims is not None:
            dims = _dims("dims", dims)
        self.cb_linear = nn.ModuleDict()
        # which (source j, piece index) feed each aux stage k, in increasing j
        fuse_plan: dict[int, list[tuple[int, int]]] = {}
        for j in sorted(self.routes):
            targets = self.routes[j]
            cin = main_ch[j] if main_ch[j] is not None else _find_channels(self.main_stages[j], "out")
            if cin is None:
                raise ValueError(f"cannot infer the output channels of main stage {j} "
                                 f"({type(self.main_stages[j]).__name__}); pass main_channels=[...]")
            couts = []
            for k in targets:
                c = aux_ch[k] if aux_ch[k] is not None else _find_channels(self.aux_stages[k], "in")
                if c is None:
                    raise ValueError(f"cannot infer the input channels of aux stage {k} "
                                     f"({type(self.aux_stages[k]).__name__}); pass aux_channels=[...]")
                couts.append(c)
            d = dims if dims is not None else _find_dims(self.main_stages[j])
            if d is None:
                raise ValueError(f"cannot infer the feature layout of main stage {j} (no Conv/Linear found); "
                                 f"pass dims=0 (vectors), 1, 2 or 3")
            self.cb_linear[str(j)] = CBLinear(cin, couts, dims=d)
            for piece, k in enumerate(targets):
                fuse_plan.setdefault(k, []).append((j, piece))
        self._fuse_sources = {k: [j for j, _ in v] for k, v in sorted(fuse_plan.items())}
        self.cb_fuse = nn.ModuleDict({str(k): CBFuse([p for _, p in v]) for k, v in sorted(fuse_plan.items())})

    @staticmethod
    def _check_routes(routes, n_main: int, n_aux: int) -> dict[int, tuple[int, ...]]:
        if not isinstance(routes, Mapping) or not routes:
            raise ValueError(f"routes must be a non-empty dict {{main stage j: [aux stages k <= j]}}, got {routes!r}")
        out: dict[int, tuple[int, ...]] = {}
        for j, ks in routes.items():
            if not is_int(j, low=0, high=n_main - 1):
                raise ValueError(f"routes key {j!r} must be a main stage index in [0, {n_main})")
            if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
                raise ValueError(f"routes[{j}] must be a non-empty list of aux stage indices, got {ks!r}")
            for k in ks:
                if not is_int(k, low=0, high=n_aux - 1):
                    raise ValueError(f"routes[{j}] holds {k!r}; aux stage indices must be in [0, {n_aux})")
                if k > j:
                    raise ValueError(f"routes[{j}] holds aux stage {k}: PGI routes a main stage to aux stages at the "
                                     f"same or lower depth (k <= j); did you write {{aux stage: [main stages]}}?")
            if len(set(ks)) != len(ks):
                raise ValueError(f"routes[{j}] lists an aux stage twice: {list(ks)}")
            out[j] = tuple(ks)
        return out

    # -------------------------------------------------------------------------- weight of the aux loss
    @property
    def aux_weight(self) -> float:
        return self._aux_weight

    @aux_weight.setter
    def aux_weight(self, value: float) -> None:
        self._aux_weight = real_scalar("aux_weight", value, nonneg=True, tensor_ok=False)

    # -------------------------------------------------------------------------- forward / loss
    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if not self.training:
            return _main_forward(self.main_stages, self.main_head, x)
        pieces: dict[int, tuple[Tensor, ...]] = {}
        h = x
        for j, stage in enumerate(self.main_stages):
            h = stage(h)
            if j in self.routes:
                pieces[j] = self.cb_linear[str(j)](h)
        main_out = self.main_head(h)
        a = x
        for k, stage in enumerate(self.aux_stages):
            srcs = self._fuse_sources.get(k)
            if srcs is not None:
                a = self.cb_fuse[str(k)]([pieces[j] for j in srcs] + [a])
            a = stage(a)
        return main_out, self.aux_head(a)

    def loss(self, outputs, target: Tensor, criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
             aux_target: Tensor | None = None) -> Tensor:
        """``criterion(main_out, target) + aux_weight * criterion(aux_out, aux_target or target)``.

        ``outputs`` is what ``forward`` returned: a ``(main_out, aux_out)`` pair in training, or ``main_out``
        alone (eval), whose loss is the main term only. ``aux_target`` serves heads trained with their own
        target assignment (the official detector uses one assigner per head set).
        """
        if isinstance(outputs, Tensor):
            return criterion(outputs, target)
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise ValueError(f"outputs must be forward()'s (main_out, aux_out) pair or a tensor, got "
                             f"{type(outputs).__name__}")
        main_out, aux_out = outputs
        return criterion(main_out, target) + self._aux_weight * criterion(
            aux_out, target if aux_target is None else aux_target)

    # -------------------------------------------------------------------------- parameters / deploy
    def main_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the main path (what :meth:`deploy` keeps)."""
        yield from self.main_stages.parameters()
        yield from self.main_head.parameters()

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        """Training-only parameters: aux stages, aux head and the CBLinear links."""
        yield from self.aux_stages.parameters()
        yield from self.aux_head.parameters()
        yield from self.cb_linear.parameters()

    def deploy(self, copy: bool = True) -> nn.Sequential:
        """The main path as a plain ``nn.Sequential(*main_stages, main_head)`` in eval mode.

        ``copy=True`` (default) deep-copies the modules so further training of the wrapper does not change it;
        ``copy=False`` shares them. The aux branch, CBLinear and CBFuse are not part of it.
        """
        return _deploy(self.main_stages, self.main_head, copy)

    def extra_repr(self) -> str:
        return f"routes={ {j: list(k) for j, k in self.routes.items()} }, aux_weight={self._aux_weight:g}"


class DeepSupervision(nn.Module):
    """Deep-supervision baseline: extra heads on intermediate main features, weighted loss (paper slug: ``pgi``).

    ``L = criterion(head(m_L), y) + weight * sum_{i in heads} criterion(aux_heads[i](m_i), y)``; 0-based stage
    indices. Training ``forward`` returns ``(main_out, [aux outs in increasing stage order])``; eval returns
    ``main_out``; :meth:`deploy` keeps the main path only (same interface as :class:`PGIWrapper`).

    Example::

        >>> ds = DeepSupervision(stages, head, {1: pool_head(16, 10), 3: pool_head(16, 10)}, weight=0.25)
        >>> loss = ds.loss(ds(x), y)
        >>> model = ds.deploy()
    """

    def __init__(self, stages: Sequence[nn.Module], head: nn.Module, aux_heads: Mapping[int, nn.Module],
                 weight: float = 0.25) -> None:
        super().__init__()
        self.stages = _module_list("stages", stages)
        self.head = _module("head", head)
        if not isinstance(aux_heads, Mapping) or not aux_heads:
            raise ValueError(f"aux_heads must be a non-empty dict {{stage index: head module}}, got {aux_heads!r}")
        for i, h in aux_heads.items():
            if not is_int(i, low=0, high=len(self.stages) - 1):
                raise ValueError(f"aux_heads key {i!r} must be a stage index in [0, {len(self.stages)})")
            _module(f"aux_heads[{i}]", h)
        self.heads_at = tuple(sorted(aux_heads))
        self.aux_heads = nn.ModuleDict({str(i): aux_heads[i] for i in self.heads_at})
        self.weight = weight

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = real_scalar("weight", value, nonneg=True, tensor_ok=False)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:
        if not self.training:
            return _main_forward(self.stages, self.head, x)
        aux = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if str(i) in self.aux_heads:
                aux.append(self.aux_heads[str(i)](x))
        return self.head(x), aux

    def loss(self, outputs, target: Tensor,
             criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
        """``criterion(main_out, target) + weight * sum_i criterion(aux_i, target)`` (main term only in eval)."""
        if isinstance(outputs, Tensor):
            return criterion(outputs, target)
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise ValueError(f"outputs must be forward()'s (main_out, aux_outs) pair or a tensor, got "
                             f"{type(outputs).__name__}")
        main_out, aux = outputs
        total = criterion(main_out, target)
        for a in aux:
            total = total + self._weight * criterion(a, target)
        return total

    def main_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.stages.parameters()
        yield from self.head.parameters()

    def aux_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.aux_heads.parameters()

    def deploy(self, copy: bool = True) -> nn.Sequential:
        """The main path as a plain ``nn.Sequential(*stages, head)`` in eval mode (deep copy unless ``copy=False``)."""
        return _deploy(self.stages, self.head, copy)

    def extra_repr(self) -> str:
        return f"heads_at={list(self.heads_at)}, weight={self._weight:g}"


# ------------------------------------------------------------------------------------ builders
def make_aux_copy(stages: nn.Module | Sequence[nn.Module]) -> nn.Module:
    """Deep copy of a stage structure with fresh parameters and buffers (paper slug: ``pgi``).

    Every submodule with ``reset_parameters`` (Conv, Linear, BatchNorm, ...) is re-initialised from the global
    torch RNG, so the auxiliary branch has the main branch's structure but its own weights.

    Example::

        >>> aux = make_aux_copy(main_stages)      # same types and shapes, new weights
    """
    if isinstance(stages, nn.Module):
        out = copy.deepcopy(stages)
    elif isinstance(stages, Sequence) and stages and all(isinstance(m, nn.Module) for m in stages):
        out = nn.ModuleList(copy.deepcopy(list(stages)))
    else:
        raise TypeError(f"stages must be an nn.Module or a non-empty list of nn.Module, got {type(stages).__name__}")
    for m in out.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return out


def conv_stages(in_channels: int, width: int, depth: int, *, downsample_at: Sequence[int] = (), dims: int = 1,
                kernel_size: int = 3) -> nn.ModuleList:
    """``depth`` stages Conv(k, stride 2 at ``downsample_at`` else 1, no bias) -> BatchNorm -> ReLU (slug ``pgi``).

    A deep-and-thin backbone for PGI experiments (0-based stage indices). ``dims`` = 1, 2 or 3.

    Example::

        >>> stages = conv_stages(1, 16, 8, downsample_at=(2, 4, 6))   # 1-D, lengths 40 -> 5
    """
    integer("in_channels", in_channels, low=1)
    integer("width", width, low=1)
    integer("depth", depth, low=1)
    integer("kernel_size", kernel_size, low=1)
    if _dims("dims", dims) == 0:
        raise ValueError("dims must be 1, 2 or 3 for conv stages, got 0")
    down = set()
    for i in downsample_at:
        if not is_int(i, low=0, high=depth - 1):
            raise ValueError(f"downsample_at must hold stage indices in [0, {depth}), got {list(downsample_at)!r}")
        down.add(i)
    conv, bn = _CONV[dims], {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    stages = []
    c = in_channels
    for i in range(depth):
        stages.append(nn.Sequential(conv(c, width, kernel_size, stride=2 if i in down else 1,
                                         padding=kernel_size // 2, bias=False), bn(width), nn.ReLU()))
        c = width
    return nn.ModuleList(stages)


def pool_head(in_channels: int, num_classes: int, dims: int = 1) -> nn.Sequential:
    """Classifier head: global average pool -> flatten -> Linear (``dims=0``: Linear only) (paper slug: ``pgi``).

    Example::

        >>> head = pool_head(16, 10, dims=1)
        >>> head(torch.randn(4, 16, 5)).shape     # torch.Size([4, 10])
    """
    integer("in_channels", in_channels, low=1)
    integer("num_classes", num_classes, low=1)
    if _dims("dims", dims) == 0:
        return nn.Sequential(nn.Linear(in_channels, num_classes))
    return nn.Sequential(_POOL[dims](1), nn.Flatten(), nn.Linear(in_channels, num_classes))
