"""Add i.i.d. Gaussian noise to parameter gradients in place (gradient-noise, arXiv 1511.06807)."""
from __future__ import annotations

from typing import Iterable

import torch
from .._validate import optional_generator, real_scalar, tensor_list

__all__ = ["add_gradient_noise", "dense_grads"]


def _noise_like(g: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``g`` in ``g``'s dtype, on ``g``'s device.

    With a generator on another device (e.g. a CPU generator for CUDA gradients) the noise is
    drawn on the generator's device and copied over: reproducible across devices, but slower.
    """
    if generator is None or generator.device.type == g.device.type:
        return torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device)
    n = torch.randn(g.shape, generator=generator, dtype=g.dtype, device=generator.device)
    return n.to(g.device, non_blocking=True)


def dense_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients to edit in place: ``.grad`` of each param that has one; sparse/non-float ones raise."""
    grads = []
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(
                f"params[{i}] has a {g.layout} gradient; gradient noise supports dense (strided) "
                "gradients only (use sparse=False in embeddings)"
            )
        if not g.is_floating_point():
            raise ValueError(f"params[{i}] has a {g.dtype} gradient; expected a floating-point dtype")
        grads.append(g)
    return grads


@torch.no_grad()
def add_gradient_noise(
    params: torch.Tensor | Iterable[torch.Tensor],
    std: float,
    generator: torch.Generator | None = None,
) -> None:
    """Add ``N(0, std^2)`` noise, i.i.d. per entry, to every ``p.grad`` in place.

    Paper: gradient-noise (Neelakantan et al., 2015): ``g <- g + N(0, sigma_t^2 I)``, one ``std``
    for all parameters; pair with :func:`gradkit.schedules.annealed_noise_std` for
    ``sigma_t = sqrt(eta / (1 + t)^gamma)``. Parameters whose ``grad`` is None are skipped;
    noise is drawn in each gradient's dtype and on its device (with a generator on another
    device it is drawn there and copied). ``std == 0`` draws nothing and changes nothing.
    Sparse gradients raise ``ValueError``. A tensor listed twice is noised once.

    Example::

        loss.backward()
        add_gradient_noise(model.parameters(), std=annealed_noise_std(t, eta=0.01))
        optimizer.step()
    """
    plist = tensor_list(params)
    s = real_scalar("std", std, nonneg=True, tensor_ok=False)
    optional_generator(generator)
    grads = dense_grads(plist)
    if s == 0.0:
        return
    for g in grads:
        g.add_(_noise_like(g, generator), alpha=s)

