"""In-process federated learning: client splits, local training and rounds of FedAvg, DP-FedAvg, HyperFL.

Paper slug: hyperfl (HyperFL, arXiv:2412.07187, with FedAvg and DP-FedAvg as its baselines).

Every client model exposes ``shared_state() -> {name: tensor}`` (what goes on the wire) and
``load_shared_state(state)``: :class:`~gradkit.nn.hypernetwork.HyperClient` shares ``phi`` only,
:class:`FedAvgClient` its whole ``state_dict``. The ``local_train_*`` functions are what one client does
in one round (a Flower client calls them too); the ``*_round`` functions run every client in turn and
aggregate on the "server"::

    FedAvg / HyperFL:   s <- sum_i (n_i / sum_j n_j) s_i                      (data-size weighted)
    DP-FedAvg:          d_i = s_i - s;  d_i <- d_i * min(1, C / ||d_i||) + N(0, (sigma C)^2 I)
                        s <- s + sum_i (n_i / sum_j n_j) d_i                  (noise added per client)

Local training goes through :func:`gradkit.engine.fit`; HyperFL's two-step update is two ``fit`` calls
(head with the generated weights frozen, then hypernetwork + embedding with norm clipping).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._validate import positive_int, real_in, real_scalar
from ..data import TensorBatches
from ..engine import accuracy, fit
from ..nn.hypernetwork import HyperClient, load_state_strict

__all__ = ["ClientData", "dirichlet_split", "FedAvgClient", "fedavg_shared_state", "weighted_average",
           "local_train_fedavg", "local_train_hyperfl", "fedavg_round", "dp_fedavg_round", "hyperfl_round",
           "clip_and_noise", "client_accuracies"]


@dataclass(frozen=True)
class ClientData:
    """One client's local data: a training and a test split (tensors)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    def to(self, device) -> "ClientData":
        return ClientData(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def dirichlet_split(x: torch.Tensor, y: torch.Tensor, num_clients: int, alpha: float = 0.5, *,
                    test_frac: float = 0.2, min_size: int = 10, seed: int = 0,
                    max_tries: int = 100) -> list[ClientData]:
    """Split ``(x, y)`` over clients with Dirichlet label skew, then 80/20 (``test_frac``) per client.

    For every class c, ``p_c ~ Dir(alpha * 1)`` over clients and the class's samples are dealt out in
    those proportions (smaller ``alpha``: stronger skew). Redrawn until every client holds at least
    ``min_size`` samples. Deterministic in ``seed``.

    Example::

        clients = dirichlet_split(torch.randn(500, 4), torch.randint(0, 5, (500,)), 4, alpha=0.5)
        [c.n_train for c in clients]
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    num_clients = positive_int("num_clients", num_clients)
    alpha = real_in("alpha", alpha, 0.0, low_open=True)
    test_frac = real_in("test_frac", test_frac, 0.0, 1.0, high_open=True)
    min_size = positive_int("min_size", min_size)
    if num_clients * min_size > len(y):
        raise ValueError(f"cannot give {num_clients} clients {min_size} samples each from {len(y)} samples")
    rng = np.random.default_rng(seed)
    labels = y.detach().cpu().numpy()
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every client >= {min_size} samples in "
                         f"{max_tries} draws; lower min_size or raise alpha")
    out = []
    for part in parts:
        idx = torch.as_tensor(rng.permutation(np.asarray(part, dtype=np.int64)), device=x.device)
        n_test = int(round(test_frac * len(idx)))
        te, tr = idx[:n_test], idx[n_test:]
        out.append(ClientData(x[tr], y[tr], x[te], y[te]))
    return out


# ---------------------------------------------------------------------------------------- FedAvg model
def fedavg_shared_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a FedAvg client sends: detached copies of its whole ``state_dict``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class FedAvgClient(nn.Module):
    """Wrap any model as a FedAvg client: it shares (and loads) its whole ``state_dict`` (paper slug: hyperfl).

    Example::

        c = FedAvgClient(nn.Linear(4, 2))
        c.load_shared_state(c.shared_state())
        c(torch.randn(3, 4)).shape            # (3, 2)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def shared_state(self) -> dict[str, torch.Tensor]:
        return fedavg_shared_state(self.model)

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        load_state_strict(self, state, self.model.state_dict())


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i s_i / sum_i w_i`` key by key (non-float tensors are taken from the first state)."""
    if len(states) == 0:
        raise ValueError("states is empty: nothing to average")
    if len(weights) != len(states):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    w = [real_scalar(f"weights[{i}]", v, nonneg=True) for i, v in enumerate(weights)]
    total = sum(w)
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {weights!r}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(keys):
            raise KeyError(f"states[{i}] has different keys from states[0]")
    out = {}
    for k in keys:
        ref = states[0][k]
        for i, s in enumerate(states):
            if s[k].shape != ref.shape:
                raise ValueError(f"states[{i}][{k!r}] has shape {tuple(s[k].shape)}, expected {tuple(ref.shape)}")
        if ref.is_floating_point():
            acc = torch.zeros_like(ref)
            for wi, s in zip(w, states):
                acc.add_(s[k].to(ref.dtype), alpha=wi / total)
            out[k] = acc
        else:
            out[k] = ref.clone()
    return out


def clip_and_noise(update: Mapping[str, torch.Tensor], clip: float, sigma: float,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """DP-FedAvg's client step: clip the update's global l2 norm to ``clip``, add ``N(0, (sigma clip)^2)``.

    Non-float tensors pass through. ``generator`` (a CPU generator) makes the noise reproducible.
    """
    clip = real_scalar("clip", clip)
    sigma = real_scalar("sigma", sigma, nonneg=True)
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    floats = [v for v in update.values() if v.is_floating_point()]
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in floats)) if floats else torch.tensor(0.0)
    scale = min(1.0, clip / (float(norm) + 1e-12))
    out = {}
    for k, v in update.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        noise = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) if sigma > 0 else 0.0
        out[k] = v * scale + sigma * clip * noise
    return out


# ---------------------------------------------------------------------------------------- local training
def _batches(data: ClientData, batch_size: int, generator: torch.Generator | None) -> TensorBatches:
    return TensorBatches(data.x_train, data.y_train, batch_size=batch_size, shuffle=True, generator=generator)


def local_train_fedavg(client: nn.Module, data: ClientData, epochs: int = 1, *, lr: float = 0.05,
                       momentum: float = 0.5, weight_decay: float = 5e-4, batch_size: int = 50,
                       generator: torch.Generator | None = None) -> float:
    """One FedAvg client's local work: ``epochs`` epochs of SGD on all its parameters; returns the last train loss."""
    lr = real_scalar("lr", lr, nonneg=True)
    opt = torch.optim.SGD(client.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    hist = fit(client, opt, _batches(data, batch_size, generator), epochs=epochs)
    return hist.last("train_loss") if hist.records else float("nan")


def local_train_hyperfl(client: HyperClient, data: ClientData, epochs: int = 5, head_epochs: int = 1, *,
                        lr: float = 0.02, head_lr: float = 0.1, momentum: float = 0.5,
                        weight_decay: float = 5e-4, max_norm: float = 50.0, batch_size: int = 50,
                        generator: torch.Generator | None = None) -> float:
    """One HyperFL client's local work (official two-step update); returns the last train loss.

    1. ``head_epochs`` epochs of SGD(head_lr) on the head ``psi`` with ``theta = h(v; phi)`` frozen.
    2. ``epochs`` epochs of SGD(lr) on ``phi`` and ``v`` (and any non-generated target parameter)
       through ``theta = h(v; phi)``, each gradient clipped to norm ``max_norm`` (phi and v separately).
    """
    if not isinstance(client, HyperClient):
        raise TypeError(f"client must be a HyperClient, got {type(client).__name__}")
    max_norm = real_scalar("max_norm", max_norm)
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    batches = _batches(data, batch_size, generator)
    head_params = list(client.head.parameters())
    if head_epochs > 0:
        with torch.no_grad():
            frozen = client.generated_weights()
        opt = torch.optim.SGD(head_params, lr=head_lr, momentum=momentum, weight_decay=weight_decay)
        fit(client, opt, batches, epochs=head_epochs,
            compute_loss=lambda m, b: F.cross_entropy(m.head(m.features(b[0], frozen)), b[1]))
    loss = float("nan")
    if epochs > 0:
        phi = client.shared_parameters()
        head_ids = {id(p) for p in head_params}
        own = [p for p in client.private_parameters() if id(p) not in head_ids]  # v (+ non-generated target)
        opt = torch.optim.SGD(phi + own, lr=lr, momentum=momentum, weight_decay=weight_decay)
        flags = [p.requires_grad for p in head_params]
        for p in head_params:
            p.requires_grad_(False)

        def clip(step: int) -> None:
            torch.nn.utils.clip_grad_norm_(phi, max_norm)
            torch.nn.utils.clip_grad_norm_(own, max_norm)

        try:
            hist = fit(client, opt, batches, epochs=epochs, before_step=clip)
        finally:
            for p, f in zip(head_params, flags):
                p.requires_grad_(f)
        loss = hist.last("train_loss") if hist.records else loss
    return loss


# ---------------------------------------------------------------------------------------- rounds
def _check_round(clients: Sequence[nn.Module], datas: Sequence[ClientData]) -> None:
    if len(clients) == 0:
        raise ValueError("clients is empty")
    if len(clients) != len(datas):
        raise ValueError(f"got {len(clients)} clients but {len(datas)} client data sets")
    for i, c in enumerate(clients):
        if not (hasattr(c, "shared_state") and hasattr(c, "load_shared_state")):
            raise TypeError(f"clients[{i}] ({type(c).__name__}) has no shared_state()/load_shared_state()")


def fedavg_round(clients: Sequence[nn.Module], global_state: Mapping[str, torch.Tensor],
                 datas: Sequence[ClientData], *, epochs: int = 1, generator: torch.Generator | None = None,
                 **train_kw) -> dict[str, torch.Tensor]:
    """One FedAvg round: every client loads the global state, trains locally; data-size-weighted average.

    ``clients`` may repeat one object (FedAvg clients hold no private state between rounds).
    """
    _check_round(clients, datas)
    states = []
    for c, d in zip(clients, datas):
        c.load_shared_state(global_state)
        local_train_fedavg(c, d, epochs, generator=generator, **train_kw)
        states.append(c.shared_state())
    return weighted_average(states, [d.n_train for d in datas])


def dp_fedavg_round(clients: Sequence[nn.Module], global_state: Mapping[str, torch.Tensor],
                    datas: Sequence[ClientData], *, epochs: int = 1, clip: float = 1.0, sigma: float = 1.0,
                    generator: torch.Generator | None = None, **train_kw) -> dict[str, torch.Tensor]:
    """One DP-FedAvg round: each client's update is clipped to ``clip`` and noised (std ``sigma*clip``)
    before it leaves the client; the server adds the data-size-weighted mean of the noisy updates."""
    _check_round(clients, datas)
    deltas = []
    for c, d in zip(clients, datas):
        c.load_shared_state(global_state)
        local_train_fedavg(c, d, epochs, generator=generator, **train_kw)
        new = c.shared_state()
        delta = {k: (new[k] - global_state[k]) if new[k].is_floating_point() else new[k] for k in new}
        deltas.append(clip_and_noise(delta, clip, sigma, generator=generator))
    mean = weighted_average(deltas, [d.n_train for d in datas])
    return {k: (global_state[k] + v) if v.is_floating_point() else v for k, v in mean.items()}


def hyperfl_round(clients: Sequence[HyperClient], global_phi: Mapping[str, torch.Tensor],
                  datas: Sequence[ClientData], *, epochs: int = 5, head_epochs: int = 1,
                  generator: torch.Generator | None = None, **train_kw) -> dict[str, torch.Tensor]:
    """One HyperFL round: clients load ``phi``, run :func:`local_train_hyperfl`; data-size-weighted mean of ``phi``.

    Each client keeps its own embedding and head across rounds, so ``clients`` must be distinct objects.
    """
    _check_round(clients, datas)
    if len({id(c) for c in clients}) != len(clients):
        raise ValueError("HyperFL clients must be distinct objects (each keeps a private embedding and head)")
    states = []
    for c, d in zip(clients, datas):
        c.load_shared_state(global_phi)
        local_train_hyperfl(c, d, epochs, head_epochs, generator=generator, **train_kw)
        states.append(c.shared_state())
    return weighted_average(states, [d.n_train for d in datas])


def client_accuracies(clients: Sequence[nn.Module], datas: Sequence[ClientData]) -> list[float]:
    """Each client's model on its own test split (percent); one shared model may be repeated."""
    if len(clients) != len(datas):
        raise ValueError(f"got {len(clients)} clients but {len(datas)} client data sets")
    return [accuracy(c, d.x_test, d.y_test) if len(d.y_test) else math.nan for c, d in zip(clients, datas)]
