"""Mutual information of hidden layers with the input and the label: the information plane (info-plane).

Shwartz-Ziv & Tishby (2017) summarise each hidden layer T of a network by two numbers, I(X;T) and
I(T;Y), and follow them over training. Two estimators:

- Binned (the paper's): each unit's value is mapped to one of ``n_bins`` equal-width bins on
  ``value_range`` (values outside are clipped into the end bins; ``"adaptive"``: the layer's own
  [min, max]), each row of bin indices is one discrete symbol t. With one row per input pattern, T is a
  function of X, so::

      I(X;T) = H(T) - H(T|X) = H(T)            I(T;Y) = H(T) - sum_y p(y) H(T | Y=y)     (bits)

  With repeated inputs (``x_ids``) H(T|X) is computed by grouping rows of the same input.
- Kernel (Saxe et al., ICLR 2018, after Kolchinsky & Tracey): add Gaussian noise of variance s2 to T and
  use the pairwise-distance upper bound on the entropy of the resulting Gaussian mixture; it does not
  depend on a bin count (it depends on s2 instead)::

      I(X;T) <= -1/n sum_i log2( 1/n sum_j exp(-||t_i - t_j||^2 / (2 s2)) )
      I(T;Y)  = that bound minus sum_y p(y) * (the same bound over the rows of class y)

Both are bounded by log2(n) (I(X;T)) and H(Y) (I(T;Y), binned; the kernel I(T;Y) is a difference of two
bounds and can dip slightly below 0). The deterministic network's true I(X;T) is infinite in the
continuous limit: both estimators measure a quantity their resolution (bins, noise) induces.

>>> ixt, ity = binned_mutual_information(torch.tanh(h), y, n_bins=30)
>>> rec = InformationPlaneRecorder(model, ["1", "3"], X, y, steps=log_spaced_steps(1000, 40))
>>> rec.record(0); fit(model, opt, batches, epochs=1000, on_epoch_end=rec.on_epoch_end)
>>> rec.history["ixt"]                      # (records, layers) in bits
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .._validate import ArgumentError, choice, integer, is_real, optional_generator, positive, positive_int, tensor
from ._hooks import HookProbe

__all__ = ["binned_mutual_information", "kde_mutual_information", "InformationPlaneRecorder", "log_spaced_steps"]

_LOG2E = 1.0 / math.log(2.0)
_MAX_CODE_BITS = 62  # rows of bin indices are packed into one int64 when they fit
_F32_SAFE = 100.0  # kernel exponents up to this size keep float32 rounding below ~1e-5


# ------------------------------------------------------------------------------------------ checks
def _activations(name: str, T: Any) -> torch.Tensor:
    T = tensor(name, T, floating=True, min_dim=1, finite=True).detach()
    T = T.reshape(len(T), -1) if T.dim() != 1 else T.reshape(-1, 1)
    if len(T) < 2:
        raise ArgumentError(f"{name} must have at least 2 rows (samples) for a mutual information estimate, "
                            f"got {len(T)}")
    return T


def _labels(name: str, y: Any, n: int) -> torch.Tensor:
    y = tensor(name, y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ArgumentError(f"{name} must be an integer tensor of discrete labels, got dtype {y.dtype}")
    y = y.reshape(-1) if y.dim() <= 1 else y
    if y.dim() != 1 or len(y) != n:
        raise ArgumentError(f"{name} must be a 1-D tensor with one entry per row ({n}), got shape "
                            f"{tuple(y.shape)}")
    return y


def _value_range(value_range: Any) -> tuple[float, float] | str:
    if isinstance(value_range, str):
        return choice("value_range", value_range, ("adaptive",))
    try:
        lo, hi = value_range
    except (TypeError, ValueError):
        raise ArgumentError(f"value_range must be a (low, high) pair or 'adaptive', got {value_range!r}") from None
    if not (is_real(lo) and is_real(hi) and lo < hi):
        raise ArgumentError(f"value_range must be finite numbers with low < high, got {value_range!r}")
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------ entropy
def _ids(x: torch.Tensor) -> torch.Tensor:
    """Dense ids 0..k-1 of the distinct values of a 1-D integer tensor."""
    return torch.unique(x, return_inverse=True)[1]


def _entropy_bits(ids: torch.Tensor) -> float:
    """Plug-in entropy (bits) of the empirical distribution of the integer ids."""
    counts = torch.unique(ids, return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def _joint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * (int(b.max()) + 1) + b


def _row_ids(idx: torch.Tensor, n_bins: int) -> torch.Tensor:
    """One id per row of bin indices (equal rows, equal ids)."""
    k = idx.shape[1]
    if k * math.log2(max(n_bins, 2)) <= _MAX_CODE_BITS:
        weights = n_bins ** torch.arange(k - 1, -1, -1, device=idx.device, dtype=torch.int64)
        return _ids((idx * weights).sum(1))
    return torch.unique(idx, dim=0, return_inverse=True)[1]


def _bin(T: torch.Tensor, n_bins: int, value_range: tuple[float, float] | str) -> torch.Tensor:
    if value_range == "adaptive":
        lo, hi = float(T.min()), float(T.max())
    else:
        lo, hi = value_range
    if not hi > lo:  # a constant layer: every value in one bin
        return torch.zeros(T.shape, dtype=torch.int64, device=T.device)
    scaled = (T.double() - lo) * (n_bins / (hi - lo))
    return scaled.floor().clamp_(0, n_bins - 1).to(torch.int64)


def binned_mutual_information(T: torch.Tensor, y: torch.Tensor, n_bins: int = 30,
                              value_range: tuple[float, float] | str = (-1.0, 1.0),
                              x_ids: torch.Tensor | None = None) -> tuple[float, float]:
    """``(I(X;T), I(T;Y))`` in bits from activations binned into ``n_bins`` equal-width bins (info-plane).

    T: ``(n, ...)`` activations, one row per sample (flattened to ``(n, k)``); y: ``(n,)`` integer labels;
    value_range: ``(low, high)`` of the bins (values outside go to the end bins) or ``"adaptive"`` (the
    min and max of ``T``); x_ids: ``(n,)`` integer id of each row's input when inputs repeat (default: every
    row a distinct input, so I(X;T) = H(T)). Equations in the module docstring; exact plug-in entropies
    of the empirical distributions, every row weighted 1/n.

    >>> T = torch.tensor([[-1.0], [1.0], [1.0], [-1.0]]); y = torch.tensor([0, 1, 1, 0])
    >>> binned_mutual_information(T, y)          # T copies the label: 1 bit each
    (1.0, 1.0)
    """
    T = _activations("T", T)
    n = len(T)
    y = _labels("y", y, n)
    n_bins = integer("n_bins", n_bins, low=2)
    vr = _value_range(value_range)
    x = torch.arange(n, device=T.device) if x_ids is None else _labels("x_ids", x_ids, n)
    t = _row_ids(_bin(T, n_bins, vr), n_bins)
    x, yid = _ids(x.to(T.device)), _ids(y.to(T.device))
    h_t = _entropy_bits(t)
    ixt = h_t + _entropy_bits(x) - _entropy_bits(_joint(t, x))
    ity = h_t + _entropy_bits(yid) - _entropy_bits(_joint(t, yid))
    return max(ixt, 0.0), max(ity, 0.0)  # exact identities; max() only removes -0.0 / -1e-16 rounding


# ------------------------------------------------------------------------------------------ kernel
def _pairwise_log_mean_kernel(T: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float,
                              block: int) -> torch.Tensor:
    """For each i in ``rows``: log( mean_{j in cols} exp(-||t_i - t_j||^2 * scale) ), in nats."""
    tc = T[cols]
    neg_sq_c = tc.square().sum(1).mul_(-scale)[None, :]
    out = []
    for s in range(0, len(rows), block):
        tr = T[rows[s:s + block]]
        # -scale ||a - b||^2 = -scale |b|^2 + 2 scale <a, b> - scale |a|^2; the last term leaves the logsumexp
        lse = torch.logsumexp(torch.addmm(neg_sq_c, tr, tc.T, alpha=2.0 * scale), dim=1)
        out.append(lse - scale * tr.square().sum(1) - math.log(len(cols)))
    return torch.cat(out)


def kde_mutual_information(T: torch.Tensor, y: torch.Tensor, noise_var: float = 0.1,
                           block: int = 1024) -> tuple[float, float]:
    """``(I(X;T), I(T;Y))`` in bits of T plus Gaussian noise, pairwise-distance (kernel) bound (info-plane).

    Saxe et al.'s estimator (after Kolchinsky & Tracey): the entropy of the mixture of Gaussians of
    variance ``noise_var`` centred on the rows of ``T`` is bounded above by pairwise distances, and
    H(T|X) is the noise's own entropy, so (module docstring)
    ``I(X;T) = -mean_i log2 mean_j exp(-||t_i - t_j||^2 / (2 noise_var))``. It uses no bins, only the
    noise scale. Assumes one row per input and T a deterministic function of it. ``block`` rows of the
    n x n distance matrix are formed at a time (memory ~ block * n values); cost O(n^2 k). Computed in
    T's dtype (float32 at least; float64 when the noise is small against the spread of T, where float32
    exponents would round by more than ~1e-5).

    >>> T = torch.tensor([[-1.0], [1.0], [1.0], [-1.0]]); y = torch.tensor([0, 1, 1, 0])
    >>> kde_mutual_information(T, y, noise_var=1e-3)   # two far-apart clusters: 1 bit each (to rounding)
    """
    T = _activations("T", T)
    y = _labels("y", y, len(T)).to(T.device)
    noise_var = positive("noise_var", noise_var)
    block = positive_int("block", block)
    scale = 1.0 / (2.0 * noise_var)
    T = T.to(torch.promote_types(T.dtype, torch.float32))
    T = T - T.mean(0)  # distances are translation-invariant; centring keeps |a|^2 + |b|^2 - 2ab accurate
    if T.dtype != torch.float64 and T.device.type != "mps" and scale * float(T.square().sum(1).max()) > _F32_SAFE:
        T = T.double()  # float32 rounding of the exponents would exceed ~1e-5 bit
    n = len(T)
    everyone = torch.arange(n, device=T.device)
    ixt = -float(_pairwise_log_mean_kernel(T, everyone, everyone, scale, block).mean()) * _LOG2E
    cond = 0.0
    for c in torch.unique(y):
        members = torch.nonzero(y == c).reshape(-1)
        h_c = -float(_pairwise_log_mean_kernel(T, members, members, scale, block).mean()) * _LOG2E
        cond += len(members) / n * h_c
    return max(ixt, 0.0), ixt - cond


# ------------------------------------------------------------------------------------------ schedule
def log_spaced_steps(last: int, count: int, first: int = 1) -> list[int]:
    """``count`` distinct integers from ``first`` to ``last``, spaced as evenly as possible on a log scale.

    Ends included; where log spacing would repeat an integer (near ``first``), consecutive integers are
    used instead. Record epoch 0 separately if wanted (the paper records at epoch 0 and log-spaced epochs).

    >>> log_spaced_steps(1000, 5)
    [1, 6, 32, 178, 1000]
    """
    first = positive_int("first", first)
    last = integer("last", last, low=first)
    count = integer("count", count, low=1, high=last - first + 1)
    if count == 1:
        return [last]
    raw = np.geomspace(first, last, count)
    out = [int(round(v)) for v in raw]
    out[0], out[-1] = first, last
    for i in range(1, count):  # strictly increasing from the left ...
        out[i] = max(out[i], out[i - 1] + 1)
    for i in range(count - 2, -1, -1):  # ... and never past the end from the right
        out[i] = min(out[i], out[i + 1] - 1)
    return out


# ------------------------------------------------------------------------------------------ recorder
def _module_by_name(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if not isinstance(name, str):
            raise ArgumentError(f"layers must be module names (str), got {type(name).__name__} {name!r}")
        if name not in modules:
            avail = [k for k in modules if k]
            shown = ", ".join(repr(k) for k in avail[:20]) + (", ..." if len(avail) > 20 else "")
            raise ArgumentError(f"layers: the model has no module named {name!r}; its modules are {shown}")
        out.append(modules[name])
    return out


class InformationPlaneRecorder(HookProbe):
    """Records each named layer's (I(X;T), I(T;Y)) over training: the information plane (info-plane).

    :meth:`record` installs forward hooks on the named modules of ``model``, runs the model on ``X``
    (eval mode and no_grad, the training mode restored), and removes the hooks again, exceptions
    included: between records the model carries no hook, so training steps pay nothing. (Used as a
    context manager, the hooks stay installed for the block and are removed on exit; they capture
    nothing outside :meth:`record`.)

    layers: module names as in ``model.named_modules()``; X, y: the inputs (all of them: the paper
    enumerates every pattern) and integer labels; n_bins / value_range / x_ids: as in
    :func:`binned_mutual_information` (``value_range="adaptive"``: each layer's own [min, max] at each
    record, for unbounded units such as ReLU); transforms: ``{layer: f}`` applied to that layer's output
    before binning (e.g. ``softmax`` of logits); kde_noise_var: also record the kernel estimate
    (:func:`kde_mutual_information`) as ``ixt_kde`` / ``ity_kde``; kde_samples: compute it on this many
    rows drawn once with ``generator`` (its cost grows as n^2); steps: the epochs at which
    :meth:`on_epoch_end` records (epoch counted from 1; None: every epoch); batch_size: rows per
    forward of X (None: all at once). A layer that runs more than once in one forward, or produces
    non-finite values, raises.

    >>> rec = InformationPlaneRecorder(model, ["1", "3"], X, y)
    >>> rec.record(0); rec.history["ixt"].shape      # (1, 2)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], X: torch.Tensor, y: torch.Tensor, *,
                 n_bins: int = 30, value_range: tuple[float, float] | str = (-1.0, 1.0),
                 x_ids: torch.Tensor | None = None, transforms: Mapping[str, Callable] | None = None,
                 kde_noise_var: float | None = None, kde_samples: int | None = None,
                 generator: torch.Generator | None = None, steps: Iterable[int] | None = None,
                 batch_size: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str):
            layers = [layers]
        self.layer_names = list(layers)
        if not self.layer_names:
            raise ArgumentError("layers must name at least one module, got an empty list")
        if len(set(self.layer_names)) != len(self.layer_names):
            raise ArgumentError(f"layers must be distinct, got {self.layer_names}")
        self.model = model
        self.layers = _module_by_name(model, self.layer_names)
        X = tensor("X", X, min_dim=1)
        if len(X) < 2:
            raise ArgumentError(f"X must have at least 2 rows (samples) for a mutual information estimate, "
                                f"got {len(X)}")
        self.X = X
        self.y = _labels("y", y, len(X))
        self.x_ids = None if x_ids is None else _labels("x_ids", x_ids, len(X))
        self.n_bins = integer("n_bins", n_bins, low=2)
        self.value_range = _value_range(value_range)
        self.transforms = dict(transforms or {})
        unknown = sorted(set(self.transforms) - set(self.layer_names))
        if unknown:
            raise ArgumentError(f"transforms names layers that are not recorded: {unknown} (layers: "
                                f"{self.layer_names})")
        for k, f in self.transforms.items():
            if not callable(f):
                raise ArgumentError(f"transforms[{k!r}] must be callable, got {type(f).__name__}")
        self.kde_noise_var = None if kde_noise_var is None else positive("kde_noise_var", kde_noise_var)
        self._kde_rows = None
        if kde_samples is not None:
            kde_samples = integer("kde_samples", kde_samples, low=2)
            if self.kde_noise_var is None:
                raise ArgumentError("kde_samples needs kde_noise_var (the kernel estimate is off without it)")
            if kde_samples < len(X):
                g = optional_generator(generator) or torch.Generator().manual_seed(0)
                self._kde_rows = torch.randperm(len(X), generator=g)[:kde_samples].sort().values
        self.steps = None if steps is None else {integer("steps[i]", s, low=0) for s in steps}
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        self._capture: list[list[torch.Tensor]] | None = None
        self._records: list[dict[str, Any]] = []
        self._handles: list = []
        self.seconds = 0.0  # wall time spent in record() so far

    # ---- hooks ---------------------------------------------------------------------------------
    def _hook(self, i: int):
        def hook(module, inputs, output):
            if self._capture is None:
                return
            h = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"layer {self.layer_names[i]!r} returned {type(h).__name__}, not a tensor")
            self._capture[i].append(h.detach())
        return hook

    def _hooks(self):
        return [(m, self._hook(i)) for i, m in enumerate(self.layers)]

    @torch.no_grad()
    def _activations(self) -> list[torch.Tensor]:
        n = len(self.X)
        bs = n if self.batch_size is None else self.batch_size
        chunks: list[list[torch.Tensor]] = [[] for _ in self.layers]
        was = self.model.training
        self.model.eval()
        try:
            for s in range(0, n, bs):
                self._capture = [[] for _ in self.layers]
                self.model(self.X[s:s + bs])
                for i, got in enumerate(self._capture):
                    if len(got) != 1:
                        what = "did not run" if not got else f"ran {len(got)} times"
                        raise RuntimeError(f"layer {self.layer_names[i]!r} {what} in one forward of X; the "
                                           "information plane needs exactly one output per layer and input")
                    chunks[i].append(got[0])
        finally:
            self._capture = None
            self.model.train(was)
        out = []
        for name, parts in zip(self.layer_names, chunks):
            h = torch.cat(parts) if len(parts) > 1 else parts[0]
            if name in self.transforms:
                h = self.transforms[name](h)
            out.append(h)
        return out

    # ---- recording -----------------------------------------------------------------------------
    def record(self, step: int) -> dict[str, list[float]]:
        """Run the model on X and store one (I(X;T), I(T;Y)) point per layer, labelled ``step``.

        Returns this record: ``{"ixt": [...], "ity": [...]}`` (plus ``ixt_kde``/``ity_kde``), one value
        per layer in bits.
        """
        step = integer("step", step, low=0)
        t0 = time.perf_counter()
        try:
            return self._record(step)
        finally:
            self.seconds += time.perf_counter() - t0

    def _record(self, step: int) -> dict[str, list[float]]:
        if self._handles:
            acts = self._activations()
        else:
            with self:
                acts = self._activations()
        rec: dict[str, Any] = {"step": step, "ixt": [], "ity": []}
        if self.kde_noise_var is not None:
            rec["ixt_kde"], rec["ity_kde"] = [], []
        for name, h in zip(self.layer_names, acts):
            h = h.reshape(len(h), -1)
            if not bool(torch.isfinite(h).all()):
                bad = int((~torch.isfinite(h)).sum())
                raise ValueError(f"layer {name!r} produced {bad} non-finite activation(s) at step {step}; "
                                 "mutual information is undefined")
            ixt, ity = binned_mutual_information(h, self.y, self.n_bins, self.value_range, self.x_ids)
            rec["ixt"].append(ixt)
            rec["ity"].append(ity)
            if self.kde_noise_var is not None:
                rows = self._kde_rows
                hk, yk = (h, self.y) if rows is None else (h[rows.to(h.device)], self.y[rows.to(self.y.device)])
                a, b = kde_mutual_information(hk, yk, self.kde_noise_var)
                rec["ixt_kde"].append(a)
                rec["ity_kde"].append(b)
        self._records.append(rec)
        return {k: list(v) for k, v in rec.items() if k != "step"}

    def on_epoch_end(self, epoch: int, history: Any = None) -> None:
        """``gradkit.engine.fit``'s ``on_epoch_end``: records after epoch ``epoch + 1`` when it is in ``steps``."""
        done = epoch + 1
        if self.steps is None or done in self.steps:
            self.record(done)

    @property
    def history(self) -> dict[str, np.ndarray]:
        """``{"step": (R,), "ixt": (R, L), "ity": (R, L)}`` (+ ``ixt_kde``, ``ity_kde``) in bits."""
        keys = ["ixt", "ity"] + (["ixt_kde", "ity_kde"] if self.kde_noise_var is not None else [])
        L = len(self.layer_names)
        out = {"step": np.asarray([r["step"] for r in self._records], dtype=np.int64)}
        for k in keys:
            out[k] = np.asarray([r[k] for r in self._records], dtype=np.float64).reshape(len(self._records), L)
        return out

    def reset(self) -> None:
        """Forget every record."""
        self._records = []
