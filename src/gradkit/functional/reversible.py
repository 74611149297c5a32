"""The reversible-chain autograd Function: a backward that rebuilds inputs from outputs instead of storing them.

Shared core of the reversible papers (slugs ``revcol`` and ``rev-mbconv``). A *reversible step*
updates an ordered list of L states ``c_0..c_{L-1}`` given an optional external input ``x``::

    c_k_new = f_k(lower, upper) + alpha_k * c_k_old      k = 0, 1, ..., L-1 (in this order)
    lower   = c_{k-1}_new   (x for k = 0)               upper = c_{k+1}_old (None for k = L-1)

and is inverted top level first: ``c_k_old = (c_k_new - f_k(lower, upper)) / alpha_k``. RevNet's
additive coupling ``y1 = x1 + F(x2), y2 = x2 + G(y1)`` is the case L = 2, alpha = 1, no ``x``;
a RevCol column is L = 4 with learnable per-channel alphas. :class:`MultiLevelReversibleFunction`
runs a chain of steps under ``no_grad`` and saves only ``x`` and the last step's outputs; its
backward walks the chain backwards, recomputing each ``f_k`` once with grad enabled: the
recomputed value both inverts the step and gives the vector-Jacobian products. Dropout masks are
reproduced by replaying the RNG state captured before each ``f_k``; BatchNorm running statistics
are restored after each recomputation, so they are updated exactly once per forward.

Level functions must be ``nn.Module`` s called as ``f(lower, upper)`` whose parameters are
reachable through ``.parameters()``; they must not modify their inputs in place (checked: an
in-place change raises instead of silently corrupting the reconstruction). Tensors that require
grad but are neither inputs nor parameters of the level functions (closures) get no gradient.
Backward is once-differentiable (no double backward); autocast state is not replayed.

Round-off in the inverse grows along the chain (by about 1/|alpha| per step, more where a level
re-reads reconstructed states), so a long chain in float32 can rebuild activations that are wrong.
Pass a :class:`DriftMonitor`: backward then measures the reconstruction's relative drift where it
is largest, at the chain's start (a first step is recomputed from the saved ``x`` anyway, so there
the check is free; otherwise up to 256 evenly spaced entries of each input state are kept as a
probe). Above ``tol`` it warns, and for a chain that begins with a first step it recomputes the
gradients exactly from ``x`` with stored activations, so a wrong gradient is never returned
silently. Modules owning a monitor switch to storing activations once it has tripped.

The modules built on it (:class:`~gradkit.nn.reversible.ReversibleBlock`,
:class:`~gradkit.nn.reversible.ReversibleSequential`, the RevCol columns) are in :mod:`gradkit.nn`.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import _native

__all__ = ["ReversibleStep", "MultiLevelReversibleFunction", "run_steps", "invert_steps", "collect_params",
           "chain_tensors", "bn_state_guard", "DriftMonitor"]

PROBE_SIZE = 256  # entries kept per input state to measure drift when the inputs are not saved


@dataclass
class ReversibleStep:
    """One reversible update: level functions ``fns[k](lower, upper)`` and per-level ``alphas``.

    ``alphas=None`` marks a *first* step that has no previous states (RevCol's first column): it
    computes ``c_k = f_k(lower, upper=None)`` and is not inverted (its inputs are the external ``x``).
    An alpha is a float or a tensor broadcastable to its state (e.g. shape ``(1, C, 1, 1)``).
    """

    fns: Sequence[nn.Module]
    alphas: Sequence[Tensor | float] | None

    @property
    def first(self) -> bool:
        return self.alphas is None


class DriftMonitor:
    """Relative drift of a reversible chain's reconstruction, measured by its backward (``revcol``).

    drift = max over states of max|rebuilt - exact| / max|exact| at the chain's start. ``tol`` is the
    largest drift accepted; above it the chain warns (once per monitor) and, where it can, recomputes
    its gradients exactly. ``last``/``worst`` hold the drifts seen, ``checks``/``trips`` their counts.

    >>> mon = DriftMonitor(tol=1e-3)
    >>> outs = MultiLevelReversibleFunction.run(steps, x, states, monitor=mon)
    >>> sum(o.sum() for o in outs).backward(); mon.last          # doctest: +SKIP
    """

    def __init__(self, tol: float = 1e-3) -> None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < float("inf"):
            raise ValueError(f"tol must be a positive finite number, got {tol!r}")
        self.tol = float(tol)
        self.reset()

    def reset(self) -> None:
        """Forget every measurement (a tripped module goes back to reconstructing)."""
        self.last: float | None = None
        self.worst = 0.0
        self.checks = 0
        self.trips = 0

    @property
    def tripped(self) -> bool:
        return self.trips > 0

    def record(self, drift: float) -> bool:
        """Store one measurement; True when it exceeds ``tol`` (non-finite drift counts as exceeding)."""
        self.last = drift
        self.checks += 1
        bad = not drift <= self.tol
        self.worst = drift if bad and drift != drift else max(self.worst, drift)
        self.trips += bad
        return bad

    def __repr__(self) -> str:
        return f"DriftMonitor(tol={self.tol}, last={self.last}, worst={self.worst}, trips={self.trips})"


def _rel_drift(got: Tensor, ref: Tensor) -> float:
    """max|got - ref| / max|ref| (NaN when either holds NaN); the denominator floored at the dtype's tiny."""
    inf = float("inf")
    num = float(torch.linalg.vector_norm(got - ref, ord=inf))
    den = float(torch.linalg.vector_norm(ref, ord=inf))
    return num / max(den, torch.finfo(ref.dtype).tiny) if den == den else float("nan")


def _worst(a: float, b: float) -> float:
    """The larger drift, NaN if either is NaN (a NaN drift must trip the monitor, not vanish in ``max``)."""
    return a + b if a != a or b != b else max(a, b)


def _probes_drift(probes: Sequence[tuple[Tensor, Tensor]], states: Sequence[Tensor]) -> float:
    """The largest :func:`_rel_drift` of the probed entries of ``states`` against ``probes`` (see
    :func:`_probe`). Probes of equal length are measured together: a few small ops and one host read
    instead of six per state; float32 on the CPU, one native call per state (:mod:`gradkit._native`)."""
    lib = _native.native()
    if lib is not None and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                               for t in states):  # idx and ref: contiguous, on t's device (_probe)
        worst = 0.0
        for (idx, ref), t in zip(probes, states):
            worst = _worst(worst, lib.gk_probe_drift(t.data_ptr(), idx.data_ptr(), ref.data_ptr(), ref.numel()))
        return worst
    if len({ref.numel() for _, ref in probes}) != 1:
        worst = 0.0
        for (idx, ref), got in zip(probes, states):
            worst = _worst(worst, _rel_drift(torch.take(got, idx), ref))
        return worst
    ref = torch.stack([r for _, r in probes])
    got = torch.stack([torch.take(t, idx) for (idx, _), t in zip(probes, states)])
    inf = float("inf")
    nums, dens = torch.stack([torch.linalg.vector_norm(got - ref, ord=inf, dim=1),
                              torch.linalg.vector_norm(ref, ord=inf, dim=1)]).tolist()
    tiny = torch.finfo(ref.dtype).tiny
    worst = 0.0
    for num, den in zip(nums, dens):
        worst = _worst(worst, num / max(den, tiny) if den == den else float("nan"))
    return worst


@functools.lru_cache(maxsize=64)
def _probe_index(numel: int, device: torch.device) -> Tensor:
    return torch.linspace(0, numel - 1, min(PROBE_SIZE, numel), device=device).long()


def _probe(t: Tensor) -> tuple[Tensor, Tensor]:
    """Flat (row-major) indices of up to PROBE_SIZE evenly spaced entries of ``t`` and a copy of them;
    ``torch.take`` reads them without copying ``t`` when it is a strided view (a coupling's half)."""
    idx = _probe_index(t.numel(), t.device)
    return idx, torch.take(t, idx)  # called where grad mode is off (the Function's forward): no graph


# ------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def bn_state_guard(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Restore every buffer of ``modules`` that the enclosed code changed in place (running statistics).

    Used around the recomputation in backward so that state updated by a forward pass (BatchNorm's
    running mean/variance and batch counter, EvoNorm-B0's running variance, Mesa's EMA ranges, any
    module's running buffers) is updated once per forward, not again by the recomputation. Every buffer is
    copied back: native kernels (BatchNorm's) update running statistics without bumping the tensor's
    version counter, so a version check would miss them.
    """
    with _restore_buffers(_buffers_of(modules)):
        yield


def _walk(mod: nn.Module) -> list[nn.Module]:
    """``list(mod.modules())`` (depth first, each module once) without building the names: a forward
    gathers its level functions' parameters on every call, and small levels make that traversal count."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [mod]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        subs = [c for c in m._modules.values() if c is not None]
        subs.reverse()
        stack.extend(subs)
    return out


def _params_and_buffers(modules: Sequence[nn.Module]) -> tuple[list[list[Tensor]], list[Tensor]]:
    """``[list(m.parameters()) for m in modules]`` and :func:`_buffers_of` ``(modules)`` in one traversal."""
    params: list[list[Tensor]] = []
    bufs: list[Tensor] = []
    seen_b: set[int] = set()
    for mod in modules:
        own: list[Tensor] = []
        seen_p: set[int] = set()
        for m in _walk(mod):
            for p in m._parameters.values():
                if p is not None and id(p) not in seen_p:
                    seen_p.add(id(p))
                    own.append(p)
            for b in m._buffers.values():
                if b is not None and id(b) not in seen_b:
                    seen_b.add(id(b))
                    bufs.append(b)
        params.append(own)
    return params, bufs


def _buffers_of(modules: Sequence[nn.Module]) -> list[Tensor]:
    """Distinct buffers of ``modules`` (and their submodules)."""
    out: list[Tensor] = []
    seen: set[int] = set()
    for mod in modules:
        for b in mod.buffers():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                out.append(b)
    return out


@contextlib.contextmanager
def _restore_buffers(buffers: Sequence[Tensor]) -> Iterator[None]:
    saved = [(b, b.clone()) for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, val in saved:
                buf.copy_(val)


def _call_level(fn: nn.Module, lower: Tensor | None, upper: Tensor | None, where: str) -> Tensor:
    """Call ``fn(lower, upper)`` and raise if it changed an input in place."""
    versions = [t._version if t is not None else None for t in (lower, upper)]
    out = fn(lower, upper)
    for name, t, v in zip(("lower", "upper"), (lower, upper), versions):
        if t is not None and t._version != v:
            raise RuntimeError(
                f"{where}: the level function {type(fn).__name__} modified its {name} input in place; "
                "a reversible block needs its inputs intact to reconstruct them (use inplace=False)")
    if not isinstance(out, Tensor):
        raise TypeError(f"{where}: level function {type(fn).__name__} must return a tensor, got "
                        f"{type(out).__name__}")
    return out


def _check_state(out: Tensor, old: Tensor, where: str) -> None:
    if out.shape != old.shape:
        raise ValueError(f"{where}: level function output has shape {tuple(out.shape)} but the state it "
                         f"updates has shape {tuple(old.shape)}; a reversible update needs equal shapes "
                         "(mismatched channel split?)")


def _is_one(a: Tensor | float) -> bool:
    """A constant alpha of 1 (additive coupling): skip the multiply and the divide it would cost."""
    return not isinstance(a, Tensor) and a == 1.0


def _add_scaled(out: Tensor, a: Tensor | float, state: Tensor) -> Tensor:
    return out + state if _is_one(a) else out + a * state


def _unscale(t: Tensor, a: Tensor | float) -> Tensor:
    return t if _is_one(a) else t / _alpha_value(a)


def _alpha_value(a: Tensor | float) -> Tensor | float:
    return a.detach() if isinstance(a, Tensor) else a


def _rng_devices(tensors: Sequence[Tensor | None]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t is not None and t.device.type == "cuda"})


def _capture_rng(devices: list[int]):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _same_rng(a, b) -> bool:
    # the CPU state's bytes compared in Python: a third of the time of torch.equal on its 5 KB
    return a[0].numpy().tobytes() == b[0].numpy().tobytes() and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _restore_rng(state, devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def run_steps(steps: Sequence[ReversibleStep], x: Tensor | None, states: Sequence[Tensor | None],
              *, rng_log: list | None = None, rng_devices: list[int] | None = None) -> list[Tensor]:
    """Apply ``steps`` in order with ordinary autograd (the plain, non-reversible path).

    ``states`` are the inputs of the first step (ignored, may be ``None``, when it is a first step).
    When ``rng_log`` is a list, one entry per level call is appended to it: the RNG state before the
    call when the call drew random numbers (the state changed), else ``None`` (nothing to replay, and
    about 5 KB per level not kept).
    """
    cur = list(states)
    devices = rng_devices or []
    # the state after one level is the state before the next (nothing in between draws): one capture per level;
    # compared once the chain has run, the first with the last first (most chains draw nothing)
    seen = [_capture_rng(devices)] if rng_log is not None else None
    for s, step in enumerate(steps):
        new: list[Tensor] = []
        n = len(step.fns)
        if not step.first and len(cur) != n:
            raise ValueError(f"step {s} has {n} level functions but receives {len(cur)} states")
        for k, fn in enumerate(step.fns):
            lower = x if k == 0 else new[k - 1]
            upper = None if (step.first or k == n - 1) else cur[k + 1]
            out = _call_level(fn, lower, upper, f"step {s}, level {k}")
            if seen is not None:
                seen.append(_capture_rng(devices))
            if step.first:
                new.append(out)
            else:
                _check_state(out, cur[k], f"step {s}, level {k}")
                new.append(_add_scaled(out, step.alphas[k], cur[k]))
        cur = new
    if seen is not None:  # keep a level's state only where it drew random numbers (its state moved)
        if _same_rng(seen[0], seen[-1]):
            rng_log.extend([None] * (len(seen) - 1))
        else:
            rng_log.extend(None if _same_rng(a, b) else a for a, b in zip(seen, seen[1:]))
    return cur


@torch.no_grad()
def invert_steps(steps: Sequence[ReversibleStep], x: Tensor | None, outputs: Sequence[Tensor]
                 ) -> list[Tensor | None]:
    """Rebuild the inputs of ``steps`` from their outputs (no grad). A first step yields ``None`` s."""
    cur: list[Tensor | None] = list(outputs)
    for step in reversed(steps):
        if step.first:
            return [None] * len(cur)
        n = len(step.fns)
        old: list[Tensor | None] = [None] * n
        for k in reversed(range(n)):
            lower = x if k == 0 else cur[k - 1]
            upper = None if k == n - 1 else old[k + 1]
            out = step.fns[k](lower, upper)
            old[k] = _unscale(cur[k] - out, step.alphas[k])
        cur = old
    return cur


# ------------------------------------------------------------------------------ the Function
class MultiLevelReversibleFunction(torch.autograd.Function):
    """Chain of reversible steps whose backward reconstructs inputs instead of storing them.

    Paper slug ``revcol`` (multi-level reversible unit; ``rev-mbconv`` uses the L = 2 case).
    Forward (no grad): ``c_k_new = f_k(c_{k-1}_new, c_{k+1}_old) + alpha_k * c_k_old``.
    Backward, per step, top level first: recompute ``o_k = f_k(...)`` with grad,
    ``c_k_old = (c_k_new - o_k) / alpha_k``, ``dc_k_old += alpha_k * dc_k_new``,
    ``dalpha_k = sum(dc_k_new * c_k_old)``, and VJPs of ``o_k`` into lower/upper/parameters.
    Saved: ``x`` and the last step's outputs only.

    Call through :func:`MultiLevelReversibleFunction.run`::

        outs = MultiLevelReversibleFunction.run(steps, x, states, params)
    """

    @staticmethod
    def forward(ctx, plan, n_states, preserve_rng, monitor, x, *rest):  # type: ignore[override]
        steps, found = plan  # the steps, and their levels' parameters and buffers (chain_tensors)
        states = rest[:n_states]
        params = rest[n_states:]
        devices = _rng_devices([x, *states]) if preserve_rng else []
        rng_log: list | None = [] if preserve_rng else None
        with torch.no_grad():
            outs = run_steps(steps, x, states, rng_log=rng_log, rng_devices=devices)
        # outputs that alias an input (identity level function) must be fresh tensors
        ins = {t.data_ptr() for t in (x, *states) if t is not None}
        outs = [o.clone() if o.data_ptr() in ins else o for o in outs]
        ctx.steps = steps
        ctx.rng_log = rng_log
        ctx.devices = devices
        ctx.n_states = n_states
        ctx.has_x = x is not None
        ctx.params = params
        ctx.level_params = [lp for lp, _ in found]
        ctx.step_buffers = [bufs for _, bufs in found]
        ctx.monitor = monitor
        ctx.probes = [_probe(t) for t in states] if monitor is not None and not steps[0].first else None
        ctx.save_for_backward(x, *outs)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):  # type: ignore[override]
        x, *ys = ctx.saved_tensors
        steps = ctx.steps
        params = ctx.params
        pindex = {id(p): i for i, p in enumerate(params)}
        pgrads: list[Tensor | None] = [None] * len(params)
        gx: Tensor | None = None
        g_cur: list[Tensor | None] = list(grad_outs)
        y_cur: list[Tensor] = [y.detach() for y in ys]
        x_d = x.detach() if x is not None else None
        need_x = ctx.has_x and ctx.needs_input_grad[4]
        drift = 0.0

        def acc(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if b is None:
                return a
            return b if a is None else a + b

        # rng log entries: one per level call, in forward order
        offsets = []
        off = 0
        for st in steps:
            offsets.append(off)
            off += len(st.fns)

        # replaying a level's RNG state must not move the caller's stream; with nothing to replay, nothing moves
        replay = ctx.rng_log is not None and any(e is not None for e in ctx.rng_log)
        rng_ctx = torch.random.fork_rng(devices=ctx.devices) if replay else contextlib.nullcontext()
        with rng_ctx:
            for s in reversed(range(len(steps))):
                step = steps[s]
                n = len(step.fns)
                old: list[Tensor | None] = [None] * n
                g_old: list[Tensor | None] = [None] * n
                g_new = list(g_cur)
                with _restore_buffers(ctx.step_buffers[s]):
                    for k in reversed(range(n)):
                        fn = step.fns[k]
                        lower = x_d if k == 0 else y_cur[k - 1]
                        upper = None if (step.first or k == n - 1) else old[k + 1]
                        need_lower = lower is not None and (k > 0 or need_x)
                        lower_leaf = lower.detach().requires_grad_(need_lower) if lower is not None else None
                        upper_leaf = upper.detach().requires_grad_(True) if upper is not None else None
                        if ctx.rng_log is not None and ctx.rng_log[offsets[s] + k] is not None:
                            _restore_rng(ctx.rng_log[offsets[s] + k], ctx.devices)
                        with torch.enable_grad():
                            out = fn(lower_leaf, upper_leaf)
                        if not step.first:
                            a = step.alphas[k]
                            old[k] = _unscale(y_cur[k] - out.detach(), a)
                        elif ctx.monitor is not None:  # rebuilt outputs of the first step vs recomputed ones
                            drift = _worst(drift, _rel_drift(y_cur[k], out.detach()))
                        g = g_new[k]
                        if g is None:
                            g = torch.zeros_like(out)
                        fparams = [p for p in ctx.level_params[s][k] if p.requires_grad and id(p) in pindex]
                        inputs = ([lower_leaf] if need_lower else []) + \
                                 ([upper_leaf] if upper_leaf is not None else []) + fparams
                        if out.requires_grad and inputs:
                            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
                        else:
                            grads = [None] * len(inputs)
                        i = 0
                        if need_lower:
                            if k == 0:
                                gx = acc(gx, grads[0])
                            else:
                                g_new[k - 1] = acc(g_new[k - 1], grads[0])
                            i = 1
                        if upper_leaf is not None:
                            g_old[k + 1] = acc(g_old[k + 1], grads[i])
                            i += 1
                        for p, gp in zip(fparams, grads[i:]):
                            j = pindex[id(p)]
                            pgrads[j] = acc(pgrads[j], gp)
                        if not step.first:
                            a = step.alphas[k]
                            g_old[k] = acc(g_old[k], g if _is_one(a) else g * _alpha_value(a))
                            if isinstance(a, Tensor) and a.requires_grad and id(a) in pindex:
                                ga = (g * old[k]).sum_to_size(a.shape)
                                j = pindex[id(a)]
                                pgrads[j] = acc(pgrads[j], ga)
                        del out
                y_cur = old  # type: ignore[assignment]
                g_cur = g_old
            if ctx.probes is not None:
                drift = _worst(drift, _probes_drift(ctx.probes, y_cur))
            if ctx.monitor is not None and ctx.monitor.record(drift):
                exact = steps[0].first
                if ctx.monitor.trips == 1:
                    warnings.warn(
                        f"reversible reconstruction drifted: relative error {drift:.3g} > tol {ctx.monitor.tol:g} "
                        f"over a chain of {len(steps)} step(s) in {x_d.dtype if x_d is not None else y_cur[0].dtype}"
                        + ("; gradients recomputed from stored activations" if exact else
                           "; this call's gradients are inexact") +
                        ". Use float64, shorter chains, or store activations.", RuntimeWarning, stacklevel=2)
                if exact:
                    gx, pgrads = _exact_grads(ctx, x_d, grad_outs, need_x)
        need_states = ctx.needs_input_grad[5:5 + ctx.n_states]
        g_states = [g if need else None for g, need in zip(g_cur, need_states)] \
            if not steps[0].first else [None] * ctx.n_states
        return (None, None, None, None, gx if need_x else None, *g_states, *pgrads)

    @staticmethod
    def run(steps: Sequence[ReversibleStep], x: Tensor | None, states: Sequence[Tensor | None],
            params: Sequence[Tensor] | None = None, *, preserve_rng: bool = True,
            monitor: DriftMonitor | None = None, tensors: tuple[list, list[Tensor]] | None = None
            ) -> tuple[Tensor, ...]:
        """Apply the chain; ``params`` defaults to every parameter of the level functions and alphas.

        ``monitor``: a :class:`DriftMonitor` that the backward reports its reconstruction drift to.
        ``tensors``: :func:`chain_tensors` ``(steps)`` where the caller has it already (one module traversal
        per call instead of two).
        """
        if monitor is not None and not isinstance(monitor, DriftMonitor):
            raise TypeError(f"monitor must be a DriftMonitor or None, got {type(monitor).__name__}")
        if not steps:
            raise ValueError("steps must contain at least one ReversibleStep")
        for i, st in enumerate(steps):
            if not isinstance(st, ReversibleStep):
                raise TypeError(f"steps[{i}] must be a ReversibleStep, got {type(st).__name__}")
            if i > 0 and st.first:
                raise ValueError(f"steps[{i}] has alphas=None (a first step); only steps[0] may be a first step")
        found, all_params = chain_tensors(steps) if tensors is None else tensors
        return MultiLevelReversibleFunction.apply((list(steps), found), len(states), bool(preserve_rng), monitor, x,
                                                  *states, *(all_params if params is None else params))


def _exact_grads(ctx, x: Tensor, grad_outs: Sequence[Tensor | None], need_x: bool
                 ) -> tuple[Tensor | None, list[Tensor | None]]:
    """Gradients of a chain that begins with a first step, by plain autograd from the saved ``x``."""
    steps, params = ctx.steps, ctx.params
    fns = [f for st in steps for f in st.fns]
    with torch.enable_grad(), bn_state_guard(fns):
        # levels before the first one that drew random numbers drew none: its state is the chain's
        first = next((e for e in ctx.rng_log if e is not None), None) if ctx.rng_log else None
        if first is not None:
            _restore_rng(first, ctx.devices)
        x_leaf = x.detach().requires_grad_(need_x)
        outs = run_steps(steps, x_leaf, [None] * ctx.n_states)
        wrt = [x_leaf] if need_x else []
        live = [i for i, p in enumerate(params) if p.requires_grad]
        wrt += [params[i] for i in live]
        gouts = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grad_outs)]
        grads = torch.autograd.grad(outs, wrt, gouts, allow_unused=True)
    pgrads: list[Tensor | None] = [None] * len(params)
    for i, g in zip(live, grads[int(need_x):]):
        pgrads[i] = g
    return (grads[0] if need_x else None), pgrads


def collect_params(steps: Sequence[ReversibleStep]) -> list[Tensor]:
    """Distinct parameters of every level function and every tensor alpha of ``steps``."""
    return chain_tensors(steps)[1]


def chain_tensors(steps: Sequence[ReversibleStep]) -> tuple[list, list[Tensor]]:
    """Per step, each level's parameters and the step's buffers (:func:`_params_and_buffers`), and the
    distinct parameters and tensor alphas of all steps (:func:`collect_params`), from one traversal. The
    order is that of ``f.parameters()`` for each level function, then the step's alphas."""
    found = [_params_and_buffers(st.fns) for st in steps]
    seen: set[int] = set()
    out: list[Tensor] = []
    for st, (level_params, _) in zip(steps, found):
        cands = [p for own in level_params for p in own]
        cands += [a for a in (st.alphas or []) if isinstance(a, Tensor)]
        for p in cands:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return found, out
