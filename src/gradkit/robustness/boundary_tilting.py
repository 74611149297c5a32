"""Linear geometry of adversarial examples: nearest-centroid direction, deviation angle, boundary distance,
minimal adversarial examples, mirror images, boundary tilting (paper slug: boundary-tilting).

For a binary linear classifier C: x -> sign(w.x + b) and two classes I (label 0) and J (label 1):

    nearest centroid (NC):  z = mu_J - mu_I,  b_z = -z.(mu_I + mu_J) / 2
    deviation angle:        theta = arccos( w.z / (||w|| ||z||) )
    boundary distance:      d_C(x) = |w.x + b| / ||w||          (the minimal l2 adversarial perturbation)
    minimal adversarial:    x - (1 + overshoot) (w.x + b) / ||w||^2 * w
    mirror image:           x_m = x - 2 (w.x + b) / ||w||^2 * w
    tilt:                   w(phi) = ||w|| (cos(phi) w_hat + sin(phi) u_perp),  u_perp = unit part of u orthogonal to w
    adversarial strength:   S = E[d_NC(x)] / E[d_C(x)]   (correctly classified points; = 1/cos(theta) when the
                            two boundaries cross the centroid segment at one point and the data vary only
                            along z and directions orthogonal to both z and w)

Tilting w towards a direction u in which the data have no variance changes no prediction, but every
distance to the boundary shrinks by cos(phi): adversarial examples of arbitrary strength at constant
accuracy. Deep models are analysed through their local linearisation (:func:`local_linearisation`):
w(x) = grad_x (f_j - f_i)(x), b(x) = (f_j - f_i)(x) - w(x).x, one (w, b) per input.

Every function takes ``w`` of shape (d,) (one classifier) or (N, d) (one per row of X), and works in the
dtype and on the device of its inputs.

>>> z, bz = nearest_centroid_direction(X, y)                        # y in {0, 1}
>>> theta = deviation_angle(w, z)                                   # radians; 0 for NC itself
>>> d = boundary_distance(X, w, b); xm = mirror_images(X, w, b)     # sign(w.xm + b) = -sign(w.x + b)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .._validate import boolean, real_scalar, tensor

# ------------------------------------------------------------------------------------ checks


def _matrix(name: str, X) -> Tensor:
    X = tensor(name, X, floating=True, finite=True)
    if X.dim() != 2 or X.shape[0] < 1:
        raise ValueError(f"{name} must be a (N, d) matrix with N >= 1, got shape {tuple(X.shape)}")
    return X


def _weights(w, d: int | None = None, n: int | None = None, name: str = "w") -> Tensor:
    w = tensor(name, w, floating=True, finite=True)
    if w.dim() not in (1, 2) or (d is not None and w.shape[-1] != d) or (w.dim() == 2 and n is not None
                                                                          and w.shape[0] != n):
        want = f"(d,) or (N, d) with d = {d}" if d is not None else "(d,) or (N, d)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(w.shape)}")
    if bool((w.norm(dim=-1) == 0).any()):
        raise ValueError(f"{name} must be non-zero (a zero weight vector has no boundary)")
    return w


def _bias(b, w: Tensor) -> Tensor:
    if isinstance(b, Tensor):
        b = tensor("b", b, floating=True, finite=True)
        if b.numel() == 1:
            return b.reshape(()).to(w.dtype)
        if w.dim() == 2 and b.shape == (w.shape[0],):
            return b.to(w.dtype)
        raise ValueError(f"b must be a scalar or shaped ({w.shape[0] if w.dim() == 2 else 1},), got {tuple(b.shape)}")
    return torch.tensor(real_scalar("b", b), dtype=w.dtype, device=w.device)


def _binary_labels(y, n: int) -> Tensor:
    y = tensor("y", y)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},), one label per row of X, got {tuple(y.shape)}")
    vals = set(torch.unique(y).tolist())
    if not vals <= {0, 1} or len(vals) < 2:
        raise ValueError(f"y must hold both binary labels 0 and 1 (and nothing else), got values {sorted(vals)}")
    return y


# ------------------------------------------------------------------------------------ geometry


def margin(X: Tensor, w: Tensor, b) -> Tensor:
    """Signed score w.x + b per row of X (w: (d,) or one row per input), shape (N,).

    >>> margin(torch.eye(2), torch.tensor([1.0, 0.0]), 0.5)
    tensor([1.5000, 0.5000])
    """
    X = _matrix("X", X)
    w = _weights(w, X.shape[1], X.shape[0])
    return (X * w).sum(-1) + _bias(b, w)


def nearest_centroid_direction(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest-centroid classifier (z, b_z): z = mu_1 - mu_0, b_z = -z.(mu_0 + mu_1)/2 (boundary-tilting).

    >>> z, bz = nearest_centroid_direction(torch.tensor([[0.0, 0], [2.0, 0]]), torch.tensor([0, 1]))
    >>> z.tolist(), float(bz)
    ([2.0, 0.0], -2.0)
    """
    X = _matrix("X", X)
    y = _binary_labels(y, X.shape[0]).to(X.device)
    mu0, mu1 = X[y == 0].mean(0), X[y == 1].mean(0)
    z = mu1 - mu0
    if float(z.norm()) == 0.0:
        raise ValueError("X has equal class centroids: the nearest-centroid direction is undefined")
    return z, -(z * (mu0 + mu1)).sum() / 2


def deviation_angle(w: Tensor, z: Tensor) -> Tensor:
    """theta = arccos(w.z / (||w|| ||z||)) in radians, in [0, pi] (per row when w is (N, d)) (boundary-tilting).

    Invariant to positive scaling of w and z; 0 for the nearest-centroid classifier itself.

    >>> float(deviation_angle(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))) * 180 / math.pi  # doctest: +ELLIPSIS
    45.0...
    """
    z = _weights(z, name="z")
    if z.dim() != 1:
        raise ValueError(f"z must have shape (d,), got {tuple(z.shape)}")
    w = _weights(w, z.shape[0])
    cos = (w * z).sum(-1) / (w.norm(dim=-1) * z.norm())
    return torch.arccos(cos.clamp(-1.0, 1.0))


def boundary_distance(X: Tensor, w: Tensor, b) -> Tensor:
    """d_C(x) = |w.x + b| / ||w||: l2 distance of each row of X to the hyperplane w.x + b = 0, shape (N,).

    It is the size of the minimal l2 adversarial perturbation of a linear classifier (boundary-tilting).

    >>> boundary_distance(torch.tensor([[3.0, 4.0]]), torch.tensor([0.0, 2.0]), -2.0)
    tensor([3.])
    """
    X = _matrix("X", X)
    w = _weights(w, X.shape[1], X.shape[0])
    return ((X * w).sum(-1) + _bias(b, w)).abs() / w.norm(dim=-1)


def _reflect(X: Tensor, w: Tensor, b, factor: float) -> Tensor:
    X = _matrix("X", X)
    w = _weights(w, X.shape[1], X.shape[0])
    s = ((X * w).sum(-1) + _bias(b, w)) / (w * w).sum(-1)
    return X - factor * s[:, None] * (w if w.dim() == 2 else w[None])


def minimal_adversarial(X: Tensor, w: Tensor, b, overshoot: float = 0.0) -> Tensor:
    """x - (1 + overshoot) (w.x + b)/||w||^2 w: the closest point on (overshoot = 0) or just past the boundary.

    >>> minimal_adversarial(torch.tensor([[3.0, 4.0]]), torch.tensor([0.0, 1.0]), -1.0)
    tensor([[3., 1.]])
    """
    overshoot = real_scalar("overshoot", overshoot, nonneg=True)
    return _reflect(X, w, b, 1.0 + overshoot)


def mirror_images(X: Tensor, w: Tensor, b) -> Tensor:
    """x_m = x - 2 (w.x + b)/||w||^2 w: x reflected through the boundary (same distance, other side).

    >>> mirror_images(torch.tensor([[3.0, 4.0]]), torch.tensor([0.0, 1.0]), -1.0)
    tensor([[ 3., -2.]])
    """
    return _reflect(X, w, b, 2.0)


def tilt(w: Tensor, u: Tensor, phi: float) -> Tensor:
    """w(phi) = ||w|| (cos(phi) w_hat + sin(phi) u_perp): w rotated by phi (radians) towards u (boundary-tilting).

    u_perp is the unit component of u orthogonal to w, so deviation_angle(tilt(w, u, phi), w) = phi and
    ||tilt(w, u, phi)|| = ||w||.

    >>> tilt(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), math.pi / 2)
    tensor([0., 2.])
    """
    w = _weights(w)
    if w.dim() != 1:
        raise ValueError(f"w must have shape (d,), got {tuple(w.shape)}")
    u = _weights(u, w.shape[0], name="u")
    if u.dim() != 1:
        raise ValueError(f"u must have shape (d,), got {tuple(u.shape)}")
    phi = real_scalar("phi", phi)
    if not 0.0 <= phi <= math.pi / 2:
        raise ValueError(f"phi must be in [0, pi/2] radians, got {phi!r}")
    wn = w.norm()
    w_hat = w / wn
    u_perp = u - (u * w_hat).sum() * w_hat
    un = u_perp.norm()
    if float(un) <= 1e-12 * float(u.norm()):
        raise ValueError("u must not be parallel to w (it has no component orthogonal to w)")
    return wn * (math.cos(phi) * w_hat + math.sin(phi) * u_perp / un)


def adversarial_strength(X: Tensor, y: Tensor, w: Tensor, b, z: Tensor | None = None,
                         b_z: Tensor | float | None = None) -> dict[str, float]:
    """Adversarial strength of C = (w, b) against the nearest-centroid classifier, on correctly classified rows.

    Returns ``ratio_mean`` = mean(d_NC) / mean(d_C), ``ratio_median`` = median of d_NC(x)/d_C(x),
    ``inv_cos`` = 1/cos(theta), ``theta`` (radians), ``median_distance`` = median d_C and ``n_correct``.
    ``z, b_z`` default to the nearest-centroid classifier of (X, y). y in {0, 1}; label 1 is w.x + b > 0.

    >>> s = adversarial_strength(X_test, y_test, w, b, *nearest_centroid_direction(X_train, y_train))
    >>> s["ratio_mean"], s["inv_cos"]
    """
    X = _matrix("X", X)
    y = _binary_labels(y, X.shape[0]).to(X.device)
    w = _weights(w, X.shape[1])
    if w.dim() != 1:
        raise ValueError(f"w must have shape (d,), got {tuple(w.shape)}")
    if (z is None) != (b_z is None):
        raise ValueError("z and b_z must be given together (or both left out)")
    if z is None:
        z, b_z = nearest_centroid_direction(X, y)
    score = margin(X, w, b)
    ok = (score > 0) == (y == 1)
    if not bool(ok.any()):
        raise ValueError("no row of X is classified correctly by (w, b): the strength is undefined")
    d_c = boundary_distance(X[ok], w, b)
    d_nc = boundary_distance(X[ok], z, b_z)
    theta = float(deviation_angle(w, z))
    ratio = d_nc / d_c.clamp_min(torch.finfo(d_c.dtype).tiny)
    cos = math.cos(theta)
    return {"ratio_mean": float(d_nc.mean() / d_c.mean()), "ratio_median": float(ratio.median()),
            "inv_cos": 1.0 / cos if cos > 0 else float("inf"), "theta": theta,
            "median_distance": float(d_c.median()), "n_correct": int(ok.sum())}


def local_linearisation(model: Callable[[Tensor], Tensor], x: Tensor, i: int | Tensor, j: int | Tensor,
                        create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """(w, b) per input of the local linear model of the score difference f_j - f_i at x (boundary-tilting).

    w(x) = grad_x (f_j(x) - f_i(x)), b(x) = f_j(x) - f_i(x) - w(x).x, so w(x).x + b(x) is the score
    difference itself and |w.x + b| / ||w|| is the first-order distance to the i/j boundary. Inputs of any
    shape (N, ...) are flattened: w has shape (N, prod(...)). Exact for a linear model. Call on a model in
    eval mode when it has dropout or batch norm.

    >>> w, b = local_linearisation(model.eval(), x, i=3, j=7)
    >>> boundary_distance(x.flatten(1), w, b)                      # first-order distances to the 3|7 boundary
    """
    x = tensor("x", x, floating=True, finite=True, min_dim=2)
    boolean("create_graph", create_graph)
    n = x.shape[0]

    def _cls(name, v):
        t = torch.as_tensor(v, device=x.device)
        if t.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool) or \
                t.shape not in ((), (n,)):
            raise ValueError(f"{name} must be a class index (int) or an int tensor of shape ({n},), got {v!r}")
        return t.expand(n)

    ii, jj = _cls("i", i), _cls("j", j)
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(xg)
        if out.dim() != 2 or out.shape[0] != n:
            raise ValueError(f"model must return scores shaped (N, classes) = ({n}, C), got {tuple(out.shape)}")
        rows = torch.arange(n, device=x.device)
        diff = out[rows, jj] - out[rows, ii]
        (g,) = torch.autograd.grad(diff.sum(), xg, create_graph=create_graph)
    w = g.flatten(1)
    b = diff - (w * xg.flatten(1)).sum(-1)
    return (w, b) if create_graph else (w.detach(), b.detach())


__all__ = ["margin", "nearest_centroid_direction", "deviation_angle", "boundary_distance", "minimal_adversarial",
           "mirror_images", "tilt", "adversarial_strength", "local_linearisation"]
