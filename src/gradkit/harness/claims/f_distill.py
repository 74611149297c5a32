"""Claim ``f-distill``: a Jensen-Shannon-weighted one-step distillation covers the modes of an imbalanced
mixture better than reverse-KL (DMD-style) distillation.

Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching" (arXiv 2502.15681).
Toy at laptop scale, 2-D: the teacher is the *exact* score of the VP-noised (cosine, T = 1000) mixture of 8
Gaussians on a circle of radius 4, std 0.15, weights (.3, .3, .1, .1, .05, .05, .05, .05) — the experiment
measures distillation, not teacher error. Each arm distils it into a one-step generator
``G(z) = 3 z + MLP(z)`` (MLP 2-128-128-2, last layer scaled down, so that G starts near the scaled identity
of ``z ~ N(0, I)``, i.e. ``N(0, 9 I)``: about uniform mode masses, TV ~ 0.35). Per generator step:
``fake_updates`` DSM updates of the fake-score MLP on fresh generator samples, one BCE update of the
density-ratio discriminator MLP (real: noised mixture samples; fake: noised generator samples; the same
``t`` range as the score terms), and one generator update with :class:`gradkit.generative.f_distill.FDistillLoss`
(DMD per-sample normalisation, weights normalised by their batch mean, ``log r`` clipped to +-5).

Arms (each the same seed: the same generator init and noise): ``reverse_kl`` (DMD; the baseline), ``js``
(ours), ``forward_kl``, and ``reverse_kl_replicate`` (reverse KL again from another seed's init and noise:
the negative control, i.e. how far two runs of the baseline differ by chance). Every arm tunes the
generator learning rate over the same grid on short runs scored by MMD to a validation sample of the
mixture cut by ``holdout`` (never the test sample). Metrics from 10k generator samples against fresh
mixture samples: per-mode mass TV (nearest mode), mode recall (modes holding >= 20% of their mass), RBF MMD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...data import Split
from ...generative.diffusion import GaussianDiffusion, VPSchedule, timestep_embedding
from ...generative.f_distill import FDistillLoss, dsm_loss, ratio_bce_loss
from ...generative.mixture import GaussianMixture, mode_coverage, rbf_mmd, ring_means
from ..protocol import Protocol, scaled
from .base import ArmContext, ArmResult, Claim, Primary, RunOutput, register
from .criteria import AllFinite, AllOf, Ratio
from .tuning import holdout, tune

SLUG = "f-distill"
OURS, BASELINE, FORWARD, REPLICATE = "js", "reverse_kl", "forward_kl", "reverse_kl_replicate"
ARMS = (BASELINE, OURS, FORWARD, REPLICATE)
KIND = {BASELINE: "reverse_kl", OURS: "js", FORWARD: "forward_kl", REPLICATE: "reverse_kl"}
WEIGHTS = (0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05)
REPLICATE_OFFSET = 100_003  # the replicate's init/noise seed = seed + offset
VAL_OFFSET = 7_919  # generator noise for validation samples
TEST_OFFSET = 15_485  # generator noise for test samples
HIST_BINS = 56
HIST_RANGE = 5.5


@dataclass(frozen=True)
class FDistillProtocol(Protocol):
    """The toy of the paper's mode-coverage argument; the numbers are the paper-free choices of this toy."""

    steps: int = scaled(smoke=60, quick=800, full=5000)  # generator updates
    tune_steps: int = scaled(smoke=20, quick=200, full=1000)  # generator updates per tuning trial
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)  # generator Adam learning rates (every arm: the same grid)
    batch: int = scaled(smoke=256, quick=256, full=512)
    fake_updates: int = 2  # fake-score DSM updates per generator update
    fake_warmup: int = scaled(smoke=30, quick=100, full=500)  # DSM updates on the initial generator first
    fake_lr: float = 3e-3
    disc_lr: float = 1e-3
    hidden: int = 128
    init_scale: float = 3.0  # G(z) = init_scale * z + MLP(z)
    num_timesteps: int = 1000
    t_min: float = 0.02
    t_max: float = 0.98
    clip: float = 5.0  # |log r| clip
    gan_weight: float = 0.0  # DMD2's non-saturating GAN term on the generator (0: the weighting alone)
    n_real: int = scaled(smoke=4000, quick=20000, full=50000)  # mixture samples (discriminator + validation)
    n_eval: int = scaled(smoke=2000, quick=10000, full=10000)  # generator samples for TV / recall
    n_mmd: int = scaled(smoke=1000, quick=2000, full=4000)  # samples per side for the MMD
    eval_every: int = scaled(smoke=20, quick=100, full=250)  # steps between TV points of the curve


# ------------------------------------------------------------------------------------------ models
class _Generator(nn.Module):
    def __init__(self, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.init_scale = init_scale
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        with torch.no_grad():
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.init_scale * z + self.mlp(z)


class _TimeMLP(nn.Module):
    """MLP on [x_t, sinusoidal embedding of t]; ``out`` outputs."""

    def __init__(self, hidden: int, out: int, emb: int = 16) -> None:
        super().__init__()
        self.emb = emb
        self.net = nn.Sequential(nn.Linear(2 + emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, timestep_embedding(t, self.emb).to(x_t)], 1))


class _FakeScore(nn.Module):
    """Student score ``s_q(x_t, t) = -eps_hat(x_t, t) / sigma_t`` (epsilon parametrisation)."""

    def __init__(self, hidden: int, schedule: VPSchedule) -> None:
        super().__init__()
        self.eps = _TimeMLP(hidden, 2)
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _, s = self.schedule.alpha_sigma(t, like=x_t)
        return -self.eps(x_t, t) / s[:, None]


# ------------------------------------------------------------------------------------------ training
def _setup(ctx: ArmContext) -> dict:
    p = ctx.p
    mix = GaussianMixture(ring_means(8, 4.0), torch.tensor(WEIGHTS, dtype=torch.float64), std=0.15)
    g = torch.Generator().manual_seed(ctx.seed)
    x = mix.sample(p.n_real + max(p.n_eval, p.n_mmd), generator=g)
    comp = torch.cdist(x.double(), mix.means).argmin(1)
    real = Split(x[:p.n_real], comp[:p.n_real], x[p.n_real:], comp[p.n_real:], name="ring8")
    fit_split, val_split = holdout(real, fraction=0.1, seed=ctx.seed)
    return {"mix": mix, "real": fit_split.x_train.to(ctx.device), "val": val_split.x_test.to(ctx.device),
            "test": real.x_test.to(ctx.device), "schedule": VPSchedule("cosine", p.num_timesteps)}


def _train(ctx: ArmContext, kind: str, lr: float, steps: int, seed: int, curve: bool) -> tuple[nn.Module, dict]:
    """One distillation run; returns the generator and curves (TV every ``eval_every`` steps)."""
    p, d, dev = ctx.p, ctx.data, ctx.device
    torch.manual_seed(seed)
    gen_noise = torch.Generator(device=dev).manual_seed(seed)
    sched, mix = d["schedule"], d["mix"]
    diff = GaussianDiffusion(sched)
    G = _Generator(p.hidden, p.init_scale).to(dev)
    fake = _FakeScore(p.hidden, sched).to(dev)
    disc = _TimeMLP(p.hidden, 1).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr)
    opt_f = torch.optim.Adam(fake.parameters(), lr=p.fake_lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=p.disc_lr)
    loss_fn = FDistillLoss(lambda x_t, t: mix.score(x_t, t, sched), fake, lambda x_t, t: disc(x_t, t).squeeze(1),
                           kind=kind, schedule=sched, clip=p.clip, gan_weight=p.gan_weight,
                           t_min=p.t_min, t_max=p.t_max)
    real, n_real = d["real"], d["real"].shape[0]

    def z(n: int) -> torch.Tensor:
        return torch.randn(n, 2, device=dev, generator=gen_noise)

    def fake_step() -> None:
        with torch.no_grad():
            x = G(z(p.batch))
        t = loss_fn.sample_t(p.batch, device=dev, generator=gen_noise)
        opt_f.zero_grad(set_to_none=True)
        dsm_loss(fake, x, sched, t=t, generator=gen_noise).backward()
        opt_f.step()

    for _ in range(p.fake_warmup):
        fake_step()
    curves: dict[str, list[float]] = {"tv": [], "weight_max": [], "step": []}
    wmax = 1.0  # before the first update: an untrained discriminator gives about constant weights
    for step in range(steps + 1):
        if curve and (step % p.eval_every == 0 or step == steps):
            with torch.no_grad():
                cov = mode_coverage(G(z(2000)), mix.means, mix.weights)
            curves["tv"].append(cov["tv"])
            curves["weight_max"].append(wmax)
            curves["step"].append(float(step))
        if step == steps:
            break
        for _ in range(p.fake_updates):
            fake_step()
        with torch.no_grad():
            x = G(z(p.batch))
            xr = real[torch.randint(0, n_real, (p.batch,), device=dev, generator=gen_noise)]
            t = loss_fn.sample_t(p.batch, device=dev, generator=gen_noise)
            x_t, xr_t = diff.q_sample(x, t, z(p.batch)), diff.q_sample(xr, t, z(p.batch))
        opt_d.zero_grad(set_to_none=True)
        ratio_bce_loss(lambda a, b: disc(a, b).squeeze(1), xr_t, x_t, t).backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        terms = loss_fn.terms(G(z(p.batch)), generator=gen_noise)
        terms.loss.backward()
        opt_g.step()
        wmax = float(terms.weight.max())
    return G, curves


def _samples(ctx: ArmContext, G: nn.Module, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    with torch.no_grad():
        return G(torch.randn(n, 2, device=ctx.device, generator=g))


def _arm(ctx: ArmContext) -> ArmResult:
    p, d, arm = ctx.p, ctx.data, ctx.arm
    kind = KIND[arm]
    seed = ctx.seed + (REPLICATE_OFFSET if arm == REPLICATE else 0)

    def trial(lr: float) -> float:
        G, _ = _train(ctx, kind, lr, p.tune_steps, seed, curve=False)
        return rbf_mmd(_samples(ctx, G, p.n_mmd, seed + VAL_OFFSET), d["val"][:p.n_mmd])

    if arm == REPLICATE and "baseline_tuned" in ctx.shared:  # the baseline's own choice, re-run from new seeds
        tuned = ctx.shared["baseline_tuned"]
    else:
        tuned = tune(p.lr_grid, trial, mode="min")
        if arm == BASELINE:
            ctx.shared["baseline_tuned"] = tuned
    G, curves = _train(ctx, kind, tuned.value, p.steps, seed, curve=True)
    x = _samples(ctx, G, max(p.n_eval, p.n_mmd), seed + TEST_OFFSET)
    cov = mode_coverage(x[:p.n_eval], d["mix"].means, d["mix"].weights)
    mmd = rbf_mmd(x[:p.n_mmd], d["test"][:p.n_mmd])
    ctx.shared.setdefault("hist", {})[arm] = _hist(x[:p.n_eval])
    ctx.shared["steps_x"] = curves.pop("step")
    metrics = {"tv": cov["tv"], "recall": cov["recall"], "mmd": mmd, "lr": float(tuned.value),
               "weight_max_final": curves["weight_max"][-1]}
    for k, q in enumerate(cov["mass"]):
        metrics[f"mass_{k}"] = q
    return ArmResult(metrics, curves=curves, info={"tuned": tuned.as_info()})


def _hist(x: torch.Tensor) -> list:
    """A 2-D histogram of samples as a [0, 1] image (rows: y from top to bottom)."""
    h = torch.histogramdd(x.double().cpu(), bins=[HIST_BINS, HIST_BINS],
                          range=[-HIST_RANGE, HIST_RANGE, -HIST_RANGE, HIST_RANGE]).hist
    img = h.T.flip(0)
    img = (img / img.max().clamp_min(1)).sqrt()  # sqrt: light modes stay visible
    return [img.tolist()]


def _finish(ctx: ArmContext, out: RunOutput) -> None:
    p, d = ctx.p, ctx.data
    rows = {"teacher (exact mixture)": _hist(d["test"][:p.n_eval])}
    rows.update({arm: h for arm, h in ctx.shared.get("hist", {}).items()})
    out.info["images"] = {"generated samples (2-D histogram, sqrt scale)": rows}
    x = ctx.shared.get("steps_x", [])
    out.info["curve_axes"] = {"tv": {"x": x, "xlabel": "generator step", "ylabel": "per-mode mass TV"},
                              "weight_max": {"x": x, "xlabel": "generator step",
                                             "ylabel": "max normalised weight h(r)/mean"}}
    out.info["target_weights"] = list(WEIGHTS)


CLAIM = register(Claim(
    slug=SLUG,
    title="One-step Diffusion Models with f-Divergence Distribution Matching",
    arxiv="2502.15681",
    statement=(
        "Distilling the exact score of an imbalanced 8-Gaussian ring into a one-step generator, the "
        "Jensen-Shannon weighting h(r) = r/(1+r) (ratio from a discriminator) covers the modes better than "
        "reverse KL (DMD): per-mode mass TV(js) <= 0.8 x TV(reverse_kl) and MMD(js) <= 1.2 x "
        "MMD(reverse_kl) (seed means); a second reverse-KL run from other seeds must not pass the same test"
    ),
    paper_figure=(
        "State-of-the-art one-step generation with JS on ImageNet-64 and zero-shot MS-COCO (SD v1.5 teacher), "
        "beating DMD2 (reverse KL); reported FIDs about 1.16 vs 1.28 and 7.4 vs 8.35 (unconfirmed against the "
        "paper's tables); forward KL also beats reverse KL; the stated reason is mode coverage (less "
        "mode-seeking divergences weight under-covered regions, r > 1, more)"
    ),
    protocol=FDistillProtocol,
    data="ring8 (procedural 2-D Gaussian mixture, exact teacher)",
    setup=_setup,
    arms={arm: _arm for arm in ARMS},
    finish=_finish,
    criterion=AllOf(Ratio("tv", OURS, BASELINE, at_most=0.8), Ratio("mmd", OURS, BASELINE, at_most=1.2),
                    AllFinite()),
    primary=Primary(metric="tv", ours=OURS, baseline=BASELINE, unit="TV", ceiling=0.0, ceiling_tol=0.01),
    control={OURS: REPLICATE},
    control_note=("reverse_kl_replicate (reverse KL from another seed's generator init and noise) stands in "
                  "for js: if two runs of the baseline differ by as much as the claimed effect, the seed "
                  "spread covers the difference and the verdict is INCONCLUSIVE"),
    uses=("gradkit.generative.f_distill.FDistillLoss", "gradkit.generative.f_distill.f_divergence_weight",
          "gradkit.generative.f_distill.dsm_loss", "gradkit.generative.f_distill.ratio_bce_loss",
          "gradkit.generative.mixture.GaussianMixture", "gradkit.generative.mixture.mode_coverage",
          "gradkit.generative.mixture.rbf_mmd", "gradkit.generative.diffusion.VPSchedule"),
    notes=(
        "Why the task can discriminate: the generator starts at about uniform mode masses (TV ~ 0.35 to the "
        "target weights), so the baseline has room above the TV ceiling of 0 and a mode-seeking divergence "
        "can keep or lose the light modes; the teacher score is exact, so a difference between arms is the "
        "weighting h(r) and nothing else (same init, noise, fake-score and discriminator training, same "
        "learning-rate grid tuned on a validation mixture sample). The control is a replicate of the "
        "baseline, so a gap that seed noise alone produces cannot pass. "
        "Criterion as the paper's mode-coverage argument states it (TV down by 20%, MMD not worse by more "
        "than 20%). The DMD2 GAN term is available (gan_weight) but 0 by default, so that the arms differ "
        "only in the f-divergence weighting; the two-stage normalisation is read as DMD's per-sample "
        "normalisation of the score difference followed by batch-mean normalisation of h(r). "
        "Out of reach here: the paper's ImageNet-64 / MS-COCO / SDXL teachers, its networks and its FID "
        "pipeline; this toy checks only the mechanism (weights h(r) that favour under-covered regions)."
    ),
    scale_note=(
        "The toy does not reproduce the paper's premise: with an exact teacher, reverse KL (DMD) reaches every "
        "mode and corrects the initially uniform mode masses (TV 0.35 -> 0.13 at quick, 0.03 after 5000 steps "
        "in a full-scale seed), so a bounded JS weighting has no under-covered mass to win back, and the "
        "one-step MLP generator puts its mass on a ring through the modes rather than on separate clusters; "
        "a task where reverse KL demonstrably drops modes (a learned, imperfect teacher, higher dimension) "
        "would settle it. The paper's image-scale FIDs are out of reach on CPU."
    ),
    plots=("tv", "weight_max"),
    bounds={"tv": (0.0, 1.0), "recall": (0.0, 1.0), "mmd": (0.0, 6.0), "weight_max": (0.0, 1e6)},
))
