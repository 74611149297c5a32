"""Claim ``odice``: the orthogonal-gradient update rescues true-gradient DICE value learning.

Mao, Xu, Zhang, Zhan, "ODICE: Revealing the Mystery of Distribution Correction Estimation via
Orthogonal-gradient Update", ICLR 2024 (arXiv 2402.00348).

Protocol (papers/odice.md, laptop scale): a deterministic 8x8 gridworld (goal in the corner, +1 and
termination on entry, gamma = 0.99); per seed, an offline data set of 200 episodes (<= 50 steps,
uniformly random non-goal starts) from a 50/50 mix of an epsilon = 0.3-noisy shortest-path policy
and the uniform random policy, rewards relabelled as the official code does for AntMaze (0 on
entering the goal, -3 per other step). A ``bc`` arm (unweighted behaviour cloning) is a reference,
not judged. V: MLP 2-64-64-1 (ReLU) on (x, y) scaled to [-1, 1]; target V:
EMA (beta = 0.005) of V; policy: MLP 2-64-64-4 softmax trained by weighted behaviour cloning with
w = min(max(0, forward residual), 100) (the official code's chi^2 weight). Pearson chi^2 f*,
lambda = 0.6. Three arms share the data, the initial weights, the batch order and everything else
except the value update:

- ``semi``: descend L_f + L_init (gradient through V(s) only, target V(s')).
- ``true``: descend (1 - lambda) mean V(s) + lambda mean f*(r + gamma V(s') - V(s)), both through V.
- ``orthogonal``: g_f + eta (g_b)_perp + grad L_init with eta = 1, one global projection
  (:class:`gradkit.optim.orthogonal.OrthogonalGradient`).

Adam (lr 1e-3 for V and policy, policy weight decay 1e-4), batch 256 sampled with replacement.
Quick: 2,000 steps; the greedy policy is evaluated from all 63 non-goal cells after every 100
steps. Metric: final success rate (percent of start cells reaching the goal within 50 steps);
also the mean cosine similarity of V's penultimate features of s and s' over the data set.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.offline_rl import (GridWorld, Transitions, dice_true_loss, dice_weight, evaluate_greedy,
                               feature_cosine, make_gridworld_dataset, odice_value_losses,
                               value_rank_correlation)
from ..engine import cpu_threads, fit, seed_everything
from ..optim.orthogonal import OrthogonalGradient
from .base import Claim, Primary, RunContext, RunOutput, register
from .criteria import AllOf, Drop, Gain

SLUG = "odice"
ARMS = ("semi", "true", "orthogonal", "bc")  # bc: unweighted behaviour cloning, reference only
SIZE, EPISODES, MAX_STEPS, EPSILON = 8, 200, 50, 0.3
LAM, ETA, GAMMA, BETA = 0.6, 1.0, 0.99, 0.005
HIDDEN, BATCH, LR, POLICY_WD = 64, 256, 1e-3, 1e-4
STEPS_PER_EPOCH = 100
# the official code's relabelling of AntMaze's sparse goal reward (main_odice_rl.py): 0 at the goal,
# -3 per other step; with the raw 1 / 0 reward the chi^2 DICE objective (E[y] = -2/3 at lambda = 0.6)
# pays +2/3 per step before termination and prefers never reaching the goal
GOAL_REWARD, STEP_REWARD = 0.0, -3.0


def make_mlp(n_in: int, n_out: int, hidden: int = HIDDEN) -> nn.Sequential:
    """``n_in -> hidden -> hidden -> n_out`` ReLU MLP; ``net[:-1]`` gives the penultimate features."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class _Mean:
    """Running mean and max-abs of floats (per epoch)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, v: float) -> None:
        self.values.append(float(v))

    def pop(self) -> tuple[float, float]:
        vs, self.values = self.values, []
        if not vs:
            return float("nan"), float("nan")
        return sum(vs) / len(vs), max(abs(v) for v in vs)


@torch.no_grad()
def _ema(target: nn.Module, source: nn.Module, beta: float) -> None:
    for pt, p in zip(target.parameters(), source.parameters()):
        pt.lerp_(p, beta)


def _run_arm(ctx: RunContext, env: GridWorld, data: Transitions, arm: str, epochs: int):
    gen = seed_everything(ctx.seed)
    agent = nn.ModuleDict({"v": make_mlp(2, 1), "pi": make_mlp(2, env.n_actions)}).to(ctx.device)
    v, pi = agent["v"], agent["pi"]
    v_target = make_mlp(2, 1).to(ctx.device)
    v_target.load_state_dict(v.state_dict())
    v_target.requires_grad_(False)
    opt = torch.optim.Adam([{"params": v.parameters(), "weight_decay": 0.0},
                            {"params": pi.parameters(), "weight_decay": POLICY_WD}], lr=LR)
    og = OrthogonalGradient(v.parameters(), eta=ETA) if arm == "orthogonal" else None
    perp_cos, fb_cos, wpos = _Mean(), _Mean(), _Mean()
    conflicts = [0, 0]  # steps with cos(g_f, g_b) < 0, steps
    tensors = data.tensors()
    n = len(data)

    def batches(epoch: int):
        idx = torch.randint(n, (STEPS_PER_EPOCH, BATCH), generator=gen).to(ctx.device)
        return (tuple(t[i] for t in tensors) for i in idx)

    def compute_loss(model: nn.ModuleDict, batch) -> Tensor:
        obs, action = batch[0], batch[1]
        logp = F.log_softmax(model["pi"](obs), -1).gather(1, action[:, None]).squeeze(1)
        if arm == "bc":
            return -logp.mean()
        if arm == "true":
            v_loss, residual = dice_true_loss(model["v"], batch, LAM, GAMMA)
        else:
            L = odice_value_losses(model["v"], v_target, batch, LAM, GAMMA)
            residual = L.residual
            if og is None:
                v_loss = L.forward + L.init
            else:
                v_loss = og.surrogate(L.forward, L.backward, extra_loss=L.init)
                perp_cos.add(og.last["perp_cos"])
                fb_cos.add(og.last["cos"])
                conflicts[0] += og.last["cos"] < 0
                conflicts[1] += 1
        w = dice_weight(residual)
        wpos.add(float((w > 0).float().mean()))
        return v_loss - (w * logp).mean()

    def on_step_start(step: int) -> None:
        if step > 0:  # EMA after every update (the first one happens before step 1)
            _ema(v_target, v, BETA)

    def evaluate(model: nn.ModuleDict) -> dict[str, float]:
        model.eval()
        out = evaluate_greedy(model["pi"], env, max_steps=MAX_STEPS, device=ctx.device)
        with torch.no_grad():
            v_mean = float(model["v"](data.obs).mean())
        model.train()
        m = {"success": out["success"], "steps": out["steps"], "v_mean": v_mean,
             "feature_cos": feature_cosine(model["v"][:-1], data.obs, data.next_obs),
             "v_rank_corr": value_rank_correlation(model["v"], env, GAMMA, device=ctx.device)}
        if arm != "bc":
            m["weight_pos_frac"] = wpos.pop()[0]
        if og is not None:
            mean_cos, _ = fb_cos.pop()
            _, max_perp = perp_cos.pop()
            m.update(fb_cos=mean_cos, max_abs_perp_cos=max_perp)
        return m

    hist = fit(agent, opt, batches, epochs=epochs, compute_loss=compute_loss, evaluate=evaluate,
               on_step_start=on_step_start, progress=ctx.progress, desc=f"{SLUG}/{arm}")
    nan = float("nan")
    finished = len(hist.records) == epochs and all(math.isfinite(x) for x in hist.series("train_loss"))
    k = min(5, len(hist.records))
    metrics = {
        "success": hist.last("success") if finished else nan,
        "success_last5": sum(hist.series("success")[-k:]) / k if finished else nan,
        "feature_cos": hist.last("feature_cos") if finished else nan,
        "v_mean": hist.last("v_mean") if finished else nan,
        "v_rank_corr": hist.last("v_rank_corr") if finished else nan,
        "diverged": float(not finished),
    }
    if arm != "bc":
        metrics["weight_pos_frac"] = hist.last("weight_pos_frac") if finished else nan
    curves = {c: hist.series(c) for c in ("success", "feature_cos", "v_mean", "v_rank_corr", "train_loss")}
    info = {"steps": hist.steps}
    if og is not None:
        metrics["max_abs_perp_cos"] = max(hist.series("max_abs_perp_cos"), default=nan)
        metrics["fb_cos"] = sum(hist.series("fb_cos")) / max(len(hist.series("fb_cos")), 1)
        metrics["conflict_frac"] = conflicts[0] / max(conflicts[1], 1)
        curves["fb_cos"] = hist.series("fb_cos")
    return metrics, curves, info


def run(ctx: RunContext) -> RunOutput:
    # 2-64-64 MLPs at batch 256 gain nothing from intra-op threads on a shared 2-core machine
    with cpu_threads(1, ctx.device):
        return _run(ctx)


def _run(ctx: RunContext) -> RunOutput:
    epochs = ctx.pick(smoke=3, quick=20, full=100)
    env = GridWorld(SIZE, goal=(SIZE - 1, SIZE - 1))
    data = make_gridworld_dataset(env, episodes=EPISODES, max_steps=MAX_STEPS, epsilon=EPSILON,
                                  expert_fraction=0.5, seed=ctx.seed, goal_reward=GOAL_REWARD,
                                  step_reward=STEP_REWARD).to(ctx.device)
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    info: dict = {}
    for arm in ARMS:
        m, c, i = _run_arm(ctx, env, data, arm, epochs)
        metrics[arm] = m
        for name, series in c.items():
            curves.setdefault(name, {})[arm] = series
        info[arm] = i
    info.update(epochs=epochs, steps=epochs * STEPS_PER_EPOCH, transitions=len(data),
                goal_transitions=int(data.done.sum()), lam=LAM, eta=ETA, gamma=GAMMA, beta=BETA,
                lr=LR, batch=BATCH, hidden=HIDDEN, policy_wd=POLICY_WD,
                goal_reward=GOAL_REWARD, step_reward=STEP_REWARD)
    return RunOutput(metrics=metrics, data=data.name, curves=curves, info=info)


def _rule() -> AllOf:
    return AllOf(
        Gain(metric="success", ours="orthogonal", baseline="true", at_least=10.0),
        Drop(metric="success", ours="orthogonal", baseline="semi", at_most=5.0),
    )


register(Claim(
    slug=SLUG,
    title="ODICE: Revealing the Mystery of Distribution Correction Estimation via Orthogonal-gradient Update",
    arxiv="2402.00348",
    statement=(
        "In offline RL with a DICE value objective (Pearson chi^2, lambda = 0.6), the orthogonal-gradient "
        "update (forward gradient + the backward gradient's component orthogonal to it, eta = 1) gives a "
        "greedy policy whose success rate is >= 10 points above true-gradient DICE and at most 5 points "
        "below the semi-gradient update (8x8 gridworld, 200 mixed-quality episodes, mean of seeds)"
    ),
    paper_figure=(
        "D4RL: O-DICE reaches SOTA-level normalised scores, clearly above true-gradient DICE methods "
        "(e.g. OptiDICE) and at or above semi-gradient IQL/SQL on MuJoCo and AntMaze (Table 1); "
        "toy example: true-gradient DICE fails, the orthogonal update recovers good values and lowers "
        "the cosine similarity of features of s and s' (numbers unconfirmed)"
    ),
    criterion=_rule(),
    primary=Primary(metric="success", ours="orthogonal", baseline="true", unit="%"),
    run=run,
    uses=("gradkit.optim.orthogonal.OrthogonalGradient", "gradkit.optim.orthogonal.orthogonal_combine",
          "gradkit.data.offline_rl.odice_value_losses", "gradkit.data.offline_rl.dice_true_loss",
          "gradkit.data.offline_rl.dice_fstar", "gradkit.data.offline_rl.make_gridworld_dataset"),
    real_data="",
    notes=(
        "Laptop-scale stand-in for D4RL (not available offline): the spec's 8x8 gridworld. Choices the "
        "spec leaves open, fixed before any run: uniformly random non-goal start cells for the data "
        "episodes, the behaviour mix chosen per episode, Adam lr 1e-3 (the paper's 2e-4 is for 1M steps), "
        "one V head (no twin heads, no LayerNorm), a fresh data set per seed (arms share it). Rewards: the "
        "official code's AntMaze relabelling (0 at the goal, -3 per step), adopted after a first run with "
        "the spec's raw 1/0 reward (seed 0) showed the dual does not aim at the goal: with the raw reward "
        "the chi^2 dual (mean residual -2/3 at lambda = 0.6) pays +2/3 per step before termination, V "
        "ranks cells far from the goal highest, and at quick scale (seeds 0-2) semi and orthogonal reach "
        "0% while true reaches 100% (its V collapses to about -170, making the weights near-uniform BC). "
        "bc = unweighted behaviour cloning (reference, not judged). success = "
        "final greedy success rate over the 63 start cells; success_last5 = mean of the last 5 "
        "evaluations (every 100 steps). feature_cos = mean cosine of V's penultimate (post-ReLU) features "
        "of s and s' over the data set (the paper's co-adaptation diagnostic; expected orthogonal < true, "
        "logged, not judged). v_rank_corr = Spearman correlation of V over the 63 cells with the optimal "
        "values; weight_pos_frac = fraction of the last epoch's batch rows with a positive policy weight. "
        "For the orthogonal arm: fb_cos = mean cos(g_f, g_b), conflict_frac = "
        "fraction of steps with cos(g_f, g_b) < 0, max_abs_perp_cos = max over steps of "
        "|cos(g_b_perp, g_f)| (0 up to rounding). A non-finite loss makes that arm's metrics NaN."
    ),
    plots=("success", "feature_cos", "v_mean"),
))
