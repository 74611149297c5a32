"""Server-side attacks on HyperFL's shared hypernetwork gradient (paper slug: hyperfl).

Threat model (the paper's): an honest-but-curious server knows the architecture and the
hypernetwork ``phi`` and receives ``dL/dphi`` (one local step) or ``Delta phi`` (after local training);
it does NOT know the client's embedding ``v`` nor its head ``psi``. Every hypernetwork output head is an
``nn.Linear`` with bias, ``theta_k = W_k e + b_k`` with ``e = ReLU(A v + a)``, hence

    dL/db_k = dL/dtheta_k            dL/dW_k = (dL/dtheta_k) e^T                        (exact)

Attacks run on the same victims:

* A0 (:func:`hyperfl_readout`): analytic. For a generated fully connected first layer ``z = W1 x + b1``
  at batch 1, ``dL/dW1 = (dL/db1) x^T``, so ``x = (dL/dW1)^T (dL/db1) / ||dL/db1||^2``
  (:func:`linear_readout`; for a batch it returns a loss-weighted mixture of the inputs).
* A1: Inverting Gradients on ``dL/dphi`` with the unknown ``v`` and ``psi`` optimised jointly with ``x``
  (:class:`HiddenClientSpace` as an extra search space of :class:`~gradkit.privacy.GradientInversion`).
* A2: the paper-style attack: the same matching with a *guessed* ``v`` and ``psi`` held fixed.

All iterative attacks use the frozen ``"hyperfl"`` preset (Inverting Gradients' settings, 400 steps).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from .._validate import positive_int
from ..nn.hypernetwork import HyperClient, HyperNetwork, load_state_strict
from .inversion import (PRESETS, GradientInversion, InversionPreset, InversionResult, PixelSpace, SearchSpace,
                        register_preset)

__all__ = ["HYPERFL_PRESET", "linear_readout", "hyperfl_readout", "first_linear", "HiddenClientSpace",
           "HyperFLServerView", "hyperfl_inversion", "shared_gradients"]

# Inverting Gradients' settings (cosine over every shared tensor, TV 1e-4, signed Adam lr 0.1, x0.1 steps at
# 3/8, 5/8, 7/8), 400 iterations; used alike by IG on FedAvg, A1 and A2.
HYPERFL_PRESET = register_preset(dataclasses.replace(PRESETS.get("ig"), name="hyperfl", iters=400,
                                                     model_mode="eval"))


def linear_readout(grad_weight: Tensor, grad_bias: Tensor) -> Tensor:
    """Input of a linear layer ``z = W x + b`` from its batch-1 gradients (paper slug: hyperfl, attack A0).

    ``dL/dW = (dL/db) x^T``  =>  ``x = (dL/dW)^T (dL/db) / ||dL/db||^2`` (least squares over all rows).

    Example::

        lin = nn.Linear(4, 3); x = torch.rand(1, 4)
        gw, gb = torch.autograd.grad(lin(x).square().sum(), [lin.weight, lin.bias])
        torch.allclose(linear_readout(gw, gb), x[0])        # True
    """
    if not isinstance(grad_weight, Tensor) or not isinstance(grad_bias, Tensor):
        raise TypeError("grad_weight and grad_bias must be tensors")
    if grad_weight.dim() != 2 or grad_bias.dim() != 1 or grad_weight.shape[0] != grad_bias.shape[0]:
        raise ValueError(f"grad_weight must be (out, in) and grad_bias (out,), got {tuple(grad_weight.shape)} and "
                         f"{tuple(grad_bias.shape)}")
    gb = grad_bias.detach()
    den = (gb * gb).sum()
    if not torch.isfinite(den) or den <= 0:
        raise ValueError("grad_bias is zero or non-finite: the input cannot be read out")
    return grad_weight.detach().t().mv(gb) / den


def first_linear(hypernet: HyperNetwork) -> tuple[str, str]:
    """Names of the first generated 2-D weight and its bias (``"<prefix>weight"``, ``"<prefix>bias"``)."""
    for n, s in zip(hypernet.names, hypernet.shapes):
        if n.endswith("weight") and len(s) == 2:
            b = n[: -len("weight")] + "bias"
            if b in hypernet.names:
                return n, b
    raise ValueError("the hypernetwork generates no fully connected layer with a bias (2-D weight + bias)")


def _as_named(grad_phi: Mapping[str, Tensor] | Sequence[Tensor], hypernet: HyperNetwork) -> dict[str, Tensor]:
    names = [n for n, _ in hypernet.named_parameters()]
    if isinstance(grad_phi, Mapping):
        out = {(k[len("hypernet."):] if k.startswith("hypernet.") else k): v for k, v in grad_phi.items()}
        missing = [n for n in names if n not in out]
        if missing:
            raise KeyError(f"grad_phi lacks hypernetwork tensors {missing[:4]} (keys as in HyperClient.shared_state())")
        return out
    grads = list(grad_phi)
    if len(grads) != len(names):
        raise ValueError(f"grad_phi must hold one tensor per hypernetwork parameter ({len(names)}), got {len(grads)}")
    return dict(zip(names, grads))


def hyperfl_readout(grad_phi: Mapping[str, Tensor] | Sequence[Tensor], hypernet: HyperNetwork,
                    weight: str | None = None, bias: str | None = None) -> Tensor:
    """Attack A0: read the victim's input out of the shared hypernetwork gradient (paper slug: hyperfl).

    The bias of the head generating ``theta_k`` has gradient ``dL/dtheta_k``; applied to the generated
    first linear layer (``weight``/``bias``, default :func:`first_linear`) this gives
    ``x = (dL/dW1)^T (dL/db1) / ||dL/db1||^2`` without knowing ``v``, ``psi`` or ``theta``.
    ``grad_phi``: ``{name: grad}`` keyed like ``HyperClient.shared_state()`` (or ``hypernet`` names),
    or a list in ``hypernet.parameters()`` order; an update ``Delta phi`` works alike (multi-step setting).

    Example::

        g = torch.autograd.grad(F.cross_entropy(client(x), y), client.shared_parameters())
        x_hat = hyperfl_readout(g, client.hypernet)          # == x.flatten() at batch 1
    """
    if not isinstance(hypernet, HyperNetwork):
        raise TypeError(f"hypernet must be a HyperNetwork, got {type(hypernet).__name__}")
    if weight is None and bias is None:
        weight, bias = first_linear(hypernet)
    elif weight is None or bias is None:
        raise ValueError("give both weight and bias names, or neither")
    named = _as_named(grad_phi, hypernet)
    i_w, i_b = hypernet.names.index(weight) if weight in hypernet.names else -1, \
        hypernet.names.index(bias) if bias in hypernet.names else -1
    if i_w < 0 or i_b < 0:
        raise KeyError(f"{weight!r}/{bias!r} are not generated tensors; generated: {list(hypernet.names)}")
    g_w = named[f"heads.{i_w}.bias"].reshape(hypernet.shapes[i_w])
    g_b = named[f"heads.{i_b}.bias"].reshape(hypernet.shapes[i_b])
    return linear_readout(g_w, g_b)


def shared_gradients(client: HyperClient, x: Tensor, y: Tensor) -> list[Tensor]:
    """What one local step shares: ``dL/dphi`` of the mean cross-entropy on ``(x, y)`` (detached)."""
    loss = F.cross_entropy(client(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, client.shared_parameters())]


class HiddenClientSpace(SearchSpace):
    """The client's private unknowns, embedding ``v`` and linear head ``psi = (W, b)`` (paper slug: hyperfl).

    Drawn from the architecture's own initialisation (``v ~ N(0, 1)`` as ``nn.Embedding``,
    ``W, b ~ U(-1/sqrt(in), 1/sqrt(in))`` as ``nn.Linear``). ``optimise=True`` (attack A1) exposes them
    to the optimiser; ``optimise=False`` (attack A2) keeps the guesses fixed.

    Example::

        space = HiddenClientSpace(16, (10, 32), generator=torch.Generator().manual_seed(0))
        view = HyperFLServerView(client, phi_state, space)
    """

    def __init__(self, embed_dim: int, head_shape: tuple[int, int], *, optimise: bool = True,
                 generator: torch.Generator | None = None, device=None, dtype=None) -> None:
        positive_int("embed_dim", embed_dim)
        if len(head_shape) != 2 or min(head_shape) < 1:
            raise ValueError(f"head_shape must be (classes, features), got {head_shape!r}")
        out_f, in_f = (int(s) for s in head_shape)
        dtype = dtype or torch.get_default_dtype()
        bound = 1.0 / math.sqrt(in_f)
        self.optimise = bool(optimise)
        self.v = torch.randn(embed_dim, generator=generator, dtype=dtype).to(device)
        self.weight = ((torch.rand(out_f, in_f, generator=generator, dtype=dtype) * 2 - 1) * bound).to(device)
        self.bias = ((torch.rand(out_f, generator=generator, dtype=dtype) * 2 - 1) * bound).to(device)
        for t in (self.v, self.weight, self.bias):
            t.requires_grad_(self.optimise)

    def parameters(self) -> list[Tensor]:
        return [self.v, self.weight, self.bias] if self.optimise else []

    def render(self) -> Tensor:  # unused: these unknowns enter through the model
        return self.v

    def snapshot(self) -> dict[str, Tensor]:
        return {"v": self.v.detach().clone(), "weight": self.weight.detach().clone(),
                "bias": self.bias.detach().clone()}


class HyperFLServerView(nn.Module):
    """The server's model of a HyperFL client: known ``phi`` and architecture, ``v``/``psi`` from a space.

    ``forward(x) = F.linear(f(x; h(space.v; phi)), space.weight, space.bias)``. Only the client's
    architecture is copied: its embedding and head are dropped, so the view cannot read them.
    Its parameters are exactly ``phi`` (in ``client.shared_parameters()`` order).
    """

    def __init__(self, client: HyperClient, phi: Mapping[str, Tensor], space: HiddenClientSpace) -> None:
        super().__init__()
        if not isinstance(client, HyperClient):
            raise TypeError(f"client must be a HyperClient, got {type(client).__name__}")
        if not isinstance(client.head, nn.Linear):
            raise TypeError(f"the attack models a linear head, got {type(client.head).__name__}")
        if not isinstance(space, HiddenClientSpace):
            raise TypeError(f"space must be a HiddenClientSpace, got {type(space).__name__}")
        self.hypernet = copy.deepcopy(client.hypernet)
        self.target = copy.deepcopy(client.target)
        ref = {f"hypernet.{k}": v for k, v in self.hypernet.state_dict().items()}
        load_state_strict(self, phi, ref)
        if any(True for _ in self.target.parameters()):  # non-generated target tensors would be unknowns too
            raise ValueError("the server view supports targets whose parameters are all generated")
        self.space = space

    def forward(self, x: Tensor) -> Tensor:
        theta = self.hypernet(self.space.v)
        return F.linear(functional_call(self.target, theta, (x,)), self.space.weight, self.space.bias)


def hyperfl_inversion(client: HyperClient, phi: Mapping[str, Tensor], target_grads: Sequence[Tensor],
                      labels: Tensor, shape: Sequence[int], *, joint: bool = True,
                      preset: str | InversionPreset = "hyperfl", generator: torch.Generator | None = None,
                      init: str | Tensor = "rand") -> InversionResult:
    """Attack A1 (``joint=True``: x, v, psi optimised together) or A2 (``joint=False``: guessed v, psi fixed).

    ``client`` supplies the architecture only; ``phi`` is the server's copy of the hypernetwork;
    ``target_grads`` is ``dL/dphi`` in ``client.shared_parameters()`` order; ``shape`` the victim batch
    shape (e.g. ``(1, 1, 8, 8)``); labels are given to the attacker as in Inverting Gradients.
    """
    head = client.head
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the attack models a linear head, got {type(head).__name__}")
    p0 = next(client.hypernet.parameters())
    space = HiddenClientSpace(client.hypernet.embed_dim, tuple(head.weight.shape), optimise=joint,
                              generator=generator, device=p0.device, dtype=p0.dtype)
    view = HyperFLServerView(client, phi, space)
    if isinstance(init, str) and init in ("rand", "randn"):  # drawn on the CPU generator, then moved
        draw = torch.rand if init == "rand" else torch.randn
        init = draw(tuple(int(s) for s in shape), generator=generator, dtype=p0.dtype).to(p0.device)
    pixels = PixelSpace(shape, init=init, clamp=(0.0, 1.0), generator=generator, device=p0.device, dtype=p0.dtype)
    attack = GradientInversion(view, preset=preset, params=list(view.hypernet.parameters()))
    return attack.run(target_grads, labels, pixels, extra=(space,) if joint else ())
