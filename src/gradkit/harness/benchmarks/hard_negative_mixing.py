"""Benchmark: a MoCHi training step (gradkit's queue, momentum update and InfoNCEWithMixing) vs a plain-PyTorch
MoCo step (paper slug: hard-negative-mixing).

Both steps hold the same weights and see the same two views: query forward, EMA of the key encoder, key
forward, InfoNCE over [positive, queue] (MoCHi: plus s + s' synthetic negatives per query), backward, Adam, and
the FIFO enqueue of the keys. The plain step writes each of these by hand in PyTorch; the difference is the
mixing (top-N of the queue similarities, the draws, the mixes' norms, s + s' more logits), gradkit's argument
checks and gradkit's loss itself: on the CPU in float32 one native Function for the whole InfoNCE
(gradkit.functional.queue_info_nce) where the plain step runs PyTorch's concatenation, division and
cross-entropy. ``moco_no_mixing_ratio`` (MLP shapes) times gradkit's step with s = s' = 0 against the same plain
step, which separates the two. Three shapes: the claim's digits setting (MLP 64-256-128 + head to 32, K = 256,
MoCHi(32, 32, 8)) and the paper's ImageNet-100 loss setting (K = 16384, MoCHi(1024, 1024, 128), 128-d
embeddings) on an MLP 784-1024-512 encoder and on a 4-layer CNN over 3x32x32 images (channels 64-128-256-512,
the conv-encoder regime of the paper, far lighter than its ResNet-50), each with a head to 128.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import Benchmark, BenchResult, compare_aside, compare_steps, register_benchmark
from ...nn.hard_negative_mixing import InfoNCEWithMixing
from ...nn.memory_queue import MemoryQueue, momentum_update

BATCH = 128
TAU = 0.2
MOMENTUM = 0.99
# name -> (encoder widths (an MLP) or conv channels on 3x32x32 images, head (hidden, out), queue size, (N, s, s'))
SHAPES = {"digits": ((64, 256, 128), (128, 32), 256, (32, 32, 8)),
          "in100": ((784, 1024, 512), (512, 128), 16384, (1024, 1024, 128)),
          "in100-cnn": ((3, 64, 128, 256, 512), (512, 128), 16384, (1024, 1024, 128))}


def _encoder(shape: str, widths: tuple[int, ...], head: tuple[int, int]) -> nn.Sequential:
    """An MLP, or for ``*-cnn`` a 4-layer conv net (3x3 convs, stride 2 after the first, global average pool)."""
    layers: list[nn.Module] = []
    for n, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if shape.endswith("cnn"):
            layers += [nn.Conv2d(a, b, 3, stride=1 if n == 0 else 2, padding=1), nn.ReLU()]
        else:
            layers += [nn.Linear(a, b), nn.ReLU()]
    if shape.endswith("cnn"):
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers += [nn.Linear(widths[-1], head[0]), nn.ReLU(), nn.Linear(head[0], head[1])]
    return nn.Sequential(*layers)


def _plain_step(model_q: nn.Module, x1: torch.Tensor, x2: torch.Tensor, keys: torch.Tensor):
    model_k = copy.deepcopy(model_q).requires_grad_(False)
    opt = torch.optim.Adam(model_q.parameters(), lr=1e-3)
    queue = keys.clone()
    ptr = [0]
    target = torch.zeros(len(x1), dtype=torch.long)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        q = F.normalize(model_q(x1), dim=1)
        with torch.no_grad():
            for pq, pk in zip(model_q.parameters(), model_k.parameters()):
                pk.mul_(MOMENTUM).add_(pq, alpha=1 - MOMENTUM)
            k = F.normalize(model_k(x2), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / TAU
        F.cross_entropy(logits, target).backward()
        opt.step()
        idx = (ptr[0] + torch.arange(len(k))) % len(queue)
        queue[idx] = k
        ptr[0] = (ptr[0] + len(k)) % len(queue)

    return step


def _mochi_step(model_q: nn.Module, x1: torch.Tensor, x2: torch.Tensor, keys: torch.Tensor, mix: tuple[int, int, int]):
    model_k = copy.deepcopy(model_q).requires_grad_(False)
    opt = torch.optim.Adam(model_q.parameters(), lr=1e-3)
    queue = MemoryQueue(keys.shape[1], keys.shape[0])
    queue.keys.copy_(keys)
    n_hard, s, s_prime = mix
    loss_fn = InfoNCEWithMixing(tau=TAU, n_hard=n_hard, s=s, s_prime=s_prime,
                                generator=torch.Generator().manual_seed(1))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        q = model_q(x1)
        with torch.no_grad():
            momentum_update(model_q, model_k, MOMENTUM)
            k = F.normalize(model_k(x2), dim=1)
        loss_fn(q, k, queue).backward()
        opt.step()
        queue.enqueue(k)

    return step


def _runner(shape: str):
    widths, head, size, mix = SHAPES[shape]

    def run(repeats: int) -> BenchResult:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = _encoder(shape, widths, head)
        x_shape = (BATCH, 3, 32, 32) if shape.endswith("cnn") else (BATCH, widths[0])
        x1, x2 = torch.randn(x_shape, generator=gen), torch.randn(x_shape, generator=gen)
        keys = F.normalize(torch.randn(size, head[1], generator=gen), dim=1)
        res = compare_steps(_plain_step(copy.deepcopy(model), x1, x2, keys),
                            _mochi_step(copy.deepcopy(model), x1, x2, keys, mix), repeats=repeats)
        extra = {"batch": BATCH, "encoder": list(widths), "head": list(head), "queue": size, "mochi": list(mix)}
        if not shape.endswith("cnn"):  # (the CNN step is all encoder: the aside would only double its time)
            # the same step through gradkit's loss without mixing: what the loss itself gains or costs, apart
            # from the mixing
            moco = compare_aside(_plain_step(copy.deepcopy(model), x1, x2, keys),
                                 _mochi_step(copy.deepcopy(model), x1, x2, keys, (mix[0], 0, 0)), repeats=repeats)
            extra["moco_no_mixing_ratio"] = round(moco.ratio, 3)
        return BenchResult(res.baseline_s, res.candidate_s, extra=extra)

    return run


for _shape, (_w, _h, _k, _m) in SHAPES.items():
    register_benchmark(Benchmark(
        name=f"hard-negative-mixing-step-{_shape}",
        slug="hard-negative-mixing",
        description=f"MoCo training step, batch {BATCH}, "
                    f"{'CNN on 3x32x32, channels' if _shape.endswith('cnn') else 'MLP'} {'-'.join(map(str, _w))} "
                    f"+ head to {_h[1]}, queue {_k}: gradkit MoCHi{_m} vs plain-PyTorch MoCo",
        target=1.2,
        baseline="plain-PyTorch MoCo step",
        run=_runner(_shape),
    ))
