"""Unit matching between two nets: correlations, one-to-one, one-to-many, many-to-many (convergent-learning).

Li, Yosinski, Clune, Lipson, Hopcroft, "Convergent Learning: Do different neural networks learn the same
representations?", ICLR 2016. Run nets A and B on the same inputs and compare their hidden units:

    standardise     z_i = (a_i - mean_i) / std_i            (dead units, std = 0, get z_i = 0)
    correlation     C_AB[i, j] = mean_n z_a_i z_b_j         (Pearson; C_AA, C_BB within one net)
    semi-matching   j*(i) = argmax_j C_AB[i, j]             (several A units may pick the same B unit)
    bipartite       pi = argmax_perm sum_i C_AB[i, pi(i)]   (Hungarian algorithm, scipy linear_sum_assignment)
    sparse stitch   M = argmin 1/2 mean_n ||z_b - M z_a||^2 + l1 ||M||_1     (one-to-many, proximal gradient)
    clusters        spectral clustering of S = [[C_AA, C_AB], [C_BA, C_BB]]  (many-to-many)

For conv layers every (image, position) pair is one sample (``spatial="flatten"``); ``position_stride``
subsamples positions on a fixed grid, the same for both nets.

>>> a = collect_activations(net_a, "1", x_test)          # (n, k) post-ReLU units of layer "1"
>>> b = collect_activations(net_b, "1", x_test)
>>> match = match_units(unit_correlation(a, b))           # partner[i] of each A unit, corr[i] its correlation
>>> match.corr.sort(descending=True).values               # the paper's sorted matched-correlation curve
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import ArgumentError, boolean, choice, integer, nonneg_int, optional_generator, positive_int, \
    real_in, real_scalar, tensor
from ._hooks import HookProbe, resolve_layers

SPATIAL = ("flatten", "mean", "max")
MATCH_METHODS = ("bipartite", "semi")
AFFINITIES = ("abs", "shift")


# ------------------------------------------------------------------------------------------ activations
def units_view(output: Tensor, spatial: str = "flatten", position_stride: int = 1) -> Tensor:
    """A layer output as a (samples, units) matrix (convergent-learning).

    (N, k) stays as it is. (N, C, *S) (channels at dim 1, PyTorch's conv layout): ``"flatten"`` makes every
    (image, position) one sample, (N * |S'|, C), keeping every ``position_stride``-th position along each
    spatial dim; ``"mean"`` / ``"max"`` pool the positions away, (N, C).

    >>> units_view(torch.randn(2, 3, 4, 4)).shape
    torch.Size([32, 3])
    """
    tensor("output", output, min_dim=2)
    choice("spatial", spatial, SPATIAL)
    position_stride = positive_int("position_stride", position_stride)
    if output.dim() == 2:
        return output
    if spatial == "mean":
        return output.flatten(2).mean(2)
    if spatial == "max":
        return output.flatten(2).amax(2)
    if position_stride > 1:
        output = output[(slice(None), slice(None)) + (slice(None, None, position_stride),) * (output.dim() - 2)]
    return output.flatten(2).transpose(1, 2).reshape(-1, output.shape[1])


class ActivationRecorder(HookProbe):
    """Context manager recording layer outputs as (samples, units) matrices (convergent-learning).

    Forward hooks on the named layers store each output, detached (``to_cpu``: moved to the CPU), as
    :func:`units_view` shapes it. Forwards of ``model`` are told apart by a hook on ``model`` itself, so a
    module run several times per forward (a reused ReLU) keeps its calls apart: pick one with ``call``.
    Every hook is removed on exit, exceptions included. The model's outputs are never changed.

    >>> with ActivationRecorder(model, ["1", "3"]) as rec:
    ...     model(x1); model(x2)
    >>> rec.activations("1").shape                   # (len(x1) + len(x2), units)
    """

    def __init__(self, model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module], *,
                 spatial: str = "flatten", position_stride: int = 1, to_cpu: bool = False) -> None:
        self.modules = resolve_layers(model, layers)
        self.model = model
        self.spatial = choice("spatial", spatial, SPATIAL)
        self.position_stride = positive_int("position_stride", position_stride)
        self.to_cpu = boolean("to_cpu", to_cpu)
        self._pending: dict[str, list[Tensor]] = {k: [] for k in self.modules}
        self._forwards: dict[str, list[list[Tensor]]] = {k: [] for k in self.modules}
        self._handles: list = []

    def _layer_hook(self, key: str):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {key!r} returned {type(output).__name__}; unit matching needs a tensor "
                                "output of shape (N, units) or (N, channels, ...)")
            out = units_view(output.detach(), self.spatial, self.position_stride)
            self._pending[key].append(out.cpu() if self.to_cpu else out)
        return hook

    def _start(self, module, inputs):
        for calls in self._pending.values():  # calls left over by a forward that raised
            calls.clear()

    def _end(self, module, inputs, output):
        for key, calls in self._pending.items():
            self._forwards[key].append(list(calls))
            calls.clear()

    def _hooks(self):
        return [(m, self._layer_hook(k)) for k, m in self.modules.items()] + [(self.model, self._end)]

    def __enter__(self):
        super().__enter__()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._start))
        except BaseException:
            self.remove()
            raise
        return self

    @property
    def forwards(self) -> int:
        """Number of completed forwards of the model while recording."""
        return len(next(iter(self._forwards.values())))

    def activations(self, layer: str | None = None, call: int | None = None) -> Tensor:
        """The recorded (samples, units) matrix of ``layer`` (default: the only one), all forwards stacked.

        A layer run k > 1 times per forward needs ``call`` in [-k, k) to pick one of its calls.
        """
        if layer is None:
            if len(self.modules) != 1:
                raise ArgumentError(f"layer must be one of {sorted(self.modules)} (several are recorded), got None")
            layer = next(iter(self.modules))
        if layer not in self._forwards:
            raise ArgumentError(f"layer must be one of {sorted(self.modules)}, got {layer!r}")
        runs = self._forwards[layer]
        if not runs:
            raise RuntimeError("no forward of the model was recorded: run the model inside the `with` block")
        counts = sorted({len(r) for r in runs})
        if counts == [0]:
            raise RuntimeError(f"layer {layer!r} did not run in the recorded forwards")
        if len(counts) > 1:
            raise RuntimeError(f"layer {layer!r} ran a different number of times in different forwards ({counts})")
        k = counts[0]
        if call is None:
            if k > 1:
                raise RuntimeError(f"layer {layer!r} ran {k} times per forward; pass call=<index in [-{k}, {k})> "
                                   "to choose one")
            call = 0
        elif not (isinstance(call, int) and not isinstance(call, bool) and -k <= call < k):
            raise ArgumentError(f"call must be an int in [-{k}, {k}) (layer {layer!r} ran {k} times per forward), "
                                f"got {call!r}")
        return torch.cat([r[call] for r in runs])

    def reset(self) -> None:
        """Forget every recorded forward."""
        for key in self.modules:
            self._pending[key].clear()
            self._forwards[key].clear()


def _batches_of(inputs: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(inputs, Tensor):
        return (inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size))
    return ((b[0] if isinstance(b, (tuple, list)) else b) for b in inputs)


@torch.no_grad()
def collect_activations(model: nn.Module, layer: str | nn.Module | Sequence[str | nn.Module], inputs: Any, *,
                        spatial: str = "flatten", position_stride: int = 1, call: int | None = None,
                        batch_size: int = 1024) -> Tensor | dict[str, Tensor]:
    """Activations of ``layer`` over ``inputs`` as a (samples, units) matrix (convergent-learning).

    inputs: a tensor (run in chunks of ``batch_size``) or an iterable of batches (a tensor, or a tuple
    whose first item is the input, as a DataLoader yields). The model runs in eval mode under
    ``no_grad`` (its mode is restored); hooks are removed whatever happens. A list of layers gives a dict
    ``{name: matrix}``. Non-finite activations raise a ValueError naming the layer.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> collect_activations(net, "1", torch.randn(100, 4)).shape
    torch.Size([100, 8])
    """
    batch_size = positive_int("batch_size", batch_size)
    single = isinstance(layer, (str, nn.Module))
    was = model.training if isinstance(model, nn.Module) else False
    rec = ActivationRecorder(model, layer, spatial=spatial, position_stride=position_stride)
    model.eval()
    try:
        with rec:
            for x in _batches_of(inputs, batch_size):
                model(x)
    finally:
        model.train(was)
    out = {k: rec.activations(k, call) for k in rec.modules}
    for k, v in out.items():
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"layer {k!r} produced {bad} non-finite activation(s) (NaN/inf); correlations of "
                             "such units are undefined")
    return next(iter(out.values())) if single else out


# ------------------------------------------------------------------------------------------ correlations
def _acts(name: str, acts: Any) -> Tensor:
    tensor(name, acts, floating=True, finite=True)
    if acts.dim() != 2:
        raise ArgumentError(f"{name} must be a (samples, units) matrix, got shape {tuple(acts.shape)}")
    if acts.shape[0] < 2:
        raise ArgumentError(f"{name} must have at least 2 samples (rows) for a correlation, got {acts.shape[0]}")
    if acts.shape[1] < 1:
        raise ArgumentError(f"{name} must have at least 1 unit (column), got shape {tuple(acts.shape)}")
    return acts


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64


def standardize(acts: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, std) with z = (acts - mean) / std per unit (column); dead units get std = 1, so z = 0.

    A unit is dead when std <= eps * (1 + |mean|) (constant over the samples). Computed in float64
    (float32 on MPS) and returned in that precision (convergent-learning).
    """
    acts = _acts("acts", acts)
    eps = real_in("eps", eps, 0.0, tensor_ok=False)
    x = acts.to(_work_dtype(acts))
    mean = x.mean(0)
    std = (x - mean).square().mean(0).sqrt()
    dead = std <= eps * (1.0 + mean.abs())
    std = torch.where(dead, torch.ones_like(std), std)
    z = (x - mean) / std
    return z.masked_fill(dead, 0.0), mean, std


def dead_units(acts: Tensor, eps: float = 1e-8) -> Tensor:
    """Boolean mask of units (columns) constant over the samples: std <= eps * (1 + |mean|) (convergent-learning)."""
    z, _, _ = standardize(acts, eps)
    return (z == 0).all(0)


def unit_correlation(acts_a: Tensor, acts_b: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each A unit with each B unit, C[i, j] = mean_n z_a[n, i] z_b[n, j] (convergent-learning).

    acts_a (n, k_a), acts_b (n, k_b) hold the same n inputs in the same order (``acts_b=None``: C_AA).
    Dead units (constant) correlate 0 with everything, themselves included, never NaN. Values are in
    [-1, 1]; computed in float64 (float32 on MPS), returned in the inputs' floating dtype.

    >>> a = torch.randn(500, 3)
    >>> torch.allclose(unit_correlation(a, 2 * a[:, [2, 0, 1]] + 1)[0, 1], torch.tensor(1.0))
    True
    """
    acts_a = _acts("acts_a", acts_a)
    za, _, _ = standardize(acts_a, eps)
    if acts_b is None:
        zb = za
    else:
        acts_b = _acts("acts_b", acts_b)
        if acts_b.shape[0] != acts_a.shape[0]:
            raise ArgumentError(f"acts_b must have the same number of samples as acts_a ({acts_a.shape[0]}), got "
                                f"{acts_b.shape[0]}")
        zb, _, _ = standardize(acts_b.to(acts_a.device), eps)
    corr = (za.T @ zb / za.shape[0]).clamp(-1.0, 1.0)
    out_dtype = acts_a.dtype if acts_b is None else torch.promote_types(acts_a.dtype, acts_b.dtype)
    return corr.to(out_dtype)


# ------------------------------------------------------------------------------------------ one-to-one
class UnitMatch(NamedTuple):
    """A matching: ``partner[i]`` is the B unit paired with A unit i, ``corr[i] = C_AB[i, partner[i]]``."""

    partner: Tensor
    corr: Tensor

    @property
    def mean(self) -> float:
        """Mean matched correlation."""
        return float(self.corr.double().mean())

    @property
    def n_shared(self) -> int:
        """How many B units are the partner of more than one A unit (0 for a bipartite matching)."""
        return int((torch.bincount(self.partner.cpu()) > 1).sum())

    def sorted(self) -> Tensor:
        """Matched correlations, best first (the paper's per-layer curve)."""
        return self.corr.sort(descending=True).values


def _corr_matrix(corr: Any) -> Tensor:
    tensor("corr", corr, floating=True, finite=True)
    if corr.dim() != 2 or corr.shape[0] < 1 or corr.shape[1] < 1:
        raise ArgumentError(f"corr must be a non-empty (k_a, k_b) matrix, got shape {tuple(corr.shape)}")
    return corr


def match_units(corr: Tensor, method: str = "bipartite", *, exclude_self: bool = False) -> UnitMatch:
    """One-to-one unit matching on a correlation matrix C_AB (k_a, k_b) (convergent-learning).

    ``"bipartite"``: the injection pi maximising sum_i C_AB[i, pi(i)] (scipy's linear_sum_assignment,
    the Hungarian algorithm; needs k_a <= k_b). ``"semi"``: j*(i) = argmax_j C_AB[i, j], partners may
    repeat. Raw correlation is maximised, as in the paper (a unit and its negative do not match).
    ``exclude_self``: for C_AA, never pair a unit with itself (the within-net redundancy baseline; square only).

    >>> c = torch.tensor([[0.1, 0.9], [0.8, 0.7]])
    >>> match_units(c).partner.tolist(), match_units(c, "semi").partner.tolist()
    ([1, 0], [1, 0])
    """
    corr = _corr_matrix(corr)
    choice("method", method, MATCH_METHODS)
    boolean("exclude_self", exclude_self)
    k_a, k_b = corr.shape
    work = corr.detach().double().cpu()
    if exclude_self:
        if k_a != k_b or k_a < 2:
            raise ArgumentError(f"exclude_self needs a square corr with at least 2 units, got shape {(k_a, k_b)}")
        work = work.clone()
        work.fill_diagonal_(-math.inf)
    if method == "semi":
        partner = work.argmax(1)
    else:
        if k_a > k_b:
            raise ArgumentError(f"bipartite matching pairs every A unit with a distinct B unit, so corr needs "
                                f"rows <= columns, got shape {(k_a, k_b)}; pass corr.T to match B into A")
        from scipy.optimize import linear_sum_assignment

        cost = -work.numpy()
        if exclude_self:
            cost[np.isinf(cost)] = 4.0 * k_a + 4.0  # larger than any gain: never chosen while a derangement exists
        rows, cols = linear_sum_assignment(cost)
        partner = torch.empty(k_a, dtype=torch.int64)
        partner[torch.as_tensor(rows, dtype=torch.int64)] = torch.as_tensor(cols, dtype=torch.int64)
    partner = partner.to(corr.device)
    return UnitMatch(partner, corr.gather(1, partner[:, None])[:, 0])


def chance_correlation(corr: Tensor) -> float:
    """Expected mean matched correlation of a random one-to-one pairing: the mean of C_AB (convergent-learning).

    For a random injection pi, E[C_AB[i, pi(i)]] = mean_j C_AB[i, j], so the average over i is the mean
    of all entries: the chance level of :func:`match_units`.
    """
    corr = _corr_matrix(corr)
    return float(corr.double().mean())


# ------------------------------------------------------------------------------------------ one-to-many
class SparseStitch(nn.Module):
    """A sparse linear map predicting B's units from A's: a bias-free Linear or 1x1 conv (convergent-learning).

    ``weight`` M (k_b, k_a) acts on standardised units: forward(a) = ((a - in_mean) / in_std) M^T * out_std
    + out_mean, so it predicts raw B activations from raw A ones (the buffers are 0 / 1 until
    :func:`fit_sparse_prediction` sets them). The paper's objective is
    1/2 mean_n ||z_b - M z_a||^2 + l1 ||M||_1: add :meth:`penalty` to your loss, or call :meth:`prox_`
    after each optimizer step (soft-thresholding, exact zeros). ``conv=True``: inputs (N, k_a, *S).

    >>> stitch = SparseStitch(128, 128, l1=1e-3)
    >>> loss = 0.5 * (stitch(a) - b).square().sum(1).mean(); loss.backward(); opt.step(); stitch.prox_(lr)
    """

    def __init__(self, in_units: int, out_units: int, l1: float = 1e-3, conv: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_units = positive_int("in_units", in_units)
        self.out_units = positive_int("out_units", out_units)
        self.l1 = real_scalar("l1", l1, nonneg=True, tensor_ok=False)
        self.conv = boolean("conv", conv)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(out_units, in_units, **kw))
        self.register_buffer("in_mean", torch.zeros(in_units, **kw))
        self.register_buffer("in_std", torch.ones(in_units, **kw))
        self.register_buffer("out_mean", torch.zeros(out_units, **kw))
        self.register_buffer("out_std", torch.ones(out_units, **kw))

    def extra_repr(self) -> str:
        return f"in_units={self.in_units}, out_units={self.out_units}, l1={self.l1:g}, conv={self.conv}"

    def _shape(self, v: Tensor, x: Tensor) -> Tensor:
        return v.view(1, -1, *([1] * (x.dim() - 2))) if self.conv else v

    def forward(self, a: Tensor) -> Tensor:
        if self.conv:
            if a.dim() < 3 or a.shape[1] != self.in_units:
                raise ArgumentError(f"a must have shape (N, {self.in_units}, ...) for a 1x1-conv stitch, got "
                                    f"{tuple(a.shape)}")
            z = (a - self._shape(self.in_mean, a)) / self._shape(self.in_std, a)
            y = torch.einsum("oi,ni...->no...", self.weight, z)
            return y * self._shape(self.out_std, y) + self._shape(self.out_mean, y)
        if a.shape[-1] != self.in_units:
            raise ArgumentError(f"a must have {self.in_units} units in its last dim, got shape {tuple(a.shape)}")
        z = (a - self.in_mean) / self.in_std
        return (z @ self.weight.T) * self.out_std + self.out_mean

    def penalty(self) -> Tensor:
        """l1 * ||M||_1."""
        return self.l1 * self.weight.abs().sum()

    @torch.no_grad()
    def prox_(self, lr: float) -> "SparseStitch":
        """Proximal step of the L1 term after a gradient step of size ``lr``: M <- sign(M) max(|M| - lr*l1, 0)."""
        lr = real_scalar("lr", lr, nonneg=True, tensor_ok=False)
        self.weight.copy_(_soft_threshold(self.weight, lr * self.l1))
        return self

    def nnz(self) -> int:
        """Number of nonzero weights."""
        return int((self.weight != 0).sum())

    def nnz_per_unit(self) -> Tensor:
        """Nonzero weights of each output (B) unit."""
        return (self.weight != 0).sum(1)


def _soft_threshold(w: Tensor, t: float) -> Tensor:
    return w.sign() * (w.abs() - t).clamp_min(0.0)


class SparseFit(NamedTuple):
    """A fitted :class:`SparseStitch`, its held-out R^2 (mean over live B units) and nonzeros per B unit."""

    stitch: SparseStitch
    r2: float
    nnz: float

    @property
    def nnz_fraction(self) -> float:
        """Fraction of nonzero weights, nnz / k_a."""
        return self.nnz / self.stitch.in_units


def prediction_r2(pred: Tensor, target: Tensor, units: Tensor | None = None) -> float:
    """Mean over units (columns) of R^2 = 1 - sum (t - p)^2 / sum (t - mean t)^2 (convergent-learning).

    ``units``: a boolean mask of the units to average; units constant in ``target`` are always left out.
    """
    tensor("pred", pred, floating=True, finite=True)
    tensor("target", target, floating=True, finite=True)
    if pred.shape != target.shape or target.dim() != 2:
        raise ArgumentError(f"pred and target must be (samples, units) matrices of one shape, got "
                            f"{tuple(pred.shape)} and {tuple(target.shape)}")
    t, p = target.double(), pred.double()
    sst = (t - t.mean(0)).square().sum(0)
    keep = sst > 1e-12 * (1.0 + t.abs().amax(0)) ** 2
    if units is not None:
        keep = keep & units.to(keep.device)
    if not bool(keep.any()):
        raise ArgumentError("target has no non-constant unit to score (every column is constant or masked out)")
    r2 = 1.0 - (t - p).square().sum(0)[keep] / sst[keep]
    return float(r2.mean())


def _pair_check(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ArgumentError(f"{b_name} must have the same number of samples as {a_name} ({a.shape[0]}), got "
                            f"{b.shape[0]}")


def _fista(za: Tensor, zb: Tensor, l1: float, steps: int) -> Tensor:
    """argmin_M 1/2 mean_n ||zb_n - M za_n||^2 + l1 ||M||_1 by accelerated proximal gradient on Gram matrices."""
    n = za.shape[0]
    gram = za.T @ za / n                                 # (k_a, k_a)
    cross = zb.T @ za / n                                # (k_b, k_a)
    lip = float(torch.linalg.eigvalsh(gram)[-1]) if gram.numel() else 0.0
    if lip <= 0.0:
        return torch.zeros_like(cross)
    step = 1.0 / lip
    m = torch.zeros_like(cross)
    y, t = m, 1.0
    for _ in range(steps):
        m_next = _soft_threshold(y - step * (y @ gram - cross), step * l1)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = m_next + ((t - 1.0) / t_next) * (m_next - m)
        m, t = m_next, t_next
    return m


def fit_sparse_prediction(acts_a: Tensor, acts_b: Tensor, l1: float, steps: int = 500, *,
                          test: tuple[Tensor, Tensor] | None = None, val_fraction: float = 0.2,
                          generator: torch.Generator | None = None, eps: float = 1e-8) -> SparseFit:
    """Fit a :class:`SparseStitch` predicting B's units from A's and score it on held-out samples (convergent-learning).

    Minimises 1/2 mean_n ||z_b - M z_a||^2 + l1 ||M||_1 on units standardised with the fitting samples'
    statistics (the paper's Caffe Euclidean loss with L1 weight decay, i.e. one Lasso per B unit) by
    ``steps`` of accelerated proximal gradient (FISTA, step 1 / lambda_max of the Gram matrix): exact zeros,
    deterministic. ``test=(a_test, b_test)`` scores on those samples; else a random ``val_fraction`` of the
    rows (``generator``) is held out. Returns ``SparseFit(stitch, r2, nnz)``: R^2 averaged over B units not
    dead in the fitting samples, nnz the mean number of nonzero weights per B unit. ``l1=0``: least squares.

    >>> a = torch.randn(400, 16); b = a @ torch.randn(16, 8)
    >>> fit = fit_sparse_prediction(a, b, l1=1e-3, test=(a, b)); round(fit.r2, 3)
    1.0
    """
    acts_a, acts_b = _acts("acts_a", acts_a), _acts("acts_b", acts_b)
    _pair_check("acts_a", acts_a, "acts_b", acts_b)
    l1 = real_scalar("l1", l1, nonneg=True, tensor_ok=False)
    steps = nonneg_int("steps", steps)
    optional_generator(generator)
    if test is None:
        frac = real_in("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True, tensor_ok=False)
        n = acts_a.shape[0]
        n_val = int(round(n * frac))
        if n_val < 2 or n - n_val < 2:
            raise ArgumentError(f"val_fraction={frac:g} of {n} samples leaves fewer than 2 samples to fit or to "
                                "score; give more samples or test=(a_test, b_test)")
        perm = torch.randperm(n, generator=generator).to(acts_a.device)
        test = (acts_a[perm[:n_val]], acts_b[perm[:n_val]])
        acts_a, acts_b = acts_a[perm[n_val:]], acts_b[perm[n_val:]]
    if not (isinstance(test, (tuple, list)) and len(test) == 2):
        raise ArgumentError(f"test must be a pair (a_test, b_test), got {type(test).__name__}")
    ta, tb = _acts("test[0]", test[0]), _acts("test[1]", test[1])
    _pair_check("test[0]", ta, "test[1]", tb)
    if ta.shape[1] != acts_a.shape[1] or tb.shape[1] != acts_b.shape[1]:
        raise ArgumentError(f"test units must match the fitting units ({acts_a.shape[1]}, {acts_b.shape[1]}), got "
                            f"({ta.shape[1]}, {tb.shape[1]})")
    za, mean_a, std_a = standardize(acts_a, eps)
    zb, mean_b, std_b = standardize(acts_b, eps)
    live_b = (zb != 0).any(0)
    m = _fista(za, zb, l1, steps)
    stitch = SparseStitch(acts_a.shape[1], acts_b.shape[1], l1=l1, device=acts_a.device, dtype=za.dtype)
    with torch.no_grad():
        stitch.weight.copy_(m)
        stitch.in_mean.copy_(mean_a), stitch.in_std.copy_(std_a)
        stitch.out_mean.copy_(mean_b), stitch.out_std.copy_(std_b)
        pred = stitch(ta.to(za.dtype))
    r2 = prediction_r2(pred, tb.to(za.dtype), units=live_b)
    return SparseFit(stitch.to(acts_a.dtype), r2, float(stitch.nnz_per_unit()[live_b].double().mean())
                     if bool(live_b.any()) else 0.0)


def partner_r2(acts_a: Tensor, acts_b: Tensor, test_a: Tensor, test_b: Tensor, method: str = "bipartite",
               eps: float = 1e-8) -> float:
    """Held-out R^2 of predicting each B unit from its one matched A unit alone (convergent-learning).

    The one-to-one baseline of the sparse stitch: partners are matched (``method``) on the fitting
    samples' correlation C_BA, each B unit is regressed on its partner there (z_b = C_BA[j, i] z_a_i), and
    R^2 is averaged over B units on (test_a, test_b).
    """
    acts_a, acts_b = _acts("acts_a", acts_a), _acts("acts_b", acts_b)
    _pair_check("acts_a", acts_a, "acts_b", acts_b)
    test_a, test_b = _acts("test_a", test_a), _acts("test_b", test_b)
    _pair_check("test_a", test_a, "test_b", test_b)
    za, mean_a, std_a = standardize(acts_a, eps)
    zb, mean_b, std_b = standardize(acts_b, eps)
    c_ba = (zb.T @ za / za.shape[0]).clamp(-1.0, 1.0)
    match = match_units(c_ba, method)
    stitch = SparseStitch(acts_a.shape[1], acts_b.shape[1], l1=0.0, device=za.device, dtype=za.dtype)
    with torch.no_grad():
        stitch.weight[torch.arange(acts_b.shape[1], device=za.device), match.partner] = match.corr
        stitch.in_mean.copy_(mean_a), stitch.in_std.copy_(std_a)
        stitch.out_mean.copy_(mean_b), stitch.out_std.copy_(std_b)
        pred = stitch(test_a.to(za.dtype))
    return prediction_r2(pred, test_b.to(za.dtype), units=(zb != 0).any(0))


# ------------------------------------------------------------------------------------------ many-to-many
@dataclass(frozen=True)
class JointClusters:
    """Spectral clusters of the units of two nets: labels per unit, and how the clusters mix the nets.

    mixed_fraction: share of clusters (of size >= 2) holding units of both nets; within / between: mean
    affinity of unit pairs in the same / in different clusters (self-pairs excluded); cross_within: mean
    affinity of the (A unit, B unit) pairs that share a cluster. A mean over no pairs is NaN.
    """

    labels_a: Tensor
    labels_b: Tensor
    mixed_fraction: float
    within: float
    between: float
    cross_within: float


def joint_spectral_clusters(corr_aa: Tensor, corr_ab: Tensor, corr_bb: Tensor, n_clusters: int, *,
                            affinity: str = "abs", random_state: int = 0) -> JointClusters:
    """Many-to-many alignment: spectral clustering of the joint unit graph of nets A and B (convergent-learning).

    S = [[C_AA, C_AB], [C_BA, C_BB]] (2k x 2k); the affinity is |S| (``"abs"``) or (1 + S) / 2
    (``"shift"``), clustered by scikit-learn's SpectralClustering (``affinity="precomputed"``).

    >>> res = joint_spectral_clusters(unit_correlation(a), unit_correlation(a, b), unit_correlation(b), 8)
    >>> res.mixed_fraction, res.within, res.between, res.cross_within
    """
    for name, c in (("corr_aa", corr_aa), ("corr_ab", corr_ab), ("corr_bb", corr_bb)):
        tensor(name, c, floating=True, finite=True)
        if c.dim() != 2:
            raise ArgumentError(f"{name} must be a matrix, got shape {tuple(c.shape)}")
    k_a, k_b = corr_ab.shape
    if tuple(corr_aa.shape) != (k_a, k_a) or tuple(corr_bb.shape) != (k_b, k_b):
        raise ArgumentError(f"corr_aa must be ({k_a}, {k_a}) and corr_bb ({k_b}, {k_b}) to fit corr_ab {(k_a, k_b)}, "
                            f"got {tuple(corr_aa.shape)} and {tuple(corr_bb.shape)}")
    n_clusters = integer("n_clusters", n_clusters, low=2, high=k_a + k_b)
    choice("affinity", affinity, AFFINITIES)
    nonneg_int("random_state", random_state)
    s = torch.cat([torch.cat([corr_aa, corr_ab], 1), torch.cat([corr_ab.T, corr_bb], 1)]).detach().double().cpu()
    aff = s.abs() if affinity == "abs" else (1.0 + s) / 2.0
    aff = ((aff + aff.T) / 2.0).clamp(0.0, 1.0)
    from sklearn.cluster import SpectralClustering

    # a tiny floor keeps the graph connected when dead units have all-zero rows
    labels = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=random_state,
                                assign_labels="kmeans").fit_predict((aff + 1e-6).numpy())
    lab = torch.as_tensor(labels, dtype=torch.int64)
    la, lb = lab[:k_a], lab[k_a:]
    sizes = torch.bincount(lab, minlength=n_clusters)
    in_a = torch.bincount(la, minlength=n_clusters) > 0
    in_b = torch.bincount(lb, minlength=n_clusters) > 0
    big = sizes >= 2
    mixed = float((in_a & in_b & big).sum()) / max(int(big.sum()), 1)
    same = lab[:, None] == lab[None, :]
    off = ~torch.eye(k_a + k_b, dtype=torch.bool)
    cross = aff[:k_a, k_a:][same[:k_a, k_a:]]
    return JointClusters(la, lb, mixed, _mean_or_nan(aff[same & off]), _mean_or_nan(aff[~same]),
                         _mean_or_nan(cross))


def _mean_or_nan(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


__all__ = ["ActivationRecorder", "collect_activations", "units_view", "standardize", "dead_units",
           "unit_correlation", "UnitMatch", "match_units", "chance_correlation", "SparseStitch", "SparseFit",
           "fit_sparse_prediction", "partner_r2", "prediction_r2", "JointClusters", "joint_spectral_clusters"]
