"""Gradient-boosted one-hidden-layer networks: sequential training of a network's final layer.

Paper slug: ``gbnn`` (Emami & Martinez-Munoz, "Sequential Training of Neural Networks with Gradient
Boosting", IEEE Access 2023, arXiv 1909.12098). A one-hidden-layer network's output
``sum_j beta_j sigma(w_j.x + b_j) + b_0`` is an additive expansion, so it can be built by gradient
boosting: start from the constant ``F_0`` that minimises the loss, and in each of ``T`` rounds fit a
tiny network of ``J`` hidden units (its own output weights and bias) to the pseudo-residuals
``r = -dl/dF`` of a random subsample, take a Newton step ``rho_t`` on the full training set and add
``rho_t h_t``. The ``T`` small networks merge into one ordinary MLP of ``T*J`` hidden units
(:meth:`GradientBoostedMLP.to_module`); units come in order of importance, so the last-trained ones
can be switched off at test time (:meth:`BoostedMLP.truncate`) at little cost.

Pieces:
- losses (the "gradient" part): :class:`SquaredLoss`, :class:`BinaryLogisticLoss` (logit ``2F``),
  :class:`SoftmaxCrossEntropyLoss`, each with ``init``, ``pseudo_residuals``, ``newton_step``;
- :func:`one_hidden_mlp` (scikit-learn's Glorot-uniform init), :func:`l2_weight_penalty`,
  :func:`make_lbfgs` (the inner solver, also used for jointly trained baselines);
- :class:`GradientBoostedMLP` (the boosting trainer, scikit-learn-like ``fit``/``predict``);
- :class:`BoostedMLP` (the merged network) and :func:`switch_off_units` (zero the output weights
  of the last hidden units of any one-hidden-layer MLP: the ablation for jointly trained nets).
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .._validate import integer, is_int, nonneg_int, positive_int, real_scalar
from ..data.batches import TensorBatches
from ..engine import fit as _engine_fit
from ..engine import null_progress

__all__ = [
    "BoostingLoss", "SquaredLoss", "BinaryLogisticLoss", "SoftmaxCrossEntropyLoss", "LOSSES",
    "ACTIVATIONS", "one_hidden_mlp", "l2_weight_penalty", "make_lbfgs", "GradientBoostedMLP",
    "BoostedMLP", "switch_off_units",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
INNER_OPTIMIZERS = ("lbfgs", "adam")


# ----------------------------------------------------------------------------- argument checks
def _linear(n_in: int, n_out: int, like: Tensor) -> nn.Linear:
    """An nn.Linear on ``like``'s device/dtype (its init is overwritten; zero-size layers allowed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(n_in, n_out, device=like.device, dtype=like.dtype)


def _float_2d(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return x


# ----------------------------------------------------------------------------- losses
class BoostingLoss:
    """A boosting loss on raw scores ``F`` (N, K) and encoded targets ``Y`` (N, K).

    ``init(Y)`` -> the constant (K,) minimising the mean loss; ``pseudo_residuals(Y, F)`` ->
    ``-dl/dF``; ``newton_step(Y, r, h)`` -> the scalar line-search step for a learner's output ``h``
    given the residuals ``r`` at the current ``F``; ``loss(Y, F)`` -> the mean loss (a 0-dim tensor).
    ``output_scale``: the merged network outputs ``output_scale * F`` (the logit).
    """

    name = ""
    output_scale = 1.0

    def loss(self, Y: Tensor, F: Tensor) -> Tensor:
        raise NotImplementedError

    def init(self, Y: Tensor) -> Tensor:
        raise NotImplementedError

    def pseudo_residuals(self, Y: Tensor, F: Tensor) -> Tensor:
        raise NotImplementedError

    def newton_step(self, Y: Tensor, r: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den == 0 (a learner that outputs zeros gets no step)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


class SquaredLoss(BoostingLoss):
    """Squared loss l = (y - F)^2 / 2 (gbnn regression): F_0 = mean(y), r = y - F, step rho = 1.

    The official code does not line-search the regression step (the Newton step of the squared loss
    along ``h`` would be sum(r h) / sum(h^2)); the learner is already a least-squares fit of ``r``.
    """

    name = "regression"

    def loss(self, Y, F):
        return 0.5 * (Y - F).pow(2).sum(-1).mean()

    def init(self, Y):
        return Y.mean(0)

    def pseudo_residuals(self, Y, F):
        return Y - F

    def newton_step(self, Y, r, h):
        return torch.ones((), dtype=r.dtype, device=r.device)


class BinaryLogisticLoss(BoostingLoss):
    """Binary deviance on y in {-1, +1}: l = log(1 + exp(-2 y F)), so P(y = +1) = sigmoid(2F) (gbnn).

    F_0 = atanh(mean y) = 1/2 log((1 + ybar) / (1 - ybar)) (ybar clamped to +-(1 - 1e-6));
    r = 2y / (1 + exp(2yF)); Newton step rho = sum(r h) / sum(h^2 |r| (2 - |r|)).
    """

    name = "binary"
    output_scale = 2.0
    clamp = 1.0 - 1e-6

    def loss(self, Y, F):
        return nn.functional.softplus(-2.0 * Y * F).sum(-1).mean()

    def init(self, Y):
        ybar = Y.double().mean(0).clamp(-self.clamp, self.clamp)
        return torch.atanh(ybar).to(Y.dtype)

    def pseudo_residuals(self, Y, F):
        return 2.0 * Y * torch.sigmoid(-2.0 * Y * F)

    def newton_step(self, Y, r, h):
        a = r.abs()
        return _ratio((r * h).sum(), (h * h * a * (2.0 - a)).sum())


class SoftmaxCrossEntropyLoss(BoostingLoss):
    """Softmax cross-entropy on one-hot Y (gbnn multi-class): r = Y - softmax(F).

    F_0 = log(class priors), centred (the argmin of the mean loss; the official code starts at 0).
    Newton step with the diagonal of the softmax Hessian, one scalar for all classes, as in the
    official code: rho = sum(h r) / sum(h^2 p (1 - p)), p = softmax(F) = Y - r (sums over samples
    and classes). It is not the exact 1-D Newton step on l(Y, F + rho h): the cross-class Hessian
    terms -p_k p_l are dropped.
    """

    name = "multiclass"
    min_prior = 1e-6

    def loss(self, Y, F):
        return -(Y * torch.log_softmax(F, -1)).sum(-1).mean()

    def init(self, Y):
        prior = Y.double().mean(0).clamp_min(self.min_prior)
        logp = prior.log()
        return (logp - logp.mean()).to(Y.dtype)

    def pseudo_residuals(self, Y, F):
        return Y - torch.softmax(F, -1)

    def newton_step(self, Y, r, h):
        p = Y - r
        return _ratio((h * r).sum(), (h * h * p * (1.0 - p)).sum())


LOSSES: dict[str, BoostingLoss] = {
    "regression": SquaredLoss(), "binary": BinaryLogisticLoss(), "multiclass": SoftmaxCrossEntropyLoss(),
}


# ----------------------------------------------------------------------------- building blocks
def one_hidden_mlp(in_dim: int, hidden: int, out_dim: int, activation: str = "sigmoid", *,
                   generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                   device: Any = None) -> nn.Sequential:
    """``Linear(in_dim, hidden) -> activation -> Linear(hidden, out_dim)`` with scikit-learn's init.

    Paper slug: gbnn (its base learners are scikit-learn MLPs). Weights and biases of each layer are
    U(-a, a), a = sqrt(f / (fan_in + fan_out)), f = 2 for the sigmoid and 6 otherwise (Glorot).
    Drawn on the CPU from ``generator`` (device-independent), then moved to ``device``/``dtype``.

    >>> net = one_hidden_mlp(30, 50, 1, generator=torch.Generator().manual_seed(0))
    >>> net(torch.randn(4, 30)).shape
    torch.Size([4, 1])
    """
    in_dim, out_dim = positive_int("in_dim", in_dim), positive_int("out_dim", out_dim)
    hidden = nonneg_int("hidden", hidden)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    dtype = dtype or torch.get_default_dtype()
    factor = 2.0 if activation == "sigmoid" else 6.0
    layers = [nn.Linear(in_dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, out_dim)]
    with torch.no_grad():
        for lin in (layers[0], layers[2]):
            bound = math.sqrt(factor / (lin.in_features + lin.out_features))
            for p in (lin.weight, lin.bias):
                p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound)
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def l2_weight_penalty(model: nn.Module, alpha: float, n_samples: int) -> Tensor:
    """scikit-learn's MLP L2 term: 0.5 * alpha * sum ||W||^2 / n_samples over Linear weights (no biases).

    Paper slug: gbnn (its base learners and the MLP baselines use alpha = 1e-4).

    >>> net = one_hidden_mlp(4, 3, 1)
    >>> pen = l2_weight_penalty(net, 1e-4, 32)
    >>> loss = net(torch.randn(32, 4)).pow(2).mean() / 2 + pen
    """
    alpha = real_scalar("alpha", alpha, nonneg=True)
    n_samples = positive_int("n_samples", n_samples)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if alpha == 0 or not weights:
        return torch.zeros((), device=weights[0].device if weights else None,
                           dtype=weights[0].dtype if weights else None)
    return (0.5 * alpha / n_samples) * sum(w.pow(2).sum() for w in weights)


def make_lbfgs(params, max_iter: int = 200) -> torch.optim.LBFGS:
    """``torch.optim.LBFGS`` set up like scikit-learn's MLP solver: ``max_iter`` iterations in one step.

    Paper slug: gbnn. History 10, strong-Wolfe line search, no tolerance-based early stop (tol 0);
    one ``step(closure)`` runs the whole fit, so :func:`gradkit.engine.fit` with one full batch and
    ``epochs=1`` trains to the end.

    >>> net = one_hidden_mlp(4, 3, 1)
    >>> opt = make_lbfgs(net.parameters(), max_iter=50)
    >>> isinstance(opt, torch.optim.LBFGS)
    True
    """
    max_iter = positive_int("max_iter", max_iter)
    return torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=0.0,
                             tolerance_change=0.0, history_size=10, line_search_fn="strong_wolfe")


# ----------------------------------------------------------------------------- the merged network
class BoostedMLP(nn.Sequential):
    """The merged GBNN network: ``[feature_extractor] -> Linear(d, T*J) -> act -> Linear(T*J, K)``.

    Paper slug: gbnn. Output = s * (F_0 + sum_t rho_t h_t(x)), s = 2 for the binary loss (the logit),
    else 1; hidden units are ordered by training round. ``step_bias[t] = s * rho_t * b2_t`` (each
    learner's own output bias) and ``init_bias = s * F_0`` are kept so that :meth:`truncate` can
    switch off the last-trained units exactly (equal to the staged prediction of the booster).

    >>> gb = GradientBoostedMLP(4, 1, total_units=6).fit(torch.randn(50, 4), torch.randn(50))
    >>> net = gb.to_module()                   # 6 hidden units
    >>> small = net.truncate(3)                # first 3 rounds only
    """

    def __init__(self, hidden: nn.Linear, activation: nn.Module, output: nn.Linear, *, step_bias: Tensor,
                 init_bias: Tensor, units_per_step: int, feature_extractor: nn.Module | None = None) -> None:
        mods = ([feature_extractor] if feature_extractor is not None else []) + [hidden, activation, output]
        super().__init__(*mods)
        units_per_step = positive_int("units_per_step", units_per_step)
        if step_bias.dim() != 2 or step_bias.shape[1] != output.out_features:
            raise ValueError(f"step_bias must have shape (steps, {output.out_features}), got {tuple(step_bias.shape)}")
        if hidden.out_features != step_bias.shape[0] * units_per_step:
            raise ValueError(f"hidden layer has {hidden.out_features} units, expected steps * units_per_step = "
                             f"{step_bias.shape[0]} * {units_per_step}")
        self.units_per_step = units_per_step
        self.has_feature_extractor = feature_extractor is not None
        self.register_buffer("step_bias", step_bias.detach().clone())
        self.register_buffer("init_bias", init_bias.detach().clone())

    @property
    def hidden(self) -> nn.Linear:
        return self[-3]

    @property
    def output(self) -> nn.Linear:
        return self[-1]

    @property
    def n_steps(self) -> int:
        return int(self.step_bias.shape[0])

    def truncate(self, n_steps: int) -> "BoostedMLP":
        """A copy keeping the first ``n_steps`` boosting rounds (their ``n_steps * J`` units).

        The later units are switched off together with their share of the output bias, so the copy
        equals the booster's staged prediction after ``n_steps`` rounds. The feature extractor, if
        any, is shared, not copied.
        """
        n_steps = integer("n_steps", n_steps, low=0, high=self.n_steps)
        u = n_steps * self.units_per_step
        h, o = self.hidden, self.output
        hidden, output = _linear(h.in_features, u, h.weight), _linear(u, o.out_features, h.weight)
        with torch.no_grad():
            hidden.weight.copy_(h.weight[:u])
            hidden.bias.copy_(h.bias[:u])
            output.weight.copy_(o.weight[:, :u])
            output.bias.copy_(self.init_bias + self.step_bias[:n_steps].sum(0))
        return BoostedMLP(hidden, copy.deepcopy(self[-2]), output, step_bias=self.step_bias[:n_steps],
                          init_bias=self.init_bias, units_per_step=self.units_per_step,
                          feature_extractor=self[0] if self.has_feature_extractor else None)

    def extra_repr(self) -> str:
        return f"n_steps={self.n_steps}, units_per_step={self.units_per_step}"


def switch_off_units(model: nn.Sequential, keep: int) -> nn.Sequential:
    """A copy of a one-hidden-layer MLP with the output weights of hidden units ``keep:`` set to 0.

    Paper slug: gbnn (anytime-inference ablation: switching off the last hidden units of a jointly
    trained network). y = W2[:, :keep] act(W1[:keep] x + b1[:keep]) + b2. The output bias is kept;
    for a :class:`BoostedMLP` use :meth:`BoostedMLP.truncate`, which also removes the switched-off
    rounds' bias terms.

    >>> net = one_hidden_mlp(8, 50, 10)
    >>> half = switch_off_units(net, 25)
    >>> bool((half[-1].weight[:, 25:] == 0).all())
    True
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0 or not isinstance(model[-1], nn.Linear):
        raise TypeError(f"model must be an nn.Sequential ending in nn.Linear, got {type(model).__name__}")
    n = model[-1].in_features
    if not is_int(keep, low=0, high=n):
        raise ValueError(f"keep must be an int in [0, {n}] (the hidden units), got {keep!r}")
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[-1].weight[:, keep:] = 0
    return out


# ----------------------------------------------------------------------------- the booster
class GradientBoostedMLP(nn.Module):
    """Train a one-hidden-layer MLP by gradient boosting: T rounds of J units each (paper slug: gbnn).

    F_0 = argmin_c sum_i l(y_i, c); for t = 1..T: r = -dl/dF at F_{t-1}; fit a J-unit MLP h_t to
    (x_S, r_S) on a random subsample S (squared loss + L2, ``inner_optimizer``); rho_t = eta *
    NewtonStep(y, r, h_t(x)) on the full training set; F_t = F_{t-1} + rho_t h_t.
    T = total_units / units_per_step. ``task``: "regression" (squared loss, y float (N,) or
    (N, out_dim)), "binary" (out_dim = 2, labels 0/1 mapped to -1/+1, logit 2F) or "multiclass"
    (labels in [0, out_dim), softmax cross-entropy). With ``feature_extractor`` (a frozen module run
    in eval mode without gradients) the boosting acts on its features, whose size is ``in_dim``.

    >>> x, y = torch.randn(200, 30), torch.randint(0, 2, (200,))
    >>> gb = GradientBoostedMLP(30, 2, task="binary", total_units=20).fit(x, y)
    >>> acc = (gb.predict(x) == y).float().mean(); net = gb.to_module(); half = gb.predict(x, n_steps=10)
    """

    def __init__(self, in_dim: int, out_dim: int, task: str = "regression", *, total_units: int = 200,
                 units_per_step: int = 1, eta: float = 1.0, subsample: float = 0.5,
                 inner_optimizer: str = "lbfgs", inner_iters: int = 200, activation: str = "sigmoid",
                 weight_decay: float = 1e-4, inner_lr: float = 1e-3, inner_batch_size: int = 200,
                 feature_extractor: nn.Module | None = None) -> None:
        super().__init__()
        self.in_dim = positive_int("in_dim", in_dim)
        self.out_dim = positive_int("out_dim", out_dim)
        if task not in LOSSES:
            raise ValueError(f"task must be one of {sorted(LOSSES)}, got {task!r}")
        if task == "binary" and out_dim != 2:
            raise ValueError(f"out_dim must be 2 (the number of classes) for task='binary', got {out_dim}")
        if task == "multiclass" and out_dim < 2:
            raise ValueError(f"out_dim must be >= 2 (the number of classes) for task='multiclass', got {out_dim}")
        self.task = task
        self.loss_fn = LOSSES[task]
        self.n_scores = 1 if task == "binary" else out_dim
        self.total_units = positive_int("total_units", total_units)
        self.units_per_step = positive_int("units_per_step", units_per_step)
        if total_units % units_per_step:
            raise ValueError(f"total_units must be a multiple of units_per_step, got {total_units} and "
                             f"{units_per_step}")
        self.n_rounds = total_units // units_per_step
        self.eta = real_scalar("eta", eta, tensor_ok=False)
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta!r}")
        self.subsample = real_scalar("subsample", subsample, tensor_ok=False)
        if not 0 < self.subsample <= 1:
            raise ValueError(f"subsample must be in (0, 1], got {subsample!r}")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        self.inner_optimizer = inner_optimizer
        self.inner_iters = positive_int("inner_iters", inner_iters)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.weight_decay = real_scalar("weight_decay", weight_decay, nonneg=True, tensor_ok=False)
        self.inner_lr = real_scalar("inner_lr", inner_lr, tensor_ok=False)
        if self.inner_lr <= 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
        self.inner_batch_size = positive_int("inner_batch_size", inner_batch_size)
        if feature_extractor is not None and not isinstance(feature_extractor, nn.Module):
            raise TypeError(f"feature_extractor must be an nn.Module or None, got {type(feature_extractor).__name__}")
        self.feature_extractor = feature_extractor
        if feature_extractor is not None:
            feature_extractor.requires_grad_(False)
        self.learners = nn.ModuleList()
        self.register_buffer("init_score", torch.zeros(self.n_scores))
        self.register_buffer("step_sizes", torch.zeros(0))
        self.train_loss_: list[float] = []

    # --------------------------------------------------------------- inputs
    @property
    def is_fitted(self) -> bool:
        return len(self.learners) > 0

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("GradientBoostedMLP is not fitted yet; call fit(X, y) first")

    @torch.no_grad()
    def features(self, X: Tensor) -> Tensor:
        """The boosting input: ``X`` itself, or the frozen feature extractor's output (eval mode)."""
        if self.feature_extractor is None:
            Z = _float_2d("X", X)
        else:
            if not isinstance(X, Tensor) or not X.is_floating_point():
                raise TypeError(f"X must be a floating-point torch.Tensor, got {type(X).__name__} "
                                f"{getattr(X, 'dtype', '')}".rstrip())
            was = self.feature_extractor.training
            self.feature_extractor.eval()
            try:
                Z = self.feature_extractor(X)
            finally:
                self.feature_extractor.train(was)
            Z = _float_2d("feature_extractor(X)", Z.flatten(1) if Z.dim() > 2 else Z)
        if Z.shape[1] != self.in_dim:
            what = "feature_extractor(X)" if self.feature_extractor is not None else "X"
            raise ValueError(f"{what} must have in_dim = {self.in_dim} columns, got shape {tuple(Z.shape)}")
        if self.is_fitted and Z.dtype != self.init_score.dtype:
            raise TypeError(f"X has dtype {Z.dtype} but the model is {self.init_score.dtype}; cast one of them "
                            f"(e.g. model.double())")
        return Z

    def _encode_targets(self, y: Any, n: int, like: Tensor) -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if len(y) != n:
            raise ValueError(f"y has {len(y)} rows, X has {n}")
        y = y.to(like.device)
        if self.task == "regression":
            if not y.is_floating_point():
                raise TypeError(f"y must be a floating-point tensor for task='regression', got {y.dtype}")
            if y.dim() == 1:
                y = y.unsqueeze(1)
            if y.dim() != 2 or y.shape[1] != self.out_dim:
                raise ValueError(f"y must have shape (N,) or (N, {self.out_dim}) for out_dim={self.out_dim}, "
                                 f"got {tuple(y.shape)}")
            if not bool(torch.isfinite(y).all()):
                raise ValueError("y contains non-finite values (nan or inf)")
            return y.to(like.dtype)
        if y.is_floating_point() or y.is_complex():
            raise TypeError(f"y must hold integer class labels for task={self.task!r}, got dtype {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"y must be 1-D class labels, got shape {tuple(y.shape)}")
        y = y.long()
        if n and (int(y.min()) < 0 or int(y.max()) >= self.out_dim):
            raise ValueError(f"y labels must be in [0, {self.out_dim}), got values in [{int(y.min())}, {int(y.max())}]")
        if self.task == "binary":
            return (2.0 * y.to(like.dtype) - 1.0).unsqueeze(1)
        return nn.functional.one_hot(y, self.out_dim).to(like.dtype)

    # --------------------------------------------------------------- training
    def _new_learner(self, Z: Tensor, generator: torch.Generator | None) -> nn.Sequential:
        return one_hidden_mlp(self.in_dim, self.units_per_step, self.n_scores, self.activation,
                              generator=generator, dtype=Z.dtype, device=Z.device)

    def _fit_learner(self, learner: nn.Sequential, zs: Tensor, rs: Tensor, generator) -> None:
        wd = self.weight_decay
        weights = (learner[0].weight, learner[2].weight)

        def loss(model: nn.Module, batch) -> Tensor:
            xb, rb = batch
            value = 0.5 * (model(xb) - rb).pow(2).mean()  # scikit-learn's squared loss (+ its L2 term)
            if wd > 0:
                value = value + (0.5 * wd / len(xb)) * (weights[0].pow(2).sum() + weights[1].pow(2).sum())
            return value

        if self.inner_optimizer == "lbfgs":
            opt = make_lbfgs(learner.parameters(), self.inner_iters)
            _engine_fit(learner, opt, [(zs, rs)], epochs=1, compute_loss=loss)
        else:
            opt = torch.optim.Adam(learner.parameters(), lr=self.inner_lr)
            batches = TensorBatches(zs, rs, batch_size=min(self.inner_batch_size, len(zs)), generator=generator)
            _engine_fit(learner, opt, batches, epochs=self.inner_iters, compute_loss=loss)

    def fit(self, X: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
            progress: Callable[..., Any] = null_progress, desc: str = "gbnn") -> "GradientBoostedMLP":
        """Boost ``n_rounds`` learners on ``(X, y)``; returns ``self``. Refitting starts afresh.

        ``generator`` (a CPU ``torch.Generator``) drives the subsamples, the learners' init and the
        inner mini-batches: the same generator seed gives the same model. ``progress(total, desc)``
        is a progress bar over the rounds. ``train_loss_[t]`` is the training loss of ``F_t``.
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.learners = nn.ModuleList()  # unfitted until the last round succeeds
        self.train_loss_ = []
        Z = self.features(X)
        n = len(Z)
        if n < 1:
            raise ValueError("X must have at least one row")
        Y = self._encode_targets(y, n, Z)
        lf = self.loss_fn
        with torch.no_grad():
            f0 = lf.init(Y)
            F = f0.expand(n, -1).clone()
        m = n if self.subsample >= 1 else max(1, int(self.subsample * n))
        rhos: list[Tensor] = []
        learners: list[nn.Module] = []
        losses = [float(lf.loss(Y, F))]
        bar = progress(total=self.n_rounds, desc=desc)
        try:
            for t in range(self.n_rounds):
                with torch.no_grad():
                    r = lf.pseudo_residuals(Y, F)
                if m < n:
                    idx = torch.randperm(n, generator=generator)[:m].to(Z.device)
                    zs, rs = Z[idx], r[idx]
                else:
                    zs, rs = Z, r
                learner = self._new_learner(Z, generator)
                self._fit_learner(learner, zs, rs, generator)
                with torch.no_grad():
                    h = learner(Z)
                    if not bool(torch.isfinite(h).all()):
                        raise RuntimeError(f"round {t}: the weak learner's output is not finite (inner "
                                           f"training diverged); lower inner_lr or standardise X")
                    rho = self.eta * lf.newton_step(Y, r, h)
                    F += rho * h
                    if not bool(torch.isfinite(F).all()):
                        raise RuntimeError(f"round {t}: the scores overflowed (Newton step rho = {float(rho):.4g}); "
                                           f"the boosting diverged, try a smaller eta or subsample = 1")
                learner.requires_grad_(False)
                learners.append(learner)
                rhos.append(rho.detach().reshape(()))
                losses.append(float(lf.loss(Y, F)))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
        finally:
            bar.close()
        self.init_score = f0.detach().clone()
        self.step_sizes = torch.stack(rhos)
        self.learners = nn.ModuleList(learners)
        self.train_loss_ = losses
        return self

    # --------------------------------------------------------------- prediction
    def _steps(self, n_steps: int | None) -> int:
        T = len(self.learners)
        if n_steps is None:
            return T
        if not is_int(n_steps, low=0, high=T):
            raise ValueError(f"n_steps must be None or an int in [0, {T}], got {n_steps!r}")
        return n_steps

    @torch.no_grad()
    def staged_scores(self, X: Tensor) -> Iterator[Tensor]:
        """Yield the raw scores ``F_t(X)`` (N, K) for t = 0, 1, ..., T (anytime prediction)."""
        self._check_fitted()
        Z = self.features(X)
        F = self.init_score.expand(len(Z), -1).clone()
        yield F.clone()
        for rho, learner in zip(self.step_sizes, self.learners):
            F += rho * learner(Z)
            yield F.clone()

    @torch.no_grad()
    def decision_function(self, X: Tensor, n_steps: int | None = None) -> Tensor:
        """Raw scores F (N, K) after ``n_steps`` rounds (default all); K = 1 for binary (logit = 2F).

        No gradients flow; use :meth:`to_module` for a differentiable network.
        """
        self._check_fitted()
        n_steps = self._steps(n_steps)
        Z = self.features(X)
        F = self.init_score.expand(len(Z), -1).clone()
        for t in range(n_steps):
            F += self.step_sizes[t] * self.learners[t](Z)
        return F

    def forward(self, X: Tensor, n_steps: int | None = None) -> Tensor:
        return self.decision_function(X, n_steps)

    @torch.no_grad()
    def predict_proba(self, X: Tensor, n_steps: int | None = None) -> Tensor:
        """Class probabilities (N, out_dim): [1 - sigmoid(2F), sigmoid(2F)] (binary) or softmax(F)."""
        if self.task == "regression":
            raise ValueError("predict_proba needs task='binary' or 'multiclass', this model has task='regression'")
        F = self.decision_function(X, n_steps)
        if self.task == "binary":
            p1 = torch.sigmoid(2.0 * F)
            return torch.cat([1.0 - p1, p1], 1)
        return torch.softmax(F, -1)

    @torch.no_grad()
    def predict(self, X: Tensor, n_steps: int | None = None) -> Tensor:
        """Class labels (N,) int64 for classification; predictions (N,) or (N, out_dim) for regression."""
        F = self.decision_function(X, n_steps)
        if self.task == "regression":
            return F.squeeze(1) if self.out_dim == 1 else F
        if self.task == "binary":
            return (F.squeeze(1) > 0).long()
        return F.argmax(-1)

    # --------------------------------------------------------------- merging
    @torch.no_grad()
    def to_module(self, n_steps: int | None = None) -> BoostedMLP:
        """Merge the first ``n_steps`` (default all) learners into one :class:`BoostedMLP`.

        Hidden weights/biases concatenated; output weights of block t = s * rho_t * W2_t; output
        bias = s * (F_0 + sum_t rho_t b2_t), s = 2 for the binary loss (the output is the logit 2F).
        """
        self._check_fitted()
        n_steps = self._steps(n_steps)
        s = self.loss_fn.output_scale
        ref = self.init_score
        J, K = self.units_per_step, self.n_scores
        used = list(self.learners)[:n_steps]
        hidden, output = _linear(self.in_dim, n_steps * J, ref), _linear(n_steps * J, K, ref)
        step_bias = torch.zeros(n_steps, K, device=ref.device, dtype=ref.dtype)
        if used:
            hidden.weight.copy_(torch.cat([lr[0].weight for lr in used], 0))
            hidden.bias.copy_(torch.cat([lr[0].bias for lr in used], 0))
            rho = self.step_sizes[:n_steps]
            output.weight.copy_(s * torch.cat([r * lr[2].weight for r, lr in zip(rho, used)], 1))
            step_bias.copy_(s * rho[:, None] * torch.stack([lr[2].bias for lr in used], 0))
        init_bias = s * self.init_score
        output.bias.copy_(init_bias + step_bias.sum(0))
        net = BoostedMLP(hidden, ACTIVATIONS[self.activation](), output, step_bias=step_bias,
                         init_bias=init_bias, units_per_step=J, feature_extractor=self.feature_extractor)
        return net

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, task={self.task!r}, rounds={self.n_rounds}, "
                f"units_per_step={self.units_per_step}, eta={self.eta:g}, subsample={self.subsample:g}, "
                f"inner_optimizer={self.inner_optimizer!r}, inner_iters={self.inner_iters}, "
                f"activation={self.activation!r}, weight_decay={self.weight_decay:g}")
