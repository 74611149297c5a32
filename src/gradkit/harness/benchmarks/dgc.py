"""Benchmarks of Deep Gradient Compression (paper slug: dgc) on a 1M-parameter model at density 0.001.

Model: bias-free MLP 1024-1024-10 (1,058,816 parameters, all compressed), batch 128, fp32.

- ``dgc-compress-vs-backward``: the DGC compressor's work on one step's gradients (momentum correction,
  accumulation, exact top-k selection (blockwise), masking, block16 index coding) vs the backward pass
  that produced them (target <= 0.7x). A bias-free MLP is the hardest case for this ratio: its backward
  is one matmul per weight and batch row, whereas a conv layer reuses each weight at every position.
  ``extra`` holds the same ratio with the official sampled threshold and the bytes on the wire: dense
  fp32 / (fp32 values + block16 indices), target >= 500x, and with int32 indices. It also states the
  memory traffic of one exact compression (``bytes_per_element``), the copy bandwidth measured in the same
  process on a buffer of the same size, and the ratio that traffic alone would take at that bandwidth
  (``bandwidth_limit_ratio``, the floor for any implementation made of these passes, were the buffers in
  cache), and the same from main memory (``bandwidth_dram_gbs``, ``bandwidth_limit_ratio_dram``: the backward
  between two compressions evicts part of them, so the true floor lies between the two). The baseline
  clears the gradients before each backward, as a training step does.
  Where the native kernels are built (:mod:`gradkit._native`), one fused pass makes the update and the row
  maxima at one thread; ``extra`` then also holds the ratio of the PyTorch passes (``ratio_pytorch_path``).
- ``dgc-train-step``: a full training step (forward, backward, compress, decompress, SGD) of one DGC
  worker vs plain SGD with momentum, same inputs (report; target <= 1.5x).
"""
from __future__ import annotations

import torch
from torch import nn

from ... import _native
from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark
from ...distributed.dgc import DGCCompressor

BATCH, WIDTH, CLASSES, DENSITY = 128, 1024, 10, 1e-3


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU(), nn.Linear(WIDTH, CLASSES, bias=False))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


BYTES_PER_ELEMENT = 4 + 12 + 12 + 8 + 4  # fp32 passes of one exact compression in PyTorch, see run_compress
BYTES_PER_ELEMENT_FUSED = 4 + 20  # the same with the fused native update (gradkit._native)


def _bandwidth_gbs(numel: int = WIDTH * WIDTH + WIDTH * CLASSES, reps: int = 25) -> float:
    """Copy bandwidth (read + write) on a buffer of ``numel`` floats: by default the compressed size (about
    4 MB, cache-resident here); with 16M floats (64 MB) the main memory's."""
    import statistics
    import time

    src = torch.randn(numel)
    dst = torch.empty_like(src)
    ts = []
    for i in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        if i >= min(5, reps // 2):
            ts.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(ts) / 1e9


def _compressor(sample_ratio, coding="block16") -> DGCCompressor:
    return DGCCompressor(density=DENSITY, momentum=0.9, world_size=1, warmup=None, sample_ratio=sample_ratio,
                         index_coding=coding, generator=torch.Generator().manual_seed(0))


def _wire_ratio(coding: str, grads) -> tuple[float, int, int]:
    comp = _compressor(0.01, coding)
    for i, g in enumerate(grads):
        comp.compress(i, g)
    return comp.compression_ratio(), comp.bytes_dense, comp.bytes_sent


def run_compress(repeats: int) -> BenchResult:
    model = _model()
    x, y = _inputs()
    loss = nn.functional.cross_entropy(model(x), y)
    params = list(model.parameters())

    def backward() -> None:
        for p in params:  # a step's backward writes fresh gradients (zero_grad), it does not accumulate
            p.grad = None
        loss.backward(retain_graph=True)  # the same graph every time: only the backward is timed

    backward()
    grads = [p.grad.detach().clone() for p in params]
    exact, sampled = _compressor(None), _compressor(0.01)

    def compress_with(comp):
        def step() -> None:
            for i, g in enumerate(grads):
                comp.compress(i, g)
        return step

    res = compare_steps(backward, compress_with(exact), repeats=repeats)
    res_sampled = compare_steps(backward, compress_with(sampled), repeats=max(3, repeats // 3))
    fused = _native.native() is not None and exact._native_fits(grads[0]) and grads[0].is_contiguous()
    with _native.disabled():  # the same exact compression made of PyTorch passes only
        res_torch = compare_steps(backward, compress_with(_compressor(None)), repeats=max(3, repeats // 3))
    n = sum(g.numel() for g in grads)
    per_element = BYTES_PER_ELEMENT_FUSED if fused else BYTES_PER_ELEMENT
    bandwidth, dram = _bandwidth_gbs(), _bandwidth_gbs(1 << 24, reps=8)
    r_block, dense_b, sent_b = _wire_ratio("block16", grads)
    r_int32, _, sent_i = _wire_ratio("int32", grads)
    return BenchResult(res.baseline_s, res.candidate_s, extra={
        "params": sum(p.numel() for p in params), "batch": BATCH, "density": DENSITY,
        "ratio_sampled_threshold": res_sampled.ratio, "wire_bytes_dense": dense_b, "wire_bytes_sent_block16": sent_b,
        "wire_bytes_ratio_block16": r_block, "wire_bytes_sent_int32": sent_i, "wire_bytes_ratio_int32": r_int32,
        "wire_bytes_target": ">= 500x", "fused_update": fused, "ratio_pytorch_path": res_torch.ratio,
        # memory traffic of the exact path per gradient entry: finite check (read g), u <- m u + g (read g, u;
        # write u), v <- v + u (read v, u; write v), |v| (read v; write a), row maxima (read a); fused: the
        # check, then one pass that reads g, u, v, writes u, v and takes the row maxima from cache
        "bytes_per_element": per_element, "bandwidth_gbs": bandwidth,
        "bandwidth_limit_ratio": per_element * n / (bandwidth * 1e9) / res.baseline_s,
        "bandwidth_dram_gbs": dram, "bandwidth_limit_ratio_dram": per_element * n / (dram * 1e9) / res.baseline_s})


def run_step(repeats: int) -> BenchResult:
    x, y = _inputs()
    plain, ours = _model(), _model()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.0)
    comp = _compressor(None)
    params = list(ours.parameters())

    def plain_step() -> None:
        opt_plain.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain(x), y).backward()
        opt_plain.step()

    def dgc_step() -> None:
        opt_ours.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ours(x), y).backward()
        for i, p in enumerate(params):
            p.grad = comp.decompress([comp.compress(i, p.grad)], p.shape)
        opt_ours.step()

    res = compare_steps(plain_step, dgc_step, repeats=repeats)
    return BenchResult(res.baseline_s, res.candidate_s, extra={"batch": BATCH, "density": DENSITY})


register_benchmark(Benchmark(
    name="dgc-compress-vs-backward",
    slug="dgc",
    description=f"DGC compressor (d={DENSITY:g}, exact top-k, block16 indices) on a 1.06M-parameter bias-free "
                f"MLP's gradients vs the backward pass (batch {BATCH}); extra: wire bytes ratio",
    target=0.7,
    baseline="backward pass",
    run=run_compress,
))

register_benchmark(Benchmark(
    name="dgc-train-step",
    slug="dgc",
    description=f"training step with DGC compress+decompress (d={DENSITY:g}, one worker) vs plain SGD momentum, "
                f"1.06M-parameter MLP, batch {BATCH}",
    target=1.5,
    baseline="plain SGD step",
    run=run_step,
))
