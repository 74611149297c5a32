"""What a gradkit Flower client trains: its model, its data shard and its local update.

Paper slug: hyperfl (the Flower path). The models and the local training are those of the in-process
simulator (:mod:`gradkit.distributed.federated`): every client model exposes ``shared_state()`` (what
goes on the wire: the whole state for FedAvg, the hypernetwork ``phi`` only for HyperFL) and
``load_shared_state(state)``; what is not shared (HyperFL's embedding ``v`` and head ``psi``) stays on
the client. The data are scikit-learn's 8x8 digits scaled to [0, 1] (images, so that an
honest-but-curious server's reconstructions can be scored), split IID into ``num_partitions`` shards,
each 80/20 train/test.

Example::

    model = make_model("fedavg", seed=0)
    data = load_partition(0, 2)
    local_train(model, data, epochs=1, lr=0.1)
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..._validate import choice, integer, positive_int
from ...data import digits_images
from ...engine import accuracy, mean_loss, seed_everything
from ...nn.hypernetwork import HyperClient
from ..federated import ClientData, FedAvgClient, local_train_fedavg, local_train_hyperfl

__all__ = ["METHODS", "IMAGE_SHAPE", "make_model", "load_partition", "local_train", "evaluate_model",
           "private_state", "load_private_state", "max_shard"]

METHODS = ("fedavg", "hyperfl")
IMAGE_SHAPE = (1, 8, 8)


def make_model(method: str = "fedavg", *, seed: int = 0, hidden: int = 32, embed_dim: int = 16,
               hyper_hidden: int = 64) -> nn.Module:
    """A freshly initialised client model for ``method`` (``"fedavg"`` or ``"hyperfl"``), seeded.

    Every client and the server build the same initial shared state from the same ``seed``.
    FedAvg: ``FedAvgClient(Flatten -> Linear(64, hidden) -> ReLU -> Linear(hidden, 10))`` (shares all).
    HyperFL: ``HyperClient`` with a generated ``Flatten -> Linear(64, hidden) -> ReLU`` extractor, a private
    ``Linear(hidden, 10)`` head and a private embedding of ``embed_dim`` values (shares ``phi`` only).
    """
    choice("method", method, METHODS)
    positive_int("hidden", hidden)
    seed_everything(seed)
    body = [nn.Flatten(), nn.Linear(64, hidden), nn.ReLU()]
    if method == "fedavg":
        return FedAvgClient(nn.Sequential(*body, nn.Linear(hidden, 10)))
    return HyperClient(nn.Sequential(*body), nn.Linear(hidden, 10), embed_dim=embed_dim, hidden=hyper_hidden)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (N, 1, 8, 8) float32 in [0, 1] and int64 labels (disk-cached: client processes skip sklearn)."""
    x, y = digits_images()
    return x.numpy(), y.numpy()


def load_partition(partition_id: int, num_partitions: int, *, seed: int = 0, test_fraction: float = 0.2
                   ) -> ClientData:
    """Client ``partition_id``'s shard of the digits (IID, seeded) as a ``ClientData`` train/test split.

    Images are ``(N, 1, 8, 8)`` float32 in [0, 1]; shards are disjoint and cover the data set.
    """
    num_partitions = positive_int("num_partitions", num_partitions)
    partition_id = integer("partition_id", partition_id, low=0, high=num_partitions - 1)
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = _digits()
    perm = np.random.RandomState(seed).permutation(len(y))
    idx = np.array_split(perm, num_partitions)[partition_id]
    n_test = max(1, int(round(len(idx) * float(test_fraction))))
    te, tr = idx[:n_test], idx[n_test:]
    t = torch.from_numpy
    return ClientData(t(x[tr]), t(y[tr]), t(x[te]), t(y[te]))


def max_shard(num_partitions: int, seed: int = 0, test_fraction: float = 0.2) -> int:
    """The most training examples any of ``num_partitions`` digits shards holds (the server's weight cap)."""
    num_partitions = positive_int("num_partitions", num_partitions)
    return max(len(load_partition(i, num_partitions, seed=seed, test_fraction=test_fraction).y_train)
               for i in range(num_partitions))


def private_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of ``model.state_dict()`` that is not shared (HyperFL's ``v`` and ``psi``; empty for FedAvg)."""
    if isinstance(model, HyperClient):
        shared = {f"hypernet.{k}" for k in model.hypernet.state_dict()}
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in shared}
    return {}


def load_private_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`private_state` saved (the shared part is left as it is)."""
    expected = private_state(model)
    if set(state) != set(expected):
        raise KeyError(f"private state keys {sorted(state)} do not match the model's {sorted(expected)}")
    if state:
        model.load_state_dict(dict(state), strict=False)


def local_train(model: nn.Module, data: ClientData, *, epochs: int = 1, lr: float = 0.1, batch_size: int = 32,
                seed: int = 0, momentum: float = 0.5, weight_decay: float = 5e-4, head_epochs: int = 1,
                head_lr: float = 0.1) -> float:
    """One client's local update (:mod:`gradkit.distributed.federated`); returns the last training loss.

    FedAvg: ``epochs`` of SGD on every parameter (``local_train_fedavg``). HyperFL: ``head_epochs`` on the
    private head with the generated weights frozen, then ``epochs`` on ``phi`` and ``v`` through
    ``theta = h(v; phi)`` with norm clipping (``local_train_hyperfl``, the official two-step update).
    """
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(model, HyperClient):
        return local_train_hyperfl(model, data, epochs, head_epochs, lr=lr, head_lr=head_lr, momentum=momentum,
                                   weight_decay=weight_decay, batch_size=batch_size, generator=gen)
    return local_train_fedavg(model, data, epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                              batch_size=batch_size, generator=gen)


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"accuracy": percent, "loss": mean cross-entropy}`` of ``model`` on ``(x, y)``."""
    return {"accuracy": accuracy(model, x, y), "loss": mean_loss(model, x, y)}
