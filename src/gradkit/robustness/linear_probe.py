"""L2-regularised binary linear classifiers (logistic regression, squared-hinge linear SVM) fitted with
full-batch L-BFGS, for the linear analysis of adversarial examples (paper slug: boundary-tilting).

    minimise_{w, b}  (1/n) sum_i loss(s_i (w.x_i + b)) + (lambda / 2) ||w||^2,   s_i = 2 y_i - 1 in {-1, +1}
    loss = log(1 + exp(-m)) (logistic)  or  max(0, 1 - m)^2 (squared hinge)

lambda = 1 / (C n) in scikit-learn's notation; the bias is not penalised. For balanced classes the
direction of w tends to the centroid difference z as lambda grows, and to a max-margin direction as
lambda -> 0 (which may tilt into low-variance directions: boundary tilting).

>>> probe = LinearProbe(lam=1e-2).fit(X_train, y_train)            # y in {0, 1}
>>> probe.w, probe.b, probe.accuracy(X_test, y_test)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import choice, positive_int, real_scalar, tensor

LOSSES = ("logistic", "squared_hinge")


class LinearProbe:
    """A binary L2-regularised linear classifier (see the module docstring) (boundary-tilting).

    lam: L2 strength lambda >= 0; loss: "logistic" or "squared_hinge"; tol: L-BFGS gradient tolerance;
    max_iter: L-BFGS iterations. After :meth:`fit`, ``w`` (d,) and ``b`` (0-dim) hold the solution in the
    input's dtype and device, ``n_iter`` the iterations used. ``fit(..., init=other_probe)`` warm-starts
    (useful along a regularisation path).

    >>> p = LinearProbe(lam=0.1).fit(torch.tensor([[-1.0], [1.0]]), torch.tensor([0, 1]))
    >>> bool(p.predict(torch.tensor([[2.0]])) == 1)
    True
    """

    def __init__(self, lam: float = 1e-4, loss: str = "logistic", tol: float = 1e-9, max_iter: int = 500) -> None:
        self.lam = real_scalar("lam", lam, nonneg=True)
        self.loss = choice("loss", loss, LOSSES)
        self.tol = real_scalar("tol", tol, nonneg=True)
        self.max_iter = positive_int("max_iter", max_iter)
        self.w: Tensor | None = None
        self.b: Tensor | None = None
        self.n_iter = 0

    def __repr__(self) -> str:
        return f"LinearProbe(lam={self.lam:g}, loss={self.loss!r}, tol={self.tol:g}, max_iter={self.max_iter})"

    def objective(self, X: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """The regularised training loss at (w, b)."""
        m = (2.0 * y.to(X.dtype) - 1.0) * (X @ w + b)
        data = F.softplus(-m).mean() if self.loss == "logistic" else F.relu(1.0 - m).pow(2).mean()
        return data + 0.5 * self.lam * (w * w).sum()

    def fit(self, X: Tensor, y: Tensor, init: "LinearProbe | None" = None) -> "LinearProbe":
        """Fit on rows of X (N, d) with labels y in {0, 1}; returns self."""
        X = tensor("X", X, floating=True, finite=True)
        if X.dim() != 2 or X.shape[0] < 2:
            raise ValueError(f"X must be a (N, d) matrix with N >= 2, got shape {tuple(X.shape)}")
        y = tensor("y", y)
        if y.shape != (X.shape[0],) or not set(torch.unique(y).tolist()) <= {0, 1}:
            raise ValueError(f"y must hold a label in {{0, 1}} per row of X (shape ({X.shape[0]},)), got shape "
                             f"{tuple(y.shape)} and values {sorted(set(torch.unique(y).tolist()))[:5]}")
        y = y.to(X.device)
        if init is not None:
            if not isinstance(init, LinearProbe) or init.w is None or init.w.shape != (X.shape[1],):
                raise ValueError(f"init must be a fitted LinearProbe with {X.shape[1]} weights, got {init!r}")
            w0, b0 = init.w.detach().clone().to(X), init.b.detach().clone().to(X)
        else:
            w0, b0 = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device), torch.zeros((), dtype=X.dtype,
                                                                                           device=X.device)
        w, b = w0.requires_grad_(True), b0.requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=self.tol,
                                tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = self.objective(X, y, w, b)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.n_iter = int(opt.state[w].get("n_iter", 0))
        self.w, self.b = w.detach(), b.detach()
        return self

    def _fitted(self) -> tuple[Tensor, Tensor]:
        if self.w is None:
            raise RuntimeError("LinearProbe is not fitted: call fit(X, y) first")
        return self.w, self.b

    def decision_function(self, X: Tensor) -> Tensor:
        """w.x + b per row."""
        w, b = self._fitted()
        return X @ w.to(X) + b.to(X)

    def predict(self, X: Tensor) -> Tensor:
        """Labels in {0, 1} (1 where w.x + b > 0)."""
        return (self.decision_function(X) > 0).long()

    def accuracy(self, X: Tensor, y: Tensor) -> float:
        """Accuracy in percent."""
        return 100.0 * float((self.predict(X) == y.to(X.device)).double().mean())


__all__ = ["LOSSES", "LinearProbe"]
