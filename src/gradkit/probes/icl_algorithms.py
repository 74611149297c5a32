"""Which algorithm does a sequence model run in context? Layer read-outs matched to solver iterates (icl-newton).

Fu, Chen, Jia, Sharan, "Transformers Learn Higher-Order Optimization Methods for In-Context Learning"
(arXiv 2310.17086). A linear read-out r_l on each layer's hidden state predicts y_i from the prompt's first
i - 1 examples; the layer's errors are compared with those of k iterations of a reference algorithm A
(Newton-Schulz, gradient descent: :mod:`gradkit.solvers.lstsq_iterates`) run on the same prefixes:

    e_l[b]  = (yhat_l[b, i] - y[b, i])_i              residuals of prompt b across positions i
    SimE(l, A_k) = mean_b cos(e_l[b], e_{A_k}[b])      similarity of errors
    k*(l) = argmax_k SimE(l, A_k)                      the best-matching number of iterations

The paper finds k*(l) growing about linearly with depth for Newton and exponentially for GD.

>>> readout = LayerReadout(model, ["blocks.0", "blocks.1"]).fit(tokens_fit, ys_fit)
>>> layer_preds = readout.predict(tokens_eval)                                   # (layers, b, n)
>>> newton = icl_predictions(lambda X, y: newton_iterates(X, y, 12, form="gram"), xs_eval, ys_eval)
>>> match = match_algorithm(layer_preds, newton, ys_eval)                       # match.best_k per layer
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._validate import ArgumentError, integer, positive_int, real_in, real_scalar, tensor
from ._hooks import HookProbe, resolve_layers

Algorithm = Callable[[Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------ algorithms
def icl_predictions(algo: Algorithm, xs: Tensor, ys: Tensor, *, batch_size: int | None = None) -> Tensor:
    """Causal in-context predictions of a least-squares algorithm: position i uses examples 0..i-1 only.

    ``algo(X, y) -> w`` takes batched problems ``X (..., m, d)``, ``y (..., m)`` and returns ``(..., d)``, or
    ``(..., K, d)`` for K iterates (e.g. :func:`~gradkit.solvers.lstsq_iterates.newton_iterates`). The prefix
    of length i is passed as the full-length prompt with rows i.. set to zero (zero rows change neither
    X^T X nor X^T y). Returns ``(b, n)``, or ``(K, b, n)`` for iterates; position 0 (no context) is 0.
    ``batch_size``: prompts per call of ``algo`` (None: all at once; memory grows as b n^2 d).

    >>> xs, ys = torch.randn(2, 6, 3), torch.randn(2, 6)
    >>> icl_predictions(lambda X, y: torch.zeros(X.shape[:-2] + (3,)), xs, ys).shape
    torch.Size([2, 6])
    """
    if not callable(algo):
        raise ArgumentError(f"algo must be a callable (X, y) -> w, got {type(algo).__name__}")
    xs = tensor("xs", xs, floating=True, finite=True, min_dim=3)
    ys = tensor("ys", ys, floating=True, finite=True, min_dim=2)
    if xs.dim() != 3 or ys.shape != xs.shape[:-1]:
        raise ArgumentError(f"xs must be (b, n, d) and ys (b, n), got shapes {tuple(xs.shape)} and {tuple(ys.shape)}")
    b, n, d = xs.shape
    step = b if batch_size is None else positive_int("batch_size", batch_size)
    keep = torch.ones(n, n, dtype=torch.bool, device=xs.device).tril(-1)   # keep[i, j]: example j is in prefix i
    outs = []
    for s in range(0, b, step):
        x, y = xs[s:s + step], ys[s:s + step]
        X = x[:, None] * keep[None, :, :, None]                              # (b, n, n, d)
        Y = y[:, None] * keep[None]
        w = algo(X, Y)
        if not isinstance(w, Tensor) or w.dim() not in (3, 4) or w.shape[:2] != X.shape[:2] or w.shape[-1] != d:
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ArgumentError(f"algo must return (..., d) or (..., K, d) for X of shape {tuple(X.shape)}, got {got}")
        if w.dim() == 3:
            p = (w * x).sum(-1)
        else:
            p = (w * x[:, :, None]).sum(-1).permute(2, 0, 1)                  # (K, b, n)
        p = p.clone()
        p[..., 0] = 0
        outs.append(p)
    return torch.cat(outs, dim=-2)


# ------------------------------------------------------------------------------------------ similarity
def _positions(positions: Any, n: int, device: torch.device) -> Tensor:
    """A boolean mask over the n positions (default: every position but the first)."""
    if positions is None:
        mask = torch.ones(n, dtype=torch.bool)
        mask[0] = False
    elif isinstance(positions, slice):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[positions] = True
    else:
        idx = torch.as_tensor(positions)
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise ArgumentError(f"positions as a mask must have shape ({n},), got {tuple(idx.shape)}")
            mask = idx.cpu()
        elif idx.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8) and idx.dim() == 1:
            if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise ArgumentError(f"positions must index the {n} positions, got {idx.tolist()}")
            mask = torch.zeros(n, dtype=torch.bool)
            mask[idx.cpu()] = True
        else:
            raise ArgumentError(f"positions must be None, a slice, a 1-d list of ints or a bool mask, "
                                f"got {positions!r}")
    if not bool(mask.any()):
        raise ArgumentError(f"positions selects none of the {n} positions: {positions!r}")
    return mask.to(device)


def _stack_preds(name: str, preds: Any, shape: torch.Size | None = None) -> Tensor:
    if isinstance(preds, Tensor):
        t = preds if preds.dim() == 3 else preds[None] if preds.dim() == 2 else None
    else:
        try:
            items = list(preds)
        except TypeError:
            raise ArgumentError(f"{name} must be a tensor or a sequence of (b, n) tensors, got "
                                f"{type(preds).__name__}") from None
        if not items or not all(isinstance(p, Tensor) and p.dim() == 2 for p in items):
            raise ArgumentError(f"{name} must hold at least one (b, n) tensor")
        if len({tuple(p.shape) for p in items}) != 1:
            raise ArgumentError(f"{name} must hold tensors of one shape, got {[tuple(p.shape) for p in items]}")
        t = torch.stack(items)
    if t is None or not t.is_floating_point():
        raise ArgumentError(f"{name} must be a floating (b, n) or (K, b, n) tensor, got "
                            f"{tuple(preds.shape)} of dtype {preds.dtype}")
    if shape is not None and t.shape[1:] != shape:
        raise ArgumentError(f"{name} must have (b, n) = {tuple(shape)} like ys, got {tuple(t.shape[1:])}")
    return t


def error_similarity(preds_a: Tensor, preds_b: Tensor, ys: Tensor, *, positions: Any = None,
                     eps: float = 1e-12) -> Tensor:
    """SimE matrix: ``S[i, j] = mean_b cos(a_i[b] - y[b], b_j[b] - y[b])`` over the chosen positions (icl-newton).

    preds_a: ``(A, b, n)`` or ``(b, n)``; preds_b: ``(B, b, n)`` or ``(b, n)``; ys: ``(b, n)``. positions: None
    (every position but the first, which has no context: every method predicts 0 there), a slice, a list of
    ints or a boolean mask of length n. ``eps`` guards zero residuals (their cosine is 0). Returns
    ``(A, B)`` in float64.

    >>> ys = torch.randn(5, 8); p = ys + torch.randn(5, 8)
    >>> float(error_similarity(p, p, ys))
    1.0
    """
    ys = tensor("ys", ys, floating=True, finite=True, min_dim=2)
    if ys.dim() != 2:
        raise ArgumentError(f"ys must be (b, n), got shape {tuple(ys.shape)}")
    a = _stack_preds("preds_a", preds_a, ys.shape)
    bb = _stack_preds("preds_b", preds_b, ys.shape)
    for name, t in (("preds_a", a), ("preds_b", bb)):
        if not bool(torch.isfinite(t).all()):
            raise ArgumentError(f"{name} must be finite, got {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    eps = real_in("eps", eps, 0.0, low_open=True)
    mask = _positions(positions, ys.shape[1], ys.device)
    y = ys.double()[:, mask]
    ea = a.double()[..., mask] - y
    eb = bb.double().to(ea.device)[..., mask] - y
    ea = ea / ea.norm(dim=-1, keepdim=True).clamp_min(eps)
    eb = eb / eb.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.einsum("abp,kbp->ak", ea, eb) / ys.shape[0]


@dataclass(frozen=True)
class AlgorithmMatch:
    """Layer-to-algorithm matching: ``best_k[l]`` iterations fit layer l best, with SimE ``best_sim[l]``.

    sim: the ``(layers, len(ks))`` SimE matrix (the paper's heatmap); ks: the iteration counts of its columns.
    """

    best_k: tuple[int, ...]
    best_sim: tuple[float, ...]
    sim: Tensor
    ks: tuple[int, ...]


def best_index(sims: Tensor, tol: float = 0.0) -> Tensor:
    """Per row, the first column whose value is within ``tol`` of the row's maximum (argmax with a tie margin)."""
    sims = tensor("sims", sims, floating=True, min_dim=1)
    tol = real_scalar("tol", tol, nonneg=True)
    ok = sims >= sims.amax(-1, keepdim=True) - tol
    return ok.to(torch.int64).argmax(-1)


def match_algorithm(layer_preds: Tensor | Sequence[Tensor], algo_preds: Tensor | Mapping[int, Tensor], ys: Tensor,
                    *, ks: Sequence[int] | None = None, positions: Any = None, tol: float = 0.0) -> AlgorithmMatch:
    """Match each layer to the algorithm iterate whose errors it shares (SimE, then argmax over k) (icl-newton).

    layer_preds: ``(L, b, n)`` (e.g. :meth:`LayerReadout.predict`) or a list of ``(b, n)``; algo_preds:
    ``(K, b, n)`` iterates (from :func:`icl_predictions`) with their iteration counts ``ks`` (default
    1..K), or a dict ``{k: (b, n)}``. ``tol``: the smallest k whose SimE is within ``tol`` of the best wins
    (0: plain argmax, ties to the smaller k); converged iterates are equal up to round-off, so a small
    ``tol`` keeps round-off from picking among them. ``positions``: as in :func:`error_similarity`.

    >>> m = match_algorithm(torch.stack([newton[1], newton[3]]), newton, ys)    # layers = iterates k = 2, 4
    >>> m.best_k
    (2, 4)
    """
    if isinstance(algo_preds, Mapping):
        if ks is not None:
            raise ArgumentError("ks must be None when algo_preds is a dict (its keys are the iteration counts)")
        ks = list(algo_preds)
        algo_preds = [algo_preds[k] for k in ks]
    A = _stack_preds("algo_preds", algo_preds)
    ks = list(range(1, A.shape[0] + 1)) if ks is None else [integer(f"ks[{i}]", k) for i, k in enumerate(ks)]
    if len(ks) != A.shape[0]:
        raise ArgumentError(f"ks must give one iteration count per iterate ({A.shape[0]}), got {len(ks)}")
    sim = error_similarity(layer_preds, A, ys, positions=positions)
    idx = best_index(sim, tol)
    best = sim.gather(1, idx[:, None])[:, 0]
    return AlgorithmMatch(tuple(ks[int(i)] for i in idx), tuple(float(v) for v in best), sim, tuple(ks))


# ------------------------------------------------------------------------------------------ read-outs
def _first_tensor(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) and output else output


class LayerReadout(HookProbe):
    """Linear read-outs of chosen layers' hidden states, fitted in closed form by ridge regression (icl-newton).

    Forward hooks on the named modules (``model.named_modules()`` names, or the modules) record each one's
    output (the first element of a tuple output) while the probe is active: ``with readout: model(x)``, or
    through :meth:`fit` / :meth:`predict`, which run ``model(*inputs)`` once in eval mode under ``no_grad``
    with the hooks on and always remove them. Each layer gets its own affine map r_l(h) = h W_l + c_l with

        (Hc^T Hc / N + ridge I) W_l = Hc^T Tc / N     (Hc, Tc: centred hidden states and targets, N rows)

    fitted on the rows selected by ``mask`` (e.g. every position but the first). Targets have the hidden
    state's leading shape (``(b, n)``) or one more trailing dim of outputs. A layer must run exactly once per
    forward; non-finite activations or fewer than two rows raise.

    >>> readout = LayerReadout(model, ["blocks.0", "blocks.1"], ridge=1e-3)
    >>> readout.fit(tokens, ys)                 # model(tokens) with hooks; one ridge fit per layer
    >>> readout.predict(tokens_new).shape       # (2, b, n)
    """

    def __init__(self, model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module],
                 ridge: float = 1e-3) -> None:
        self.modules: dict[str, nn.Module] = resolve_layers(model, layers)
        self.model = model
        self.ridge = real_scalar("ridge", ridge, nonneg=True)
        self.records: dict[str, list[Tensor]] = {k: [] for k in self.modules}
        self.weights: dict[str, tuple[Tensor, Tensor]] = {}
        self._squeeze: dict[str, bool] = {}
        self._handles: list = []

    @property
    def layers(self) -> list[str]:
        """The probed layers' names, in order."""
        return list(self.modules)

    def _hook(self, key: str):
        def hook(module, inputs, output):
            h = _first_tensor(output)
            if not isinstance(h, Tensor):
                raise TypeError(f"layer {key!r} returned {type(output).__name__}; LayerReadout needs a tensor "
                                "(or a tuple whose first element is one)")
            self.records[key].append(h.detach())
        return hook

    def _hooks(self):
        return [(m, self._hook(k)) for k, m in self.modules.items()]

    def reset(self) -> None:
        """Forget the recorded hidden states (the fitted read-outs stay)."""
        self.records = {k: [] for k in self.modules}

    def hidden_states(self, inputs: Any) -> dict[str, Tensor]:
        """Each layer's output for one forward ``model(*inputs)`` (a tensor is one input), in eval mode."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        self.reset()
        was = self.model.training
        self.model.eval()
        try:
            with self, torch.no_grad():
                self.model(*args)
        finally:
            self.model.train(was)
        states = {}
        for key, recs in self.records.items():
            if len(recs) != 1:
                raise RuntimeError(f"layer {key!r} ran {len(recs)} times in one forward; LayerReadout reads one "
                                   "output per layer, so name a module that runs exactly once")
            states[key] = recs[0]
        self.reset()
        return states

    def _check_states(self, states: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.modules if k not in states]
        if missing:
            raise ArgumentError(f"states lacks the layers {missing} (has {sorted(states)})")
        for key in self.modules:
            h = states[key]
            if not isinstance(h, Tensor) or h.dim() < 2 or not h.is_floating_point():
                raise ArgumentError(f"layer {key!r}: hidden state must be a floating tensor with a trailing feature "
                                    f"dim, got {tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
            if not bool(torch.isfinite(h).all()):
                bad = int((~torch.isfinite(h)).sum())
                raise ValueError(f"layer {key!r} produced {bad} non-finite activation(s) (NaN/inf) in a hidden state "
                                 f"of shape {tuple(h.shape)}; a read-out cannot be fitted")

    def fit(self, inputs: Any, targets: Tensor, mask: Tensor | None = None) -> "LayerReadout":
        """Run ``model(*inputs)`` with the hooks and fit every layer's read-out to ``targets`` (see the class)."""
        return self.fit_states(self.hidden_states(inputs), targets, mask)

    def fit_states(self, states: Mapping[str, Tensor], targets: Tensor, mask: Tensor | None = None) -> "LayerReadout":
        """Fit the read-outs on recorded hidden states ``{layer: (..., h)}`` (e.g. from :meth:`hidden_states`)."""
        self._check_states(states)
        targets = tensor("targets", targets, floating=True, finite=True)
        for key in self.modules:
            h = states[key]
            lead = h.shape[:-1]
            if targets.shape != lead and targets.shape[:-1] != lead:
                raise ArgumentError(f"targets must have shape {tuple(lead)} (or with a trailing output dim) like layer "
                                    f"{key!r}'s hidden state {tuple(h.shape)}, got {tuple(targets.shape)}")
            t = targets.reshape(lead.numel(), -1)
            rows = h.reshape(lead.numel(), h.shape[-1])
            if mask is not None:
                m = tensor("mask", mask)
                if m.dtype != torch.bool or m.shape != lead:
                    raise ArgumentError(f"mask must be a bool tensor of shape {tuple(lead)}, got {m.dtype} "
                                        f"{tuple(m.shape)}")
                sel = m.reshape(-1).to(rows.device)
                rows, t = rows[sel], t[sel.to(t.device)]
            if rows.shape[0] < 2:
                raise ValueError(f"layer {key!r}: {rows.shape[0]} row(s) to fit a read-out; need at least 2 "
                                 "(a larger batch, or a mask that selects more positions)")
            self.weights[key] = _ridge(rows.double(), t.double().to(rows.device), self.ridge)
            self._squeeze[key] = targets.shape == lead
        return self

    def predict(self, inputs: Any) -> Tensor:
        """Every layer's read-out prediction for ``model(*inputs)``: ``(layers, *targets' shape)``, float64."""
        return self.predict_states(self.hidden_states(inputs))

    def predict_states(self, states: Mapping[str, Tensor]) -> Tensor:
        """Read-out predictions from recorded hidden states (see :meth:`predict`)."""
        if set(self.weights) != set(self.modules):
            raise RuntimeError("LayerReadout is not fitted: call fit(inputs, targets) first")
        self._check_states(states)
        outs = []
        for key in self.modules:
            h = states[key]
            W, c = self.weights[key]
            p = h.double().reshape(-1, h.shape[-1]) @ W.to(h.device) + c.to(h.device)
            out = p.reshape(h.shape[:-1] + (W.shape[1],))
            outs.append(out[..., 0] if self._squeeze[key] else out)
        return torch.stack(outs)


def _ridge(H: Tensor, T: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Affine ridge fit: W (h, o), c (o,) minimising mean ||H W + c - T||^2 + ridge ||W||^2."""
    hm, tm = H.mean(0), T.mean(0)
    Hc, Tc = H - hm, T - tm
    n = H.shape[0]
    if ridge > 0:
        A = Hc.T @ Hc / n + ridge * torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
        W = torch.linalg.solve(A, Hc.T @ Tc / n)
    else:
        W = torch.linalg.pinv(Hc) @ Tc
    return W, tm - hm @ W
