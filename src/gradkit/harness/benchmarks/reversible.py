"""Benchmark: training step of a reversible stack vs the same coupling in plain autograd (paper slug: revcol).

The stacks are the ones on which reversible libraries are usually compared: an MLP whose F and G are
Linear(256, 256) + ReLU on the two halves of a 512-wide input, and a convolutional stack whose F and G are
3x3 Conv(16, 16) + ReLU on the two halves of 32 channels at 16x16. The baseline is the textbook coupling
``y1 = x1 + F(x2), y2 = x2 + G(y1)`` in plain PyTorch, which stores every activation; ours
(:class:`gradkit.nn.ReversibleSequential`) stores only the output and recomputes in backward. Every step is
zero_grad, forward, a squared-output loss, backward and SGD. With ``--peers`` revlib's
``ReversibleSequential`` on the same F, G modules is timed against the same baseline. The reported
``saved_ratio`` is the bytes autograd saves for backward (saved-tensor hooks), ours over the baseline's;
``retained_ratio`` the bytes a forward leaves allocated (profiler memory records: the output, saved
tensors and anything kept on ``ctx``, RNG states included), ours over the baseline's, and ``retained_kb``
ours in KiB, which stays flat in depth. With ``--peers``, ``vs_revlib_drift_check_off`` also times ours with
``drift_tol=None`` directly against revlib: the same work as revlib's step (RNG states kept, no
reconstruction check), beside the default's ``direct``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...nn import ReversibleBlock, ReversibleSequential
from ...testing import RetainedBytesMeter
from ..bench import (Benchmark, BenchResult, compare_aside, compare_steps, forward_saved_bytes, import_peer,
                     peer_result, peers_enabled, register_benchmark)

STACKS = {"mlp": (64, 256), "conv": (16, 16)}  # (batch, width or channels per half)
DEPTHS = (2, 16)


def _fg(kind: str, width: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.ReLU())
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())


class _PlainCoupling(nn.Module):
    def __init__(self, fs: list[nn.Module], gs: list[nn.Module]) -> None:
        super().__init__()
        self.fs, self.gs = nn.ModuleList(fs), nn.ModuleList(gs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        for f, g in zip(self.fs, self.gs):
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
        return torch.cat([x1, x2], dim=1)


def _retained(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes a training forward leaves allocated (output, saved tensors, anything kept on ctx or modules)."""
    with RetainedBytesMeter() as m:
        out = model(x)
    del out
    return m.bytes


def _step(model: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        model(x).pow(2).mean().backward()
        opt.step()

    return step


def _runner(kind: str, depth: int):
    batch, width = STACKS[kind]

    def run(repeats: int) -> BenchResult:
        torch.manual_seed(0)
        fs = [_fg(kind, width) for _ in range(depth)]
        gs = [_fg(kind, width) for _ in range(depth)]
        plain = _PlainCoupling(copy.deepcopy(fs), copy.deepcopy(gs))
        ours = ReversibleSequential(*[ReversibleBlock(f, g, split_dim=1) for f, g in
                                      zip(copy.deepcopy(fs), copy.deepcopy(gs))])
        shape = (batch, 2 * width) if kind == "mlp" else (batch, 2 * width, 16, 16)
        # the input requires grad, as the output of a stem would (revlib needs it)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        base = _step(plain, x)
        ours_step = _step(ours, x)
        res = compare_steps(base, ours_step, repeats=repeats)
        extra = {"depth": depth, "batch": batch, "input": list(shape[1:]),
                 "saved_ratio": forward_saved_bytes(ours, x) / forward_saved_bytes(plain, x),
                 "retained_ratio": _retained(ours, x) / _retained(plain, x), "retained_kb": _retained(ours, x) / 1024}
        if peers_enabled():
            revlib = import_peer("revlib")
            peer = None
            if revlib is not None:
                mods = [m for f, g in zip(copy.deepcopy(fs), copy.deepcopy(gs)) for m in (f, g)]
                peer = _step(revlib.ReversibleSequential(*mods, split_dim=1), x)
            extra["peers"] = [peer_result("revlib", base, peer, res.ratio, repeats, ours=ours_step)]
            if peer is not None:  # the same work as revlib's: RNG states kept, no drift check
                same = ReversibleSequential(*[ReversibleBlock(f, g, split_dim=1) for f, g in
                                              zip(copy.deepcopy(fs), copy.deepcopy(gs))], drift_tol=None)
                d = compare_aside(peer, _step(same, x), repeats=repeats)
                extra.update({"vs_revlib_drift_check_off": d.ratio, "vs_revlib_drift_check_off_min": d.extra["ratio_min"],
                              "vs_revlib_drift_check_off_max": d.extra["ratio_max"]})
        return BenchResult(res.baseline_s, res.candidate_s, extra=extra)

    return run


for _kind in STACKS:
    for _depth in DEPTHS:
        _b, _w = STACKS[_kind]
        register_benchmark(Benchmark(
            name=f"reversible-{_kind}-{_depth}-blocks",
            slug="revcol",
            description=(f"training step of {_depth} reversible blocks (F, G = "
                         + (f"Linear({_w}, {_w}) + ReLU, batch {_b}" if _kind == "mlp"
                            else f"3x3 Conv({_w}, {_w}) + ReLU at 16x16, batch {_b}")
                         + ") vs the same coupling in plain autograd"),
            target=None,
            baseline="plain coupling (autograd)",
            run=_runner(_kind, _depth),
        ))
