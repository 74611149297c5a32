"""The attention SVM: the max-margin token selection that gradient descent on attention converges to
(paper slug: transformers-svm).

For sequences ``X_i`` (T tokens of dimension d), queries ``z_i`` (dimension d_z) and one selected token
``alpha_i`` per sequence, the attention SVM separates, inside each sequence, the selected token from every
other one through the attention score ``s_it = x_it^T W z_i``::

    W^mm = argmin_W ||W||   s.t.   (x_{i,alpha_i} - x_it)^T W z_i >= 1   for all i and all t != alpha_i

Each constraint is linear in W: ``<W, A_it>_F >= 1`` with ``A_it = (x_{i,alpha_i} - x_it) z_i^T``.
``norm="fro"`` (the direction of plain W trained by gradient descent) is a least-distance problem,
solved exactly as a non-negative least-squares problem (Lawson and Hanson's LDP reduction, scipy's
active-set NNLS): it returns the dual multipliers ``lambda >= 0`` with ``W^mm = sum lambda_it A_it`` and
detects infeasible selections. ``norm="nuc"`` (the direction of ``W = K Q^T`` trained by gradient descent)
is solved by ADMM whose two steps are singular-value soft-thresholding and the exact projection onto the
constraint polyhedron (again an LDP); the iterate it returns is feasible and its optimality is certified
by the weak-duality bound ``||W||_* >= sum(mu) / ||sum mu_it A_it||_2`` for the multipliers ``mu >= 0``
the projection produces (``solution.gap``). ``solver="cvxpy"`` solves either problem with cvxpy when it
is installed (an optional reference, not a dependency).

Example::

    sel = optimal_tokens(X, v, Y)                      # argmax_t Y_i v^T x_it, the globally optimal tokens
    sol = solve_attention_svm(X, z, sel)               # sol.W (d x d_z), sol.min_margin ~ 1, sol.dual
    W_nuc = attention_svm(X, z, sel, norm="nuc")       # the nuclear-norm solution as a tensor
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls

from .. import _validate as V

__all__ = ["InfeasibleSVMError", "AttentionSVMSolution", "optimal_tokens", "svm_constraints", "svm_margins",
           "solve_attention_svm", "attention_svm"]

NORMS = ("fro", "nuc")
SOLVERS = ("dual", "cvxpy")


class InfeasibleSVMError(ValueError):
    """No W separates the selected tokens (e.g. a selected token equals another token of its sequence)."""


@dataclass(frozen=True)
class AttentionSVMSolution:
    """The attention SVM's solution and its certificates.

    W: the solution (d x d_z, dtype and device of ``X``); norm: ``"fro"`` or ``"nuc"``; value: ``||W||`` in
    that norm; dual: multipliers ``lambda_it >= 0`` as an (n, T) tensor (0 at the selected tokens);
    margins: ``(x_sel - x_it)^T W z_i`` as (n, T) (NaN at the selected tokens); min_margin: their minimum
    (1 at the optimum); lower_bound: a dual bound ``<= min ||W||`` over the feasible set; gap:
    ``value - lower_bound`` (0 up to rounding at the optimum); iterations: ADMM iterations (0 for ``fro``).
    """

    W: torch.Tensor
    norm: str
    selected: torch.Tensor
    value: float
    dual: torch.Tensor
    margins: torch.Tensor
    min_margin: float
    lower_bound: float
    gap: float
    iterations: int
    solver: str

    @property
    def support(self) -> torch.Tensor:
        """(n, T) bool: the constraints with a positive multiplier (the 'support tokens')."""
        return self.dual > 0


# ------------------------------------------------------------------------------------------ arguments
def _check_inputs(X, z, selected) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    V.tensor("X", X, floating=True, finite=True)
    if X.dim() != 3:
        raise V.ArgumentError(f"X must have shape (n, T, d), got shape {tuple(X.shape)}")
    n, T, _ = X.shape
    if n < 1 or T < 2:
        raise V.ArgumentError(f"X must hold at least one sequence of at least 2 tokens, got shape {tuple(X.shape)}")
    V.tensor("z", z, floating=True, finite=True)
    if z.dim() != 2 or z.shape[0] != n:
        raise V.ArgumentError(f"z must have shape (n, d_z) with n = {n} (one query per sequence of X), got shape "
                              f"{tuple(z.shape)}")
    selected = torch.as_tensor(selected) if not isinstance(selected, torch.Tensor) else selected
    if selected.dtype.is_floating_point or selected.dtype == torch.bool or selected.is_complex() \
            or tuple(selected.shape) != (n,):
        raise V.ArgumentError(f"selected must be an integer tensor of shape ({n},) (one token index per "
                              f"sequence), got dtype {selected.dtype} and shape {tuple(selected.shape)}")
    bad = (selected < 0) | (selected >= T)
    if bool(bad.any()):
        raise V.ArgumentError(f"selected must hold token indices in [0, {T - 1}], got {selected.tolist()}")
    return X, z, selected.to(device=X.device, dtype=torch.long)


def optimal_tokens(X: torch.Tensor, v: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The globally optimal token of each sequence: ``argmax_t Y_i v^T x_it`` (paper slug: transformers-svm).

    X: (n, T, d); v: (d,) the linear head; Y: (n,) labels in {-1, +1}. Returns an (n,) long tensor.
    """
    V.tensor("X", X, floating=True, finite=True)
    if X.dim() != 3:
        raise V.ArgumentError(f"X must have shape (n, T, d), got shape {tuple(X.shape)}")
    V.tensor("v", v, floating=True, finite=True)
    if tuple(v.shape) != (X.shape[2],):
        raise V.ArgumentError(f"v must have shape ({X.shape[2]},) (the token dimension of X), got {tuple(v.shape)}")
    V.tensor("Y", Y, finite=True)
    if tuple(Y.shape) != (X.shape[0],):
        raise V.ArgumentError(f"Y must have shape ({X.shape[0]},) (one label per sequence), got {tuple(Y.shape)}")
    return (Y.to(X.dtype)[:, None] * (X @ v.to(X.dtype))).argmax(dim=1)


def svm_constraints(X: torch.Tensor, z: torch.Tensor, selected) -> tuple[torch.Tensor, torch.Tensor]:
    """The constraint matrices ``A_it = (x_{i,sel_i} - x_it) z_i^T`` of the attention SVM.

    Returns ``(A, mask)``: A of shape (n, T, d, d_z) (zero at the selected tokens) and an (n, T) bool mask
    of the constraints (False at the selected tokens). A W is feasible iff ``<W, A_it> >= 1`` on the mask.
    """
    X, z, selected = _check_inputs(X, z, selected)
    n, T, _ = X.shape
    x_sel = X[torch.arange(n, device=X.device), selected]                    # (n, d)
    diff = x_sel[:, None, :] - X                                              # (n, T, d)
    mask = torch.ones(n, T, dtype=torch.bool, device=X.device)
    mask[torch.arange(n, device=X.device), selected] = False
    return diff[..., :, None] * z[:, None, None, :], mask


def svm_margins(W: torch.Tensor, X: torch.Tensor, z: torch.Tensor, selected) -> torch.Tensor:
    """``(x_{i,sel_i} - x_it)^T W z_i`` as an (n, T) tensor, NaN at the selected tokens."""
    X, z, selected = _check_inputs(X, z, selected)
    V.tensor("W", W, floating=True)
    if tuple(W.shape) != (X.shape[2], z.shape[1]):
        raise V.ArgumentError(f"W must have shape ({X.shape[2]}, {z.shape[1]}) (token dim x query dim), got "
                              f"{tuple(W.shape)}")
    n = X.shape[0]
    scores = torch.einsum("ntd,de,ne->nt", X, W.to(X.dtype), z)  # s_it = x_it^T W z_i
    m = scores[torch.arange(n, device=X.device), selected][:, None] - scores
    m[torch.arange(n, device=X.device), selected] = float("nan")
    return m


# ------------------------------------------------------------------------------------------ numerics
class _LDP:
    """min ||w|| s.t. G w >= h for one G and any h, through NNLS (Lawson & Hanson, ch. 23): the residual r of
    min_{u >= 0} ||[G^T; h^T] u - e_last|| gives w = -r[:D] / r[D] and the multipliers mu = u / (1 - h^T u)
    (w = G^T mu); a zero residual means the constraints are inconsistent. With more unknowns than
    constraints (D > K), G^T = Q R first, and the problem is solved in the K coordinates of range(G^T)."""

    def __init__(self, G: np.ndarray) -> None:
        K, D = G.shape
        self.Q = None
        if D > K:
            self.Q, R = np.linalg.qr(G.T)  # D x K, K x K
            G = R.T
        self.G = G

    def __call__(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        K, D = self.G.shape
        E = np.vstack([self.G.T, h[None, :]])
        f = np.zeros(D + 1)
        f[-1] = 1.0
        u, _ = nnls(E, f, maxiter=max(100, 50 * K))
        r = E @ u - f
        denom = -r[-1]  # = 1 - h^T u, in (0, 1] when consistent
        if not denom > 1e-12:
            return None
        w = -r[:D] / r[-1]
        return (w if self.Q is None else self.Q @ w), u / denom


def _svt(M: np.ndarray, tau: float) -> np.ndarray:
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return (U * np.maximum(s - tau, 0.0)) @ Vt


def _nuc(M: np.ndarray) -> float:
    return float(np.linalg.svd(M, compute_uv=False).sum())


def _infeasible(msg: str = "") -> InfeasibleSVMError:
    return InfeasibleSVMError("the attention SVM is infeasible for this token selection: no W separates every "
                              "selected token from the other tokens of its sequence (a selected token equal to "
                              f"another token, or contradicting sequences){msg}")


def _solve_fro(G: np.ndarray, ldp: _LDP | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    res = (ldp or _LDP(G))(np.ones(G.shape[0]))
    if res is None:
        raise _infeasible()
    w, lam = res
    return w, lam, 0


def _solve_nuc(G: np.ndarray, shape: tuple[int, int], tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, int]:
    """ADMM on min ||W||_* + I_C(V) s.t. W = V, C = {G vec V >= 1}; V stays feasible (exact projection)."""
    ldp = _LDP(G)
    w_fro, _, _ = _solve_fro(G, ldp)
    V_ = w_fro.copy()
    U_ = np.zeros_like(V_)
    rho = 1.0 / max(np.linalg.norm(w_fro), 1e-12)
    best = (math.inf, V_, np.zeros(G.shape[0]))
    lb = 0.0
    it = 0
    for it in range(1, max_iter + 1):
        W_ = _svt((V_ - U_).reshape(shape), 1.0 / rho).ravel()
        P = W_ + U_
        res = ldp(1.0 - G @ P)
        if res is None:  # cannot happen once the fro problem was feasible; guard anyway
            raise _infeasible()
        y, mu = res
        V_new = P + y
        U_ = P - V_new
        r_primal = np.linalg.norm(W_ - V_new)
        r_dual = rho * np.linalg.norm(V_new - V_)
        V_ = V_new
        value = _nuc(V_.reshape(shape))
        S = (G.T @ mu).reshape(shape)
        spectral = float(np.linalg.norm(S, 2)) if mu.any() else 0.0
        if spectral > 0:
            lb = max(lb, float(mu.sum()) / spectral)
        if value < best[0]:
            best = (value, V_.copy(), mu / spectral if spectral > 0 else mu)
        if best[0] - lb <= tol * max(best[0], 1e-12):
            break
        # residual balancing (Boyd et al. 2011, sec. 3.4.1); the scaled dual U scales with 1/rho
        if r_primal > 10 * r_dual:
            rho *= 2.0
            U_ /= 2.0
        elif r_dual > 10 * r_primal:
            rho /= 2.0
            U_ *= 2.0
    if best[0] - lb > tol * max(best[0], 1e-12):
        warnings.warn(f"attention SVM (nuc): ADMM stopped at max_iter={max_iter} with relative duality gap "
                      f"{(best[0] - lb) / max(best[0], 1e-12):.2e} > tol={tol:g}; the returned W is feasible",
                      RuntimeWarning, stacklevel=3)
    return best[1], best[2], it


def _solve_cvxpy(G: np.ndarray, shape: tuple[int, int], norm: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        import cvxpy as cp
    except ImportError:
        raise ImportError("solver='cvxpy' needs cvxpy (pip install cvxpy); solver='dual' needs only scipy") from None
    Wv = cp.Variable(shape)
    cons = [G @ cp.vec(Wv, order="C") >= 1]
    prob = cp.Problem(cp.Minimize(cp.norm(Wv, norm)), cons)
    prob.solve()
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise _infeasible(f" (cvxpy status {prob.status!r})")
    lam = np.maximum(np.asarray(cons[0].dual_value, dtype=np.float64).ravel(), 0.0)
    w = np.asarray(Wv.value, dtype=np.float64).ravel()
    if norm == "fro":  # cvxpy's multipliers are those of min ||W||_F; W = sum lambda A holds for 1/2 ||W||_F^2
        lam = lam * float(np.linalg.norm(w))
    return w, lam


# ------------------------------------------------------------------------------------------ public solver
def solve_attention_svm(X: torch.Tensor, z: torch.Tensor, selected, norm: str = "fro", *, solver: str = "dual",
                        tol: float = 1e-8, max_iter: int = 5000) -> AttentionSVMSolution:
    """Solve the attention SVM for the token selection ``selected`` (see the module docstring).

    X: (n, T, d) tokens; z: (n, d_z) queries (self-attention: ``z = X[:, -1]``); selected: (n,) token
    indices; norm: ``"fro"`` or ``"nuc"``; solver: ``"dual"`` (scipy NNLS, plus ADMM for ``"nuc"``) or
    ``"cvxpy"``; tol: relative duality gap at which ADMM stops (``"nuc"``); max_iter: its iteration cap.
    Raises :class:`InfeasibleSVMError` when no W satisfies the constraints. Computed in float64 on the CPU;
    the solution comes back in ``X``'s dtype and device.
    """
    X, z, selected = _check_inputs(X, z, selected)
    V.choice("norm", norm, NORMS)
    V.choice("solver", solver, SOLVERS)
    V.real_in("tol", tol, 0.0, 1.0, low_open=True, high_open=True)
    max_iter = V.positive_int("max_iter", max_iter)
    A, mask = svm_constraints(X.detach().double().cpu(), z.detach().double().cpu(), selected.cpu())
    n, T, d, dz = A.shape
    G = A[mask].reshape(-1, d * dz).numpy()
    zero = np.linalg.norm(G, axis=1) == 0.0
    if zero.any():
        k = int(np.flatnonzero(zero)[0])
        i, t = [int(v) for v in torch.nonzero(mask)[k]]
        raise _infeasible(f": sequence {i}, token {t} gives the zero constraint 0 >= 1 (token equal to the "
                          f"selected token {int(selected[i])}, or z_{i} = 0)")
    iters = 0
    if solver == "cvxpy":
        w, lam = _solve_cvxpy(G, (d, dz), norm)
    elif norm == "fro":
        w, lam, iters = _solve_fro(G)
    else:
        w, lam, iters = _solve_nuc(G, (d, dz), tol, max_iter)
    Wm = w.reshape(d, dz)
    value = float(np.linalg.norm(Wm)) if norm == "fro" else _nuc(Wm)
    S = (G.T @ lam).reshape(d, dz)
    dual_norm = float(np.linalg.norm(S)) if norm == "fro" else float(np.linalg.norm(S, 2))
    lower = float(lam.sum()) / dual_norm if dual_norm > 0 else 0.0
    dual = torch.zeros(n, T, dtype=torch.float64)
    dual[mask] = torch.from_numpy(lam)
    W = torch.from_numpy(Wm).to(device=X.device, dtype=X.dtype)
    margins = svm_margins(torch.from_numpy(Wm), X.detach().double().cpu(), z.detach().double().cpu(), selected.cpu())
    return AttentionSVMSolution(
        W=W, norm=norm, selected=selected.clone(), value=value, dual=dual.to(device=X.device, dtype=X.dtype),
        margins=margins.to(device=X.device, dtype=X.dtype), min_margin=float(np.nanmin(margins.numpy())),
        lower_bound=lower, gap=value - lower, iterations=iters, solver=solver)


def attention_svm(X: torch.Tensor, z: torch.Tensor, selected, norm: str = "fro", *, solver: str = "dual",
                  tol: float = 1e-8, max_iter: int = 5000) -> torch.Tensor:
    """``W^mm``, the attention SVM's solution for ``selected`` (see :func:`solve_attention_svm`)."""
    return solve_attention_svm(X, z, selected, norm, solver=solver, tol=tol, max_iter=max_iter).W
