"""Benchmark of dta: the DTN surrogate's forward vs the non-differentiable renderer, per image, in one process.

- ``dta-dtn-vs-renderer``: baseline = :meth:`ToyRenderer.render` of a texture tile into a batch of scenes
  (numpy; geometry, shading, shadow, highlight, noise, quantisation); candidate = what the attack runs
  instead: :func:`expand_texture` of the same tile + the DTN's forward on the scenes' reference renders
  (torch, no grad). Same batch, same scenes; the ratio is candidate / baseline time, so a surrogate that is
  20x faster per image scores <= 0.05 (the target).

Setup: 64 scenes of 32x32, a 4x4 tile, the claim's quick-scale DTN (hidden 16).
"""
from __future__ import annotations

import numpy as np
import torch

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...data.dta_scenes import sample_scenes
from ...robustness.dta import DifferentiableTransformationNetwork, TexturePool, expand_texture
from ...robustness.toy_renderer import ToyRenderer

BATCH, SIZE, K, HIDDEN = 64, 32, 4, 16


def run(repeats: int) -> BenchResult:
    torch.manual_seed(0)
    renderer = ToyRenderer(K)
    scenes = sample_scenes(BATCH, SIZE, seed=0)
    pool = TexturePool.render(renderer, scenes, np.full((3, K, K), 0.5))
    dtn = DifferentiableTransformationNetwork(hidden=HIDDEN, check_inputs=False).eval()
    tile = torch.rand(3, K, K, generator=torch.Generator().manual_seed(1))
    tile_np = tile.numpy().astype(np.float64)

    def baseline() -> None:
        renderer.render(tile_np, scenes)

    def candidate() -> None:
        with torch.no_grad():
            dtn(pool.x_ref, expand_texture(tile, pool.index, pool.mask), pool.mask)

    res = compare_steps(baseline, candidate, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "size": SIZE, "hidden": HIDDEN,
                              "renderer_ms_per_image": 1e3 * res.baseline_s / BATCH,
                              "dtn_ms_per_image": 1e3 * res.candidate_s / BATCH})


register_benchmark(Benchmark(
    name="dta-dtn-vs-renderer",
    slug="dta",
    description=f"DTN forward (+ texture expansion) vs the numpy toy renderer, batch {BATCH} of 3x{SIZE}x{SIZE} "
                f"scenes, 4x4 tile, hidden {HIDDEN}",
    target=0.05,
    baseline="ToyRenderer.render of the same tile into the same scenes",
    run=run,
))
