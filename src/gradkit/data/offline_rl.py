"""Offline RL toy: a deterministic gridworld, an offline data set from mixed behaviour policies,
batched greedy evaluation, and the DICE value losses of O-DICE (paper slug: ``odice``).

Gridworld: ``size x size`` cells, 4 actions (0 up: y-1, 1 down: y+1, 2 left: x-1, 3 right: x+1;
moves into a wall leave the agent in place), reward +1 and termination when the goal is entered,
0 otherwise. Observations are the cell coordinates scaled to [-1, 1].

DICE value objective (lambda in (0, 1), f* the convex conjugate of f)::

    min_V (1 - lambda) E_s[V(s)] + lambda E_(s,a,r,s')[ f*( r + gamma (1 - done) V(s') - V(s) ) ]

Pearson chi^2 with the x >= 0 constraint (the official code): w* = max(0, y/2 + 1),
f*(y) = y w* - (w* - 1)^2; reverse KL: f*(y) = exp(y - 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import choice, integer, probability, real_scalar

__all__ = ["GridWorld", "Transitions", "make_gridworld_dataset", "evaluate_greedy",
           "dice_fstar", "dice_weight", "DiceLosses", "odice_value_losses", "dice_true_loss",
           "feature_cosine", "value_rank_correlation", "FSTAR_KINDS"]

MOVES = np.array([[0, -1], [0, 1], [-1, 0], [1, 0]], dtype=np.int64)  # up, down, left, right (dx, dy)
FSTAR_KINDS = ("chi2", "rkl")


@dataclass(frozen=True)
class GridWorld:
    """``size x size`` gridworld with 4 actions and one absorbing goal (+1 on entry).

    Deterministic by default; ``slip`` in [0, 1] makes it stochastic (a uniformly random action
    replaces the chosen one with that probability). :meth:`optimal_values` and :meth:`policy_values`
    give exact values by dynamic programming.

    Example::

        env = GridWorld(8)
        env.step(np.array([[6, 7]]), np.array([3]))     # -> next cell [[7, 7]], reward [1.], done [True]
        env.shortest_path_actions(0, 0)                   # [1, 3]: down or right
    """

    size: int = 8
    goal: tuple[int, int] = (7, 7)
    slip: float = 0.0  # probability that a uniformly random action replaces the chosen one

    def __post_init__(self) -> None:
        integer("size", self.size, low=2)
        gx, gy = self.goal
        if not (0 <= gx < self.size and 0 <= gy < self.size):
            raise ValueError(f"goal must be a cell of the {self.size}x{self.size} grid, got {self.goal!r}")
        probability("slip", self.slip)

    @property
    def n_actions(self) -> int:
        return 4

    def step(self, cells: np.ndarray | Tensor, actions: np.ndarray | Tensor, rng=None):
        """Batched step: ``(next_cells, rewards, dones)``; works on numpy arrays or torch tensors.

        With ``slip > 0`` each action is replaced by a uniformly random one with probability ``slip``,
        drawn from ``rng`` (a ``numpy.random.Generator`` for arrays, a ``torch.Generator`` or None
        for tensors; required for arrays).
        """
        if self.slip > 0:
            actions = self._slipped(cells, actions, rng)
        if isinstance(cells, Tensor):
            moves = torch.as_tensor(MOVES, device=cells.device)
            nxt = (cells + moves[actions]).clamp(0, self.size - 1)
            goal = torch.as_tensor(self.goal, device=cells.device)
            done = (nxt == goal).all(-1)
            return nxt, done.to(torch.float32), done
        nxt = np.clip(cells + MOVES[actions], 0, self.size - 1)
        done = (nxt == np.asarray(self.goal)).all(-1)
        return nxt, done.astype(np.float32), done

    def _slipped(self, cells, actions, rng):
        if isinstance(cells, Tensor):
            dev = rng.device if rng is not None else cells.device
            n = len(actions)
            u = torch.rand(n, generator=rng, device=dev).to(cells.device)
            rand = torch.randint(4, (n,), generator=rng, device=dev).to(cells.device)
            return torch.where(u < self.slip, rand, actions)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"a slippery GridWorld (slip={self.slip}) steps numpy arrays with rng=numpy.random."
                            f"Generator, got {type(rng).__name__}")
        actions = np.asarray(actions)
        u = rng.random(actions.shape)
        return np.where(u < self.slip, rng.integers(4, size=actions.shape), actions)

    def _index(self, cells: np.ndarray) -> np.ndarray:
        return cells[..., 1] * self.size + cells[..., 0]

    def transition_matrices(self) -> np.ndarray:
        """``P[a, s, s']`` over all ``size**2`` cells (row-major (y, x) index), slip included; the goal
        is absorbing (its rows are self-loops and are never used as a source)."""
        n = self.size ** 2
        ys, xs = np.meshgrid(np.arange(self.size), np.arange(self.size), indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], -1)
        det = np.zeros((4, n, n))
        for a in range(4):
            nxt = np.clip(cells + MOVES[a], 0, self.size - 1)
            det[a, np.arange(n), self._index(nxt)] = 1.0
        P = (1 - self.slip) * det + self.slip * det.mean(0, keepdims=True)
        g = self._index(np.asarray(self.goal))
        P[:, g, :] = 0.0
        P[:, g, g] = 1.0
        return P

    def _rewards(self, goal_reward: float, step_reward: float) -> tuple[np.ndarray, int]:
        g = int(self._index(np.asarray(self.goal)))
        r = np.full(self.size ** 2, float(step_reward))  # reward on entering s'
        r[g] = float(goal_reward)
        return r, g

    def optimal_values(self, gamma: float = 0.99, goal_reward: float = 1.0, step_reward: float = 0.0,
                       tol: float = 1e-10) -> np.ndarray:
        """V* over :meth:`start_cells` by value iteration (exact dynamic programming, slip included).

        ``Q(s, a) = sum_s' P(s' | s, a) (r(s') + gamma [s' != goal] V(s'))``, ``V = max_a Q``.
        """
        gamma = real_scalar("gamma", gamma)
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        P = self.transition_matrices()
        r, g = self._rewards(goal_reward, step_reward)
        cont = np.ones_like(r)
        cont[g] = 0.0
        v = np.zeros_like(r)
        for _ in range(100_000):
            q = P @ (r + gamma * cont * v)
            new = q.max(0)
            new[g] = 0.0
            if np.abs(new - v).max() < tol:
                v = new
                break
            v = new
        return v[self._index(self.start_cells())]

    def policy_values(self, actions: np.ndarray, gamma: float = 0.99, goal_reward: float = 1.0,
                      step_reward: float = 0.0) -> np.ndarray:
        """V of the deterministic policy taking ``actions[i]`` in ``start_cells()[i]`` (exact linear solve).

        ``actions`` may also be ``(n_starts, 4)`` action probabilities (a stochastic policy).
        """
        gamma = real_scalar("gamma", gamma)
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        starts = self.start_cells()
        probs = np.asarray(actions, dtype=np.float64)
        if probs.ndim == 1:
            if probs.shape != (len(starts),):
                raise ValueError(f"actions must have one entry per start cell ({len(starts)}), got {probs.shape}")
            probs = np.eye(4)[probs.astype(np.int64)]
        if probs.shape != (len(starts), 4):
            raise ValueError(f"actions must be ({len(starts)},) or ({len(starts)}, 4), got {probs.shape}")
        P = self.transition_matrices()
        r, g = self._rewards(goal_reward, step_reward)
        idx = self._index(starts)
        Ppi = np.einsum("ia,aij->ij", probs, P[:, idx, :])  # (n_starts, n_cells)
        r_pi = Ppi @ r
        A = np.eye(len(idx)) - gamma * Ppi[:, idx]  # the goal contributes no continuation
        return np.linalg.solve(A, r_pi)

    def shortest_path_actions(self, x: int, y: int) -> list[int]:
        """Actions that reduce the Manhattan distance to the goal (empty at the goal)."""
        gx, gy = self.goal
        out = []
        if gy < y:
            out.append(0)
        if gy > y:
            out.append(1)
        if gx < x:
            out.append(2)
        if gx > x:
            out.append(3)
        return out

    def observe(self, cells: np.ndarray | Tensor) -> Tensor:
        """Cell coordinates (x, y) scaled to [-1, 1], float32."""
        c = torch.as_tensor(cells, dtype=torch.float32)
        return c * (2.0 / (self.size - 1)) - 1.0

    def start_cells(self) -> np.ndarray:
        """Every non-goal cell, shape ``(size*size - 1, 2)``, in row-major (y, x) order."""
        ys, xs = np.meshgrid(np.arange(self.size), np.arange(self.size), indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], -1)
        return cells[~(cells == np.asarray(self.goal)).all(-1)]


@dataclass
class Transitions:
    """An offline data set of ``(obs, action, reward, next_obs, done)`` rows (torch tensors).

    ``obs``/``next_obs`` float32 ``(N, 2)``, ``action`` int64 ``(N,)``, ``reward``/``done`` float32
    ``(N,)``; ``cells``/``next_cells`` are the integer cells; ``behaviour`` is 1 for rows from the
    noisy shortest-path policy and 0 for the random one.
    """

    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    done: Tensor
    cells: Tensor
    next_cells: Tensor
    behaviour: Tensor
    episodes: int
    name: str = ""

    def __len__(self) -> int:
        return len(self.action)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(obs, action, reward, next_obs, done)``: the order the DICE losses expect."""
        return self.obs, self.action, self.reward, self.next_obs, self.done

    def to(self, device) -> "Transitions":
        f = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Transitions(**f)


def make_gridworld_dataset(env: GridWorld | None = None, episodes: int = 200, max_steps: int = 50,
                           epsilon: float = 0.3, expert_fraction: float = 0.5, seed: int = 0,
                           goal_reward: float = 1.0, step_reward: float = 0.0) -> Transitions:
    """Offline data set: each episode starts in a uniformly random non-goal cell and follows, with
    probability ``expert_fraction``, an ``epsilon``-noisy shortest-path policy (a uniformly random
    action with probability ``epsilon``, else a random one of the shortest-path actions), otherwise
    the uniform random policy; it stops at the goal or after ``max_steps`` steps (a time-out is
    not a terminal). Paper slug: ``odice`` (a laptop-scale offline RL toy).

    Rewards are relabelled ``goal_reward`` on entering the goal and ``step_reward`` otherwise
    (default: the environment's 1 / 0; the official O-DICE code relabels AntMaze's sparse goal
    reward as 0 at the goal and -3 per other step: ``goal_reward=0, step_reward=-3``).

    Example::

        data = make_gridworld_dataset(GridWorld(8), episodes=200, seed=0)
        obs, action, reward, next_obs, done = data.tensors()
    """
    env = GridWorld() if env is None else env
    if not isinstance(env, GridWorld):
        raise TypeError(f"env must be a GridWorld, got {type(env).__name__}")
    episodes = integer("episodes", episodes, low=1)
    max_steps = integer("max_steps", max_steps, low=1)
    epsilon = probability("epsilon", epsilon)
    expert_fraction = probability("expert_fraction", expert_fraction)
    seed = integer("seed", seed, low=0)
    goal_reward = real_scalar("goal_reward", goal_reward)
    step_reward = real_scalar("step_reward", step_reward)
    rng = np.random.default_rng(seed)
    starts = env.start_cells()
    rows: list[tuple[int, int, int, int, int, float, bool, int]] = []
    for _ in range(episodes):
        x, y = (int(v) for v in starts[rng.integers(len(starts))])
        expert = bool(rng.random() < expert_fraction)
        for _ in range(max_steps):
            if expert and rng.random() >= epsilon:
                opts = env.shortest_path_actions(x, y)
                a = int(opts[rng.integers(len(opts))])
            else:
                a = int(rng.integers(4))
            nxt, _, d = env.step(np.array([[x, y]]), np.array([a]), rng=rng)
            nx, ny = (int(v) for v in nxt[0])
            rows.append((x, y, a, nx, ny, goal_reward if d[0] else step_reward, bool(d[0]), int(expert)))
            x, y = nx, ny
            if d[0]:
                break
    arr = np.array(rows, dtype=np.float64)
    cells = torch.as_tensor(arr[:, 0:2], dtype=torch.int64)
    next_cells = torch.as_tensor(arr[:, 3:5], dtype=torch.int64)
    return Transitions(
        obs=env.observe(cells), action=torch.as_tensor(arr[:, 2], dtype=torch.int64),
        reward=torch.as_tensor(arr[:, 5], dtype=torch.float32), next_obs=env.observe(next_cells),
        done=torch.as_tensor(arr[:, 6], dtype=torch.float32), cells=cells, next_cells=next_cells,
        behaviour=torch.as_tensor(arr[:, 7], dtype=torch.int64), episodes=episodes,
        name=f"gridworld{env.size}x{env.size}",
    )


@torch.no_grad()
def evaluate_greedy(policy: Callable[[Tensor], Tensor], env: GridWorld, max_steps: int = 50,
                    device: torch.device | str = "cpu", generator: torch.Generator | None = None
                    ) -> dict[str, float]:
    """Run the greedy policy (argmax of ``policy(obs)``) from every non-goal cell at once.

    Returns ``success`` (percent of starts that reach the goal within ``max_steps``) and
    ``steps`` (mean steps to the goal over the successful starts; NaN if none). A slippery env
    draws its slips from ``generator``.
    """
    max_steps = integer("max_steps", max_steps, low=1)
    cells = torch.as_tensor(env.start_cells(), device=device)
    done = torch.zeros(len(cells), dtype=torch.bool, device=device)
    steps = torch.zeros(len(cells), dtype=torch.int64, device=device)
    for _ in range(max_steps):
        if bool(done.all()):
            break
        a = policy(env.observe(cells).to(device)).argmax(-1)
        nxt, _, d = env.step(cells, a, rng=generator)
        live = ~done
        cells = torch.where(live[:, None], nxt, cells)
        steps += live.long()
        done = done | (d & live)
    n_ok = int(done.sum())
    return {"success": 100.0 * n_ok / len(done),
            "steps": float(steps[done].double().mean()) if n_ok else float("nan")}


# ------------------------------------------------------------------------------ DICE losses
def _check_kind(kind: str) -> None:
    choice("kind", kind, FSTAR_KINDS)


def dice_fstar(y: Tensor, kind: str = "chi2") -> Tensor:
    """Convex conjugate f*(y) of the DICE f-divergence, elementwise (paper slug: ``odice``).

    ``"chi2"`` (Pearson chi^2 with x >= 0): w = max(0, y/2 + 1), f*(y) = y w - (w - 1)^2
    (= y + y^2/4 for y >= -2, -1 below); ``"rkl"`` (reverse KL): f*(y) = exp(y - 1).

    Example::

        dice_fstar(torch.tensor([-3.0, 0.0, 2.0]))     # tensor([-1., 0., 3.])
    """
    _check_kind(kind)
    if kind == "rkl":
        return torch.exp(y - 1)
    w = torch.clamp_min(y / 2 + 1, 0.0)
    return y * w - (w - 1) ** 2


def dice_weight(residual: Tensor, kind: str = "chi2", max_weight: float = 100.0) -> Tensor:
    """Detached policy-extraction weight from the forward residual, as in the official code.

    ``"chi2"``: min(max(0, y), max_weight) (the code's choice, not the chi^2 f'^-1 = y/2 + 1);
    ``"rkl"``: min(exp(y - 1), max_weight).
    """
    _check_kind(kind)
    max_weight = real_scalar("max_weight", max_weight, nonneg=True)
    y = residual.detach()
    w = torch.exp(y - 1) if kind == "rkl" else torch.clamp_min(y, 0.0)
    return torch.clamp_max(w, max_weight)


class DiceLosses(NamedTuple):
    """O-DICE's value-loss terms: ``forward`` (through V(s)), ``backward`` (through V(s')),
    ``init`` ((1 - lambda) mean V(s)) and the detached forward ``residual`` (for the policy)."""

    forward: Tensor
    backward: Tensor
    init: Tensor
    residual: Tensor


def _check_value_args(lam, gamma) -> tuple[float, float]:
    lam = real_scalar("lam", lam)
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1), got {lam!r}")
    gamma = real_scalar("gamma", gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    return lam, gamma


def _unpack(batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        obs, _, reward, next_obs, done = batch
    except (TypeError, ValueError):
        raise ValueError("batch must be (obs, action, reward, next_obs, done)") from None
    if reward.shape != done.shape or reward.shape[0] != obs.shape[0] or next_obs.shape != obs.shape:
        raise ValueError(f"batch shapes disagree: obs {tuple(obs.shape)}, reward {tuple(reward.shape)}, "
                         f"next_obs {tuple(next_obs.shape)}, done {tuple(done.shape)}")
    return obs, reward, next_obs, done


def _v(net: nn.Module, x: Tensor) -> Tensor:
    out = net(x)
    return out.squeeze(-1) if out.dim() > 1 else out


def odice_value_losses(v: nn.Module, v_target: nn.Module, batch, lam: float, gamma: float = 0.99,
                       kind: str = "chi2") -> DiceLosses:
    """O-DICE's forward and backward DICE value losses (paper slug: ``odice``).

    With V the online network and V_t the (stop-gradient) target network::

        L_f    = lam * mean f*( r + gamma (1 - done) V_t(s') - V(s) )     # gradient through V(s)
        L_b    = lam * mean f*( r + gamma (1 - done) V(s')   - V_t(s) )   # gradient through V(s')
        L_init = (1 - lam) * mean V(s)

    The semi-gradient update descends ``L_f + L_init``; O-DICE descends
    ``g_f + eta * (g_b)_perp + grad L_init`` (:class:`gradkit.optim.orthogonal.OrthogonalGradient`
    with ``main=L_f``, ``aux=L_b``, ``extra=L_init``). ``eta`` is the transform's, not a factor of
    ``L_b`` (the official code folds it into ``L_b``; the projection is linear, so it is the same).

    Example::

        L = odice_value_losses(v, v_target, (s, a, r, s2, done), lam=0.6)
        OrthogonalGradient(v.parameters()).backward(L.forward, L.backward, extra_loss=L.init)
    """
    lam, gamma = _check_value_args(lam, gamma)
    _check_kind(kind)
    obs, reward, next_obs, done = _unpack(batch)
    v_s, v_s2 = _v(v, obs), _v(v, next_obs)
    with torch.no_grad():
        vt_s, vt_s2 = _v(v_target, obs), _v(v_target, next_obs)
    notdone = 1.0 - done
    fwd = reward + gamma * notdone * vt_s2 - v_s
    bwd = reward + gamma * notdone * v_s2 - vt_s
    return DiceLosses(lam * dice_fstar(fwd, kind).mean(), lam * dice_fstar(bwd, kind).mean(),
                      (1.0 - lam) * v_s.mean(), fwd.detach())


def dice_true_loss(v: nn.Module, batch, lam: float, gamma: float = 0.99, kind: str = "chi2") -> tuple[Tensor, Tensor]:
    """The true-gradient DICE value loss (both V(s) and V(s') through the online network).

    ``(loss, residual)`` with loss = (1 - lam) mean V(s) + lam mean f*( r + gamma (1 - done) V(s') - V(s) )
    and ``residual`` the detached residual (paper slug: ``odice``, its ``true_g`` baseline).
    """
    lam, gamma = _check_value_args(lam, gamma)
    _check_kind(kind)
    obs, reward, next_obs, done = _unpack(batch)
    v_s, v_s2 = _v(v, obs), _v(v, next_obs)
    res = reward + gamma * (1.0 - done) * v_s2 - v_s
    return (1.0 - lam) * v_s.mean() + lam * dice_fstar(res, kind).mean(), res.detach()


def feature_cosine(features: Callable[[Tensor], Tensor], obs: Tensor, next_obs: Tensor) -> float:
    """Mean cosine similarity of ``features(s)`` and ``features(s')`` over the rows (feature
    co-adaptation, the O-DICE paper's diagnostic); rows with a zero feature vector count as 0."""
    with torch.no_grad():
        a, b = features(obs), features(next_obs)
        cos = nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return float(cos.mean())


def value_rank_correlation(v: Callable[[Tensor], Tensor], env: GridWorld, gamma: float = 0.99,
                           device: torch.device | str = "cpu") -> float:
    """Spearman rank correlation between ``v`` over every non-goal cell and the optimal value
    ``gamma^(d - 1)`` (d = Manhattan distance to the goal): 1 when V orders the cells by closeness
    to the goal, whatever its scale or offset (a DICE V carries a large offset); NaN for constant V."""
    from scipy.stats import spearmanr

    cells = env.start_cells()
    d = np.abs(cells - np.asarray(env.goal)).sum(-1)
    with torch.no_grad():
        out = v(env.observe(cells).to(device))
    vals = (out.squeeze(-1) if out.dim() > 1 else out).double().cpu().numpy()
    if not np.isfinite(vals).all() or np.ptp(vals) == 0:
        return float("nan")
    return float(spearmanr(vals, gamma ** (d - 1.0)).statistic)
