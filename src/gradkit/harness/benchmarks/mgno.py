"""Benchmark: MgNO forward (and training step) vs an FNO of the same width (paper slug: mgno).

Both are 3-layer neural operators of width 16 on the same batch of 8 Darcy-like inputs: MgNO with 4-level
V-cycles ``((1, 0), (1, 0), (1, 0), (2, 0))`` (:class:`gradkit.solvers.mgno.MgNO`) and the claim's FNO-2D
(12 modes, zero padding of 9 cells, lifting and projection MLP). The forward runs under ``torch.no_grad``;
the step is forward + backward + Adam step with the relative L2 loss. Two grids: 64x64 (the paper's
setting is 211x211 for Darcy; 64 keeps the CPU benchmark short) and the claim's 32x32 (8 modes).
Target: MgNO's forward at most 2x the FNO's.
"""
from __future__ import annotations

import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ..claims.mgno import GridFNO2d, n_params
from ...solvers.mgno import MgNO
from ...solvers.operator_losses import relative_lp_loss

BATCH, WIDTH, LAYERS = 8, 16, 3
LEVELS = ((1, 0), (1, 0), (1, 0), (2, 0))
GRIDS = {"64": (64, 12, 9), "32": (32, 8, 8)}  # size, FNO modes, FNO padding


def _models(size: int, modes: int, padding: int):
    torch.manual_seed(0)
    fno = GridFNO2d(WIDTH, modes, LAYERS, padding)
    mg = MgNO(in_channels=1, width=WIDTH, n_layers=LAYERS, levels=LEVELS)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, size, size, generator=gen)
    y = torch.randn(BATCH, 1, size, size, generator=gen)
    return fno, mg, x, y


def _forward(model, x):
    def step() -> None:
        with torch.no_grad():
            model(x)
    return step


def _train(model, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        relative_lp_loss(model(x), y).backward()
        opt.step()
    return step


def _runner(grid: str, kind: str):
    size, modes, padding = GRIDS[grid]

    def run(repeats: int) -> BenchResult:
        fno, mg, x, y = _models(size, modes, padding)
        make = (lambda m: _forward(m, x)) if kind == "forward" else (lambda m: _train(m, x, y))
        res = compare_steps(make(fno), make(mg), repeats=repeats)
        return BenchResult(res.baseline_s, res.candidate_s,
                           extra={"batch": BATCH, "grid": size, "width": WIDTH, "fno_modes": modes,
                                  "mgno_params": n_params(mg), "fno_params": n_params(fno)})

    return run


for _grid, (_size, _modes, _pad) in GRIDS.items():
    register_benchmark(Benchmark(
        name=f"mgno-forward-{_grid}",
        slug="mgno",
        description=f"3-layer width-{WIDTH} operator forward, batch {BATCH} on {_size}x{_size}: MgNO (4-level "
                    f"V-cycles) vs FNO-2D ({_modes} modes)",
        target=2.0,
        baseline=f"FNO-2D, width {WIDTH}",
        run=_runner(_grid, "forward"),
    ))
    register_benchmark(Benchmark(
        name=f"mgno-train-step-{_grid}",
        slug="mgno",
        description=f"3-layer width-{WIDTH} operator training step (Adam, relative L2), batch {BATCH} on "
                    f"{_size}x{_size}: MgNO vs FNO-2D ({_modes} modes)",
        target=None,
        baseline=f"FNO-2D, width {WIDTH}",
        run=_runner(_grid, "train"),
    ))
