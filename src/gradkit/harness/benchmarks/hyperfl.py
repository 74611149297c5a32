"""Benchmark: a HyperFL client's training step vs the same MLP trained directly (paper slug: hyperfl).

Baseline: the claim's 64-64-32 MLP extractor + linear head, one SGD step (forward, backward, update) on a
batch of 50 digits-sized inputs. Candidate: the same architecture as a ``HyperClient`` (embedding 16,
hypernetwork hidden 64, as in the claim), whose step generates the extractor's 6,240 weights from the
embedding, back-propagates through the hypernetwork (~0.4M parameters) and updates phi and v, with the
official norm clipping. The ratio is HyperFL's compute overhead per local step.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..bench import Benchmark, BenchResult, compare_steps, register_benchmark, train_step
from ...nn.hypernetwork import HyperClient

BATCH, SIZES, EMBED, HIDDEN = 50, (64, 64, 32), 16, 64


def _mlp() -> tuple[nn.Sequential, nn.Linear]:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers), nn.Linear(SIZES[-1], 10)


def run(repeats: int) -> BenchResult:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    torch.manual_seed(0)
    ext, head = _mlp()
    plain = nn.Sequential(ext, head)
    base = train_step(plain, torch.optim.SGD(plain.parameters(), lr=0.02, momentum=0.5, weight_decay=5e-4), x, y)
    client = HyperClient(*_mlp(), embed_dim=EMBED, hidden=HIDDEN)
    phi, v = client.shared_parameters(), [client.embedding.weight]
    opt = torch.optim.SGD(phi + v, lr=0.02, momentum=0.5, weight_decay=5e-4)
    for p in client.head.parameters():  # as in HyperFL's second local step: head fixed
        p.requires_grad_(False)

    def cand() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(client(x), y).backward()
        torch.nn.utils.clip_grad_norm_(phi, 50.0)
        torch.nn.utils.clip_grad_norm_(v, 50.0)
        opt.step()

    res = compare_steps(base, cand, repeats=repeats, inner=5)
    return BenchResult(res.baseline_s, res.candidate_s,
                       extra={"batch": BATCH, "extractor": "64-64-32", "phi_params": sum(p.numel() for p in phi),
                              "theta_params": sum(s.numel() for s in client.hypernet.shapes)})


register_benchmark(Benchmark(
    name="hyperfl-client-step",
    slug="hyperfl",
    description=f"HyperFL client step (hypernetwork embed {EMBED}, hidden {HIDDEN} -> 64-64-32 MLP weights), "
                f"batch {BATCH}, vs training the MLP directly",
    target=None,
    baseline="plain MLP SGD step",
    run=run,
))
