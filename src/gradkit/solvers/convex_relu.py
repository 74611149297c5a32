"""Global optimisation of two-layer ReLU networks through their convex reformulation (paper slug: convex-relu).

The weight-decayed squared-loss problem of a one-hidden-layer ReLU network (``X`` n x d, a ones column for a
bias, ``y`` in R^n)::

    min_{u_j, a_j}  0.5 || sum_j (X u_j)_+ a_j - y ||^2 + (beta/2) sum_j (||u_j||^2 + a_j^2)

equals the convex program over activation patterns ``D_i`` (:mod:`gradkit.solvers.relu_patterns`)::

    min_{v_i, w_i}  0.5 || sum_i D_i X (v_i - w_i) - y ||^2 + beta sum_i (||v_i||_2 + ||w_i||_2)
    s.t.            (2 D_i - I) X v_i >= 0,  (2 D_i - I) X w_i >= 0

when every pattern is present (with sampled patterns its optimum is an upper bound). A solution maps back to a
network: each nonzero ``v_i`` gives a neuron ``u = v_i / sqrt(||v_i||)``, ``a = +sqrt(||v_i||)`` (``w_i``: ``a < 0``)
with the same objective (:meth:`ConvexReLUProblem.to_network`).

:func:`admm_convex_relu` solves it by scaled ADMM on ``u = [v; w]`` with copies ``v`` (group norm) and ``s = G u``
(cone, ``s >= 0``); ``F = [D_i X, ..., -D_i X, ...]``, ``G = blockdiag((2 D_i - I) X)``, so
``G^T G = blockdiag(X^T X)``::

    u   <- (I + F^T F / rho + G^T G)^{-1} (F^T y / rho + v - lam + G^T (s - nu))     (Cholesky factor: once)
    v_g <- max(0, 1 - beta / (rho ||u_g + lam_g||)) (u_g + lam_g)
    s   <- max(0, G u + nu)
    lam <- lam + gamma (u - v);  nu <- nu + gamma (G u - s)

After the one-off factorisation (cubic in ``dP``) an iteration is two triangular solves and products with ``F``
and ``G``: ``O((dP)^2 + n d P)``. ``G`` is never formed; it is applied block by block.

Example::

    X = torch.randn(10, 2, dtype=torch.float64); y = torch.sign(X[:, 0] * X[:, 1])
    prob = ConvexReLUProblem(X, y, enumerate_patterns_2d(X), beta=1e-2)
    v, w, hist = admm_convex_relu(prob, rho=0.1, max_iter=2000, tol=1e-8)
    net = prob.to_network(v, w)                   # nn.Sequential(Linear, ReLU, Linear), same objective
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from .. import _validate as V
from .relu_patterns import check_patterns

__all__ = ["ConvexReLUProblem", "admm_convex_relu", "ADMMHistory", "ADMMResult", "group_soft_threshold",
           "nonconvex_objective", "sign_accuracy", "check_sign_labels"]


def group_soft_threshold(z: torch.Tensor, t: float) -> torch.Tensor:
    """The prox of ``t ||.||_2`` applied to every row of ``z``: ``max(0, 1 - t / ||z_g||) z_g``.

    A row with ``||z_g|| <= t`` becomes 0; any other keeps its direction and loses exactly ``t`` of its norm.
    """
    V.tensor("z", z, floating=True, min_dim=2)
    t = V.real_scalar("t", t, nonneg=True)
    norms = z.norm(dim=-1, keepdim=True)
    scale = (1 - t / norms.clamp_min(torch.finfo(z.dtype).tiny)).clamp_min(0)
    return scale * z


def check_sign_labels(y: torch.Tensor, name: str = "y") -> torch.Tensor:
    """``y`` as given when every entry is -1 or +1; otherwise an error naming the values found."""
    V.tensor(name, y)
    bad = ~((y == 1) | (y == -1))
    if bool(bad.any()):
        vals = torch.unique(y[bad])[:5].tolist()
        raise V.ArgumentError(f"{name} must hold labels in {{-1, +1}}, got other values such as {vals}")
    return y


def sign_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Percentage of examples with ``sign(pred) == y`` (``pred >= 0`` counts as +1); ``y`` in {-1, +1}."""
    V.tensor("pred", pred, floating=True)
    check_sign_labels(y)
    pred = pred.reshape(-1)
    if pred.shape[0] != y.reshape(-1).shape[0]:
        raise V.ArgumentError(f"pred and y must have as many entries, got {pred.shape[0]} and {y.numel()}")
    hit = torch.where(pred >= 0, 1.0, -1.0).to(y.dtype) == y.reshape(-1)
    return 100.0 * float(hit.double().mean())


def nonconvex_objective(net: nn.Module, X: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """``0.5 ||net(X) - y||^2 + (beta/2) sum_p ||p||^2`` over every parameter ``p`` of ``net`` (a 0-dim tensor).

    For ``Linear(d, m, bias=False) -> ReLU -> Linear(m, 1, bias=False)`` on ``X`` with a ones column this is
    the weight-decayed problem the convex program solves (differentiable: usable as a training loss).
    """
    if not isinstance(net, nn.Module):
        raise V.ArgumentError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    V.tensor("X", X, floating=True, min_dim=2)
    V.tensor("y", y, floating=True)
    beta = V.real_scalar("beta", beta, nonneg=True)
    out = net(X).reshape(-1)
    if out.shape[0] != y.reshape(-1).shape[0]:
        raise V.ArgumentError(f"net(X) must give one output per example of y: got {out.shape[0]} outputs for "
                              f"{y.numel()} labels")
    fit = 0.5 * (out - y.reshape(-1).to(out.dtype)).pow(2).sum()
    reg = sum((p.pow(2).sum() for p in net.parameters()), torch.zeros((), dtype=out.dtype, device=out.device))
    return fit + 0.5 * beta * reg


class ConvexReLUProblem:
    """The convex program of a two-layer ReLU network on ``(X, y)`` over the given patterns (paper slug: convex-relu).

    X: (n, d) data (append a ones column for a bias); y: (n,) targets; patterns: ``BoolTensor (P, n)``
    (:func:`~gradkit.solvers.relu_patterns.sample_patterns` or ``enumerate_patterns_2d``); beta > 0: the
    weight decay of the non-convex problem (for the sum-of-squares loss used here: scale it with n).
    dtype: the working precision (float64 by default; X and y are converted), on X's device.
    A solution is a pair ``v, w`` of shape (P, d) (one row per pattern).
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, patterns: torch.Tensor, beta: float, *,
                 dtype: torch.dtype = torch.float64) -> None:
        V.tensor("X", X, floating=True, finite=True)
        if X.dim() != 2 or X.shape[0] < 1 or X.shape[1] < 1:
            raise V.ArgumentError(f"X must be a non-empty 2-D tensor (n x d), got shape {tuple(X.shape)}")
        V.tensor("y", y, finite=True)
        if y.reshape(-1).shape[0] != X.shape[0] or (y.dim() == 2 and y.shape[1] != 1) or y.dim() > 2:
            raise V.ArgumentError(f"y must have shape (n,) = ({X.shape[0]},) to match X, got {tuple(y.shape)}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise V.ArgumentError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.beta = V.positive("beta", beta)
        self.X = X.detach().to(dtype)
        self.y = y.detach().reshape(-1).to(dtype=dtype, device=X.device)
        self.patterns = check_patterns(patterns, X.shape[0]).to(X.device)
        self.mask = self.patterns.to(dtype)          # (P, n): D_i as rows
        self.sign = 2 * self.mask - 1                # (P, n): diag(2 D_i - I)
        self._factor: tuple[float, torch.Tensor] | None = None

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]

    @property
    def num_patterns(self) -> int:
        return self.patterns.shape[0]

    @property
    def num_variables(self) -> int:
        """``2 d P``: the size of the linear system ADMM factorises."""
        return 2 * self.d * self.num_patterns

    def _check_pair(self, v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_patterns, self.d)
        for name, t in (("v", v), ("w", w)):
            V.tensor(name, t, floating=True)
            if tuple(t.shape) != shape:
                raise V.ArgumentError(f"{name} must have shape (P, d) = {shape}, got {tuple(t.shape)}")
        return v.to(self.X.dtype), w.to(self.X.dtype)

    # ---- the operators, block by block (G is never formed) --------------------------------------
    def apply_F(self, u: torch.Tensor) -> torch.Tensor:
        """``F u = sum_i D_i X (v_i - w_i)`` for ``u = [v; w]`` of shape (2P, d) -> (n,)."""
        P = self.num_patterns
        return ((self.X @ (u[:P] - u[P:]).T) * self.mask.T).sum(1)

    def apply_FT(self, r: torch.Tensor) -> torch.Tensor:
        """``F^T r``: blocks ``X^T D_i r`` and ``-X^T D_i r`` -> (2P, d)."""
        b = (self.mask * r) @ self.X
        return torch.cat([b, -b])

    def apply_G(self, u: torch.Tensor) -> torch.Tensor:
        """``G u``: blocks ``(2 D_i - I) X u_g`` -> (2P, n)."""
        return (u @ self.X.T) * torch.cat([self.sign, self.sign])

    def apply_GT(self, z: torch.Tensor) -> torch.Tensor:
        """``G^T z``: blocks ``X^T (2 D_i - I) z_g`` -> (2P, d)."""
        return (z * torch.cat([self.sign, self.sign])) @ self.X

    def system_matrix(self, rho: float) -> torch.Tensor:
        """``I + F^T F / rho + G^T G`` (2dP x 2dP), ``G^T G = blockdiag(X^T X)`` since ``(2 D_i - I)^2 = I``."""
        rho = V.positive("rho", rho)
        P, d = self.num_patterns, self.d
        B = (self.mask.T[:, :, None] * self.X[:, None, :]).reshape(self.n, P * d)  # [D_1 X, ..., D_P X]
        K = B.T @ B / rho
        H = torch.cat([torch.cat([K, -K], 1), torch.cat([-K, K], 1)], 0)
        gram = self.X.T @ self.X
        idx = torch.arange(d, device=self.X.device)
        for g in range(2 * P):
            H[g * d + idx[:, None], g * d + idx[None, :]] += gram
        H.diagonal().add_(1.0)
        return H

    def factor(self, rho: float) -> torch.Tensor:
        """The lower Cholesky factor of :meth:`system_matrix` (the last rho's factor is kept)."""
        rho = V.positive("rho", rho)
        if self._factor is None or self._factor[0] != rho:
            L, info = torch.linalg.cholesky_ex(self.system_matrix(rho))
            if int(info) != 0:
                raise RuntimeError(f"Cholesky factorisation of the ADMM system failed (rho={rho}): not positive "
                                   "definite in this precision; use float64 or a larger rho")
            self._factor = (rho, L)
        return self._factor[1]

    # ---- objective, feasibility, network -----------------------------------------------------------
    def objective(self, v: torch.Tensor, w: torch.Tensor) -> float:
        """``0.5 ||sum_i D_i X (v_i - w_i) - y||^2 + beta sum_i (||v_i|| + ||w_i||)``."""
        v, w = self._check_pair(v, w)
        u = torch.cat([v, w])
        res = self.apply_F(u) - self.y
        return float(0.5 * res.pow(2).sum() + self.beta * u.norm(dim=1).sum())

    def cone_violation(self, v: torch.Tensor, w: torch.Tensor) -> float:
        """``max(0, -min (2 D_i - I) X [v_i, w_i])``: how far the pair is from the cone constraints."""
        v, w = self._check_pair(v, w)
        return float((-self.apply_G(torch.cat([v, w]))).clamp_min(0).max())

    def feasible(self, v: torch.Tensor, w: torch.Tensor, tol: float = 1e-8) -> bool:
        """Whether every cone constraint ``(2 D_i - I) X v_i >= -tol`` (and for ``w_i``) holds."""
        tol = V.real_scalar("tol", tol, nonneg=True)
        return self.cone_violation(v, w) <= tol

    def nonzero_blocks(self, v: torch.Tensor, w: torch.Tensor, threshold: float = 0.0) -> int:
        """The number of blocks with ``||v_i|| > threshold`` plus those with ``||w_i|| > threshold`` (neurons)."""
        v, w = self._check_pair(v, w)
        return int((torch.cat([v, w]).norm(dim=1) > threshold).sum())

    def predict(self, v: torch.Tensor, w: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
        """The recovered network's outputs ``sum_i (X v_i)_+ - (X w_i)_+`` on ``X`` (default: the training data)."""
        v, w = self._check_pair(v, w)
        X = self.X if X is None else X.to(self.X.dtype)
        if X.dim() != 2 or X.shape[1] != self.d:
            raise V.ArgumentError(f"X must have shape (m, {self.d}), got {tuple(X.shape)}")
        return torch.relu(X @ v.T).sum(1) - torch.relu(X @ w.T).sum(1)

    def to_network(self, v: torch.Tensor, w: torch.Tensor, threshold: float = 0.0, *,
                   intercept: bool = False) -> nn.Sequential:
        """``Linear(d, m, bias=False) -> ReLU -> Linear(m, 1, bias=False)`` with one neuron per nonzero block.

        ``v_i`` gives ``u = v_i / sqrt(||v_i||)``, ``a = +sqrt(||v_i||)``; ``w_i`` the same with ``a < 0``, so the
        non-convex objective (:func:`nonconvex_objective`) equals :meth:`objective` when the pair is feasible.
        intercept: the last column of X is the constant 1; its weights become the first layer's bias
        (``Linear(d - 1, m)``). With no nonzero block, one neuron with zero weights is returned.
        """
        v, w = self._check_pair(v, w)
        threshold = V.real_scalar("threshold", threshold, nonneg=True)
        V.boolean("intercept", intercept)
        blocks = torch.cat([v, w])
        norms = blocks.norm(dim=1)
        keep = norms > threshold
        signs = torch.cat([torch.ones(len(v)), -torch.ones(len(w))]).to(blocks)
        root = norms[keep].sqrt()
        U = blocks[keep] / root[:, None]
        a = signs[keep] * root
        if U.shape[0] == 0:
            U, a = torch.zeros(1, self.d).to(blocks), torch.zeros(1).to(blocks)
        m = U.shape[0]
        d_in = self.d - 1 if intercept else self.d
        if d_in < 1:
            raise V.ArgumentError("intercept=True needs X to have a feature column besides the ones column")
        first = nn.Linear(d_in, m, bias=intercept, dtype=blocks.dtype, device=blocks.device)
        second = nn.Linear(m, 1, bias=False, dtype=blocks.dtype, device=blocks.device)
        with torch.no_grad():
            first.weight.copy_(U[:, :d_in])
            if intercept:
                first.bias.copy_(U[:, -1])
            second.weight.copy_(a[None, :])
        return nn.Sequential(first, nn.ReLU(), second)


@dataclass
class ADMMHistory:
    """Per-iteration record of :func:`admm_convex_relu`.

    objective: the convex objective of the group-sparse iterate ``v``; primal_u: ``||u - v||``; primal_s:
    ``||G u - s||``; dual: ``rho ||v_k - v_{k-1}||``; iterations run; converged: all three residuals < tol.
    """

    objective: list[float] = field(default_factory=list)
    primal_u: list[float] = field(default_factory=list)
    primal_s: list[float] = field(default_factory=list)
    dual: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False


class ADMMResult(NamedTuple):
    """``(v, w, history)``: the solution blocks (P, d) each, and the :class:`ADMMHistory`."""

    v: torch.Tensor
    w: torch.Tensor
    history: ADMMHistory


def admm_convex_relu(problem: ConvexReLUProblem, rho: float = 0.1, gamma: float = 1.0, max_iter: int = 500,
                     tol: float = 1e-6, *, callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                     record_objective: bool = True, alpha: float = 1.0) -> ADMMResult:
    """Solve a :class:`ConvexReLUProblem` by scaled ADMM (paper slug: convex-relu; equations in the module doc).

    rho > 0: the penalty; gamma in (0, 2): the dual step (1 is standard scaled ADMM); stops after ``max_iter``
    iterations or when ``||u - v||``, ``||G u - s||`` and ``rho ||v_k - v_{k-1}||`` are all < ``tol``
    (absolute). ``callback(k, v, w)`` runs after every iteration (k from 1). Returns ``(v, w, history)`` from
    the group-sparse copy (exact zeros for pruned neurons).

    alpha in (0, 2): over-relaxation (Boyd et al. 2011, sec. 3.4.3): the v-, s- and dual updates use
    ``alpha u + (1 - alpha) v`` and ``alpha G u + (1 - alpha) s`` in place of ``u`` and ``G u``. 1 (default) is
    the plain iteration above; 1.5-1.8 often needs fewer iterations at the same cost per iteration.
    """
    if not isinstance(problem, ConvexReLUProblem):
        raise V.ArgumentError(f"problem must be a ConvexReLUProblem, got {type(problem).__name__}")
    rho = V.positive("rho", rho)
    gamma = V.real_in("gamma", gamma, 0.0, 2.0, low_open=True, high_open=True)
    max_iter = V.positive_int("max_iter", max_iter)
    tol = V.positive("tol", tol)
    alpha = V.real_in("alpha", alpha, 0.0, 2.0, low_open=True, high_open=True)
    if callback is not None and not callable(callback):
        raise V.ArgumentError(f"callback must be callable or None, got {type(callback).__name__}")
    P, d, n = problem.num_patterns, problem.d, problem.n
    L = problem.factor(rho)
    Fty = problem.apply_FT(problem.y) / rho
    like = dict(dtype=problem.X.dtype, device=problem.X.device)
    v = torch.zeros(2 * P, d, **like)
    lam = torch.zeros(2 * P, d, **like)
    s = torch.zeros(2 * P, n, **like)
    nu = torch.zeros(2 * P, n, **like)
    hist = ADMMHistory()
    thresh = problem.beta / rho
    for k in range(1, max_iter + 1):
        rhs = Fty + v - lam + problem.apply_GT(s - nu)
        u = torch.linalg.solve_triangular(L, rhs.reshape(-1, 1), upper=False)
        u = torch.linalg.solve_triangular(L.mT, u, upper=True).reshape(2 * P, d)
        Gu = problem.apply_G(u)
        u_hat = u if alpha == 1.0 else alpha * u + (1 - alpha) * v
        g_hat = Gu if alpha == 1.0 else alpha * Gu + (1 - alpha) * s
        v_new = group_soft_threshold(u_hat + lam, thresh)
        s = (g_hat + nu).clamp_min(0)
        lam = lam + gamma * (u_hat - v_new)
        nu = nu + gamma * (g_hat - s)
        r_u, r_s, r_d = (float((u - v_new).norm()), float((Gu - s).norm()), rho * float((v_new - v).norm()))
        v = v_new
        hist.primal_u.append(r_u)
        hist.primal_s.append(r_s)
        hist.dual.append(r_d)
        if record_objective:
            hist.objective.append(problem.objective(v[:P], v[P:]))
        hist.iterations = k
        if callback is not None:
            callback(k, v[:P], v[P:])
        if r_u < tol and r_s < tol and r_d < tol:
            hist.converged = True
            break
    return ADMMResult(v[:P].clone(), v[P:].clone(), hist)
