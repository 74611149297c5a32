"""Hypernetworks that generate a target module's weights from a private embedding (paper slug: hyperfl).

HyperFL (Guo et al., AAAI 2025, arXiv:2412.07187) breaks the direct link between shared parameters and
private data: a client's feature-extractor weights are *generated*, ``theta = h(v; phi)``, from a private
client embedding ``v``; the head ``psi`` and ``v`` stay on the client, only the hypernetwork ``phi`` is
shared. As in the official CNN code, every generated tensor has its own ``nn.Linear`` output head WITH
bias::

    e = ReLU(A v + a)                 (hidden units)
    theta_k = W_k e + b_k             (reshaped to the k-th target tensor's shape)

so ``dL/db_k = dL/dtheta_k`` and ``dL/dW_k = (dL/dtheta_k) e^T`` (rank one): a single-step gradient of
``phi`` reveals the gradient of every generated weight (see ``gradkit.privacy.hyperfl_attacks``).
The target runs through ``torch.func.functional_call`` with the generated tensors, so autograd routes
``dL/dphi = (dtheta/dphi)^T dL/dtheta`` and ``dL/dv`` by ordinary backprop.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from .._validate import positive_int

__all__ = ["HyperNetwork", "HyperClient"]


class HyperNetwork(nn.Module):
    """Generate the parameters of ``target`` from an embedding ``v`` (paper slug: hyperfl).

    ``e = ReLU(A v + a)``; ``theta_k = W_k e + b_k`` reshaped to the shape of the k-th generated
    tensor of ``target`` (its ``named_parameters()`` for which ``include(name)`` is true, default all).
    ``forward(v)`` returns ``{name: tensor}`` ready for ``torch.func.functional_call(target, ...)``.

    Example::

        hn = HyperNetwork(nn.Linear(4, 3), embed_dim=8, hidden=16)
        w = hn(torch.randn(8))           # {'weight': (3, 4), 'bias': (3,)}
        y = torch.func.functional_call(nn.Linear(4, 3), w, (torch.randn(2, 4),))
    """

    def __init__(self, target: nn.Module, embed_dim: int = 64, hidden: int = 128,
                 include: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        if not isinstance(target, nn.Module):
            raise TypeError(f"target must be an nn.Module, got {type(target).__name__}")
        self.embed_dim = positive_int("embed_dim", embed_dim)
        self.hidden = positive_int("hidden", hidden)
        if include is not None and not callable(include):
            raise TypeError(f"include must be a callable name -> bool or None, got {type(include).__name__}")
        named = [(n, p) for n, p in target.named_parameters() if include is None or include(n)]
        if not named:
            raise ValueError("target has no parameters to generate (include selected none)")
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for _, p in named)
        p0 = named[0][1]
        kw = {"device": p0.device, "dtype": p0.dtype}
        self.body = nn.Linear(self.embed_dim, self.hidden, **kw)
        self.heads = nn.ModuleList(nn.Linear(self.hidden, p.numel(), **kw) for _, p in named)

    def extra_repr(self) -> str:
        n = sum(s.numel() for s in self.shapes)
        return f"embed_dim={self.embed_dim}, hidden={self.hidden}, generates {len(self.names)} tensors ({n} values)"

    def head_for(self, name: str) -> nn.Linear:
        """The output head (``nn.Linear`` with bias) that generates target tensor ``name``."""
        try:
            return self.heads[self.names.index(name)]
        except ValueError:
            raise KeyError(f"{name!r} is not generated; generated tensors: {list(self.names)}") from None

    def features(self, v: torch.Tensor) -> torch.Tensor:
        """The hidden code ``e = ReLU(A v + a)`` of one embedding (shape ``(hidden,)``)."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a tensor, got {type(v).__name__}")
        if v.numel() != self.embed_dim:
            raise ValueError(f"v must hold one embedding of {self.embed_dim} values, got shape {tuple(v.shape)}")
        return torch.relu(self.body(v.reshape(self.embed_dim)))

    def forward(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self.features(v)
        return {n: head(e).view(shape) for n, head, shape in zip(self.names, self.heads, self.shapes)}


class HyperClient(nn.Module):
    """A HyperFL client: generated feature extractor + private head + private embedding (paper slug: hyperfl).

    ``forward(x) = head(f(x; h(v; phi)))`` with ``f`` run by ``functional_call``. Only the hypernetwork
    ``phi`` is shared (:meth:`shared_state`); ``v`` (``nn.Embedding(1, embed_dim)``) and the head
    ``psi`` stay local. The generated tensors are removed from the client's copy of ``target`` (kept
    as empty non-persistent placeholders), so they are neither parameters nor state.

    Example::

        c = HyperClient(nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10), embed_dim=16, hidden=64)
        logits = c(torch.randn(5, 64))                     # (5, 10)
        phi = c.shared_state()                              # {'hypernet.body.weight': ..., ...}
    """

    def __init__(self, target: nn.Module, head: nn.Module, embed_dim: int = 64, hidden: int = 128,
                 include: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
        self.hypernet = HyperNetwork(target, embed_dim, hidden, include)
        target = copy.deepcopy(target)
        for name in self.hypernet.names:
            mod_name, _, leaf = name.rpartition(".")
            mod = target.get_submodule(mod_name) if mod_name else target
            ref = mod._parameters.pop(leaf)
            mod.register_buffer(leaf, torch.empty(0, device=ref.device, dtype=ref.dtype), persistent=False)
        self.target = target
        self.head = head
        self.embedding = nn.Embedding(1, self.hypernet.embed_dim)
        p0 = next(self.hypernet.parameters())
        self.embedding.to(device=p0.device, dtype=p0.dtype)

    # ------------------------------------------------------------------------------------ forward
    def generated_weights(self) -> dict[str, torch.Tensor]:
        """``theta = h(v; phi)`` for this client's embedding."""
        return self.hypernet(self.embedding.weight[0])

    def features(self, x: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``f(x; theta)``; pass precomputed ``weights`` to reuse (or freeze) one generation."""
        return functional_call(self.target, dict(self.generated_weights() if weights is None else weights), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # ------------------------------------------------------------------------------------ sharing
    def shared_parameters(self) -> list[nn.Parameter]:
        """``phi``: the parameters that go on the wire."""
        return list(self.hypernet.parameters())

    def private_parameters(self) -> list[nn.Parameter]:
        """``v``, ``psi`` and any target parameter that is not generated."""
        shared = {id(p) for p in self.hypernet.parameters()}
        return [p for p in self.parameters() if id(p) not in shared]

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of ``phi`` keyed ``hypernet.<name>`` (what the server receives)."""
        return {f"hypernet.{k}": v.detach().clone() for k, v in self.hypernet.state_dict().items()}

    def load_shared_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a (global) ``phi`` into this client; keys and shapes must match :meth:`shared_state`."""
        load_state_strict(self, state, {f"hypernet.{k}": v for k, v in self.hypernet.state_dict().items()})


def load_state_strict(owner: nn.Module, state: Mapping[str, torch.Tensor],
                      targets: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the tensors ``targets`` (same keys, same shapes), without autograd."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping name -> tensor, got {type(state).__name__}")
    missing = sorted(set(targets) - set(state))
    extra = sorted(set(state) - set(targets))
    if missing or extra:
        raise KeyError(f"{type(owner).__name__}: state keys do not match the shared state "
                       f"(missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for k, dst in targets.items():
            src = state[k]
            if not isinstance(src, torch.Tensor):
                src = torch.as_tensor(src)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"state[{k!r}] has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src)
